"""SFTP sizes that lie: a server whose listing (and stat) claims one size while its reads serve another.

The asyncssh test server (tests/sftp_server.py) with ``listed_sizes``; the real ``smt-watch sync`` CLI, run
in this process (conftest's ``cli_in_process``: its output and exit status, without a process start-up that
is not what these tests are about). Nothing is allocated for a remote size before its bytes arrive: a listed
size beyond the free space fails the file up front, a served size that does not match fails it with its part
removed, and the next honest listing fetches it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from sftp_server import SftpTestServer, sftp_env

from conftest import cli_in_process
from faults.support import assert_clean

pytestmark = [pytest.mark.faults, pytest.mark.timeout(600)]  # CLI starts on a shared, loaded machine

MiB = 1024 * 1024
TiB = 1024**4


def _env(base_env: dict[str, str], tmp_path: Path, server: SftpTestServer) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path / "home"), **base_env,
            **sftp_env(server, tmp_path / "ssh" / "known_hosts", timeout=10)}


def sync(env: dict[str, str], cwd: Path, workers: int = 1) -> subprocess.CompletedProcess[str]:
    return cli_in_process(["sync", "--workers", str(workers)], env, cwd)


def everything(inbox: Path) -> dict[str, tuple[int, int]]:
    """Every file under the inbox, hidden parts included: (apparent size, bytes allocated)."""
    return {p.relative_to(inbox).as_posix(): (p.stat().st_size, p.stat().st_blocks * 512)
            for p in inbox.rglob("*") if p.is_file()}


def test_a_listed_size_beyond_the_free_space_fails_that_file_up_front(
        sftp: SftpTestServer, tmp_path: Path, base_env: dict[str, str]) -> None:
    """1 TiB listed, 7 KB served: the old sync left a 1 TiB sparse part in the inbox."""
    env = _env(base_env, tmp_path, sftp)
    inbox = Path(env["SMT_LOCAL_DIR"])
    st = os.statvfs(inbox)
    if st.f_bavail * st.f_frsize >= TiB:
        pytest.skip("more than 1 TiB free here: the listed size would fit")
    sftp.put("liar.csv", os.urandom(7000))
    honest = os.urandom(5000)
    sftp.put("honest.csv", honest)
    sftp.listed_sizes["/liar.csv"] = TiB
    proc = sync(env, tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert_clean(out, "sync output")
    assert "/liar.csv" in proc.stderr and "free in" in proc.stderr, out
    assert [r for r in sftp.reads if r.path == "/liar.csv"] == []  # refused before a byte was asked for
    assert everything(inbox) == {"honest.csv": (len(honest), everything(inbox)["honest.csv"][1])}
    assert (inbox / "honest.csv").read_bytes() == honest


@pytest.mark.parametrize("workers", [1, 2], ids=["one-stream", "ranges"])
def test_a_file_that_serves_less_than_listed_fails_with_its_part_removed(
        sftp: SftpTestServer, tmp_path: Path, base_env: dict[str, str], workers: int) -> None:
    """Listed 100 MiB (2 workers: fetched as byte ranges into one part), served 7 KB: the file fails at
    once with the sizes in its reason, not after retries, and nothing of it stays, visible or hidden."""
    env = _env(base_env, tmp_path, sftp)
    inbox = Path(env["SMT_LOCAL_DIR"])
    served = os.urandom(7000)
    sftp.put("short.csv", served)
    sftp.listed_sizes["/short.csv"] = 100 * MiB
    proc = sync(env, tmp_path, workers)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert_clean(out, "sync output")
    assert "/short.csv" in proc.stderr and "104857600" in proc.stderr and "Retrying" not in out, out
    assert everything(inbox) == {}, "a part of a lying file was left in the inbox"

    sftp.listed_sizes.clear()  # the server tells the truth again: the next pass fetches it
    again = sync(env, tmp_path, workers)
    assert again.returncode == 0, again.stdout + again.stderr
    assert (inbox / "short.csv").read_bytes() == served
    assert [p for p in everything(inbox) if p != "short.csv"] == []


def test_a_file_that_serves_more_than_listed_fails_with_its_part_removed(
        sftp: SftpTestServer, tmp_path: Path, base_env: dict[str, str]) -> None:
    env = _env(base_env, tmp_path, sftp)
    inbox = Path(env["SMT_LOCAL_DIR"])
    sftp.put("long.csv", os.urandom(7000))
    sftp.listed_sizes["/long.csv"] = 1000
    proc = sync(env, tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert_clean(out, "sync output")
    assert "/long.csv" in proc.stderr and "more than the 1000 bytes it listed" in proc.stderr, out
    assert everything(inbox) == {}


def test_free_space_is_counted_across_the_files_of_a_pass(tmp_path: Path) -> None:
    """Two files that each fit but not together: the bigger is fetched, the other fails up front."""
    from smt_watch.config import load_settings
    from smt_watch.sftp import RemoteFile
    from smt_watch.sync import SyncReport, _fits_free_space, free_bytes

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    settings = load_settings({"SMT_LOCAL_DIR": str(inbox), "SMT_STATE_DIR": str(tmp_path / "state")})
    free = free_bytes(inbox)
    a, b = RemoteFile("/a.csv", free * 2 // 3, 1), RemoteFile("/b.csv", free // 2, 1)
    report = SyncReport(todo=[b, a])
    assert _fits_free_space(settings, report) == [a] and report.failed == ["/b.csv"]
    small: Any = SyncReport(todo=[RemoteFile("/c.csv", 10, 1)])
    assert _fits_free_space(settings, small) == small.todo and small.failed == []
