"""`sync` durability and identity, against the in-process asyncssh SFTP server (tests/sftp_server.py).

README: downloads go to a hidden ``.part``, "are fsynced and renamed into place", and the next pass resumes an
unchanged file's part. Whether a byte reached the disk cannot be seen without pulling the power, so the first
test records the real ``os.fsync``/``os.link``/``os.replace`` calls (passing them through) while a real pass runs, and
checks their order: the part is fsynced, then renamed, then its directory is fsynced. The second test checks
that a resumed download is identified by the SHA-256 of all its bytes, the part read back included: the
same bytes already in the inbox are recognised instead of being stored again as ``a.1.csv``.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sftp_server import SftpTestServer, sftp_env
from test_sync import sync_once, visible

from conftest import IoCalls
from smt_watch import sync
from smt_watch.config import Settings
from smt_watch.ledger.sqlite import SqliteLedger
from smt_watch.sftp import RemoteFile
from smt_watch.statedir import open_ledger
from smt_watch.sync import SyncReport, _Landed, part_path

Make = Callable[..., Settings]
KiB = 1024


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


def records_in(io_calls: IoCalls, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each ledger ``record_fetch`` also lands in ``io_calls``' events, in order with the fsyncs and renames."""
    real_record = SqliteLedger.record_fetch

    def record_fetch(self: SqliteLedger, remote_path: str, size: int, mtime: int, sha256: str,
                     local_path: str) -> None:
        io_calls._add("record", local_path)
        real_record(self, remote_path, size, mtime, sha256, local_path)

    monkeypatch.setattr(SqliteLedger, "record_fetch", record_fetch)


