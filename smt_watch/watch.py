"""``smt-watch watch``: turn files landing in the inbox into deliveries, and keep at it until stopped.

Threads and what they own:

- the watchdog observer thread (:mod:`smt_watch.events`) reports paths (``_intake``) and new directories;
  nothing else;
- the main loop owns the :class:`Settler` (the quiet period), the full rescans, the schedule of rows due
  again (``retrying`` whose backoff expired, ``pending`` after a crash or a change), systemd notification
  and the stop sequence;
- ``SMT_WORKERS`` delivery threads take ready files from a bounded queue (up to ``GROUP_MAX`` at once),
  hash them (or take the hash from the stat cache), claim them in the ledger (one transaction for the
  group), send them, and hand the group to the committer; with ``SMT_WORKER_MODE=process`` each thread
  hands the hashing, claiming, sending and committing to a worker process of its own (:mod:`smt_watch.jobs`);
- in thread mode, the committer thread commits the outcomes of every group the workers handed it meanwhile
  (one transaction for all) and only then counts them and applies ``SMT_AFTER_SEND``: a worker goes on to
  its next group instead of waiting for the database (with PostgreSQL, a round trip to another process).

A path is in the queue or in flight at most once (``_busy``); the same bytes under two names are sent once
because the ledger claim is by SHA-256. Nothing is lost on a crash: a row is ``sent`` only after a 2xx,
a row left ``sending`` by a dead process goes back to ``pending`` at start, and the start-up scan finds
whatever landed while we were down.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import heapq
import logging
import os
import queue
import shutil
import stat as stat_mod
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, TypeVar, assert_never

from smt_watch.autoverify import AutoVerify
from smt_watch.clock import utc_stamp
from smt_watch.config import AfterSend, Settings, WorkerMode
from smt_watch.cpus import keep_on_one_cpu
from smt_watch.delivery import Sink, delivery_mode, make_sink
from smt_watch.errors import ConfigError, LedgerUnavailable, SmtWatchError
from smt_watch.events import InboxWatcher
from smt_watch.hashing import FileIdentity, Signature
from smt_watch.inbox import (
    Found,
    Settler,
    create_inbox,
    is_candidate,
    is_candidate_name,
    parent_dir_fd,
    regular_stat,
    relative,
    scan,
)
from smt_watch.jobs import GROUP_MAX, Cached, Delivered, InProcess, InThread, JobKind, JobResult, Runner, commit
from smt_watch.ledger import Ledger, Seen
from smt_watch.limits import node_stats_reader
from smt_watch.metrics import Metrics
from smt_watch.notify import Notifier
from smt_watch.pipeline import Outcome, Result
from smt_watch.statedir import open_ledger, owner_name, whoami
from smt_watch.status import HEARTBEAT_SECONDS, Beat, Unreadable, beat, record_unreadable

log = logging.getLogger("smt_watch.watch")
_T = TypeVar("_T")

DUE_CHECK_SECONDS = 1.0
LEDGER_RETRY_SECONDS = 5.0  # a shared ledger that cannot be reached is asked again after this
SCAN_BATCH = 1000  # stat-cache rows asked for at once during a scan
BUSY_RECHECK_SECONDS = 0.5
OVERFLOW_RESCAN_DELAY = 1.0  # seconds from an inotify overflow to the rescan it triggers
HANDLED_STATES = frozenset({"sent", "failed", "retrying"})
UNREADABLE_RECHECK_SECONDS = 30.0  # a file this user cannot open is tried again this often (a chmod ends it)
COMMIT_QUEUE_CHECK_SECONDS = 0.1  # how often a wait on the committer's queue looks whether it should go on waiting


def _with_waiting(q: queue.Queue[_T | None], first: _T, limit: int = 0) -> tuple[list[_T], bool]:
    """``first`` and what else waits in ``q`` now, up to ``limit`` items in all (0: no limit); True when the
    stop sequence's marker (None) was among them."""
    items = [first]
    while not limit or len(items) < limit:
        try:
            item = q.get_nowait()
        except queue.Empty:
            break
        if item is None:
            return items, True
        items.append(item)
    return items, False


class ReadyFile(NamedTuple):
    """A file that settled, queued for a worker (``sync.Job`` is a download's unit of work, another idea).
    A named tuple: one is made for every file a drain delivers, and a frozen dataclass costs several times
    as much to build."""

    path: Path
    signature: Signature
    ready_at: float  # monotonic time the file became ready, for the latency figure
    cached: Cached | None = None  # the stat cache's answer when the loop asked it (None: not asked)


