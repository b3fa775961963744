"""``watch``'s jobs: one ready file → one delivery attempt (:func:`handle_job`, :class:`JobResult`), and
the runners that carry it out in a worker thread (:class:`InThread`) or a worker process (:class:`InProcess`).

``SMT_WORKER_MODE=thread`` (the default): the ``SMT_WORKERS`` threads share the watcher's ledger connection
and HTTP client. Small, but all of them share one GIL: a backlog of small files drains at about 350 files/s
on two cores. ``process``: each worker thread hands its files to a process of its own (own GIL, ledger
connection and HTTP client): about 1.3× that on two cores (bench/RESULTS.md), for ~40–45 MB a process.

The watcher keeps every decision that needs its state (settling, the queue, counts, metrics, the
after-send action); :func:`handle_job` only needs a ledger and a sink, so it runs the same anywhere.
A process that dies (OOM killer, ``kill``) is replaced, and its file is looked at again; the claim it held
is taken over because its holder is gone. Worker processes ignore SIGINT/SIGTERM (the watcher's stop
sequence ends them after in-flight deliveries, within ``SMT_STOP_GRACE_SECONDS``) and die with the
watcher (``PR_SET_PDEATHSIG``), so none outlives it.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
from dataclasses import dataclass
from enum import Enum
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Protocol

from smt_watch.config import Settings
from smt_watch.content import sniffing
from smt_watch.delivery import Sink, make_sink
from smt_watch.errors import FileChanged, InputError, LedgerUnavailable, SmtWatchError, reason
from smt_watch.hashing import FileIdentity, Signature, identify
from smt_watch.inbox import open_beneath, regular_stat
from smt_watch.ledger import Remember, Seen
from smt_watch.ledger.roles import WatchJobs
from smt_watch.pipeline import Outcome, deliver_identified
from smt_watch.smtcsv import Sniffer
from smt_watch.statedir import open_ledger
from smt_watch.workers import WorkerLogging, enter_worker, start_worker, stop_process

log = logging.getLogger("smt_watch.workers")  # the module's former name: log filters in the field use it


class JobKind(Enum):
    """What became of one job."""

    DONE = "done"  # identified and handed to the pipeline: ``JobResult.outcome`` says what happened
    GONE = "gone"  # no longer a regular file reached beneath the inbox: nothing to do
    CHANGED = "changed"  # not the bytes that settled (still being written, or replaced): let it settle again
    SKIPPED = "skipped"  # cannot be read (``JobResult.message`` says why): left alone
    UNREADABLE = "unreadable"  # this user may not open it (EACCES): the watcher warns once and shows it in status
    ERROR = "error"  # the job itself failed (a worker process died, a ledger error): looked at again later
    UNREACHABLE = "unreachable"  # the shared ledger could not be reached: looked at again once it answers


@dataclass(frozen=True)
class JobResult:
    """What became of one job."""

    kind: JobKind
    ident: FileIdentity | None = None
    outcome: Outcome | None = None
    hashed: bool = False  # the file was read to hash it (the stat cache did not know it)
    message: str = ""


@dataclass(frozen=True, slots=True)
class Cached:
    """What the stat cache answered for a path when the watcher asked it (``seen``: None, it knew nothing):
    handed to the job so the cache is asked once per file, not again by the worker."""

    seen: Seen | None


def handle_job(settings: Settings, ledger: WatchJobs, sink: Sink, path: Path, sig: Signature,
               cached: Cached | None = None) -> JobResult:
    """Check the file is still what settled, identify it (stat cache or hash) and deliver it.

    ``cached``: the stat cache's answer the watcher already has (None: the job asks it).

    The bytes are read through a descriptor opened beneath the inbox without following a symlink on any
    component (:func:`open_beneath`): a directory swapped for a symlink at any moment cannot make us read
    (or send) a file outside the inbox."""
    root = settings.local_dir.absolute()
    st = regular_stat(path, root)  # a parent swapped for a symlink: not ours
    if st is None:
        return JobResult(JobKind.GONE)
    if Signature.of(st) != sig:
        return JobResult(JobKind.CHANGED)  # still being written: it settles again
    try:
        fd = open_beneath(root, path)
    except PermissionError:
        return JobResult(JobKind.UNREADABLE, message=f"permission denied (mode {st.st_mode & 0o7777:o})")
    except OSError:
        return JobResult(JobKind.GONE)
    try:
        if Signature.of(os.fstat(fd)) != sig:
            return JobResult(JobKind.CHANGED)  # not the file that settled (replaced, or reached another way)
        return _deliver_open(settings, ledger, sink, path, sig, fd, cached)
    finally:
        os.close(fd)


def _deliver_open(settings: Settings, ledger: WatchJobs, sink: Sink, path: Path, sig: Signature,
                  fd: int, cached: Cached | None) -> JobResult:
    source = Path(f"/proc/self/fd/{fd}")  # what the sink reads: the file this descriptor holds, whatever moves
    key = str(path)
    known = ledger.seen(key) if cached is None else cached.seen
    remember = None
    sniffer: Sniffer | None = None
    if known and known.signature == sig:
        ident = FileIdentity(path, known.sha256, sig, source)
    else:
        sniffer = sniffing(path.name)
        try:
            ident = identify(path, source, observe=sniffer.feed if sniffer else None, fd=fd)  # one read: hash, sniff
        except FileChanged:
            return JobResult(JobKind.CHANGED)
        except InputError as exc:
            return JobResult(JobKind.SKIPPED, message=str(exc))
        remember = Remember(key, ident.signature, ident.sha256)
    # the stat-cache row goes into the claim's transaction
    outcome = deliver_identified(settings, ledger, sink, ident, respect_backoff=True, remember=remember,
                                 sniffed=sniffer)
    return JobResult(JobKind.DONE, ident, outcome, hashed=remember is not None)


class Runner(Protocol):
    def run(self, path: Path, sig: Signature, cached: Cached | None = None) -> JobResult: ...

    def close(self) -> None: ...


class InThread:
    """Runs jobs in the calling thread with the watcher's own ledger and sink."""

    def __init__(self, settings: Settings, ledger: WatchJobs, sink: Sink) -> None:
        self._settings, self._ledger, self._sink = settings, ledger, sink

    def run(self, path: Path, sig: Signature, cached: Cached | None = None) -> JobResult:
        return handle_job(self._settings, self._ledger, self._sink, path, sig, cached)

    def close(self) -> None:
        pass