def test_part_is_fsynced_then_renamed_then_its_directory_fsynced(
    server: SftpTestServer, env: dict[str, str], make_settings: Make, inbox: Path, io_calls: IoCalls,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Checked against mutants sync-part-no-fsync (the part's fsync removed) and sync-rename-dir-no-fsync
    (the directory fsync after the rename removed): each turns this test red. The directory is fsynced once
    for a batch of files, and each file is recorded in the ledger only after that (a crash before it may
    undo the rename: a file recorded as fetched would then never be fetched again)."""
    files = {"adhocusage/2026/a.CSV": os.urandom(300 * KiB), "b.csv": os.urandom(20 * KiB),
             "c.csv": os.urandom(40 * KiB)}
    for rel, data in files.items():
        server.put(rel, data)
    records_in(io_calls, monkeypatch)
    report = sync_once(make_settings, env)
    monkeypatch.undo()
    events = io_calls.events
    assert report.failed == [] and len(report.fetched) == 3
    assert visible(inbox) == files

    for rel in files:
        final = (inbox / rel).resolve()
        renames = [i for i, e in enumerate(events)  # place() moves a part by a hard link (then unlinks it)
                   if e[0] in ("link", "replace") and Path(e[2]).resolve() == final]
        assert len(renames) == 1, events
        at = renames[0]
        part = Path(events[at][1]).resolve()
        assert part.parent == final.parent and part.name.startswith(".") and part.name.endswith(".part"), part
        synced_before = [e for e in events[:at] if e == ("fsync", str(part))]
        assert synced_before, f"{part.name} renamed to {rel} without an fsync first: {events}"
        synced_dir_after = [i for i, e in enumerate(events) if i > at and e == ("fsync", str(final.parent))]
        assert synced_dir_after, f"the rename to {rel} was not made durable (no fsync of its directory): {events}"
        recorded = [i for i, e in enumerate(events) if e[0] == "record" and Path(e[1]).resolve() == final]
        assert len(recorded) == 1 and recorded[0] > synced_dir_after[0], \
            f"{rel} recorded before its rename was made durable: {events}"


def test_resumed_download_is_identified_by_all_its_bytes(
    server: SftpTestServer, env: dict[str, str], make_settings: Make, inbox: Path,
) -> None:
    """The remote file is touched (same bytes, new mtime), so it is fetched again, and an interrupted pass left
    the first 256 KiB of that version in its hidden part: the download resumes there. Its SHA-256 must cover
    the part read back, or the identical a.csv already in the inbox is not recognised and a second copy
    a.1.csv appears for watch to pick up.
    Checked against mutant sync-resume-hash-skips-part (the part's bytes left out of the digest)."""
    data = os.urandom(1024 * KiB)
    t0 = int(time.time()) - 3600
    remote = server.put("a.csv", data, mtime=t0)
    first = sync_once(make_settings, env)
    assert first.fetched == [inbox / "a.csv"]

    os.utime(remote, (t0 + 60, t0 + 60))  # same bytes, new mtime: a changed remote file
    have = 256 * KiB
    part = part_path(inbox / "a.csv", RemoteFile("/a.csv", len(data), t0 + 60))
    part.write_bytes(data[:have])  # what a pass that dropped mid-file leaves (test_sync.py shows it)
    server.reset_counters()
    second = sync_once(make_settings, env)
    assert second.failed == []
    assert server.read_ranges() == {"/a.csv": [(have, len(data))]}  # the case under test ran: it resumed
    assert second.fetched == [inbox / "a.csv"]
    assert visible(inbox) == {"a.csv": data}  # no a.1.csv copy of the same bytes
    assert sorted(p.name for p in inbox.iterdir()) == ["a.csv"]  # and no part left


def test_a_batch_of_files_costs_one_fsync_per_directory_then_each_is_recorded(
    make_settings: Make, inbox: Path, io_calls: IoCalls, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the pass does with the files its workers renamed into place: one fsync per directory for the
    batch (not one per file), then one ledger record per file, none before that fsync."""
    settings = make_settings()
    landed = _Landed()
    for rel in ("x/a.csv", "x/b.csv", "y/c.csv"):
        final = inbox / rel
        final.parent.mkdir(parents=True, exist_ok=True)
        final.write_bytes(rel.encode())
        landed.add(RemoteFile("/" + rel, len(rel), 1), final, hashlib.sha256(rel.encode()).hexdigest(), str(final))
    records_in(io_calls, monkeypatch)
    report = SyncReport()
    with open_ledger(settings) as ledger:
        landed.flush(ledger, report, lambda remote, why: pytest.fail(f"{remote.path} failed: {why}"))
        assert set(ledger.remote_files()) == {"/x/a.csv", "/x/b.csv", "/y/c.csv"}
    kinds = [e[0] for e in io_calls.events]
    assert io_calls.events[:2] == [("fsync", str(inbox / "x")), ("fsync", str(inbox / "y"))], io_calls.events
    assert kinds[2:] == ["record"] * 3, io_calls.events
    assert report.fetched == [inbox / "x/a.csv", inbox / "x/b.csv", inbox / "y/c.csv"] and landed.files == []


def test_fetched_files_are_fsynced_several_at_once(
    server: SftpTestServer, env: dict[str, str], make_settings: Make, inbox: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One worker (threads here) fetches four files; its finisher threads fsync them, several at once: the
    first two fsyncs meet at a barrier, which only two fsyncs in flight together can pass (one thread doing
    them in series would wait there until the barrier's deadline breaks it, and those files fail).
    Checked against mutant sync-fsyncs-in-series (one finisher thread a worker)."""
    files = {f"f{i}.csv": os.urandom(30 * KiB) for i in range(4)}
    for rel, data in files.items():
        server.put(rel, data)
    meet = threading.Barrier(2, timeout=5)  # a deadline, not a pause: passed as soon as two fsyncs are in flight
    calls = itertools.count()
    real = sync.make_durable

    def make_durable(path: Path) -> None:
        if next(calls) < 2:
            meet.wait()
        real(path)

    monkeypatch.setattr(sync, "make_durable", make_durable)
    report = sync_once(make_settings, env, workers=1)
    assert report.failed == [] and visible(inbox) == files


def test_a_download_starts_the_disk_writing_as_it_goes(
    server: SftpTestServer, env: dict[str, str], make_settings: Make, inbox: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A file bigger than WRITEBACK_STEP has its part's bytes handed to the disk while it downloads
    (sync_file_range), so the fsync before its rename has little left to write. Checked against mutant
    sync-no-writeback."""
    step = 64 * KiB
    monkeypatch.setattr(sync, "WRITEBACK_STEP", step)
    data = os.urandom(16 * step + 5)
    remote = server.put("big.csv", data)
    server.put("small.csv", b"x" * (step // 2))
    kicked: list[str] = []
    real = sync.start_writeback

    def start_writeback(fd: int, offset: int = 0, nbytes: int = 0) -> None:
        kicked.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd, offset, nbytes)

    monkeypatch.setattr(sync, "start_writeback", start_writeback)
    report = sync_once(make_settings, env, workers=1)
    assert report.failed == [] and visible(inbox) == {"big.csv": data, "small.csv": b"x" * (step // 2)}
    part = part_path(inbox / "big.csv", RemoteFile("/big.csv", len(data), int(remote.stat().st_mtime)))
    assert len(kicked) >= 3 and set(kicked) == {str(part.resolve())}, kicked  # the big part only, as it grew


@pytest.mark.parametrize("how", ["renameat2", "link"])
def test_two_placers_never_take_the_same_free_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   how: str) -> None:
    """Two finishers place different files under one name at once (a remote file whose name another one's
    fallback also took): each must land at a name of its own. Both placers meet at a barrier just before
    they move their part to ``a.CSV``, so both have already looked and found it free; a check then a rename
    would let the second replace the first, whose bytes would never be delivered. ``renameat2`` with
    RENAME_NOREPLACE where the kernel has it, else a hard link: both refuse a taken name.
    Checked against mutants sync-place-check-then-rename (link) and sync-place-replaces (renameat2)."""
    final = tmp_path / "a.CSV"
    meet = threading.Barrier(2, timeout=5)  # a deadline, not a pause: both placers arrive at once
    real_link, real_replace, real_noreplace = os.link, os.replace, sync._rename_noreplace

    def noreplace(src: Path, dst: Path) -> bool | None:
        if how == "link":
            return None  # as where the kernel or file system lacks renameat2
        if Path(dst) == final:
            meet.wait()
        return real_noreplace(src, dst)

    def link(src: str | Path, dst: str | Path, **kw: bool) -> None:
        if Path(dst) == final:
            meet.wait()
        real_link(src, dst, **kw)

    def replace(src: str | Path, dst: str | Path) -> None:
        if Path(dst) == final:
            meet.wait()
        real_replace(src, dst)

    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(sync, "_rename_noreplace", noreplace)
    contents = [b"first " * 100, b"second " * 100]
    parts = []
    for i, data in enumerate(contents):
        part = part_path(final, RemoteFile(f"/d{i}/a.CSV", len(data), i))
        part.write_bytes(data)
        parts.append(part)
    placed: list[Path | BaseException] = [OSError("not placed")] * 2

    def placer(i: int) -> None:
        try:
            placed[i] = sync.place(parts[i], final, hashlib.sha256(contents[i]).hexdigest(), sync_dir=False)
        except BaseException as exc:  # surfaced below
            placed[i] = exc

    threads = [threading.Thread(target=placer, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    monkeypatch.undo()
    assert all(isinstance(p, Path) for p in placed), placed
    assert {p.name for p in placed if isinstance(p, Path)} == {"a.CSV", "a.1.CSV"}
    for dest, data in zip(placed, contents, strict=True):
        assert isinstance(dest, Path) and dest.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.1.CSV", "a.CSV"]  # no part left


def test_a_range_starts_the_disk_writing_what_it_wrote(
    server: SftpTestServer, env: dict[str, str], make_settings: Make, inbox: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A byte range of a big file (what a worker process fetches, run here in this process) hands the disk
    each step it wrote, through the descriptor it writes with: consecutive pieces of its own range, nothing
    outside it. Checked against mutant sync-no-range-writeback."""
    step = 64 * KiB
    monkeypatch.setattr(sync, "WRITEBACK_STEP", step)
    data = os.urandom(40 * step)
    remote_path = server.put("big.csv", data)
    remote = RemoteFile("/big.csv", len(data), int(remote_path.stat().st_mtime))
    final = inbox / "big.csv"
    part = sync.ranged_part_path(final, remote)
    part.write_bytes(bytes(len(data)))  # the parent makes the ranged part, at its full size
    start, end = 8 * step, 30 * step + 123
    kicked: list[tuple[str, int, int]] = []
    real = sync.start_writeback

    def start_writeback(fd: int, offset: int = 0, nbytes: int = 0) -> None:
        kicked.append((os.readlink(f"/proc/self/fd/{fd}"), offset, nbytes))
        real(fd, offset, nbytes)

    monkeypatch.setattr(sync, "start_writeback", start_writeback)
    conn = sync._fetch_range_with_retries(make_settings(**env), None, sync.Job(0, remote, final, start, end),
                                          lambda n: None)
    conn.close()
    assert part.read_bytes()[start:end] == data[start:end]
    assert len(kicked) >= 3 and {k[0] for k in kicked} == {str(part.resolve())}, kicked
    assert kicked[0][1] == start and all(nbytes >= step for _, _, nbytes in kicked), kicked
    assert all(a[1] + a[2] == b[1] for a, b in itertools.pairwise(kicked)), kicked  # consecutive pieces
    assert kicked[-1][1] + kicked[-1][2] <= end, kicked


def test_a_part_that_cannot_be_opened_for_writeback_is_still_fetched(
    server: SftpTestServer, env: dict[str, str], make_settings: Make, inbox: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Writeback is a hint: when the descriptor it opens on the part cannot be had (EMFILE here), the file
    is fetched without it, at the first try, not failed and retried. Checked against mutant
    sync-writeback-open-fails-the-file."""
    step = 64 * KiB
    monkeypatch.setattr(sync, "WRITEBACK_STEP", step)
    data = os.urandom(16 * step)
    server.put("big.csv", data)
    refused: list[str] = []
    real_open = os.open

    def open_(path: Any, flags: int, *a: Any, **kw: Any) -> int:
        if str(path).endswith(".part") and not flags & (os.O_WRONLY | os.O_RDWR):
            refused.append(str(path))
            if len(refused) == 1:  # the first: writeback's, during the download (the fsync's comes after)
                raise OSError(errno.EMFILE, "Too many open files")
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", open_)
    report = sync_once(make_settings, env, workers=1)
    monkeypatch.undo()
    assert report.failed == [] and visible(inbox) == {"big.csv": data}
    assert len(refused) == 2  # writeback tried once (not at every step), then the fsync's
    assert len({r.session for r in server.reads if r.path == "/big.csv"}) == 1  # one try, not retried


def test_a_finisher_whose_thread_cannot_start_ends_the_ones_that_did(monkeypatch: pytest.MonkeyPatch) -> None:
    """The third of a worker's finisher threads cannot start (the process is out of threads): the error is
    the worker's, and the two that started end instead of waiting for work forever.
    Checked against mutant sync-finisher-threads-left-waiting."""
    real_start = threading.Thread.start
    started: list[threading.Thread] = []

    def start(self: threading.Thread) -> None:
        if self.name.endswith("-finish-2"):
            raise RuntimeError("can't start new thread")
        real_start(self)
        started.append(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    with pytest.raises(RuntimeError):
        sync._Finisher(lambda msg: None)
    monkeypatch.undo()
    for t in started:
        t.join(timeout=10)  # a deadline, not a pause
    assert len(started) == 2 and not any(t.is_alive() for t in started)


def test_a_part_that_is_also_the_placed_file_is_never_resumed_into(tmp_path: Path) -> None:
    """A crash between a placing link and the part's unlink leaves one file under two names: the fetch drops
    the part's name and starts a new one, so the placed (maybe delivered) file is never written into.
    Checked against mutant sync-resume-into-placed-file."""
    final = tmp_path / "a.CSV"
    final.write_bytes(b"placed and delivered")
    part = part_path(final, RemoteFile("/a.CSV", 20, 0))
    os.link(final, part)
    sync._fresh_if_linked(part)
    assert not part.exists() and final.read_bytes() == b"placed and delivered"
    part.write_bytes(b"a part of its own")
    sync._fresh_if_linked(part)  # one name: a resumable part, kept
    assert part.read_bytes() == b"a part of its own"
