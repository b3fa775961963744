"""README promises about `watch` that no other test pinned down (found by the mutants in
tests/mutants/watch.toml; each test names the mutants it was checked against).

Real parts only: a real watchdog observer on a temp inbox, the real receiver on loopback, real SQLite (and
real PostgreSQL for the tests of claims, duplicates and backoff, marked ``both_ledgers``).
Every wait is a condition with a deadline. "Never taken" is proven with SMT_WORKERS=1 and sentinels: one
worker takes jobs in queue order, so once a sentinel that landed after the files under test (and after an
earlier sentinel was delivered) is delivered, those files were either refused or already handled.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import UPLOAD_TOKEN, wait_for, watching, write_csv
from smt_watch.config import Settings
from smt_watch.reference.receiver import Fault
from smt_watch.statedir import open_ledger

Make = Callable[..., Settings]

# Temporary names, spelled as writers spell them (any case); SMT_PATTERNS="*" matches every one of them.
TEMP_NAMES = ("a.csv.part", "b.CSV.PARTIAL", "c.tmp", "d.csv.filepart", "e.csv.crdownload", "f.csv~")
GROW_SECONDS = 3.5  # how long the file under test keeps changing without any inotify close event: past the
# 2 s settle time (a broken settler takes it then, a partial file), and 5 s proved no more
GROW_STEP_SECONDS = 0.05  # between two changes: far below the 2 s settle time


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def settings_for(make_settings: Make, receiver: Any, **env: str) -> Settings:
    defaults = {"SMT_UPLOAD_URL": f"{receiver.url}/upload", "SMT_UPLOAD_TOKEN": UPLOAD_TOKEN,
                "SMT_SETTLE_SECONDS": "0.1"}
    return make_settings(**{**defaults, **env})


def stored_names(receiver: Any) -> list[str]:
    return sorted(r["filename"] for r in receiver.stored())


def ledger_names(settings: Settings) -> list[str]:
    with open_ledger(settings) as ledger:
        return sorted(r.filename for r in ledger.rows())


def test_hidden_and_temporary_names_are_never_taken_even_when_patterns_match(
        make_settings: Make, receiver: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """SMT_PATTERNS="*" matches every name here, so only the hidden/temporary rules keep them out, on both
    paths a file can come in by: the scan at start (files already there) and inotify events (files landing
    while watching, and a hidden directory moved in whole). Checked against watch-temp-event,
    watch-temp-scan, watch-temp-suffixes, watch-temp-tilde, watch-hidden-scan-entry, watch-hidden-new-dir
    and watch-hidden-event: each makes a refused file reach the ledger (or the start scan's count)."""
    settings = settings_for(make_settings, receiver, SMT_PATTERNS="*", SMT_VALIDATE="0", SMT_WORKERS="1")
    box = settings.local_dir
    outside = write_csv(tmp_path / "outside" / "target.csv", seed=99)
    # Present at start: only the scan can find these.
    for i, name in enumerate(TEMP_NAMES):
        write_csv(box / "early" / name, seed=10 + i)
    write_csv(box / "early" / ".dot.csv", seed=20)
    write_csv(box / ".hidden" / "inner.csv", seed=21)
    (box / "early" / "link.csv").symlink_to(outside)
    write_csv(box / "early" / "first.csv", seed=1)
    with caplog.at_level(logging.INFO, logger="smt_watch"), watching(settings):
        # The start scan's own count: exactly one candidate (first.csv) among everything above.
        assert "1 file(s) to look at" in caplog.text, caplog.text
        wait_for(lambda: stored_names(receiver) == ["first.csv"], 10, "first.csv delivered")
        # Landing while watching: events only (the periodic rescan is 300 s away).
        for i, name in enumerate(TEMP_NAMES):
            write_csv(box / name, seed=30 + i)
        write_csv(box / ".late.csv", seed=40)
        staged = tmp_path / "staging" / ".late-hidden"
        write_csv(staged / "inner2.csv", seed=41)
        os.rename(staged, box / ".late-hidden")  # a whole hidden directory moved in: scanned, never taken
        write_csv(box / "second.csv", seed=2)
        wait_for(lambda: "second.csv" in stored_names(receiver), 10, "second.csv delivered")
        write_csv(box / "third.csv", seed=3)  # lands after everything above was queued: one worker, in order
        wait_for(lambda: "third.csv" in stored_names(receiver), 10, "third.csv delivered")
    assert ledger_names(settings) == ["first.csv", "second.csv", "third.csv"]
    assert stored_names(receiver) == ["first.csv", "second.csv", "third.csv"]
    assert sha(outside.read_bytes()) not in {r["sha256"] for r in receiver.stored()}


def test_a_file_that_keeps_changing_without_events_is_not_taken(make_settings: Make, receiver: Any,
                                                                 tmp_path: Path) -> None:
    """Size and mtime must hold still for SMT_SETTLE_SECONDS even when no inotify event says the file
    changed: here it grows by ``truncate`` (no open descriptor, so no close-after-write event and no writer
    for the lease check to see), so only the settler's re-stat at the due time can notice. Checked against
    watch-settle-restart (a changed file taken at once if nobody holds it open): it sends a partial file."""
    settings = settings_for(make_settings, receiver, SMT_SETTLE_SECONDS="2.0", SMT_VALIDATE="0")
    staged = write_csv(tmp_path / "staging" / "growing.csv")
    target = settings.local_dir / "growing.csv"
    with watching(settings) as service:
        os.rename(staged, target)  # one moved event; the changes below produce none the watcher listens to
        size = target.stat().st_size
        end = time.monotonic() + GROW_SECONDS
        while time.monotonic() < end:
            size += 1
            os.truncate(target, size)
            assert receiver.stored() == [], "taken while it was still changing"
            time.sleep(GROW_STEP_SECONDS)  # the behaviour under test: a change every 50 ms, for 3.5 s
        wait_for(lambda: service.counts.sent == 1, 15, "growing.csv delivered once it held still")
    [row] = receiver.stored()
    assert row["sha256"] == sha(target.read_bytes()) and row["sizeBytes"] == size


@pytest.mark.both_ledgers
def test_a_duplicate_under_another_name_gets_the_after_send_action(make_settings: Make, receiver: Any,
                                                                    tmp_path: Path) -> None:
    """SMT_AFTER_SEND=delete: the second name holds bytes already delivered, so it counts as delivered and
    is deleted too. Checked against watch-after-send-duplicate: two.csv (or one.csv) stays."""
    settings = settings_for(make_settings, receiver, SMT_AFTER_SEND="delete")
    src = write_csv(tmp_path / "src.csv")
    with watching(settings) as service:
        for name in ("one.csv", "two.csv"):
            (settings.local_dir / name).write_bytes(src.read_bytes())
        wait_for(lambda: service.counts.sent + service.counts.duplicate == 2, 10, "both names handled")
        wait_for(lambda: not any(settings.local_dir.iterdir()), 10, "both names deleted after delivery")
    assert len(receiver.state.requests) == 1


@pytest.mark.both_ledgers
def test_a_file_changed_after_delivery_is_left_for_the_next_pass(make_settings: Make, receiver: Any) -> None:
    """SMT_AFTER_SEND=delete must not delete a file that changed while its old bytes were being delivered:
    that is new content, delivered in its turn (and deleted then). The receiver holds the first request;
    the file grows meanwhile (the request is held until the append is done, not for a fixed time). Checked
    against watch-after-send-unchanged-only: the grown file is deleted with its new bytes never delivered,
    so the wait for them times out.

    (Should the append reach the file before the client read it, the first send is abandoned as changed
    and only the new bytes are delivered; the assertions hold either way.)"""
    settings = settings_for(make_settings, receiver, SMT_AFTER_SEND="delete", SMT_VALIDATE="0")
    held = threading.Event()
    receiver.state.faults.append(Fault(release=held))
    f = write_csv(settings.local_dir / "a.csv")
    with watching(settings):
        try:
            wait_for(lambda: not receiver.state.faults, 10, "the first request to reach the receiver")
            with f.open("a") as fh:
                fh.write("one more line\n")
            new = sha(f.read_bytes())
        finally:
            held.set()  # the first request goes on (also when the test fails: no request held at teardown)
        wait_for(lambda: new in {r["sha256"] for r in receiver.stored()}, 15, "the new bytes delivered")
        wait_for(lambda: not f.exists(), 10, "a.csv deleted once its current bytes were delivered")


def test_archive_never_overwrites_a_dangling_symlink(make_settings: Make, receiver: Any) -> None:
    """SMT_AFTER_SEND=move never overwrites anything in the archive, not even a symlink pointing nowhere
    (``exists()`` is False for it). Checked against watch-archive-no-overwrite-symlink."""
    settings = settings_for(make_settings, receiver, SMT_AFTER_SEND="move")
    archive = settings.archive_path
    archive.mkdir(parents=True)
    (archive / "a.csv").symlink_to(archive / "nowhere")
    with watching(settings) as service:
        f = write_csv(settings.local_dir / "a.csv")
        data = f.read_bytes()
        wait_for(lambda: service.counts.sent == 1, 10, "a.csv delivered")
        wait_for(lambda: not f.exists(), 10, "a.csv moved")
    assert (archive / "a.csv").is_symlink()
    assert (archive / "a.csv.1").read_bytes() == data


@pytest.mark.both_ledgers
def test_failed_and_backed_off_files_wait_even_when_looked_at_again(make_settings: Make, receiver: Any) -> None:
    """A refused file stays where it is (even with SMT_AFTER_SEND=delete) and is not sent again until
    ``ledger forget``; a file told to come back in 120 s (Retry-After) is not sent before then. Touching
    both makes the 1 s rescan hand them to the worker again (their stat-cache entries no longer match), so
    only the claim's backoff rules keep them back. Checked against retry-failed-waits-for-forget,
    retry-retrying-waits-for-its-time and watch-after-send-only-delivered."""
    settings = settings_for(make_settings, receiver, SMT_AFTER_SEND="delete", SMT_RESCAN_SECONDS="1",
                            SMT_WORKERS="1", SMT_RETRY_ATTEMPTS="3")
    receiver.state.faults.extend([Fault(status=422, body={"ok": False, "error": "bad csv"}),
                                  Fault(status=503, retry_after="120")])
    box = settings.local_dir
    with watching(settings) as service:
        bad = write_csv(box / "bad.csv", seed=1)
        wait_for(lambda: service.counts.failed == 1, 10, "bad.csv failed")
        later = write_csv(box / "later.csv", seed=2)
        wait_for(lambda: service.counts.retrying == 1, 10, "later.csv retrying")
        write_csv(box / "sentinel1.csv", seed=3)
        wait_for(lambda: "sentinel1.csv" in stored_names(receiver), 10, "sentinel1 delivered")
        assert bad.exists() and later.exists()
        hashed = service.counts.hashed
        for f in (bad, later):
            st = f.stat()
            os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        wait_for(lambda: service.counts.hashed >= hashed + 2, 15, "both touched files looked at again")
        write_csv(box / "sentinel2.csv", seed=4)
        wait_for(lambda: "sentinel2.csv" in stored_names(receiver), 10, "sentinel2 delivered")
        assert bad.exists() and later.exists()
    assert [r.status for r in receiver.state.requests] == [422, 503, 200, 200]
    with open_ledger(settings) as ledger:
        states = {r.filename: r.state for r in ledger.rows()}
    assert states == {"bad.csv": "failed", "later.csv": "retrying", "sentinel1.csv": "sent",
                      "sentinel2.csv": "sent"}
