"""``smt-watch sync``: one pass that copies files new on the SMT SFTP server into the inbox.

"New" is decided by the ledger's ``remote_files`` table, not by what is in the inbox: a file fetched once is
never fetched again (even after ``watch`` moved or deleted the local copy) unless its size or mtime on the
server changed. Each file is downloaded to a hidden ``.<name>.<size>-<mtime>.part`` beside its final path
(same filesystem), fsynced and renamed into place, so ``watch`` only ever sees complete files; a part left
by an interrupted pass is resumed when the remote file is unchanged (its name says which version it is).

One pass at a time: the ledger's sync lock (a lock file beside the SQLite ledger, or a PostgreSQL advisory
lock shared by every node) keeps a timer run and a webhook run from overlapping.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import functools
import gc
import hashlib
import logging
import multiprocessing
import os
import queue
import re
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection as MpConnection
from multiprocessing.connection import wait as mp_wait
from multiprocessing.context import ForkContext, ForkServerContext
from pathlib import Path
from typing import Any, TypeVar

import tenacity

from smt_watch.clib import libc
from smt_watch.config import Settings
from smt_watch.errors import ConfigError, SftpError, SizeMismatch, SmtWatchError, reason
from smt_watch.hashing import identify
from smt_watch.ledger.roles import SyncMemory
from smt_watch.sftp import Connection, RemoteFile
from smt_watch.sizes import human_bytes
from smt_watch.sshfast import keep_freed_memory
from smt_watch.statedir import open_ledger
from smt_watch.workers import WorkerLogging, enter_worker, start_worker, stop_process

log = logging.getLogger("smt_watch.sync")
_T = TypeVar("_T")

ATTEMPTS = 3
MIB = 1024 * 1024
# A pass this big (or with this many files) runs its workers as processes; a smaller one as threads here.
PROCESS_MIN_BYTES = 64 * MIB
PROCESS_MIN_FILES = 100
PIECE = 32 * MIB  # a big file is fetched as ranges of this size, handed out in order
SPLIT_MIN = 2 * PIECE  # smaller files are one stream each
DEPTH = 2  # ranged pieces queued per worker: the next one is there when the current one ends
DEPTH_WHOLE = 4  # whole files per worker at least: one being made durable, one fetched, the next opened ahead, one more
DEPTH_SMALL = 16  # ... and up to this many while what it holds is under QUEUED_BYTES (small files: see _room)
QUEUED_BYTES = 4 * MIB
FINISHERS = 4  # threads per worker that fsync and place its fetched files, several at once (see _Finisher)
BATCH_FILES = 64  # whole files recorded together, after one fsync of their directories
BATCH_SECONDS = 0.25  # ... or once the oldest of them has waited this long for the next message
PROGRESS_STEP = 4 * MIB
WRITEBACK_STEP = 8 * MIB  # a download asks the disk to start writing its bytes every this many
SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writing the range's dirty pages, do not wait for them
HASH_BLOCK = MIB
JOIN_SECONDS = 10
DRAIN = 32  # messages taken from one worker per wait, at most


@dataclass
class SyncReport:
    listed: int = 0
    already: int = 0
    todo: list[RemoteFile] = field(default_factory=list)
    fetched: list[Path] = field(default_factory=list)
    bytes: int = 0
    failed: list[str] = field(default_factory=list)
    placed: list[Path] = field(default_factory=list)  # the final paths fetched to (before any renaming)
    seconds: float = 0.0
    dry_run: bool = False

    def summary(self) -> str:
        if self.dry_run:
            size = human_bytes(sum(f.size for f in self.todo))
            return f"sync: {len(self.todo)} to fetch ({size}), {self.already} already fetched (dry run)"
        return (f"sync: {len(self.fetched)} new ({human_bytes(self.bytes)} in {self.seconds:.1f} s), "
                f"{self.already} already fetched, {len(self.failed)} failed")


def part_path(final: Path, remote: RemoteFile) -> Path:
    return final.with_name(f".{final.name}.{remote.size}-{remote.mtime}.part")


def alternative_name(final: Path, n: int) -> Path:
    """``a.CSV`` → ``a.1.CSV``; ``X.CSV.3.asc`` → ``X.1.CSV.3.asc``: still matches ``SMT_PATTERNS``."""
    stem, dot, rest = final.name.partition(".")
    return final.with_name(f"{stem}.{n}{dot}{rest}")


def place(part: Path, final: Path, sha256: str, sync_dir: bool = True) -> Path:
    """Move the finished part into place, never over different content that may not be delivered yet.
    The parts of older versions of this file are the pass's to remove, once per directory
    (:func:`clean_stale_parts`: a glob per file would be quadratic in the directory's size).
    ``sync_dir`` off: the caller makes the move durable (:func:`fsync_dirs`, once for a batch of files)
    before it records the file; until then a crash may undo it, and the next pass fetches again."""
    dest, n = final, 0
    while not _move_unless_taken(part, dest):
        try:
            if not dest.is_symlink() and identify(dest).sha256 == sha256:
                part.unlink()
                return dest
        except Exception:  # noqa: S110 - unreadable or changing: just pick another name
            pass
        n += 1
        dest = alternative_name(final, n)
    if sync_dir:
        fsync_dirs([dest.parent])
    return dest


def _move_unless_taken(part: Path, dest: Path) -> bool:
    """Move ``part`` to ``dest`` unless something (a file, a symlink) is there: False then, nothing moved.

    Why not "exists? then rename": a worker's finishers place at once, and a file whose name is taken goes
    to the next free one (``a.CSV``'s new version to ``a.1.CSV``) while the remote may hold an ``a.1.CSV``
    of its own: both could see the name free, and the second rename would replace the first, whose bytes
    were never delivered though the ledger records them. ``renameat2(RENAME_NOREPLACE)`` moves atomically
    or fails with EEXIST. Where the kernel or file system lacks it: a hard link (EEXIST too) then the part's
    unlink; a crash between them leaves the part and the final name one file, so a resumed fetch must never
    write into a part with a second name (:func:`_fresh_if_linked`). Without hard links: check, then rename
    (racy, as before)."""
    moved = _rename_noreplace(part, dest)
    if moved is not None:
        return moved
    try:
        os.link(part, dest, follow_symlinks=False)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        if dest.exists() or dest.is_symlink():
            return False
        os.replace(part, dest)
        return True
    part.unlink()
    return True


_NO_HARD_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS})
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def _fresh_if_linked(part: Path) -> None:
    """A part that is also a placed file (a crash between :func:`_move_unless_taken`'s link and unlink) loses
    its name, so the fetch starts a new part: resuming into it would write into the placed file."""
    try:
        if os.lstat(part).st_nlink > 1:
            part.unlink()
    except FileNotFoundError:
        pass


def _rename_noreplace(part: Path, dest: Path) -> bool | None:
    """``renameat2(part, dest, RENAME_NOREPLACE)``: True moved, False ``dest`` taken, None not available here
    (an old C library or kernel, a file system without it)."""
    fn = getattr(libc(), "renameat2", None)
    if fn is None:
        return None
    if fn(_AT_FDCWD, os.fsencode(part), _AT_FDCWD, os.fsencode(dest), _RENAME_NOREPLACE) == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.EEXIST:
        return False
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return None
    raise OSError(err, os.strerror(err), str(part), None, str(dest))


def fsync_dirs(directories: Iterable[Path]) -> None:
    """fsync each directory once: the renames made in it survive a crash."""
    for directory in dict.fromkeys(directories):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a crash
        finally:
            os.close(dir_fd)


_PART_NAME = re.compile(r"\.(?P<name>.+)\.\d+-\d+(?:\.ranges(?:\.done)?)?\.part", re.DOTALL)


def clean_stale_parts(finals: list[Path]) -> None:
    """Remove every part left beside each of ``finals`` (fetched and in place): older versions' parts,
    a ranged part's record. One directory listing per directory."""
    by_dir: dict[Path, set[str]] = collections.defaultdict(set)
    for final in finals:
        by_dir[final.parent].add(final.name)
    for directory, names in by_dir.items():
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            m = _PART_NAME.fullmatch(entry.name)
            if m and m["name"] in names:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def list_remote(conn: Connection, settings: Settings) -> list[RemoteFile]:
    seen: dict[str, RemoteFile] = {}
    for top in settings.smt_remote_dirs:
        for f in conn.walk(top, settings.patterns):
            seen.setdefault(f.path, f)
    return list(seen.values())


def run_sync(
    settings: Settings,
    *,
    workers: int = 4,
    dry_run: bool = False,
    wait: bool = False,
    accept_new_host_key: bool = False,
    on_bytes: Callable[[int], None] | None = None,
    on_plan: Callable[[SyncReport], None] | None = None,
    force_repost: bool = False,
) -> SyncReport | None:
    """One pass. Returns None when another pass holds the lock (and ``wait`` is off).

    ``force_repost`` (the webhook's ``forceRepost``): what this pass fetches is delivered even if the same
    bytes were sent before; their ledger rows are dropped before the file is renamed into the inbox.
    """
    with open_ledger(settings, max_connections=workers + 2) as ledger, ledger.sync_lock(wait) as locked:
        if not locked:
            return None
        started = time.monotonic()
        began = time.time()
        report = SyncReport(dry_run=dry_run)
        try:
            with Connection(settings, accept_new_host_key=accept_new_host_key) as conn:
                remote = list_remote(conn, settings)
            known = ledger.remote_files()
            report.listed = len(remote)
            report.todo = [f for f in remote if known.get(f.path) != (f.size, f.mtime)]
            report.already = report.listed - len(report.todo)
            if on_plan:
                on_plan(report)
            if not dry_run and report.todo:
                _fetch_all(settings, ledger, report, workers, on_bytes, force_repost)
        except SmtWatchError as exc:
            if not dry_run:
                _record(ledger, settings, began, report, str(exc))
            raise
        report.seconds = time.monotonic() - started
        if not dry_run:  # a dry run fetched nothing: the last real pass stays what `status` shows
            _record(ledger, settings, began, report, None)
        return report


def _record(ledger: SyncMemory, settings: Settings, began: float, report: SyncReport, error: str | None) -> None:
    """The pass as `status` shows it; a ledger that fails here does not turn the pass into a failure."""
    from smt_watch.status import record_sync

    try:
        record_sync(ledger, settings.node_name, began, report, error)
    except SmtWatchError as exc:
        log.warning("Could not record this sync pass for `status`: %s", exc)


@dataclass(frozen=True)
class Job:
    """One unit of work for a worker: a whole file (``end`` is None: single stream into its ``.part``,
    resumable by appending) or the byte range ``[start, end)`` of a big file, written with ``pwrite`` into
    its ``.ranges.part``. ``place``: a finished whole file is renamed into place by the worker (off with
    ``force_repost``, where this process first drops the ledger rows of its hash)."""

    n: int
    remote: RemoteFile
    final: Path
    start: int = 0
    end: int | None = None
    place: bool = True


class _Ranged:
    """A big file fetched as byte ranges by several workers into one ``.ranges.part``.

    The pieces done are recorded in ``.ranges.done.part`` beside it, one ``start end`` line each, written
    only after the part's data was fdatasync'ed: a later pass resumes exactly the pieces not recorded (a
    ranged part is never taken as a resumable prefix). The SHA-256 is of the part itself, read back in
    order as its done prefix grows (from the page cache, while the rest is still being fetched), so it is
    the hash of every byte renamed into place, resumed pieces included.
    """

    def __init__(self, remote: RemoteFile, final: Path, piece: int) -> None:
        self.remote, self.final = remote, final
        self.part = ranged_part_path(final, remote)
        self.record = self.part.with_name(self.part.name[: -len(".part")] + ".done.part")
        final.parent.mkdir(parents=True, exist_ok=True)
        _fresh_if_linked(self.part)
        if not self.part.exists():
            self.record.unlink(missing_ok=True)  # a record without its part says nothing
        self.fd = os.open(self.part, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            # Nothing is allocated ahead: the part grows only where received bytes are written (a server
            # listing 1 TiB and serving 7 KB must not leave a 1 TiB sparse file). A part without its record,
            # or longer than the file, says nothing: start over.
            if not self.record.exists() or os.fstat(self.fd).st_size > remote.size:
                os.ftruncate(self.fd, 0)
                self.record.unlink(missing_ok=True)
            recorded = self._read_record()
            self.pieces = [(a, min(a + piece, remote.size)) for a in range(0, remote.size, piece)] or [(0, 0)]
            self.done = {p for p in self.pieces if any(a <= p[0] and p[1] <= b for a, b in recorded)}
        except BaseException:
            os.close(self.fd)
            raise
        if self.done:
            log.info("Resuming %s: %d of %d pieces already fetched", remote.path, len(self.done), len(self.pieces))
        self.digest = hashlib.sha256()
        self.hashed = 0  # pieces[:hashed] are in the digest
        self.failed = False
        self.closed = False

    def _read_record(self) -> list[tuple[int, int]]:
        try:
            text = self.record.read_text("ascii", "replace")
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():  # a torn last line (a crash while appending) is ignored
            fields = line.split()
            if len(fields) == 2 and all(f.isdigit() for f in fields):
                out.append((int(fields[0]), int(fields[1])))
        return out

    def todo(self) -> list[tuple[int, int]]:
        return [p for p in self.pieces if p not in self.done]

    def complete(self, piece: tuple[int, int]) -> bool:
        """``piece`` was written: make it durable, record it, hash what became contiguous. True when all done."""
        os.fdatasync(self.fd)
        with self.record.open("a", encoding="ascii") as fh:
            fh.write(f"{piece[0]} {piece[1]}\n")
        self.done.add(piece)
        self._hash_prefix()
        return self.hashed == len(self.pieces)

    def _hash_prefix(self) -> None:
        while self.hashed < len(self.pieces) and self.pieces[self.hashed] in self.done:
            at, end = self.pieces[self.hashed]
            while at < end:
                data = os.pread(self.fd, min(HASH_BLOCK, end - at), at)
                if not data:
                    raise SftpError(f"{self.remote.path}: its part ended early at {at} bytes")
                self.digest.update(data)
                at += len(data)
            self.hashed += 1

    def finish(self) -> str:
        self._hash_prefix()  # a pass that resumed with every piece already done
        if (size := os.fstat(self.fd).st_size) != self.remote.size:
            raise SizeMismatch(f"{self.remote.path}: got {size} bytes, the server listed {self.remote.size}")
        os.fsync(self.fd)
        self.close()
        return self.digest.hexdigest()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)

    def discard(self) -> None:
        """The served size did not match the listed one: nothing of this file is kept."""
        self.close()
        self.part.unlink(missing_ok=True)
        self.record.unlink(missing_ok=True)


def ranged_part_path(final: Path, remote: RemoteFile) -> Path:
    return final.with_name(f".{final.name}.{remote.size}-{remote.mtime}.ranges.part")


def _plan(settings: Settings, todo: list[RemoteFile], split: bool, place_in_worker: bool,
          parts: _PartsHere | None = None) -> tuple[list[Job], dict[str, _Ranged]]:
    """The jobs, biggest file first (the pass ends sooner), a ranged file's pieces in order. ``parts``: the
    pass's listing of the inbox's parts, shared with :func:`_fits_free_space` (None: listed here)."""
    jobs: list[Job] = []
    ranged: dict[str, _Ranged] = {}
    parts = parts or _PartsHere()
    for f in sorted(todo, key=lambda f: -f.size):
        final = settings.local_dir / f.relative
        resumable_stream = parts.has(part_path(final, f))
        if (split and f.size >= SPLIT_MIN and not resumable_stream) or parts.has(ranged_part_path(final, f)):
            try:
                r = _Ranged(f, final, PIECE)
            except OSError:
                pass  # a local problem: the whole-file job reports it as this file's failure
            else:
                ranged[f.path] = r
                jobs += [Job(len(jobs) + i, f, final, a, b) for i, (a, b) in enumerate(r.todo())]
                continue
        jobs.append(Job(len(jobs), f, final, place=place_in_worker))
    return jobs, ranged


def _fetch_all(
    settings: Settings,
    ledger: SyncMemory,
    report: SyncReport,
    workers: int,
    on_bytes: Callable[[int], None] | None,
    force_repost: bool,
) -> None:
    """Hand the jobs to ``workers`` workers (each with its own SSH connection) and record what they fetch.

    A big pass runs its workers as processes (each its own interpreter, so paramiko's per-packet Python
    work is spread over the cores) and splits big files into byte ranges; a small one runs them as threads
    here (no start-up cost). Either way the workers only fetch (and rename a finished whole file into
    place); this process keeps every decision and is the only one that touches the ledger.
    """
    parts = _PartsHere()  # each inbox directory listed once for both: nothing makes a part in between
    fitting = _fits_free_space(settings, report, parts)
    total = sum(f.size for f in fitting)
    processes = workers > 1 and (total >= PROCESS_MIN_BYTES or len(fitting) >= PROCESS_MIN_FILES)
    jobs, ranged = _plan(settings, fitting, split=processes, place_in_worker=not force_repost, parts=parts)
    pool = _Pool(settings, max(1, min(workers, len(jobs))), processes)
    try:
        _drive(settings, ledger, report, pool, jobs, ranged, on_bytes, force_repost)
    finally:
        pool.close()
        for r in ranged.values():
            r.close()
        clean_stale_parts(report.placed)


def free_bytes(directory: Path) -> int:
    """Bytes an unprivileged writer may still use on the file system of ``directory`` (or of its nearest
    existing parent: the inbox may not exist yet)."""
    at = directory
    while not at.exists() and at.parent != at:
        at = at.parent
    st = os.statvfs(at)
    return st.f_bavail * st.f_frsize


class _PartsHere:
    """Which hidden parts exist, from one listing of each inbox directory: planning a pass of 1,000 new
    files asked for four stats a file (a tenth of the pass's own CPU) where a listing or two does."""

    def __init__(self) -> None:
        self._names: dict[Path, frozenset[str]] = {}

    def has(self, part: Path) -> bool:
        names = self._names.get(part.parent)
        if names is None:
            try:
                names = frozenset(e.name for e in os.scandir(part.parent) if e.name.endswith(".part"))
            except OSError:  # not there yet (nothing to resume), or unreadable (the fetch will say so)
                names = frozenset()
            self._names[part.parent] = names
        return part.name in names


def _fits_free_space(settings: Settings, report: SyncReport, parts: _PartsHere | None = None) -> list[RemoteFile]:
    """The files of ``report.todo`` whose listed size fits in the inbox's free space, biggest first, each
    counted against what the ones before it take. A file that does not fit fails now with its reason: a
    remote size is a claim, and nothing is allocated for it before the bytes arrive."""
    budget = free_bytes(settings.local_dir)
    fitting = []
    parts = parts or _PartsHere()
    for f in sorted(report.todo, key=lambda f: -f.size):
        final = settings.local_dir / f.relative
        have = 0
        for part in (part_path(final, f), ranged_part_path(final, f)):
            if not parts.has(part):
                continue
            with contextlib.suppress(OSError):
                st = part.lstat()
                have = max(have, min(st.st_size, st.st_blocks * 512))
        need = max(0, f.size - have)
        if need > budget:
            log.error("Failed to fetch %s: the server lists %s, more than the %s free in %s; not fetched",
                      f.path, human_bytes(f.size), human_bytes(budget), settings.local_dir)
            report.failed.append(f.path)
            continue
        budget -= need
        fitting.append(f)
    return fitting


def _drive(
    settings: Settings,
    ledger: SyncMemory,
    report: SyncReport,
    pool: _Pool,
    jobs: list[Job],
    ranged: dict[str, _Ranged],
    on_bytes: Callable[[int], None] | None,
    force_repost: bool,
) -> None:
    waiting = collections.deque(jobs)
    outstanding: dict[int, dict[int, Job]] = {i: {} for i in range(len(pool.conns))}
    fatal: list[BaseException] = []
    landed = _Landed()

    def fail(remote: RemoteFile, reason: object) -> None:
        log.error("Failed to fetch %s: %s", remote.path, reason)
        report.failed.append(remote.path)

    for r in list(ranged.values()):
        if not r.todo():  # every piece fetched by an earlier pass: only the hash and the rename are left
            try:
                _finish_ranged(ledger, report, r, force_repost)
            except SizeMismatch as exc:
                r.failed = True
                r.discard()
                fail(r.remote, exc)

    def feed(w: int) -> None:
        while waiting and _room(outstanding[w], waiting[0]) and not fatal:
            job = waiting.popleft()
            r = ranged.get(job.remote.path)
            if r is not None and (r.failed or r.closed):
                continue  # another piece of this file failed: the rest waits for the next pass
            outstanding[w][job.n] = job
            pool.conns[w].send(job)

    for w in outstanding:
        feed(w)
    while any(outstanding.values()):
        for w, msg in pool.receive([w for w, o in outstanding.items() if o]):
            if msg is None:  # the worker is gone (killed, crashed): its jobs fail in this pass
                for job in outstanding.pop(w).values():
                    _job_failed(report, ranged, job, f"worker process exited ({pool.exitcode(w)})", fail)
                continue
            kind = msg[0]
            if kind == "bytes":
                if on_bytes:
                    on_bytes(msg[1])
                continue
            job = outstanding[w].pop(msg[1])
            if kind == "done":
                _job_done(ledger, report, ranged, job, msg[2], msg[3], force_repost, fail, landed)
            elif kind == "failed":
                _job_failed(report, ranged, job, msg[2], fail, discard=len(msg) > 3 and bool(msg[3]))
            else:  # "fatal": a ConfigError (host key, login): nothing more is fetched
                fatal.append(msg[2])
            feed(w)
        if landed.due():
            landed.flush(ledger, report, fail)
    landed.flush(ledger, report, fail)
    if fatal:
        raise fatal[0]


def _room(held: dict[int, Job], job: Job) -> bool:
    """Whether a worker holding ``held`` (sent, not yet answered) is sent ``job`` now.

    Ranged pieces: ``DEPTH``. Whole files: at least ``DEPTH_WHOLE``, and up to ``DEPTH_SMALL`` while they
    add up to less than ``QUEUED_BYTES``. Why more small files: a worker holds the files its finisher
    threads are still making durable, and with only four in hand it often had nothing left to open ahead
    (11–35 % of 100 KB files cost an extra round trip) and waited for this process to answer. Why bounded
    by bytes: what a worker holds is not shared out when the others run dry, so the pass's end waits for it."""
    if job.end is not None:
        return len(held) < DEPTH
    return len(held) < DEPTH_WHOLE or (len(held) < DEPTH_SMALL
                                       and sum(j.remote.size for j in held.values()) < QUEUED_BYTES)


class _Landed:
    """Whole files the workers renamed into place (each fsynced first), not yet recorded.

    A rename is durable once its directory is fsynced; one fsync per directory for a batch of files,
    instead of one per file, halves the fsyncs of a pass of small files. A file is recorded only after
    that fsync: a crash before it may undo the rename, and then the next pass fetches the file again
    (the same bytes already in place are recognised by :func:`place`, not stored twice)."""

    def __init__(self) -> None:
        self.files: list[tuple[RemoteFile, Path, str, str]] = []  # remote, final, SHA-256, where it landed
        self.since = 0.0

    def add(self, remote: RemoteFile, final: Path, sha: str, dest: str) -> None:
        if not self.files:
            self.since = time.monotonic()
        self.files.append((remote, final, sha, dest))

    def due(self) -> bool:
        return len(self.files) >= BATCH_FILES or (bool(self.files) and time.monotonic() - self.since >= BATCH_SECONDS)

    def flush(self, ledger: SyncMemory, report: SyncReport, fail: Callable[[RemoteFile, object], None]) -> None:
        files, self.files = self.files, []
        if not files:
            return
        try:
            fsync_dirs(Path(dest).parent for _, _, _, dest in files)
        except OSError as exc:
            for remote, *_ in files:
                fail(remote, reason(exc))
            return
        for remote, final, sha, dest in files:
            ledger.record_fetch(remote.path, remote.size, remote.mtime, sha, dest)
            report.placed.append(final)
            report.fetched.append(Path(dest))
            report.bytes += remote.size


def _job_done(ledger: SyncMemory, report: SyncReport, ranged: dict[str, _Ranged], job: Job, dest: str | None,
              sha: str | None, force_repost: bool, fail: Callable[[RemoteFile, object], None],
              landed: _Landed) -> None:
    remote = job.remote
    r = ranged.get(remote.path)
    if r is not None:
        assert job.end is not None
        try:
            if not r.failed and r.complete((job.start, job.end)):
                _finish_ranged(ledger, report, r, force_repost)
        except (SmtWatchError, OSError) as exc:
            r.failed = True
            r.discard() if isinstance(exc, SizeMismatch) else r.close()
            fail(remote, reason(exc))
        return
    assert sha is not None
    try:
        if dest is None:  # force_repost: the ledger forgets the hash before the watcher can see the file
            ledger.forget([sha])
            dest = str(place(part_path(job.final, remote), job.final, sha, sync_dir=False))
    except (SmtWatchError, OSError) as exc:
        fail(remote, reason(exc))
        return
    landed.add(remote, job.final, sha, dest)  # recorded once its directory is fsynced


def _finish_ranged(ledger: SyncMemory, report: SyncReport, r: _Ranged, force_repost: bool) -> None:
    sha = r.finish()
    if force_repost:
        ledger.forget([sha])
    dest = place(r.part, r.final, sha)  # the record goes with clean_stale_parts
    ledger.record_fetch(r.remote.path, r.remote.size, r.remote.mtime, sha, str(dest))
    log.info("Fetched %s (%s, %d ranges) -> %s", r.remote.path, human_bytes(r.remote.size), len(r.pieces), dest)
    report.placed.append(r.final)
    report.fetched.append(dest)
    report.bytes += r.remote.size


def _job_failed(report: SyncReport, ranged: dict[str, _Ranged], job: Job, reason: object,
                fail: Callable[[RemoteFile, object], None], discard: bool = False) -> None:
    r = ranged.get(job.remote.path)
    if r is not None:
        if discard:
            r.discard()  # the server's size is not what it listed: nothing of the file stays
        if r.failed:
            return  # said once per file
        r.failed = True
        r.close()  # else its part and record stay for the next pass
    fail(job.remote, reason)


# --- workers --------------------------------------------------------------------------------------------


class _Pool:
    """Workers, each on one end of a pipe: threads here, or processes (forked from this process when it
    runs no other thread, else from the fork server: see :func:`_process_context`). A worker process dies
    with its parent (``PR_SET_PDEATHSIG``; the fork server exits when we do)."""

    def __init__(self, settings: Settings, n: int, processes: bool) -> None:
        self.conns: list[MpConnection] = []
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self.threads: list[threading.Thread] = []
        if processes:
            ctx = _process_context()
            for i in range(n):
                parent, proc = start_worker(ctx, _process_main, (settings,), f"smt-sync-{i}")
                self.conns.append(parent)
                self.procs.append(proc)
        else:
            for i in range(n):
                parent, child = multiprocessing.Pipe()
                t = threading.Thread(target=_worker_loop, args=(settings, child, threading.Lock()),
                                     name=f"smt-sync-{i}", daemon=True)
                t.start()
                self.conns.append(parent)
                self.threads.append(t)

    def receive(self, among: list[int]) -> list[tuple[int, tuple[Any, ...] | None]]:
        """The next messages from the workers in ``among``, each worker's in order; ``None`` for one whose
        pipe closed (its last). What a ready worker already sent is taken in the same call (up to
        ``DRAIN``): one wait (a selector built and torn down) for several messages, not one each."""
        index = {id(self.conns[w]): w for w in among}
        out: list[tuple[int, tuple[Any, ...] | None]] = []
        for ready in mp_wait([self.conns[w] for w in among]):
            w = index[id(ready)]
            conn = self.conns[w]
            try:
                out.append((w, conn.recv()))
                for _ in range(DRAIN - 1):
                    if not conn.poll():
                        break
                    out.append((w, conn.recv()))
            except (EOFError, OSError):
                out.append((w, None))
        return out

    def exitcode(self, w: int) -> int | None:
        if not self.procs:
            return None
        self.procs[w].join(timeout=5)
        return self.procs[w].exitcode

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(None)
        for t in self.threads:
            t.join(timeout=JOIN_SECONDS)
        for proc in self.procs:
            stop_process(proc, JOIN_SECONDS)
        for conn in self.conns:
            conn.close()
        if self.procs:
            # Reap the fork server now (it would exit with us anyway): no process outlives the pass, and
            # the CPU of the workers it reaped is counted in ours (getrusage, time(1)).
            from multiprocessing import forkserver

            stop = getattr(forkserver._forkserver, "_stop", None)  # CPython >= 3.9
            if stop is not None:
                stop()


def _process_context() -> ForkContext | ForkServerContext:
    """How worker processes start: a plain fork when this process runs no other thread (a ``smt-watch
    sync`` pass once its listing connection is closed), else through the fork server.

    A fork copies a process whose modules are loaded: no interpreter to start and nothing to import again
    (the fork server costs ~0.4 s of CPU and ~0.3 s before the first worker can connect, a tenth of a pass
    of 1,000 small files). Forking is safe only when no other thread can hold a lock at that moment
    (logging's, a connection pool's): ``serve`` and ``watch`` run passes among their threads, and a
    PostgreSQL ledger's pool has threads of its own, so they go through the fork server, whose one process
    has loaded this module once and forks each worker from there. A worker never touches what it inherits
    (the ledger's connection, the sync lock's descriptor): it ends with ``os._exit`` and dies with us."""
    if threading.active_count() == 1:
        log.debug("Sync workers start as forks of this process")
        return multiprocessing.get_context("fork")
    log.debug("Sync workers start from the fork server (this process runs %d threads)", threading.active_count())
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["smt_watch.sync"])
    return ctx


def _process_main(settings: Settings, conn: MpConnection, logs: WorkerLogging) -> None:
    enter_worker(settings, logs, (signal.SIGINT,))  # the parent decides; it ends us when it stops
    keep_freed_memory()  # this process only downloads (the fork server's worker: not serve's own allocator)
    # What the worker inherited (every module loaded, the parent's objects) lives as long as it does: out
    # of the collector's way, a full collection looks only at what the worker made, and does not touch
    # (and copy) the pages it shares with its parent.
    gc.freeze()
    _worker_loop(settings, conn, threading.Lock())


def _worker_loop(settings: Settings, conn: MpConnection, lock: threading.Lock) -> None:
    """Fetch the jobs the pipe sends until it sends None or closes; answer each with one message.
    ``("bytes", n)`` progress messages go every ``PROGRESS_STEP`` and before this worker waits for work,
    not once per file (a pass of small files would send two messages a file)."""
    current: Connection | None = None

    def send(msg: tuple[Any, ...]) -> None:
        with lock:
            conn.send(msg)

    queued: collections.deque[Job] = collections.deque()  # received, not yet run: the next one is opened ahead
    closing = False
    finisher = _Finisher(send)
    progress = _Progress(send)
    try:
        while True:
            while not closing and (not queued or conn.poll()):
                if not queued:
                    progress.flush()  # about to wait for work: the bytes fetched so far are told first
                try:
                    got: Job | None = conn.recv()
                except (EOFError, OSError):
                    got = None
                if got is None:
                    closing = True
                else:
                    queued.append(got)
            if not queued:
                return
            job = queued.popleft()
            try:
                current, fetched = _run_job(settings, current, job, progress, queued[0] if queued else None)
            except ConfigError as exc:
                send(("fatal", job.n, exc))
                return
            except (SmtWatchError, OSError) as exc:
                # A local problem (disk full, a file where a directory should be) fails this file only.
                progress.flush()
                send(("failed", job.n, reason(exc), isinstance(exc, SizeMismatch)))
                continue
            if fetched is None:  # a range: written, the parent makes it durable and records it
                progress.flush()
                send(("done", job.n, None, None))
            else:
                finisher.put(job, fetched)  # answered once durable and in place, while the next one is fetched
    except (OSError, EOFError):
        return  # the parent is gone
    finally:
        finisher.close()  # the files in hand are made durable and answered first
        if current is not None:
            current.close()


@dataclass(frozen=True)
class _Fetched:
    """A whole file written to its part (not yet fsynced) and its SHA-256, for :class:`_Finisher`."""

    part: Path
    final: Path
    sha256: str
    started: float  # time.monotonic() when its fetch began, for the log line


def make_durable(path: Path) -> None:
    """fsync ``path`` (a finished part) through a descriptor of its own: its bytes survive a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)  # the part's bytes are on disk before it is renamed into place
    finally:
        os.close(fd)


@functools.cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """``sync_file_range(2)`` from the C library (Python's ``os`` has none), or None where there is none.
    Looked up on first use, not when this module is imported (``serve`` imports it and may never sync)."""
    fn = getattr(libc(), "sync_file_range", None)
    if fn is None:
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


def start_writeback(fd: int, offset: int = 0, nbytes: int = 0) -> None:
    """Ask the kernel to start writing bytes ``[offset, offset + nbytes)`` of ``fd`` to disk now (``nbytes``
    0: to the end of the file), without waiting for them. Durability is still the fsync's job; this only
    leaves it little to do.

    Why: the kernel otherwise keeps a download's bytes in memory as dirty pages until the fsync before the
    rename writes them all, after the last byte arrived; and a writer that piles up dirty pages is slowed
    down by the kernel's dirty-page throttling. Measured on this disk: 1 GiB written then fsynced 4.3–9.3 s,
    the same with this every 8 MiB 0.8–1.1 s; a 1 GiB `--workers 1` pass's final fsync 0.38–0.70 s without
    it, 0.00–0.01 s with it (wall 5.7/5.8/7.4 s against 4.6/5.5/6.7 s, alternating). Failures are left to
    the fsync, which reports them."""
    fn = _sync_file_range()
    if fn is not None:
        fn(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)


class _Writeback:
    """A download's progress callback that also starts the disk writing what it wrote, every
    ``WRITEBACK_STEP`` bytes (:func:`start_writeback`).

    A whole file (``part``): its download writes through a file object of its own, so this opens the part
    (once it has a step's worth: a small file never does) and starts the writeback of all of it. A byte
    range (no ``part``): the caller gives the descriptor it writes through with ``pwrite`` (``fd``) and
    where it writes (``at``), and only the bytes written since the last step are handed over. Writeback is
    a hint: a part that cannot be opened for it is fetched without it (the fsync before the rename still
    makes it durable, and reports a real disk error)."""

    def __init__(self, progress: Callable[[int], None] | None, part: Path | None = None, at: int = 0) -> None:
        self.progress, self.part = progress, part
        self.fd = -1
        self.at = self.kicked = at  # bytes before ``kicked`` were handed to start_writeback

    def __call__(self, n: int) -> None:
        if self.progress is not None:
            self.progress(n)
        self.at += n
        if self.at - self.kicked < WRITEBACK_STEP:
            return
        if self.part is None:
            if self.fd >= 0:
                start_writeback(self.fd, self.kicked, self.at - self.kicked)
        else:
            if self.fd < 0:
                try:
                    self.fd = os.open(self.part, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                except OSError as exc:
                    log.debug("No writeback for %s: %s", self.part, exc)
                    self.part = None  # and fd stays -1: no more tries for this file
            if self.fd >= 0:
                start_writeback(self.fd)  # pages already being written are left alone
        self.kicked = self.at

    def restart(self, fd: int) -> None:
        """A range's new attempt: it writes through ``fd`` from where the bytes so far end."""
        self.fd, self.kicked = fd, self.at

    def close(self) -> None:
        if self.part is not None and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1


class _Finisher:
    """A worker's threads that make each fetched whole file durable (fsync), rename it into place and answer
    the parent, while the worker's connection already fetches the next file.

    Why threads: an fsync waits for the disk (1–4 ms each for a small file here, one per file), and a
    worker that waited for it left its connection idle; fsync and the rename release the GIL. Why several
    (``FINISHERS`` a worker): fsyncs in series are a queue of disk waits, while fsyncs issued at once
    overlap on the disk (1,000 files of 100 KB measured on this disk: 3.9–7.1 s in series, 0.9–1.9 s from 4
    threads, about what writing them without any fsync takes); one thread fell behind the fetching, and the
    files it held kept the worker's queue short (the next file could not be opened ahead). Each file is
    still fsynced by itself: ``syncfs(2)`` would make a batch durable in one call, but it writes back every
    dirty file on the inbox's file system (another program's, a 1 GiB part in progress), so how long it
    takes would depend on what else runs on the droplet, and its error says nothing about which file.

    A file still counts only once durable: the parent hears "done" after the fsync and the rename, and
    records it only after the directory's fsync (:class:`_Landed`). A worker killed meanwhile leaves the
    part, which the next pass resumes (it is complete: only the end-of-file probe is asked for)."""

    def __init__(self, send: Callable[[tuple[Any, ...]], None]) -> None:
        self._send = send
        self._queue: queue.SimpleQueue[tuple[Job, _Fetched] | None] = queue.SimpleQueue()
        name = threading.current_thread().name
        self._threads: list[threading.Thread] = []
        try:
            for i in range(FINISHERS):
                t = threading.Thread(target=self._run, name=f"{name}-finish-{i}", daemon=True)
                t.start()
                self._threads.append(t)
        except BaseException:  # a thread that could not start (RuntimeError): end the ones that did
            self.close()
            raise

    def put(self, job: Job, fetched: _Fetched) -> None:
        self._queue.put((job, fetched))

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            job, f = item
            msg: tuple[Any, ...]
            try:
                make_durable(f.part)
                dest = place(f.part, f.final, f.sha256, sync_dir=False) if job.place else None
            except Exception as exc:  # a local problem fails this file (its part stays for the next pass);
                # this thread answers every file it took, or the pass would wait for it forever
                msg = ("failed", job.n, reason(exc), False)
            else:
                if dest is not None:
                    log.info("Fetched %s (%s in %.1f s) -> %s", job.remote.path, human_bytes(job.remote.size),
                             time.monotonic() - f.started, dest)
                msg = ("done", job.n, None if dest is None else str(dest), f.sha256)
            try:
                self._send(msg)
            except (OSError, EOFError):
                return  # the parent is gone


class _Progress:
    """Counts bytes, tells the parent every ``PROGRESS_STEP`` (one small message, not one per packet)."""

    def __init__(self, send: Callable[[tuple[Any, ...]], None]) -> None:
        self.send, self.pending = send, 0

    def __call__(self, n: int) -> None:
        self.pending += n
        if self.pending >= PROGRESS_STEP:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.send(("bytes", self.pending))
            self.pending = 0


def _run_job(settings: Settings, conn: Connection | None, job: Job, progress: Callable[[int], None],
             after: Job | None = None) -> tuple[Connection, _Fetched | None]:
    """Fetch ``job``: a whole file into its part (to be made durable and placed by the :class:`_Finisher`),
    or a range into the ranged part (None: the parent makes it durable)."""
    if job.end is None:
        ahead = after.remote if after is not None and after.end is None else None
        started = time.monotonic()
        conn, sha = _fetch_with_retries(settings, conn, job.remote, progress, ahead=ahead)
        return conn, _Fetched(part_path(job.final, job.remote), job.final, sha, started)
    return _fetch_range_with_retries(settings, conn, job, progress), None


def _with_retries(settings: Settings, remote: RemoteFile, attempt: Callable[[], _T]) -> _T:
    """``attempt()``, retried as :func:`_retrying` says. The first try runs outside tenacity: its
    bookkeeping (a ``Retrying``, a future and an attempt object a call) was ~5 % of a worker's CPU for a
    small file, and most files need one try. A first try that failed is handed to tenacity as its first
    attempt, so the attempts, the waits and what is logged stay tenacity's."""
    try:
        return attempt()
    except SftpError as exc:
        if not _retryable(exc):
            raise
        failed: list[SftpError] = [exc]

    def again() -> _T:
        if failed:
            raise failed.pop()  # the first try, already made: tenacity counts it, says it and waits
        return attempt()

    return _retrying(settings, remote)(again)


def _retryable(exc: BaseException) -> bool:
    """A size that does not match is what the server serves: asking again in this pass gets the same."""
    return isinstance(exc, SftpError) and not isinstance(exc, SizeMismatch)


def _retrying(settings: Settings, remote: RemoteFile) -> tenacity.Retrying:
    """Up to ATTEMPTS tries of one file or range in this pass, waiting SMT_RETRY_BACKOFF_SECONDS, then double
    that, between them (at most 10 s): the step an operator sets for delivery's in-call retries."""
    return tenacity.Retrying(
        retry=tenacity.retry_if_exception(_retryable),
        stop=tenacity.stop_after_attempt(ATTEMPTS),
        wait=tenacity.wait_exponential(multiplier=settings.retry_backoff, max=10),
        before_sleep=lambda s: log.warning("Retrying %s after: %s", remote.path,
                                           s.outcome.exception() if s.outcome else "?"),
        reraise=True,
    )


def _fetch_range_with_retries(settings: Settings, conn: Connection | None, job: Job,
                              progress: Callable[[int], None]) -> Connection:
    """Fetch one byte range into the ranged part; a dropped connection is re-opened and the range goes on
    where the bytes written so far end."""
    assert job.end is not None
    remote, end = job.remote, job.end
    part = ranged_part_path(job.final, remote)
    holder = [conn]
    written = _Writeback(progress, at=job.start)  # its ``at``: where the bytes written so far end

    def attempt() -> None:
        current = holder[0] if holder[0] is not None else Connection(settings)
        holder[0] = current
        fd = os.open(part, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)  # made by the parent, not here
        written.restart(fd)
        try:
            current.fetch_range(remote, fd, written.at, end, written)
        except SftpError:
            current.close()
            holder[0] = None
            raise
        finally:
            written.close()
            os.close(fd)

    _with_retries(settings, remote, attempt)
    assert holder[0] is not None
    return holder[0]


def _fetch_with_retries(
    settings: Settings,
    conn: Connection | None,
    remote: RemoteFile,
    on_bytes: Callable[[int], None] | None,
    ahead: RemoteFile | None = None,
) -> tuple[Connection, str]:
    """Fetch one file into its part; a dropped connection is re-opened and the transfer resumes from its
    part. The part is not fsynced here: the worker's :class:`_Finisher` does that, then renames it into
    place (the rename's directory is fsynced by the pass, for a batch, before recording them).
    ``ahead``: the file fetched next on this connection, opened while this one is read."""
    final = settings.local_dir / remote.relative
    part = part_path(final, remote)
    final.parent.mkdir(parents=True, exist_ok=True)
    _fresh_if_linked(part)
    holder = [conn]

    def attempt() -> str:
        current = holder[0] if holder[0] is not None else Connection(settings)
        holder[0] = current
        written = _Writeback(on_bytes, part)
        try:
            return current.download(remote, part, written, ahead=ahead, durable=False)
        except SftpError:
            current.close()
            holder[0] = None
            raise
        finally:
            written.close()

    sha = _with_retries(settings, remote, attempt)
    assert holder[0] is not None
    return holder[0], sha
