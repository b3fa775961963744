"""An SFTP server that drops the connection mid-file, and one that stalls mid-file, while ``watch`` runs.

The server is the asyncssh test server (tests/sftp_server.py) on loopback. ``drop_after_bytes`` aborts the SSH
connection after that many file bytes in a session; ``stall()`` blocks every read until ``release()``. A
pass that cannot finish a file must leave only a hidden ``.part`` (so the running watcher never delivers a
partial file) and exit 1 with the file named; the next pass completes it, fetching only the rest.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sftp_server import SftpTestServer, sftp_env

from conftest import UPLOAD_TOKEN, cli_in_process, wait_for, watching
from faults.support import assert_clean, sha
from smt_watch.config import Settings
from smt_watch.sftp import RemoteFile
from smt_watch.sync import ATTEMPTS, part_path

pytestmark = pytest.mark.faults

MiB = 1024 * 1024
Make = Callable[..., Settings]


def visible(inbox: Path) -> dict[str, bytes]:
    """Every regular file with no hidden path part: what ``watch`` could pick up."""
    out = {}
    for path in inbox.rglob("*"):
        rel = path.relative_to(inbox)
        if path.is_file() and not any(p.startswith(".") for p in rel.parts):
            out[rel.as_posix()] = path.read_bytes()
    return out


def hidden_parts(inbox: Path) -> list[Path]:
    return sorted(p for p in inbox.rglob(".*.part") if p.is_file())


def sync_cli(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """The real ``smt-watch sync`` CLI in this process (conftest's ``cli_in_process``), beside the watcher's
    thread: what it prints and exits with, without a process start-up that these tests are not about."""
    return cli_in_process(["sync", "--workers", "1"], env, cwd)


def _env(base_env: dict[str, str], tmp_path: Path, server: SftpTestServer, receiver: Any,
         timeout: float) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path / "home"), **base_env,
            **sftp_env(server, tmp_path / "ssh" / "known_hosts", timeout=timeout),
            "SMT_UPLOAD_URL": f"{receiver.url}/upload", "SMT_UPLOAD_TOKEN": UPLOAD_TOKEN,
            "SMT_SETTLE_SECONDS": "0.2", "SMT_RESCAN_SECONDS": "1", "SMT_VALIDATE": "0"}


def test_server_drops_mid_file(sftp: SftpTestServer, tmp_path: Path, base_env: dict[str, str], receiver: Any,
                               make_settings: Make) -> None:
    big, small = os.urandom(3 * MiB), b"ESIID,X\n1,2\n"
    sftp.put("adhocusage/2026/big.csv", big)
    sftp.put("adhocusage/2026/small.csv", small)
    env = _env(base_env, tmp_path, sftp, receiver, timeout=10)
    inbox = Path(env["SMT_LOCAL_DIR"])
    sftp.drop_after_bytes = 512 * 1024
    sftp.drop_times = ATTEMPTS  # every attempt of the first pass dies mid-file
    with watching(make_settings(**{k: v for k, v in env.items() if k not in ("PATH", "HOME")})) as service:
        first = sync_cli(env, tmp_path)
        assert first.returncode == 1, first.stdout + first.stderr
        assert "/adhocusage/2026/big.csv" in first.stderr
        assert_clean(first.stdout + first.stderr, "sync output")
        assert sftp.drops == ATTEMPTS
        assert visible(inbox) == {"adhocusage/2026/small.csv": small}  # no partial big.csv in sight
        [part] = hidden_parts(inbox)
        have = part.stat().st_size
        assert 0 < have < len(big) and part.read_bytes() == big[:have]
        wait_for(lambda: service.counts.sent == 1, 20, "small.csv delivered")

        sftp.reset_counters()
        second = sync_cli(env, tmp_path)
        assert second.returncode == 0, second.stdout + second.stderr
        assert (inbox / "adhocusage" / "2026" / "big.csv").read_bytes() == big
        assert sftp.read_ranges() == {"/adhocusage/2026/big.csv": [(have, len(big))]}  # only the rest
        assert hidden_parts(inbox) == []
        wait_for(lambda: service.counts.sent == 2, 20, "big.csv delivered")
    assert sorted(r["sha256"] for r in receiver.stored()) == sorted([sha(big), sha(small)])
    assert len(receiver.state.requests) == 2  # nothing partial was ever sent


def test_server_stalls_mid_file(sftp: SftpTestServer, tmp_path: Path, base_env: dict[str, str], receiver: Any,
                                make_settings: Make, fault_report: Callable[[str], None]) -> None:
    """An earlier pass left the first 256 KiB in the hidden part, so this pass resumes mid-file, and stalls."""
    data = os.urandom(2 * MiB)
    remote = sftp.put("a.csv", data)
    env = _env(base_env, tmp_path, sftp, receiver, timeout=1)
    inbox = Path(env["SMT_LOCAL_DIR"])
    have = 256 * 1024
    part = part_path(inbox / "a.csv", RemoteFile("/a.csv", len(data), int(remote.stat().st_mtime)))
    part.write_bytes(data[:have])  # what test_server_drops_mid_file shows a dropped pass leaves

    sftp.stall()
    with watching(make_settings(**{k: v for k, v in env.items() if k not in ("PATH", "HOME")})) as service:
        started = time.monotonic()
        stalled = sync_cli(env, tmp_path)
        elapsed = time.monotonic() - started
        assert sftp.read_blocked.is_set(), "the server never stalled a read"
        assert stalled.returncode == 1, stalled.stdout + stalled.stderr
        assert "/a.csv" in stalled.stderr
        assert_clean(stalled.stdout + stalled.stderr, "sync output")
        # SMT_SFTP_TIMEOUT=1 per read, ATTEMPTS attempts with 1 s + 2 s between them: well under 60 s.
        assert elapsed < 60, f"a stalled server held sync for {elapsed:.0f} s with SMT_SFTP_TIMEOUT=1"
        fault_report(f"a stalled pass gave up after {elapsed:.1f} s ({ATTEMPTS} attempts, SMT_SFTP_TIMEOUT=1)")
        assert visible(inbox) == {}
        assert [p.stat().st_size for p in hidden_parts(inbox)] == [have]

        sftp.release()
        sftp.reset_counters()
        done = sync_cli(env, tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
        assert (inbox / "a.csv").read_bytes() == data
        assert sftp.read_ranges() == {"/a.csv": [(have, len(data))]}
        wait_for(lambda: service.counts.sent == 1, 20, "a.csv delivered")
    assert [r["sha256"] for r in receiver.stored()] == [sha(data)]
    assert len(receiver.state.requests) == 1
