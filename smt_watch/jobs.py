"""``watch``'s jobs: ready files → delivery attempts, a worker's group at a time (:func:`handle_jobs`, one
claim commit and one outcome commit for the group; :class:`JobResult`), and the runners that carry them
out in a worker thread (:class:`InThread`) or a worker process (:class:`InProcess`). In thread mode the
outcome commit is the watcher's committer thread's (:func:`deliver_jobs`, then :func:`commit` of several
workers' groups at once), so a worker goes on to its next group instead of waiting for the database.

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
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

from smt_watch.config import Settings
from smt_watch.content import is_container, sniffing
from smt_watch.delivery import Sink, make_sink
from smt_watch.errors import FileChanged, InputError, LedgerUnavailable, SmtWatchError, reason
from smt_watch.hashing import HOLD_MAX, FileIdentity, Signature, identify, identify_held
from smt_watch.inbox import open_beneath, regular_stat
from smt_watch.ledger import Claim, Remember, Seen
from smt_watch.ledger.common import ClaimRequest, Mark
from smt_watch.ledger.roles import Deliveries, WatchJobs
from smt_watch.ledger.store import failed_mark, released_mark, retrying_mark, sent_mark
from smt_watch.names import sent
from smt_watch.pipeline import Outcome, deliver_identified
from smt_watch.smtcsv import Sniffer
from smt_watch.statedir import open_ledger
from smt_watch.workers import WorkerLogging, enter_worker, start_worker, stop_process

log = logging.getLogger("smt_watch.workers")
_T = TypeVar("_T")  # the module's former name: log filters in the field use it


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


GROUP_MAX = 16  # ready files a worker takes from the queue at once: one claim and one outcome commit for all
FLUSH_RETRY_SECONDS = 5.0  # a group's outcomes wait this long between attempts while the ledger is unreachable


Job = tuple[Path, Signature, Cached | None]


def handle_job(settings: Settings, ledger: WatchJobs, sink: Sink, path: Path, sig: Signature,
               cached: Cached | None = None) -> JobResult:
    """One job: :func:`handle_jobs` with a group of one."""
    return handle_jobs(settings, ledger, sink, [(path, sig, cached)])[0]


def handle_jobs(settings: Settings, ledger: WatchJobs, sink: Sink, jobs: Sequence[Job],
                stop: threading.Event | None = None) -> list[JobResult]:
    """Check each file is still what settled, identify it (stat cache or hash) and deliver it; one result
    per job, in order: :func:`deliver_jobs`, then :func:`commit` of its outcomes. ``cached``: the stat
    cache's answer the watcher already has (None: the job asks it).

    Group commit: the group's CSVs are claimed in ONE transaction (their stat-cache rows in it), sent one
    after another, and their outcomes committed in ONE more; a result says DONE only once its row is
    durable, so the watcher counts, logs and moves a file only then. A crash in between leaves the rows
    ``sending``: resumed (sent again, under the same Idempotency-Key) at the next start, as a crash between
    a 2xx and its single commit always did. An ``.asc``/``.zip`` is delivered on its own, as before.

    The bytes are read through a descriptor opened beneath the inbox without following a symlink on any
    component (:func:`open_beneath`): a directory swapped for a symlink at any moment cannot make us read
    (or send) a file outside the inbox.

    ``stop``: see :func:`commit`."""
    return commit(ledger, [deliver_jobs(settings, ledger, sink, jobs)], stop)[0]


@dataclass(frozen=True)
class Delivered:
    """A group whose files were delivered but whose outcomes are not durable yet (:func:`commit` makes them
    so): each job's result as it stands once they are, the outcomes held, and which results wait on them."""

    results: list[JobResult]
    marks: list[Mark]  # the group's outcomes, claims it did not use handed back among them
    held: list[int]  # indexes of the DONE results of claimed CSVs: acknowledged only once ``marks`` commit
    first: Path | None  # what a log line about the group's ledger work names


def deliver_jobs(settings: Settings, ledger: WatchJobs, sink: Sink, jobs: Sequence[Job]) -> Delivered:
    """:func:`handle_jobs` up to the commit of its outcomes: readiness, identity, the group's claims in one
    transaction, and the sends. ``watch``'s workers hand what this returns to the committer thread and go on
    to their next group while it is committed."""
    results: list[JobResult | None] = [None] * len(jobs)
    ready: list[_Ready] = []
    marks: list[Mark] = []
    held: list[int] = []
    try:
        for i, (path, sig, cached) in enumerate(jobs):
            got = _guarded(path, partial(_prepare, settings, ledger, path, sig, cached))
            if isinstance(got, JobResult):
                results[i] = got
            else:
                ready.append(_Ready(i, *got))
        if ready:
            marks, held = _deliver_group(settings, ledger, sink, ready, results)
    finally:
        for r in ready:
            os.close(r.fd)
    return Delivered([r if r is not None else JobResult(JobKind.ERROR, message="not handled") for r in results],
                     marks, held, ready[0].ident.path if ready else None)


