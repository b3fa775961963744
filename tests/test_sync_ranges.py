"""`sync`'s process workers and ranged fetches, against the real asyncssh SFTP server on 127.0.0.1.

A pass big enough (``PROCESS_MIN_BYTES`` / ``PROCESS_MIN_FILES``) runs its workers as processes, each with
its own SSH connection, and fetches a file of ``SPLIT_MIN`` or more as ``PIECE``-sized byte ranges into one
``.ranges.part``. Those constants are read by the parent only (planning), so the tests shrink them with
monkeypatch in-process, and with a small wrapper for the CLI run that is killed with SIGKILL.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from sftp_server import SftpTestServer, sftp_env
from test_sync import sync_once, visible

from conftest import wait_for
from smt_watch import sync
from smt_watch.config import Settings
from smt_watch.sftp import Connection, RemoteFile
from smt_watch.statedir import open_ledger

Make = Callable[..., Settings]
KiB = 1024
PIECE = 256 * KiB


@pytest.fixture
def server(sftp: SftpTestServer) -> SftpTestServer:
    """This module's name for conftest's ``sftp`` (a real SFTP server on loopback, one per test)."""
    return sftp


@pytest.fixture
def env(server: SftpTestServer, tmp_path: Path) -> dict[str, str]:
    return sftp_env(server, tmp_path / "ssh" / "known_hosts")


@pytest.fixture
def inbox(base_env: dict[str, str]) -> Path:
    return Path(base_env["SMT_LOCAL_DIR"])


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sync, "PIECE", PIECE)
    monkeypatch.setattr(sync, "SPLIT_MIN", 2 * PIECE)
    monkeypatch.setattr(sync, "PROCESS_MIN_BYTES", 1)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def covered_once(server: SftpTestServer, path: str) -> list[tuple[int, int]]:
    """The byte ranges of ``path`` served, merged; fails if any byte was served twice."""
    reads = sorted((r.offset, r.offset + r.length) for r in server.reads if r.path == path)
    merged: list[tuple[int, int]] = []
    for a, b in reads:
        assert not merged or a >= merged[-1][1], f"bytes {a}..{merged[-1][1]} of {path} served twice"
        if merged and a == merged[-1][1]:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    return merged


def fetched_sha(make_settings: Make, env: dict[str, str], path: str) -> str | None:
    with open_ledger(make_settings(**env)) as ledger:
        rows = [r for t, r in ledger.export_rows() if t == "remote_files" and r.get("remote_path") == path]
    return str(rows[0]["sha256"]) if rows else None


def test_big_file_is_fetched_in_ranges_by_several_processes_byte_identical(
    server: SftpTestServer, env: dict[str, str], make_settings: Make, inbox: Path, small_pieces: None,
) -> None:
    big = os.urandom(13 * PIECE + 777)  # a short last piece
    small = {f"s{i}.csv": os.urandom(5000 + i) for i in range(3)}
    server.put("adhocusage/big.CSV", big)
    for name, data in small.items():
        server.put(name, data)
    report = sync_once(make_settings, env, workers=3)
    assert report.failed == [] and len(report.fetched) == 4
    assert visible(inbox) == {"adhocusage/big.CSV": big, **small}
    assert sorted(p.name for p in (inbox / "adhocusage").iterdir()) == ["big.CSV"]  # no part, no record
    sessions = {r.session for r in server.reads if r.path == "/adhocusage/big.CSV"}
    assert len(sessions) >= 2, "the big file was not fetched by several workers"
    assert covered_once(server, "/adhocusage/big.CSV") == [(0, len(big))]  # every byte, once
    assert fetched_sha(make_settings, env, "/adhocusage/big.CSV") == sha(big)
    again = sync_once(make_settings, env, workers=3)
    assert again.fetched == [] and again.already == 4


def test_more_workers_than_files_and_pieces(
    server: SftpTestServer, env: dict[str, str], make_settings: Make, inbox: Path, small_pieces: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sync, "PROCESS_MIN_FILES", 1)
    files = {"a.csv": os.urandom(2 * PIECE + 1), "b.csv": b"b\n"}  # 3 pieces and one small file
    for name, data in files.items():
        server.put(name, data)
    report = sync_once(make_settings, env, workers=9)
    assert report.failed == [] and sorted(p.name for p in report.fetched) == ["a.csv", "b.csv"]
    assert visible(inbox) == files
    assert sorted(p.name for p in inbox.iterdir()) == ["a.csv", "b.csv"]
    assert fetched_sha(make_settings, env, "/a.csv") == sha(files["a.csv"])


def test_dropped_connection_mid_range_goes_on_where_the_range_ended(
    server: SftpTestServer, env: dict[str, str], make_settings: Make, inbox: Path, small_pieces: None,
) -> None:
    data = os.urandom(8 * PIECE)
    server.put("a.csv", data)
    server.drop_after_bytes = 3 * PIECE // 2  # one session dies in the middle of its second piece
    report = sync_once(make_settings, env, workers=2)
    assert report.failed == [] and server.drops == 1
    assert visible(inbox) == {"a.csv": data}
    assert fetched_sha(make_settings, env, "/a.csv") == sha(data)


def holders(path: Path) -> list[int]:
    """Pids of processes with ``path`` open."""
    out = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) == str(path) for fd in fd_dir.iterdir()):
                out.append(int(fd_dir.parent.name))
        except OSError:
            continue
    return out


WRAPPER = f"""
import runpy, sys
import smt_watch.sync as s
s.PIECE, s.SPLIT_MIN, s.PROCESS_MIN_BYTES = {PIECE}, {2 * PIECE}, 1
sys.argv = ["smt-watch", "sync", "--workers", "3"]
runpy.run_module("smt_watch", run_name="__main__")
"""


def test_ranged_fetch_killed_with_sigkill_resumes_only_missing_pieces_and_delivers_the_right_file(
    server: SftpTestServer, env: dict[str, str], make_settings: Make, inbox: Path, small_pieces: None,
    base_env: dict[str, str], tmp_path: Path,
) -> None:
    data = os.urandom(24 * PIECE)
    t0 = 1_700_000_000
    server.put("a.csv", data, mtime=t0)
    remote = RemoteFile("/a.csv", len(data), t0)
    part = sync.ranged_part_path(inbox / "a.csv", remote)
    record = part.with_name(part.name[: -len(".part")] + ".done.part")
    # reads time out long after the waits below: the workers must die with the pass, not when a read gives up
    full_env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path / "home"), **base_env, **env,
                "SMT_SFTP_TIMEOUT": "300"}
    proc = subprocess.Popen([sys.executable, "-c", WRAPPER], env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        wait_for(lambda: record.exists() and len(record.read_text().splitlines()) >= 2, timeout=60,
                 what="two pieces recorded")
        server.stall()  # the rest waits mid-read: the kill lands while ranges are in flight
        wait_for(server.read_blocked.is_set, timeout=30, what="a read blocked")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # The workers die with it (PR_SET_PDEATHSIG; this pass forks them, see sync._process_context): nobody
    # writes the part any more.
    wait_for(lambda: not holders(part), timeout=30, what="worker processes gone")
    # A worker that was not writing the part at that moment holds the sync lock it inherited until it is
    # gone too: the next pass would find the lock taken (seen once on a loaded machine).
    locks = list(tmp_path.rglob("sync.lock"))
    assert locks, "the killed pass took no sync lock"
    wait_for(lambda: not any(holders(lock.resolve()) for lock in locks), timeout=30, what="the sync lock free")
    assert visible(inbox) == {}  # nothing visible for watch
    done = [tuple(map(int, line.split())) for line in record.read_text().splitlines()]
    assert len(done) >= 2
    for a, b in done:  # what the record says is done is done, byte for byte
        with part.open("rb") as fh:
            fh.seek(a)
            assert fh.read(b - a) == data[a:b]

    # Reads of the killed pass that were held by the stall are answered (into dead connections) once
    # released, possibly after this point: only the new pass's own sessions count below.
    killed_sessions = server.logins
    server.release()
    server.reset_counters()
    report = sync_once(make_settings, env, workers=3)
    assert report.failed == [] and report.fetched == [inbox / "a.csv"]
    assert visible(inbox) == {"a.csv": data}
    assert sorted(p.name for p in inbox.iterdir()) == ["a.csv"]  # part and record gone
    assert fetched_sha(make_settings, env, "/a.csv") == sha(data)
    # What the new pass read (a piece it fetched may be asked for twice by paramiko's read-ahead: that is not
    # the promise here); none of it lies in a piece the record says was done.
    served = [(r.offset, r.offset + r.length) for r in server.reads
              if r.path == "/a.csv" and r.session > killed_sessions]
    for a, b in done:  # recorded pieces were not fetched again
        assert all(b <= x or y <= a for x, y in served), (done, served)


def test_ranged_part_without_record_is_fetched_whole_never_taken_as_a_prefix(
    server: SftpTestServer, env: dict[str, str], make_settings: Make, inbox: Path, small_pieces: None,
) -> None:
    """A ranged part whose pieces were never recorded (a crash before the first fdatasync) holds bytes at
    unknown places: all of it is fetched again, and the single-stream resume never looks at it."""
    data = os.urandom(4 * PIECE)
    t0 = 1_700_000_000
    server.put("a.csv", data, mtime=t0)
    part = sync.ranged_part_path(inbox / "a.csv", RemoteFile("/a.csv", len(data), t0))
    part.write_bytes(os.urandom(len(data)))  # garbage where the pieces would go
    report = sync_once(make_settings, env, workers=1)  # threads: a ranged part is still continued as ranges
    assert report.failed == []
    assert visible(inbox) == {"a.csv": data}
    assert covered_once(server, "/a.csv") == [(0, len(data))]
    assert fetched_sha(make_settings, env, "/a.csv") == sha(data)


def test_worker_processes_are_forked_only_by_a_pass_that_runs_no_other_thread() -> None:
    """A forked worker would inherit any lock another thread holds at that moment: a pass forks its workers
    only while it runs no other thread (`smt-watch sync` once its listing connection is closed); among
    threads (`serve`, a PostgreSQL ledger's pool, this test process's) it goes through the fork server."""
    code = "from smt_watch.sync import _process_context; print(_process_context().get_start_method())"
    alone = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert alone.stdout.strip() == "fork"
    stop = threading.Event()
    other = threading.Thread(target=stop.wait, daemon=True)
    other.start()
    try:
        assert sync._process_context().get_start_method() == "forkserver"
    finally:
        stop.set()
        other.join()


def test_a_closed_connection_leaves_no_thread_behind(server: SftpTestServer, env: dict[str, str],
                                                     make_settings: Make) -> None:
    """What lets the CLI pass fork its workers: once the listing connection is closed, paramiko's thread
    has ended (Connection.close shuts its socket down and joins it). Without the join the thread usually
    ends in time anyway (the shutdown wakes it), so this is a check of the result, not a mutant killer."""
    settings = make_settings(**env)
    before = set(threading.enumerate())
    with Connection(settings):
        assert len(set(threading.enumerate()) - before) == 1  # paramiko's transport thread
    assert set(threading.enumerate()) - before == set()
