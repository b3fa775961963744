"""The worker's own check of the inbox boundary, deterministically.

tests/faults/test_inbox_boundary.py swaps a directory for a symlink under a running `watch`, where the main
loop's settle check usually sees the swap first. Here the swap lands in the window that check cannot close:
after the file settled, before the worker opens it. The file outside is a hard link to the very inode that
settled, so size, mtime and inode all match: only the worker's refusal to follow a symlinked parent keeps
`watch` inside the inbox."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from conftest import UPLOAD_TOKEN
from smt_watch.config import load_settings
from smt_watch.delivery import make_sink
from smt_watch.hashing import Signature
from smt_watch.jobs import JobKind, handle_job
from smt_watch.statedir import open_ledger

pytestmark = pytest.mark.faults


def test_a_parent_swapped_for_a_symlink_after_settling_is_not_read(base_env: dict[str, str], tmp_path: Path,
                                                                    receiver: Any) -> None:
    settings = load_settings({**base_env, "SMT_UPLOAD_URL": f"{receiver.url}/upload",
                              "SMT_UPLOAD_TOKEN": UPLOAD_TOKEN, "SMT_VALIDATE": "0"})
    inbox = settings.local_dir
    (inbox / "sub").mkdir()
    inside = inbox / "sub" / "x.csv"
    inside.write_bytes(b"ESIID,X\nsettled,1\n")
    sig = Signature.of(inside.stat())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.link(inside, elsewhere / "x.csv")  # the same inode, reachable from outside the inbox
    shutil.rmtree(inbox / "sub")
    os.symlink(elsewhere, inbox / "sub")  # inbox/sub/x.csv now leads outside, with the settled signature
    assert Signature.of(inside.stat()) == sig
    with open_ledger(settings) as ledger:
        sink = make_sink(settings, "multipart", chunks=ledger, announce=False)
        try:
            result = handle_job(settings, ledger, sink, inside, sig)
        finally:
            sink.close()
    assert result.kind is JobKind.GONE, result
    assert receiver.stored() == []
    assert (elsewhere / "x.csv").read_bytes() == b"ESIID,X\nsettled,1\n"