def commit(ledger: WatchJobs, groups: Sequence[Delivered], stop: threading.Event | None = None
           ) -> list[list[JobResult]]:
    """The outcomes of several delivered groups committed in ONE transaction (``watch``'s committer takes
    every group its workers finished meanwhile: a drain pays one commit for several groups); the results of
    each group, in order. When the commit is refused, each group is committed on its own, once, so one group's
    refused outcomes do not hold the others back; a result whose commit failed is not acknowledged: it says
    why (its row stays ``sending`` and is delivered again, under the same Idempotency-Key).

    ``stop`` (the watcher's): while it is not set, a ledger that cannot be reached is waited for (every
    :data:`FLUSH_RETRY_SECONDS`), so a PostgreSQL outage does not make the files go out twice; once set,
    the commit is given up (the rows stay ``sending``)."""
    marks = [m for g in groups for m in g.marks]
    first = next((g.first for g in groups if g.marks and g.first is not None), None)
    flushed: JobResult | None = None
    if marks and first is not None:
        flushed = _guarded(first, partial(ledger.finish_many, marks))
        while (isinstance(flushed, JobResult) and flushed.kind is JobKind.UNREACHABLE and stop is not None
               and not stop.wait(FLUSH_RETRY_SECONDS)):
            flushed = _guarded(first, partial(ledger.finish_many, marks))  # the same outcomes, once it answers
    if flushed is None:
        return [g.results for g in groups]
    if flushed.kind is JobKind.ERROR and len(groups) > 1:
        # refused (not an outage): one group's outcomes need not cost the others theirs; each on its own, once
        return [commit(ledger, [g], stop)[0] for g in groups]
    return [[flushed if i in g.held else r for i, r in enumerate(g.results)] for g in groups]


@dataclass
class _Ready:
    """A job past its readiness checks and hashing, its descriptor open: what its claim and send need."""

    index: int
    fd: int
    ident: FileIdentity
    remember: Remember | None  # a stat-cache row to write with the claim (the file was hashed)
    sniffer: Sniffer | None


def _guarded(path: Path, work: Callable[[], _T]) -> _T | JobResult:
    """``work``, with a failure of the ledger or a bug turned into this job's result (the others go on)."""
    try:
        return work()
    except LedgerUnavailable as exc:
        return JobResult(JobKind.UNREACHABLE, message=str(exc))
    except SmtWatchError as exc:
        return JobResult(JobKind.ERROR, message=str(exc))
    except Exception as exc:  # a bug: logged with its traceback here, the watcher carries on
        log.exception("Unexpected error handling %s", path)
        return JobResult(JobKind.ERROR, message=f"internal error: {reason(exc)}")


def _prepare(settings: Settings, ledger: WatchJobs, path: Path, sig: Signature, cached: Cached | None
             ) -> JobResult | tuple[int, FileIdentity, Remember | None, Sniffer | None]:
    """Readiness (still the file that settled, reached beneath the inbox) and identity (stat cache or one
    read that hashes and sniffs). Returns the open descriptor with the identity; the caller closes it."""
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
            os.close(fd)
            return JobResult(JobKind.CHANGED)  # not the file that settled (replaced, or reached another way)
        source = Path(f"/proc/self/fd/{fd}")  # what the sink reads: the file this descriptor holds, whatever moves
        key = str(path)
        known = ledger.seen(key) if cached is None else cached.seen
        if known and known.signature == sig:
            return fd, FileIdentity(path, known.sha256, sig, source), None, None
        sniffer = sniffing(path.name)
        observe = sniffer.feed if sniffer else None
        try:
            if sig.size <= HOLD_MAX and sniffer is not None:
                # a small CSV read once: the hash, the CSV check and the request body use the same bytes
                ident = identify_held(path, fd, sig, source, observe)
            else:
                ident = identify(path, source, observe=observe, fd=fd)  # one read: hash, sniff
        except FileChanged:
            os.close(fd)
            return JobResult(JobKind.CHANGED)
        except InputError as exc:
            os.close(fd)
            return JobResult(JobKind.SKIPPED, message=str(exc))
        return fd, ident, Remember(key, ident.signature, ident.sha256), sniffer
    except BaseException:
        os.close(fd)
        raise


