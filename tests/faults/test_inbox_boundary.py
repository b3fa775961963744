"""The inbox is a boundary: a directory swapped for a symlink never leads `watch` outside it.

The issue's case, with a real `watch` process: `inbox/sub/x.csv` is written (an event), then, while it
settles, `inbox/sub` is replaced by a symlink to a directory outside holding a file of the same name. Before
the fix `watch` delivered the outside file and, with `SMT_AFTER_SEND=delete`, deleted it. A sentinel that
lands after the swap proves the watcher got past that point: once it is delivered, anything earlier would
have been too.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from conftest import UPLOAD_TOKEN, wait_for
from faults.support import assert_clean, sha, subprocess_env, watch_process

pytestmark = pytest.mark.faults

SETTLE = 2.0  # long enough that the swap below always happens inside it


@pytest.mark.parametrize("after_send", ["delete", "move"])
def test_a_directory_swapped_for_a_symlink_is_never_followed(base_env: dict[str, str], tmp_path: Path,
                                                             receiver: Any, after_send: str) -> None:
    env = subprocess_env(base_env, tmp_path / "home", SMT_UPLOAD_URL=f"{receiver.url}/upload",
                         SMT_UPLOAD_TOKEN=UPLOAD_TOKEN, SMT_SETTLE_SECONDS=str(SETTLE), SMT_VALIDATE="0",
                         SMT_AFTER_SEND=after_send)
    inbox = Path(env["SMT_LOCAL_DIR"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    secret = elsewhere / "x.csv"
    secret.write_bytes(b"ESIID,X\noutside,1\n")
    with watch_process(env, tmp_path / "watch.log") as w:
        (inbox / "sub").mkdir()
        (inbox / "sub" / "x.csv").write_bytes(b"ESIID,X\ninside,2\n")
        shutil.rmtree(inbox / "sub")  # at once, well inside the settle time
        os.symlink(elsewhere, inbox / "sub")
        sentinel = inbox / "sentinel.csv"
        sentinel.write_bytes(b"ESIID,X\nsentinel,3\n")
        wait_for(lambda: sha(sentinel.read_bytes() if sentinel.exists() else b"") in
                 {r["sha256"] for r in receiver.stored()} or "Deleted sentinel.csv" in w.text()
                 or "Moved sentinel.csv" in w.text(), 30, "the sentinel delivered")
        assert w.stop() == 0
    delivered = {r["sha256"] for r in receiver.stored()}
    assert sha(b"ESIID,X\noutside,1\n") not in delivered, "a file outside the inbox was delivered"
    assert secret.read_bytes() == b"ESIID,X\noutside,1\n", "a file outside the inbox was touched"
    assert sorted(p.name for p in elsewhere.iterdir()) == ["x.csv"]
    assert_clean(w.text(), "watch log")


def test_an_inbox_that_is_itself_a_symlink_keeps_working(base_env: dict[str, str], tmp_path: Path,
                                                         receiver: Any) -> None:
    """The operator's own symlink at the root is followed (once); only what is below it is held to the rule."""
    real = tmp_path / "real-inbox"
    (real / "sub").mkdir(parents=True)
    link = tmp_path / "inbox-link"
    os.symlink(real, link)
    env = subprocess_env(base_env, tmp_path / "home", SMT_UPLOAD_URL=f"{receiver.url}/upload",
                         SMT_UPLOAD_TOKEN=UPLOAD_TOKEN, SMT_SETTLE_SECONDS="0.1", SMT_VALIDATE="0",
                         SMT_AFTER_SEND="delete", SMT_LOCAL_DIR=str(link))
    data = b"ESIID,X\nvia-link,1\n"
    with watch_process(env, tmp_path / "watch.log") as w:
        (real / "sub" / "a.csv").write_bytes(data)
        wait_for(lambda: not (real / "sub" / "a.csv").exists(), 30, "delivered, then deleted after delivery")
        assert w.stop() == 0
    assert [r["sha256"] for r in receiver.stored()] == [sha(data)]
    assert_clean(w.text(), "watch log")


@pytest.mark.timeout(600)
def test_a_file_landing_at_the_top_of_a_symlinked_inbox_is_delivered_live(base_env: dict[str, str], tmp_path: Path,
                                                                          receiver: Any) -> None:
    """SMT_LOCAL_DIR a symlink to the real directory: a file written at its top while `watch` runs is seen
    by the observer (not by the rescan, an hour away here). When the symlink is swapped to another directory,
    that one is watched and scanned, and a file landing in the old target is never read."""
    real, other = tmp_path / "real-inbox", tmp_path / "other-inbox"
    real.mkdir()
    other.mkdir()
    link = tmp_path / "inbox-link"
    os.symlink(real, link)
    env = subprocess_env(base_env, tmp_path / "home", SMT_UPLOAD_URL=f"{receiver.url}/upload",
                         SMT_UPLOAD_TOKEN=UPLOAD_TOKEN, SMT_SETTLE_SECONDS="0.1", SMT_VALIDATE="0",
                         SMT_RESCAN_SECONDS="3600", SMT_LOCAL_DIR=str(link))

    def delivered(data: bytes) -> bool:
        return sha(data) in {r["sha256"] for r in receiver.stored()}

    with watch_process(env, tmp_path / "watch.log") as w:
        live = b"ESIID,X\nlive-at-the-top,1\n"
        (real / "a.csv").write_bytes(live)
        wait_for(lambda: delivered(live), 90, "a file at the top of a symlinked inbox delivered live")

        waiting = b"ESIID,X\nalready-in-the-new-target,2\n"
        (other / "b.csv").write_bytes(waiting)
        os.symlink(other, tmp_path / "inbox-link.new")
        os.replace(tmp_path / "inbox-link.new", link)  # what `ln -sfn` does: the new link renamed over the old
        wait_for(lambda: delivered(waiting), 90, "the new target scanned after the swap")
        stale = b"ESIID,X\nin-the-old-target,3\n"
        (real / "c.csv").write_bytes(stale)
        fresh = b"ESIID,X\nlive-in-the-new-target,4\n"
        (other / "d.csv").write_bytes(fresh)
        wait_for(lambda: delivered(fresh), 90, "a file in the new target delivered live")
        assert w.stop() == 0
    assert not delivered(stale), "a file in the directory the inbox no longer names was delivered"
    assert len(receiver.stored()) == 3
    assert "now leads to" in w.text()
    assert_clean(w.text(), "watch log")
