"""Issue 27's speed-ups keep their guarantees: a small multipart body is sent in one piece but still never
unless its bytes are the ones hashed; the console script skips only the imports nobody uses."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from conftest import UPLOAD_TOKEN, write_csv
from smt_watch.config import Settings
from smt_watch.delivery import make_sink
from smt_watch.hashing import identify
from smt_watch.pipeline import deliver_identified
from smt_watch.reference.receiver import running_receiver
from smt_watch.statedir import open_ledger

Make = Callable[..., Settings]


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Any]:
    with running_receiver(tmp_path / "received", upload_token=UPLOAD_TOKEN) as r:
        yield r


def _settings(make: Make, receiver: Any) -> Settings:
    return make(SMT_UPLOAD_URL=f"{receiver.url}/upload", SMT_UPLOAD_TOKEN=UPLOAD_TOKEN, SMT_VALIDATE="0")


@pytest.mark.parametrize("change", ["same size", "grew", "shrank"])
def test_a_small_file_changed_after_hashing_is_never_sent(make_settings: Make, receiver: Any, tmp_path: Path,
                                                          change: str) -> None:
    """The one-piece body of a small file is checked against the hash before a byte of it goes out."""
    settings = _settings(make_settings, receiver)
    f = write_csv(tmp_path / "small.csv", rows=50)
    ident = identify(f)  # what the claim is made for
    data = f.read_bytes()
    f.write_bytes({"same size": data[:-2] + b"9\n", "grew": data + b"x\n", "shrank": data[:-1]}[change])
    with open_ledger(settings) as ledger, closing(make_sink(settings, "multipart", chunks=ledger)) as sink:
        o = deliver_identified(settings, ledger, sink, ident)
        row = ledger.get(ident.sha256)
    assert o.result == "changed"
    assert row is not None and row.state == "pending"
    assert receiver.stored() == []


def test_a_small_file_arrives_whole_with_its_fields(make_settings: Make, receiver: Any, tmp_path: Path) -> None:
    settings = _settings(make_settings, receiver)
    f = write_csv(tmp_path / "whole.csv", rows=300)
    ident = identify(f)
    with open_ledger(settings) as ledger, closing(make_sink(settings, "multipart", chunks=ledger)) as sink:
        o = deliver_identified(settings, ledger, sink, ident)
    assert o.result == "sent"
    assert receiver.read(hashlib.sha256(f.read_bytes()).hexdigest()) == f.read_bytes()
    assert len(receiver.state.requests) == 1


def test_the_console_script_skips_only_unused_optional_imports() -> None:
    """httpx without its CLI and httpcore without trio; trio itself stays importable for anyone else."""
    code = (
        "import sys\n"
        "from smt_watch.cli import _skip_unused_optional_imports\n"
        "_skip_unused_optional_imports()\n"
        "import httpx, httpcore\n"
        "print('trio' in sys.modules, 'httpx._main' in sys.modules)\n"
        "httpx.Client().close()\n"
        "try:\n"
        "    import trio\n"
        "except ImportError:\n"
        "    print('absent')\n"
        "else:\n"
        "    print(hasattr(trio, 'run'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[:2] == ["False", "False"]
    assert out[2] in ("True", "absent")  # installed (test extras: selenium) or not: either way a real answer