def _deliver_group(settings: Settings, ledger: WatchJobs, sink: Sink, ready: list[_Ready],
                   results: list[JobResult | None]) -> tuple[list[Mark], list[int]]:
    """Claim the group's CSVs together and send each; fill ``results`` as they will stand once the group's
    outcomes are committed. Returns those outcomes and the indexes of the results that wait on them."""
    first = ready[0].ident.path  # what a log line about the group's ledger work names
    plain = [r for r in ready if not is_container(r.ident.path.name)]
    claimed = _guarded(first, lambda: ledger.claim_many([
        ClaimRequest(r.ident.sha256, sent(r.ident.path.name), str(r.ident.path.absolute()), r.ident.size,
                     sink.name, respect_backoff=True, remember=r.remember) for r in plain]) if plain else [])
    if isinstance(claimed, JobResult):  # none of them was claimed (one transaction)
        for r in plain:
            results[r.index] = claimed
        ready = [r for r in ready if r not in plain]
        plain = []
        claimed = []
    group = _Group(ledger, [(r.ident.sha256, c) for r, c in zip(plain, claimed, strict=True)])
    held: list[int] = []
    try:
        for r in ready:
            # an .asc/.zip: delivered with the ledger itself (its parent row reads its CSVs' rows as it goes)
            target = cast(Deliveries, group) if r in plain else ledger
            got = _guarded(r.ident.path, partial(deliver_identified, settings, target, sink, r.ident,
                                                 respect_backoff=True, remember=r.remember, sniffed=r.sniffer))
            if isinstance(got, JobResult):
                results[r.index] = got
            else:
                # the kept bytes go no further than the delivery (a worker process pickles its results)
                results[r.index] = JobResult(JobKind.DONE, r.ident.without_data(), got,
                                             hashed=r.remember is not None)
                if r in plain:
                    held.append(r.index)
    except BaseException:  # stopped mid-group (not by an error, which _guarded turned into a result)
        _guarded(first, partial(ledger.finish_many, group.take()))
        raise
    return group.take(), held


class _Group:
    """The ledger as one group's deliveries see it: claims already decided by ``claim_many`` are answered
    from here, and outcomes are held until :meth:`take` hands them to :func:`commit`. Everything else
    goes to the ledger itself."""

    def __init__(self, ledger: WatchJobs, claims: list[tuple[str, Claim]]) -> None:
        self._ledger = ledger
        self._claims: dict[str, list[Claim]] = {}  # per SHA-256, in the group's order (the same bytes twice)
        for sha, claim in claims:
            self._claims.setdefault(sha, []).append(claim)
        self._marks: list[Mark] = []
        self._taken: list[str] = []  # group claims handed to a delivery

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ledger, name)

    def claim(self, sha256: str, **kwargs: Any) -> Claim:
        waiting = self._claims.get(sha256)
        if not waiting:
            return self._ledger.claim(sha256, **kwargs)
        claim = waiting.pop(0)
        if claim is Claim.CLAIMED:
            self._taken.append(sha256)
        return claim

    def mark_sent(self, sha256: str, *, status: int | None, destination: str, attempts: int) -> None:
        self._marks.append(sent_mark(sha256, status=status, destination=destination, attempts=attempts))

    def mark_retrying(self, sha256: str, *, status: int | None, error: str, attempts: int,
                      next_attempt_at: float) -> None:
        self._marks.append(retrying_mark(sha256, status=status, error=error, attempts=attempts,
                                         next_attempt_at=next_attempt_at))

    def mark_failed(self, sha256: str, *, status: int | None, error: str, attempts: int) -> None:
        self._marks.append(failed_mark(sha256, status=status, error=error, attempts=attempts))

    def release(self, sha256: str, *, error: str, attempts: int) -> None:
        self._marks.append(released_mark(sha256, error=error, attempts=attempts))

    def take(self) -> list[Mark]:
        """The held outcomes, to be committed together; a claim of the group that has no outcome (never used,
        or its delivery stopped by an error after the claim, e.g. the ledger gone mid-group) is handed back
        (``pending``) among them, so it is not held by this process for ever."""
        marked = {m.sha256 for m in self._marks}
        unused = [sha for sha, waiting in self._claims.items() for c in waiting if c is Claim.CLAIMED]
        unused += [sha for sha in self._taken if sha not in marked]
        marks = self._marks + [released_mark(s, error="interrupted", attempts=0) for s in unused]
        self._claims, self._taken, self._marks = {}, [], []
        return marks


class Runner(Protocol):
    def run(self, path: Path, sig: Signature, cached: Cached | None = None) -> JobResult: ...

    def run_many(self, jobs: Sequence[Job]) -> list[JobResult]: ...

    def close(self) -> None: ...


class InThread:
    """Runs jobs in the calling thread with the watcher's own ledger and sink."""

    def __init__(self, settings: Settings, ledger: WatchJobs, sink: Sink, stop: threading.Event | None = None
                 ) -> None:
        self._settings, self._ledger, self._sink, self._stop = settings, ledger, sink, stop

    def run(self, path: Path, sig: Signature, cached: Cached | None = None) -> JobResult:
        return handle_job(self._settings, self._ledger, self._sink, path, sig, cached)

    def run_many(self, jobs: Sequence[Job]) -> list[JobResult]:
        return handle_jobs(self._settings, self._ledger, self._sink, jobs, self._stop)

    def deliver_many(self, jobs: Sequence[Job]) -> Delivered:
        """:meth:`run_many` but for the commit of the outcomes (:func:`commit`), left to the caller."""
        return deliver_jobs(self._settings, self._ledger, self._sink, jobs)

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

    def run_many(self, jobs: Sequence[Job]) -> list[JobResult]:
        """One job at a time over the pipe (the process has its own ledger connection and GIL already)."""
        return [self.run(*job) for job in jobs]

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