@dataclass
class Counts:
    sent: int = 0
    duplicate: int = 0
    failed: int = 0
    retrying: int = 0
    hashed: int = 0  # files read to hash them: a restart over sent files must keep this at 0
    cached: int = 0  # files the stat cache showed as handled already: looked at, neither read nor queued


class WatchService:
    """The long-running watcher. ``run()`` blocks until :meth:`request_stop`; tests run it in a thread."""

    def __init__(self, settings: Settings, *, polling: bool = False, metrics: Metrics | None = None,
                 own_process: bool = False) -> None:
        self.settings = settings
        self._own_process = own_process  # the process runs nothing else: it may be bound to one CPU
        self.mode = delivery_mode(settings)
        self.root = settings.local_dir.absolute()
        self._root_prefix = str(self.root).rstrip("/") + "/"  # a path starting so lies below the inbox
        self.counts = Counts()
        self.metrics = metrics or Metrics()
        self.ready = threading.Event()  # set once watching (after the start-up scan was queued)
        self._polling = polling
        self._stop = threading.Event()
        self._force = threading.Event()
        self._rescan_now = threading.Event()  # set from the observer thread after an inotify overflow
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._incoming: set[Path] = set()
        self._new_dirs: set[Path] = set()
        self._later: list[tuple[float, str]] = []  # heap of (monotonic due, path) to look at again
        self._busy: set[Path] = set()
        self._queue: queue.Queue[ReadyFile | None] = queue.Queue(maxsize=max(64, settings.workers * 32))
        # groups delivered by the worker threads whose outcomes the committer has yet to commit (thread mode);
        # bounded: a worker that runs this far ahead of the commits waits
        self._commits: queue.Queue[tuple[list[ReadyFile], Delivered] | None] = queue.Queue(
            maxsize=max(1, settings.workers))
        self._committer: threading.Thread | None = None
        self._settler = Settler(settings.settle_seconds)
        # What the stat cache answered for each settling file, handed to its job: the cache is asked once
        # per new file, not again by the worker. (Dropped when the job is made; pruned if a file vanishes.)
        self._asked: dict[Path, Cached] = {}
        self._notifier = Notifier(settings.notify_socket, settings.watchdog_usec)
        self._ledger: Ledger | None = None
        self._sink: Sink | None = None
        self.backend = ""
        self._started_at = time.time()
        self._unreadable: dict[Path, Unreadable] = {}  # files this user cannot open, warned about once each
        self._inbox_lock: int | None = None
        self._auto: AutoVerify | None = None  # automatic verify (with an app to ask: INTELLIWATT_BASE_URL)
        self._verifier: threading.Thread | None = None

    # --- control ------------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Signal-safe: only sets flags. A second request while stopping forces an immediate exit."""
        if self._stop.is_set():
            self._force.set()
        self._stop.set()
        self._wake.set()

    def _intake(self, path: Path) -> None:
        with self._lock:
            first = not self._incoming
            self._incoming.add(path)
        if first:  # the loop takes the whole set at once: one wake-up per batch, not per event
            self._wake.set()

    def _intake_dir(self, path: Path) -> None:
        with self._lock:
            self._new_dirs.add(path)
        self._wake.set()

    def _overflowed(self) -> None:
        """inotify lost events: rescan the whole inbox now rather than at the next periodic rescan."""
        self._rescan_now.set()
        self._wake.set()

    def _look_again(self, path: Path, after: float) -> None:
        with self._lock:
            heapq.heappush(self._later, (time.monotonic() + after, str(path)))
        self._wake.set()

    # --- the main loop ------------------------------------------------------------------------------

    def _keep_on_one_cpu(self) -> None:
        """The process's threads on one CPU when ``SMT_ONE_CPU`` and thread mode say so (:mod:`smt_watch.cpus`
        says why); only in a process that runs nothing but this service (``own_process``, the CLI's
        ``watch``): binding is process-wide, and a service embedded in another process must not bind it."""
        if self._own_process and self.settings.one_cpu and self.settings.worker_mode is WorkerMode.THREAD:
            cpu = keep_on_one_cpu()
            if cpu is not None:
                log.info("Keeping watch's threads on CPU %d (SMT_ONE_CPU=0: the kernel places them)", cpu)

    def run(self) -> int:
        if self.settings.create_inbox:
            create_inbox(self.root)
        elif not self.root.is_dir():
            what = "is not a directory" if self.root.exists() else "does not exist"
            raise ConfigError(f"SMT_LOCAL_DIR {self.root} {what} (a typo?); create it, or start watch with "
                              "--create-inbox (SMT_CREATE_INBOX=1)")
        self._ledger = ledger = open_ledger(self.settings)
        try:
            self._inbox_lock = lock_inbox(self.settings.state_dir, self.root)
            record_unreadable(ledger, self.settings.node_name, [])  # what a previous run recorded is stale
        except BaseException:
            ledger.close()
            raise
        try:
            self._sink = make_sink(self.settings, self.mode, chunks=ledger, stop=self._stop)
            self.metrics.outbound(node_stats_reader(self.settings))
            if self.settings.metrics_port:
                self.metrics.serve(self.settings.metrics_port)
                log.info("Serving metrics at http://127.0.0.1:%d/metrics", self.settings.metrics_port)
        except BaseException:
            self._unlock_inbox()
            ledger.close()
            raise
        self._keep_on_one_cpu()  # once the start-up checks passed (a refused start says only why)
        workers = [
            threading.Thread(target=self._worker, args=(i,), name=f"smt-watch-worker-{i}", daemon=True)
            for i in range(self.settings.workers)
        ]
        # verify what was sent once the app has had time to store it, and re-send what its window dropped
        self._auto = AutoVerify.for_watch(self.settings, ledger, self.metrics, stop=self._stop)
        if self._auto.enabled:
            self._verifier = threading.Thread(target=self._auto.run, args=(self._stop,), name="smt-watch-verify",
                                              daemon=True)
            self._verifier.start()
        if self.settings.worker_mode is WorkerMode.THREAD:
            self._committer = threading.Thread(target=self._commit_groups, name="smt-watch-commit", daemon=True)
            self._committer.start()
        for w in workers:
            w.start()
        watcher = InboxWatcher(self.root, self._intake, self._intake_dir, on_overflow=self._overflowed,
                               polling=self._polling)
        try:
            for row in ledger.recover_stale():
                log.warning("Resuming %s (sha256 %s): it was being sent when smt-watch stopped",
                            row.filename, row.sha256[:12])
            self.backend = watcher.start()
            started = time.monotonic()
            found = self._scan(self.root)
            log.info("Watching %s (%s, %d worker(s)%s, mode %s): %d file(s) to look at, %d already handled",
                     self.root, self.backend, self.settings.workers,
                     " in processes" if self.settings.worker_mode is WorkerMode.PROCESS else "", self.mode, found,
                     self.counts.cached)
            self._notifier.ready(self._status())
            self._beat()
            self.ready.set()
            self._loop(started)
        finally:
            self._shutdown(watcher, workers)
        return 0

    def _loop(self, started: float) -> None:
        s = self.settings
        next_rescan = started + s.rescan_seconds
        next_due = started
        next_ping = started
        next_beat = started + HEARTBEAT_SECONDS
        ping = self._notifier.watchdog_interval
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                next_rescan, next_due = self._turn(now, next_rescan, next_due)
            except LedgerUnavailable:
                # Said once by the ledger. Paths taken this turn may be dropped: rescan once it answers again.
                next_rescan = next_due = now
                self._stop.wait(LEDGER_RETRY_SECONDS)
                continue
            if ping and now >= next_ping:
                self._notifier.watchdog()
                self._notifier.status(self._status())
                next_ping = now + ping
            if now >= next_beat:
                self._beat()
                next_beat = now + HEARTBEAT_SECONDS
            self.metrics.queue_depth.set(self._queue.qsize() + len(self._settler))
            wake_at = [next_rescan, next_due, next_beat]
            if ping:
                wake_at.append(next_ping)
            settle_due = self._settler.next_due()
            if settle_due is not None and not self._queue.full():
                wake_at.append(settle_due)  # with a full queue, a worker finishing a job wakes us
            with self._lock:
                if self._later:
                    wake_at.append(self._later[0][0])
            timeout = max(0.0, min(wake_at) - time.monotonic())
            self._wake.wait(timeout)
            self._wake.clear()

    def _turn(self, now: float, next_rescan: float, next_due: float) -> tuple[float, float]:
        """One turn of the loop's ledger work: intake, rescans, rows due again, feeding the queue."""
        s = self.settings
        self._take_intake(now)
        if self._rescan_now.is_set():
            self._rescan_now.clear()
            log.warning("inotify queue overflowed: rescanning %s in %.0f s", self.root, OVERFLOW_RESCAN_DELAY)
            # watchdog sends its EventsLostEvent once it has rebuilt its watches; the delay is margin, so
            # nothing written meanwhile can fall between the rebuild and our scan
            next_rescan = min(next_rescan, now + OVERFLOW_RESCAN_DELAY)
        if now >= next_rescan:
            self._scan(self.root)
            next_rescan = now + s.rescan_seconds
        if now >= next_due:
            self._schedule_due()
            next_due = now + DUE_CHECK_SECONDS
        self._feed_queue(now)
        return next_rescan, next_due

    def _take_intake(self, now: float) -> None:
        with self._lock:
            paths, self._incoming = self._incoming, set()
            dirs, self._new_dirs = self._new_dirs, set()
            again: set[Path] = set()
            while self._later and self._later[0][0] <= now:
                again.add(Path(heapq.heappop(self._later)[1]))
        for d in dirs:
            self._scan(d)
        # one stat-cache query for the whole batch of events (a drain brings hundreds per turn), in slices
        fresh = [f for f in map(self._candidate, paths - again) if f is not None]
        for i in range(0, len(fresh), SCAN_BATCH):
            self._consider_batch(fresh[i:i + SCAN_BATCH], now)
        for path in again:
            self._recheck(path, now)

    def _candidate(self, path: Path) -> Found | None:
        """``path`` with its signature when it is a candidate (docs/contract.md §3) and a regular file."""
        text = str(path)
        if text.startswith(self._root_prefix) and "/" not in (name := text[len(self._root_prefix):]):
            # straight in the inbox (the common case): checked on the string, no directory on its way, one lstat
            if not is_candidate_name(name, self.settings.patterns):
                return None
            st = regular_stat(path)
            return None if st is None else Found(text, Signature.of(st))
        rel = relative(self.root, path)
        if rel is None or not is_candidate(rel, self.settings.patterns):
            return None
        # a file straight in the inbox has no directory on its way to check (the common case: one lstat)
        st = regular_stat(path, self.root if len(rel.parts) > 1 else None)
        return None if st is None else Found(str(path), Signature.of(st))

    def _recheck(self, path: Path, now: float) -> bool:
        """A file a worker asked to look at again (the same bytes were in flight under another name): it goes
        to a worker whatever the stat cache says, so it is counted as a duplicate and gets its SMT_AFTER_SEND
        action. (New files go through :meth:`_consider_batch`, which asks the cache.)"""
        found = self._candidate(path)
        if found is None:
            return False
        return self._consider_known(path, found.signature, None, now, asked=False)

    def _consider_known(self, path: Path, sig: Signature, known: Seen | None, now: float,
                        asked: bool = True) -> bool:
        """Into the settler unless the stat cache says these exact bytes were handled already."""
        if known and known.signature == sig and known.state in HANDLED_STATES:
            self.counts.cached += 1  # only the main loop writes this count
            return False
        self._settler.add(path, sig, now)
        if asked:
            self._asked[path] = Cached(known)
        else:
            self._asked.pop(path, None)
        return True

    def _scan(self, directory: Path) -> int:
        """A full (or new-directory) scan; the stat cache is asked in batches, never held in memory."""
        assert self._ledger is not None
        now = time.monotonic()
        added = 0
        batch: list[Found] = []
        for found in scan(self.root, self.settings.patterns, directory):
            batch.append(found)
            if len(batch) >= SCAN_BATCH:
                added += self._consider_batch(batch, now)
                batch = []
        return added + self._consider_batch(batch, now)

    def _consider_batch(self, batch: list[Found], now: float) -> int:
        assert self._ledger is not None
        # a file still settling had the cache asked already (its first event): ask only for the others
        paths = [Path(f.path) for f in batch]  # each made once, for the settler and the asked map alike
        asked = {f.path: c.seen for f, p in zip(batch, paths, strict=True) if (c := self._asked.get(p)) is not None}
        ask = [f.path for f in batch if f.path not in asked]
        known = {**(self._ledger.seen_many(ask) if ask else {}), **asked}
        return sum(self._consider_known(p, f.signature, known.get(f.path), now)
                   for f, p in zip(batch, paths, strict=True))

    def _schedule_due(self) -> None:
        """Rows to deliver again: their backoff expired, or they were cut off (``pending``)."""
        assert self._ledger is not None
        now = time.monotonic()
        for row in self._ledger.due(time.time()):
            if not row.path or row.parent:
                continue  # a CSV from an .asc/.zip is retried with its parent, which unpacks it again
            path = Path(row.path)
            if path in self._busy or path in self._settler:
                continue
            st = regular_stat(path, self.root)
            if st is None:
                self._ledger.mark_failed(row.sha256, status=None, attempts=0,
                                         error=f"file no longer in the inbox: {row.path}")
                continue
            sig = Signature.of(st)
            cached = self._ledger.seen(row.path)
            if cached and cached.signature == sig and cached.sha256 != row.sha256:
                log.info("Dropping %s row %s: %s now holds other content", row.state, row.sha256[:12], path)
                self._ledger.forget([row.sha256])
                continue
            self._settler.add(path, sig, now)
            self._asked[path] = Cached(cached)

    def _feed_queue(self, now: float) -> None:
        free = self._queue.maxsize - self._queue.qsize()
        if len(self._asked) > 2 * len(self._settler) + 1024:  # files that vanished while settling
            self._asked = {p: c for p, c in self._asked.items() if p in self._settler}
        for path, sig in self._settler.ready(now, limit=max(0, free)):
            cached = self._asked.pop(path, None)
            with self._lock:
                if path in self._busy:
                    heapq.heappush(self._later, (now + BUSY_RECHECK_SECONDS, str(path)))
                    continue
                self._busy.add(path)
            try:
                self._queue.put_nowait(ReadyFile(path, sig, now, cached))
            except queue.Full:
                with self._lock:
                    self._busy.discard(path)
                self._settler.add(path, sig, now)
                if cached is not None:
                    self._asked[path] = cached

    def _status(self) -> str:
        c = self.counts
        return (f"queue {self._queue.qsize() + len(self._settler)}, sent {c.sent}, duplicate {c.duplicate}, "
                f"retrying {c.retrying}, failed {c.failed}")

    def _beat(self, stopped: bool = False) -> None:
        """The heartbeat ``status`` reads; a ledger that cannot take it now gets the next one."""
        if self._ledger is None:
            return
        try:
            beat(self._ledger, Beat(node=self.settings.node_name, started_at=self._started_at,
                                    waiting=self._queue.qsize() + len(self._settler), mode=self.mode,
                                    workers=self.settings.workers, stopped=stopped))
        except SmtWatchError as exc:
            log.debug("Heartbeat not written: %s", exc)

    def _shutdown(self, watcher: InboxWatcher, workers: list[threading.Thread]) -> None:
        self._notifier.stopping()
        try:
            while True:
                job = self._queue.get_nowait()  # not started: the next start's scan finds them again
                if job is not None:
                    with self._lock:
                        self._busy.discard(job.path)
        except queue.Empty:
            pass
        with self._lock:
            in_flight = len(self._busy)
        if in_flight:
            log.warning("Stopping: waiting up to %.0f s (SMT_STOP_GRACE_SECONDS) for %d delivery(ies) in flight; "
                        "press Ctrl-C again (or send SIGTERM again) to quit now", self.settings.grace_seconds,
                        in_flight)
        else:
            log.info("Stopping: no delivery in flight (a second Ctrl-C quits at once)")
        watcher.stop()
        for _ in workers:
            self._queue.put(None)
        deadline = time.monotonic() + self.settings.grace_seconds
        for w in workers:
            while w.is_alive() and not self._force.is_set() and time.monotonic() < deadline:
                w.join(0.1)
        alive = sum(w.is_alive() for w in workers)
        if self._committer is not None and not alive:  # (else a live worker may still hand it a group)
            alive = self._stop_committer(self._committer, deadline)
        verifying = self._verifier is not None and self._verifier.is_alive()
        if verifying and not self._force.is_set():
            assert self._verifier is not None
            self._verifier.join(max(0.0, deadline - time.monotonic()))
            verifying = self._verifier.is_alive()
        if self.ready.is_set():
            self._beat(stopped=True)
        if alive:
            log.warning("Stopping with %d delivery(ies) in flight; they will be sent again at next start", alive)
            self._unlock_inbox()
            return  # daemon threads; their rows stay `sending` and are resumed at the next start
        if self._sink:
            self._sink.close()
        if self._auto is not None and not verifying:
            self._auto.close()
        if self._ledger and not verifying:  # a verification still reading the app keeps the ledger (daemon)
            self._ledger.close()
        self._unlock_inbox()
        log.info("Stopped: %s", self._status())

    def _unlock_inbox(self) -> None:
        if self._inbox_lock is not None:
            os.close(self._inbox_lock)  # the kernel drops the flock with it (and on a crash, with the process)
            self._inbox_lock = None

    # --- workers ------------------------------------------------------------------------------------

    def _worker(self, index: int) -> None:
        """Takes its share of the ready files waiting in the queue, up to GROUP_MAX at once (a drain: a full
        group; one file landing alone: a group of one, no waiting), and hands them to the runner as one
        group: one claim commit for all; in thread mode the committer then commits their outcomes with
        those of the other groups waiting (:func:`smt_watch.jobs.deliver_jobs`, :func:`smt_watch.jobs.commit`),
        in process mode the worker process does (:func:`smt_watch.jobs.handle_jobs`)."""
        runner = self._runner(index)
        try:
            stopping = False
            while not stopping:
                first = self._queue.get()
                if first is None:
                    return
                # a fair share of what waits, so a short backlog still spreads over every worker (each may
                # be waiting on the network); a drain's full queue gives each a full group
                share = min(GROUP_MAX, max(1, (self._queue.qsize() + 1) // max(1, self.settings.workers)))
                jobs, stopping = _with_waiting(self._queue, first, share)  # the marker: this group, then stop
                self._run_group(runner, jobs)
        finally:
            runner.close()

    def _run_group(self, runner: Runner, jobs: list[ReadyFile]) -> None:
        work = [(j.path, j.signature, j.cached) for j in jobs]
        handed = False
        try:
            try:
                if isinstance(runner, InThread):  # the committer commits its outcomes; the worker goes on
                    delivered = runner.deliver_many(work)
                    handed = self._hand_over(jobs, delivered)
                    results = [] if handed else self._commit_here(delivered)
                else:
                    results = runner.run_many(work)
            except LedgerUnavailable as exc:
                results = [JobResult(JobKind.UNREACHABLE, message=str(exc))] * len(jobs)
            except SmtWatchError as exc:
                results = [JobResult(JobKind.ERROR, message=str(exc))] * len(jobs)
            if not handed:
                self._finish(jobs, results)
        except Exception:
            self._retry_later(jobs)
        finally:
            if not handed:
                self._done_with(jobs)

    def _hand_over(self, jobs: list[ReadyFile], delivered: Delivered) -> bool:
        """Queue a delivered group for the committer (waiting while ``SMT_WORKERS`` groups already wait);
        False if the committer is gone (it ends only after the stop sequence's marker, but a worker must
        never wait on a queue nobody reads)."""
        while True:
            try:
                self._commits.put((jobs, delivered), timeout=COMMIT_QUEUE_CHECK_SECONDS)
                return True
            except queue.Full:
                if self._committer is None or not self._committer.is_alive():
                    return False

    def _commit_here(self, delivered: Delivered) -> list[JobResult]:
        assert self._ledger is not None
        return commit(self._ledger, [delivered], self._stop)[0]

    def _commit_groups(self) -> None:
        """The committer (thread mode): commits the outcomes of every group waiting (one transaction for all
        of them), then applies each file's result; until the stop sequence's marker."""
        assert self._ledger is not None
        last = False
        while not last:
            first = self._commits.get()
            if first is None:
                return
            batch, last = _with_waiting(self._commits, first)  # the marker: these groups, then stop
            try:
                results = commit(self._ledger, [d for _, d in batch], self._stop)
            except Exception:  # a bug: commit turns every failure of the ledger into the files' results
                for jobs, _ in batch:
                    self._retry_later(jobs)
            else:
                for (jobs, _), got in zip(batch, results, strict=True):
                    self._finish(jobs, got)
            finally:
                for jobs, _ in batch:
                    self._done_with(jobs)

    def _stop_committer(self, committer: threading.Thread, deadline: float) -> int:
        """The stop sequence, once every worker ended: the committer commits the groups handed over, then
        stops. Returns the deliveries still in flight when it could not finish (the grace period ran out,
        or a second signal): the files of the groups it holds, which stay ``sending`` for the next start."""
        def waiting() -> bool:
            return committer.is_alive() and not self._force.is_set() and time.monotonic() < deadline

        while waiting():
            try:
                self._commits.put(None, timeout=COMMIT_QUEUE_CHECK_SECONDS)  # after the groups handed over
                break
            except queue.Full:
                continue
        while waiting():
            committer.join(COMMIT_QUEUE_CHECK_SECONDS)
        if not committer.is_alive():
            return 0
        with self._lock:
            return max(1, len(self._busy))

    def _retry_later(self, jobs: list[ReadyFile]) -> None:
        for job in jobs:
            log.exception("Unexpected error handling %s", job.path)
            self._look_again(job.path, DUE_CHECK_SECONDS * 5)

    def _finish(self, jobs: list[ReadyFile], results: list[JobResult]) -> None:
        for job, result in zip(jobs, results, strict=True):
            try:
                self._apply(job, result)
            except Exception:
                self._retry_later([job])

    def _done_with(self, jobs: list[ReadyFile]) -> None:
        with self._lock:
            self._busy.difference_update(j.path for j in jobs)
        if self._queue.qsize() <= self._queue.maxsize // 2:
            self._wake.set()  # room in the queue: the main loop may feed more files

    def _runner(self, index: int) -> Runner:
        if self.settings.worker_mode is WorkerMode.PROCESS:
            return InProcess(self.settings, self.mode, f"smt-watch-delivery-{index}")
        assert self._ledger is not None and self._sink is not None
        return InThread(self.settings, self._ledger, self._sink, self._stop)

    def _apply(self, job: ReadyFile, result: JobResult) -> None:
        """What the watcher does with a job's result: its state, counts, log lines and after-send."""
        match result.kind:
            case JobKind.CHANGED:
                self._intake(job.path)  # still being written: wait for it to settle again
            case JobKind.SKIPPED:
                log.warning("Skipping %s: %s", job.path, result.message)
            case JobKind.UNREADABLE:
                self._cannot_read(job.path)
                self._look_again(job.path, UNREADABLE_RECHECK_SECONDS)
            case JobKind.ERROR:
                log.error("Could not handle %s: %s", job.path, result.message)
                self._look_again(job.path, DUE_CHECK_SECONDS * 5)
            case JobKind.UNREACHABLE:  # the ledger said so once; this file waits until it answers
                log.debug("Ledger unreachable: %s is looked at again in %.0fs", job.path, LEDGER_RETRY_SECONDS)
                self._look_again(job.path, LEDGER_RETRY_SECONDS)
            case JobKind.GONE:
                log.debug("%s is gone, or no longer a regular file beneath the inbox: nothing to deliver", job.path)
                self._readable_again(job.path)
            case JobKind.DONE:
                self._readable_again(job.path)
                assert result.ident is not None and result.outcome is not None
                if result.hashed:
                    with self._lock:
                        self.counts.hashed += 1
                self._record(job, result.ident, result.outcome)
            case _:
                assert_never(result.kind)

    def _cannot_read(self, path: Path) -> None:
        """A file this user may not open: warned once (name, owner, mode, our user) and kept in the ledger
        for ``status`` until it is readable or gone; it is tried again every UNREADABLE_RECHECK_SECONDS."""
        try:
            st = path.lstat()
        except OSError:
            return
        entry = Unreadable(node=self.settings.node_name, path=str(path), owner=owner_name(st.st_uid),
                           mode=f"{st.st_mode & 0o7777:o}", user=whoami(), since=utc_stamp())
        with self._lock:
            known = self._unreadable.get(path)
            if known is not None and (known.owner, known.mode) == (entry.owner, entry.mode):
                return
            self._unreadable[path] = entry
            files = list(self._unreadable.values())
        log.warning("Cannot read %s (owner %s, mode %s) as user %s: it is not delivered until %s can read it "
                    "(sudo chown %s %s, or chmod g+r it and add %s to its group)", path, entry.owner, entry.mode,
                    entry.user, entry.user, entry.user, path, entry.user)
        self._save_unreadable(files)

    def _readable_again(self, path: Path) -> None:
        with self._lock:
            if self._unreadable.pop(path, None) is None:
                return
            files = list(self._unreadable.values())
        log.info("%s can be read now", path)
        self._save_unreadable(files)

    def _save_unreadable(self, files: list[Unreadable]) -> None:
        if self._ledger is None:
            return
        try:
            record_unreadable(self._ledger, self.settings.node_name, files)
        except SmtWatchError as exc:
            log.debug("Unreadable files not recorded for status: %s", exc)

    def _record(self, job: ReadyFile, ident: FileIdentity, o: Outcome) -> None:
        """Counts, metrics and one log line per delivered CSV; then the file's after-send action."""
        latency = time.monotonic() - job.ready_at
        for item in o.children or (o,):
            self._count(item, latency, job.path.name if o.children else None)
        if o.children and o.result is Result.FAILED:
            log.error("Failed %s sha256=%s: %s", job.path.name, ident.sha256[:12], o.error)
        if o.result in (Result.SENT, Result.DUPLICATE):
            self._after_send(job.path, ident)
        elif o.result in (Result.CHANGED, Result.BUSY):
            self._look_again(job.path, BUSY_RECHECK_SECONDS)

    def _verify_later(self, sha256: str | None) -> None:
        if self._auto is None or not self._auto.enabled or not sha256:
            return
        try:
            self._auto.after_delivery(sha256, time.time())
        except SmtWatchError as exc:  # the next `smt-watch verify` (or sync's pass) still finds it
            log.warning("Automatic verify of %s not scheduled: %s", sha256[:12], exc)

    def _count(self, o: Outcome, latency: float, parent: str | None) -> None:
        m = self.mode
        name = o.name or o.path.name
        origin = f" from={parent}" if parent else ""
        sha = (o.sha256 or "-")[:12]
        if o.result is Result.SENT:
            with self._lock:
                self.counts.sent += 1
            self._verify_later(o.sha256)
            self.metrics.delivered.labels(m).inc()
            self.metrics.bytes.labels(m).inc(o.size or 0)
            self.metrics.latency.observe(latency)
            self.metrics.last_success.set(time.time())
            log.info("Delivered %s sha256=%s size=%d mode=%s status=%s attempts=%d latency=%.3fs%s",
                     name, sha, o.size or 0, m, o.status, o.attempts, latency, origin)
        elif o.result is Result.DUPLICATE:
            with self._lock:
                self.counts.duplicate += 1
            self.metrics.duplicates.inc()
        elif o.result in (Result.FAILED, Result.ERROR):
            with self._lock:
                self.counts.failed += 1
            self.metrics.failed.labels(m).inc()
            log.error("Failed %s sha256=%s size=%d mode=%s status=%s attempts=%d: %s%s",
                      name, sha, o.size or 0, m, o.status, o.attempts, o.error, origin)
        elif o.result is Result.RETRYING:
            with self._lock:
                self.counts.retrying += 1
            self.metrics.retried.labels(m).inc()

    def _after_send(self, path: Path, ident: FileIdentity) -> None:
        """``SMT_AFTER_SEND``: keep, move to the archive (relative path kept, never overwriting), delete."""
        action = self.settings.after_send
        if action is AfterSend.KEEP:
            return
        try:
            # Relative to the file's directory reached without following a symlink: a directory swapped for a
            # symlink after delivery cannot make us delete or move anything outside the inbox.
            with parent_dir_fd(self.root, path) as dir_fd:
                st = os.stat(path.name, dir_fd=dir_fd, follow_symlinks=False)
                if not stat_mod.S_ISREG(st.st_mode) or Signature.of(st) != ident.signature:
                    return  # changed since it was delivered: it is new content, leave it for the next pass
                if action is AfterSend.DELETE:
                    os.unlink(path.name, dir_fd=dir_fd)
                    log.info("Deleted %s after delivery", path.name)
                else:
                    dest = unique_destination(self.settings.archive_path / path.relative_to(self.root))
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    _move_from(dir_fd, path.name, dest)
                    log.info("Moved %s to %s", path.name, dest)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("Could not %s %s after delivery: %s", action, path, exc.strerror)
            return
        assert self._ledger is not None
        self._ledger.unremember(str(path))


def lock_inbox(state_dir: Path, root: Path) -> int:
    """One ``watch`` per inbox: an ``flock`` on ``watch-<hash of the inbox>.lock`` in the state dir, holding
    the holder's pid. A second ``watch`` on the same inbox is refused, naming that pid; the kernel drops the
    lock when its holder exits, however it exits. Returns the descriptor to keep open."""
    key = hashlib.sha256(os.fsencode(root.resolve())).hexdigest()[:16]
    lock_path = state_dir / f"watch-{key}.lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise ConfigError(f"cannot open the inbox lock {lock_path}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode("ascii", "replace").split()
        os.close(fd)
        pid = holder[0] if holder else "unknown"
        raise ConfigError(f"another watch (pid {pid}) is watching {root} already (lock {lock_path}); "
                          "stop it first (systemctl stop smt-watch), or watch another inbox") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {root}\n".encode(errors="surrogateescape"), 0)
    return fd


def _move_from(dir_fd: int, name: str, dest: Path) -> None:
    """``rename`` when the archive is on the same filesystem; else copy the open file and unlink it, both
    through ``dir_fd`` (never by a path that could be swapped)."""
    try:
        os.rename(name, dest, src_dir_fd=dir_fd)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    with os.fdopen(fd, "rb") as src, dest.open("xb") as out:
        shutil.copyfileobj(src, out, 1024 * 1024)
        out.flush()
        os.fsync(out.fileno())
    shutil.copystat(f"/proc/self/fd/{dir_fd}/{name}", dest, follow_symlinks=False)
    os.unlink(name, dir_fd=dir_fd)


def unique_destination(dest: Path) -> Path:
    """``dest`` or ``dest.1``, ``dest.2``, …: the archive never overwrites an earlier file."""
    candidate, n = dest, 0
    while candidate.exists() or candidate.is_symlink():
        n += 1
        candidate = dest.with_name(f"{dest.name}.{n}")
    return candidate