class InProcess:
    """Runs jobs in a worker process of its own, one job at a time over a pipe."""

    def __init__(self, settings: Settings, mode: str, name: str) -> None:
        self._settings, self._mode, self._name = settings, mode, name
        self._conn: Connection | None = None
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._start()

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # not fork: the watcher has threads and open sockets
        self._conn, self._proc = start_worker(ctx, _child_main, (self._settings, self._mode), self._name)

    def run(self, path: Path, sig: Signature, cached: Cached | None = None) -> JobResult:
        assert self._conn is not None and self._proc is not None
        try:
            self._conn.send((str(path), sig, cached))
            result: JobResult = self._conn.recv()
            return result
        except (EOFError, OSError):
            code = self._proc.exitcode
            self._reap()
            self._start()
            return JobResult(JobKind.ERROR, message=f"worker process {self._name} exited ({code}); it was restarted")

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.send(None)
        self._reap()

    def _reap(self) -> None:
        if self._proc is not None:
            stop_process(self._proc, 5)
        if self._conn is not None:
            self._conn.close()
        self._conn = self._proc = None


def _child_main(settings: Settings, mode: str, conn: Connection, logs: WorkerLogging) -> None:
    """A worker process: deliver what the pipe sends until it sends None or closes. SIGIO: the readiness
    probe's read leases, ignored as in the watcher."""
    enter_worker(settings, logs, (signal.SIGINT, signal.SIGTERM, signal.SIGIO))
    with open_ledger(settings) as ledger, contextlib.closing(
        make_sink(settings, mode, chunks=ledger, announce=False)
    ) as sink:
        while True:
            try:
                job = conn.recv()
            except (EOFError, OSError):
                return
            if job is None or os.getppid() == 1:
                return
            path, sig, cached = job
            try:
                result = handle_job(settings, ledger, sink, Path(path), sig, cached)
            except LedgerUnavailable as exc:
                result = JobResult(JobKind.UNREACHABLE, message=str(exc))
            except SmtWatchError as exc:
                result = JobResult(JobKind.ERROR, message=str(exc))
            except Exception as exc:  # a bug: logged with its traceback here, the watcher carries on
                log.exception("Unexpected error handling %s", path)
                result = JobResult(JobKind.ERROR, message=f"internal error: {reason(exc)}")
            conn.send(result)
