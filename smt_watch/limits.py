"""Outbound limits toward the web app: at most ``SMT_MAX_REQUESTS_PER_SECOND`` requests a second and
``SMT_MAX_IN_FLIGHT`` at once (docs/contract.md §1), per node, or per fleet with a PostgreSQL ledger.

Why: a backlog (after an outage or a migration) drains at several hundred files a second; every request
is a serverless function run holding database connections in IntelliWatt (a raw-upload chunk writes up to
5,000 interval rows). The README's "Outbound limits" says why the defaults are what they are.

Every HTTP request the poster (:mod:`smt_watch.delivery.http`) sends goes through :meth:`Limiter.request`:
first an in-flight slot, then a token from the rate bucket, then the request; the slot is freed when its
answer has been read. Waiting here is not a delivery attempt: the poster counts an attempt only once the
limiter let it through, and a retry's backoff sleeps without holding a slot.

Where the budget lives (chosen by measuring; see :class:`NodeBudget` and ``smt_watch.ledger.fleet``):

- **per node**, files under ``SMT_STATE_DIR/limits``: one ``flock`` per in-flight slot and a 24-byte bucket
  file updated under a ``flock``. Watch's worker threads, its worker processes (``SMT_WORKER_MODE=process``)
  and a ``post`` run beside it all share it, with no process having to own it: a process that dies drops its
  locks with its descriptors. Measured on the shared 2-core machine: a slot, a token and the release ~65 µs
  (the same in-process, without files, ~18 µs), against a millisecond or more for any request.
- **per fleet**, with ``SMT_LEDGER_URL=postgresql://…``: slots are session advisory locks and the bucket one
  row updated in one statement with the server's clock (:mod:`smt_watch.ledger.fleet`), so every droplet
  sharing the ledger shares one budget and a dead node's slots go with its session. When PostgreSQL cannot be
  reached, this node falls back to its per-node budget (logged once, and once again when it answers): the
  fleet may then send up to its node count times the limit, but no delivery waits on an unreachable server.

The rate is a token bucket of one second's worth of tokens (at least one), kept as GCRA's single number, the
theoretical arrival time (``tat``): a request may go at ``max(now, tat - tau)``, and ``tat`` moves on by
``1/rate``. One number is what a file or a row can hold and update atomically.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol, TypeVar

from smt_watch.errors import FileChanged, SmtWatchError

if TYPE_CHECKING:
    from smt_watch.config import Settings

log = logging.getLogger("smt_watch.limits")

T = TypeVar("T")

SLOT_POLL_FIRST: Final = 0.005  # a waiter for a slot asks again after this, doubling up to SLOT_POLL_MAX
SLOT_POLL_MAX: Final = 0.05
STOP_CHECK_SECONDS: Final = 0.1  # a long wait looks at both the limiter's close and watch's stop this often
ANNOUNCE_AFTER: Final = 1.0  # an episode of waits is logged once it has lasted this long (a backlog, not a burst)
QUIET_SECONDS: Final = 60.0  # no wait for this long: the throttling episode is over (logged once more)
FLEET_RETRY_SECONDS: Final = 5.0  # while PostgreSQL is unreachable, ask it again at most this often
MAX_WAITERS: Final = 1024  # bounds how far ahead a sane bucket's tat can be (a stale file is reset)
# tat (CLOCK_MONOTONIC seconds), requests that waited, seconds waited, when a process last said it throttles
_BUCKET: Final = struct.Struct("<dqdd")


class LimiterClosed(FileChanged):
    """The limiter was closed (or watch began to stop) while a request waited for it: nothing was sent.

    A :class:`~smt_watch.errors.FileChanged` for what follows from it, which is what an abandoned attempt
    needs: not retried within the call, the row back to ``pending`` (not ``retrying``: no backoff, no attempt
    counted), taken again at the next start, where a raw-upload file resumes after its acknowledged chunks."""


# --- the bucket (pure) -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rate:
    """A request rate as GCRA parameters: ``interval`` between requests, ``tau`` the burst tolerance."""

    per_second: float

    @property
    def burst(self) -> float:
        """Tokens a full bucket holds: one second's worth, at least one."""
        return max(1.0, math.floor(self.per_second))

    @property
    def interval(self) -> float:
        return 1.0 / self.per_second

    @property
    def tau(self) -> float:
        return (self.burst - 1.0) * self.interval

    def reserve(self, tat: float, now: float) -> tuple[float, float]:
        """Take the next token: ``(new tat, seconds to wait before sending)``. The caller must send no
        earlier than ``now + wait``; the token is its own even if it gives up."""
        if tat > now + self.interval * (MAX_WAITERS + self.burst):  # another boot's clock: start afresh
            tat = now
        start = max(tat, now)
        wait = start - self.tau - now
        return start + self.interval, wait if wait > 1e-9 else 0.0  # float sums of intervals: not a wait


class TokenBucket:
    """A thread-safe in-memory :class:`Rate` with an injected clock: the unit tests' and the last fallback."""

    def __init__(self, rate: Rate, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self._clock = clock
        self._tat = -math.inf
        self._lock = threading.Lock()

    def reserve(self) -> float:
        """Seconds to wait before the request this token is for may go."""
        with self._lock:
            self._tat, wait = self.rate.reserve(self._tat, self._clock())
        return wait


# --- budgets: where slots and tokens come from ------------------------------------------------------------


class Budget(Protocol):
    """Slots and tokens from one place (this process, this node, the fleet)."""

    where: str

    def try_slot(self) -> int | None:
        """A free in-flight slot, now held by the caller, or None when all are taken."""
        ...

    def release(self, slot: int) -> None: ...

    def reserve(self) -> float:
        """Take a token; seconds to wait before sending."""
        ...

    def close(self) -> None: ...


class LocalBudget:
    """This process alone: the fallback when ``SMT_STATE_DIR/limits`` cannot be written."""

    where = "process"

    def __init__(self, rate: Rate | None, slots: int) -> None:
        self._bucket = TokenBucket(rate) if rate else None
        self._free = list(range(slots))
        self._lock = threading.Lock()

    def try_slot(self) -> int | None:
        with self._lock:
            return self._free.pop() if self._free else None

    def release(self, slot: int) -> None:
        with self._lock:
            self._free.append(slot)

    def reserve(self) -> float:
        return self._bucket.reserve() if self._bucket else 0.0

    def close(self) -> None:
        pass


class NodeBudget:
    """Shared by every process of this node through files under ``directory``.

    Slots: ``slot-<i>`` files, each held with ``flock(LOCK_EX|LOCK_NB)`` on this process's descriptor; a
    process-local set keeps two threads of one process (which share the descriptor, so ``flock`` would let
    both in) from taking the same slot. The bucket: ``bucket``, read and written under ``flock`` (and a
    thread lock, for the same reason). Files, not the ledger: the per-node limit then works with either
    ledger and costs system calls (~65 µs a request, measured), where PostgreSQL would cost round trips.
    """

    where = "node"

    def __init__(self, directory: Path, rate: Rate | None, slots: int) -> None:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._dir = directory
        self._rate = rate
        self._lock = threading.Lock()
        self._held: set[int] = set()
        self._slot_fds = [os.open(directory / f"slot-{i}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                          for i in range(slots)]
        self._bucket_fd = os.open(directory / "bucket", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        owner = _foreign_owner(directory.parent)
        if owner is not None:  # root in the service's state dir: what it creates stays the service's
            os.chown(directory, *owner)
            for fd in (*self._slot_fds, self._bucket_fd):
                os.fchown(fd, *owner)

    def try_slot(self) -> int | None:
        with self._lock:
            for i, fd in enumerate(self._slot_fds):
                if i in self._held:
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                self._held.add(i)
                return i
        return None

    def release(self, slot: int) -> None:
        with self._lock:
            if slot in self._held:
                self._held.discard(slot)
                fcntl.flock(self._slot_fds[slot], fcntl.LOCK_UN)

    @contextlib.contextmanager
    def _bucket(self) -> Iterator[list[float]]:
        """The bucket file's fields, locked; written back as the caller left them."""
        with self._lock:
            fcntl.flock(self._bucket_fd, fcntl.LOCK_EX)
            try:
                raw = os.pread(self._bucket_fd, _BUCKET.size, 0)
                tat, waited, seconds, said = (_BUCKET.unpack(raw) if len(raw) == _BUCKET.size
                                              else (-math.inf, 0, 0.0, -math.inf))
                fields = [tat, float(waited), seconds, said]
                yield fields
                os.pwrite(self._bucket_fd, _BUCKET.pack(fields[0], int(fields[1]), fields[2], fields[3]), 0)
            finally:
                fcntl.flock(self._bucket_fd, fcntl.LOCK_UN)

    def reserve(self) -> float:
        if self._rate is None:
            return 0.0
        with self._bucket() as fields:
            fields[0], wait = self._rate.reserve(fields[0], time.monotonic())
        return wait

    def count_wait(self, seconds: float) -> None:
        """One request waited ``seconds`` for the limit (node-wide counters, for the metrics)."""
        with self._bucket() as fields:
            fields[1] += 1
            fields[2] += seconds

    def claim_announcement(self, quiet: float) -> bool:
        """True for the first process of the node to ask since ``quiet`` seconds: watch's worker processes
        each have a limiter, and the node's throttling is said once, not once per process."""
        now = time.monotonic()
        with self._bucket() as fields:
            if now - fields[3] < quiet:
                fields[3] = now  # an episode still going on somewhere on this node
                return False
            fields[3] = now
            return True

    def close(self) -> None:
        with self._lock:
            for fd in [*self._slot_fds, self._bucket_fd]:
                os.close(fd)
            self._slot_fds, self._held = [], set()


@dataclass(frozen=True)
class OutboundStats:
    """Node-wide, for the metrics: requests that waited for the limit, seconds waited, slots held now."""

    waited: int
    wait_seconds: float
    in_flight: int | None  # None: no in-flight limit (nothing to count)


def read_node_stats(directory: Path, slots: int) -> OutboundStats:
    """What the node's limit files say, without taking a slot for longer than a non-blocking probe."""
    try:
        with open(directory / "bucket", "rb") as f:
            raw = f.read(_BUCKET.size)
    except OSError:
        raw = b""
    _, waited, seconds, _ = _BUCKET.unpack(raw) if len(raw) == _BUCKET.size else (0.0, 0, 0.0, 0.0)
    held = None
    if slots:
        held = 0
        for i in range(slots):
            try:
                fd = os.open(directory / f"slot-{i}", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                held += 1
            finally:
                os.close(fd)  # drops the probe's shared lock with it
    return OutboundStats(int(waited), seconds, held)


# --- the limiter ------------------------------------------------------------------------------------------


def describe(settings: Settings) -> str:
    """The effective limits in words (doctor's line, the throttling log line)."""
    rate = settings.max_requests_per_second
    flight = settings.max_in_flight
    if not rate and not flight:
        return "off (SMT_MAX_REQUESTS_PER_SECOND=0, SMT_MAX_IN_FLIGHT=0)"
    parts = [f"{rate:g} request(s)/s" if rate else "no rate limit",
             f"{flight} in flight" if flight else "no in-flight limit"]
    scope = "per fleet (shared through the PostgreSQL ledger)" if settings.ledger_url else "per node"
    return f"{', '.join(parts)}, {scope}"


class Limiter:
    """What every outbound request passes through (:meth:`request`). Thread-safe; one per poster.

    ``fleet`` (optional) is tried first; while it cannot be reached (it raises
    :class:`~smt_watch.errors.SmtWatchError`) ``node`` stands in. A slot is held only while its request is
    out, and released on whichever budget it came from.
    """

    def __init__(self, settings: Settings, node: Budget | None, fleet: Budget | None = None,
                 clock: Callable[[], float] = time.monotonic, stop: threading.Event | None = None) -> None:
        self._settings = settings
        self._rate = settings.max_requests_per_second
        self._slots = settings.max_in_flight
        self._node = node
        self._fleet = fleet
        self._clock = clock
        self._closed = threading.Event()
        self._stop = stop  # watch's: once set, waits end too
        self._lock = threading.Lock()
        self._waiting = 0
        self._throttled_since: float | None = None
        self._last_wait = 0.0
        self._episode_waits = 0
        self._episode_seconds = 0.0
        self._announced = False  # this episode was looked at for saying so (by this process or another)
        self._said = False  # ... and this process said it
        self._most_waiting = 0
        self._fleet_down_until: float | None = None  # monotonic time to ask PostgreSQL again

    @property
    def off(self) -> bool:
        return self._node is None and self._fleet is None

    @contextlib.contextmanager
    def request(self) -> Iterator[float]:
        """Wait for a slot and a token, then let the caller send; yields the seconds waited. Raises
        :class:`LimiterClosed` (nothing sent) when closed meanwhile."""
        if self.off:
            yield 0.0
            return
        started = self._clock()
        budget, slot = self._take_slot(started)
        try:
            self._take_token(budget)
            waited = self._clock() - started
            self._note(waited)
            yield waited
        finally:
            if slot is not None:
                self._release(budget, slot)

    def close(self) -> None:
        """Wake every waiter (they raise :class:`LimiterClosed`) and let the budgets go."""
        self._closed.set()
        for b in (self._fleet, self._node):
            if b is not None:
                with contextlib.suppress(Exception):
                    b.close()

    def _ended(self) -> bool:
        return self._closed.is_set() or (self._stop is not None and self._stop.is_set())

    def _sleep(self, seconds: float) -> bool:
        """Wait ``seconds`` (real time); True when closed or stopped meanwhile."""
        end = time.monotonic() + seconds
        while not self._ended():
            left = end - time.monotonic()
            if left <= 0:
                return False
            (self._stop or self._closed).wait(min(left, STOP_CHECK_SECONDS))
        return True

    # --- slots and tokens, with the fleet's fallback --------------------------------------------------

    def _budget(self) -> Budget:
        if self._fleet is not None and (self._fleet_down_until is None or self._clock() >= self._fleet_down_until):
            return self._fleet
        assert self._node is not None
        return self._node

    def _fleet_failed(self, exc: Exception) -> None:
        with self._lock:
            first = self._fleet_down_until is None
            self._fleet_down_until = self._clock() + FLEET_RETRY_SECONDS
        if first:
            log.warning("Outbound limit: the fleet budget in PostgreSQL is unreachable (%s); limiting this node "
                        "alone until it answers", exc)

    def _fleet_answered(self) -> None:
        if self._fleet_down_until is None:
            return
        with self._lock:
            was_down, self._fleet_down_until = self._fleet_down_until is not None, None
        if was_down:
            log.warning("Outbound limit: the fleet budget in PostgreSQL is reachable again; limiting the fleet")

    def _call(self, budget: Budget, fn: Callable[[Budget], T]) -> tuple[Budget, T]:
        """``fn(budget)``; on a fleet failure, the same on the node budget (and the fleet is left alone
        for :data:`FLEET_RETRY_SECONDS`)."""
        if budget is self._fleet and budget is not None:
            try:
                result = fn(budget)
            except SmtWatchError as exc:
                self._fleet_failed(exc)
            else:
                self._fleet_answered()
                return budget, result
            assert self._node is not None
            budget = self._node
        return budget, fn(budget)

    def _take_slot(self, started: float) -> tuple[Budget, int | None]:
        if not self._slots:
            return self._budget(), None
        pause = SLOT_POLL_FIRST
        counted = False
        try:
            while True:
                if self._ended():
                    raise LimiterClosed("stopping: the request waited for the outbound limit and was not sent")
                budget, slot = self._call(self._budget(), lambda b: b.try_slot())
                if slot is not None:
                    return budget, slot
                if not counted:
                    counted = True
                    with self._lock:
                        self._waiting += 1
                    self._throttling(started)
                self._sleep(pause)
                pause = min(SLOT_POLL_MAX, pause * 2)
        finally:
            if counted:
                with self._lock:
                    self._waiting -= 1

    def _take_token(self, budget: Budget) -> None:
        if not self._rate:
            return
        _, wait = self._call(budget, lambda b: b.reserve())
        if wait > 0.001:
            with self._lock:
                self._waiting += 1
            try:
                self._throttling(self._clock())
                if self._sleep(wait):
                    raise LimiterClosed("stopping: the request waited for the outbound limit and was not sent")
            finally:
                with self._lock:
                    self._waiting -= 1

    def _release(self, budget: Budget, slot: int) -> None:
        try:
            budget.release(slot)
        except SmtWatchError as exc:  # the session is gone, and its advisory locks with it
            if budget is self._fleet:
                self._fleet_failed(exc)

    # --- saying so ----------------------------------------------------------------------------------------

    def _throttling(self, now: float) -> None:
        """A request starts to wait. Once an episode of waits has lasted :data:`ANNOUNCE_AFTER` it is logged,
        once per node, with the most requests the process that says it had waiting meanwhile (at the very
        first wait that is always one; with worker processes, each has one request at a time)."""
        with self._lock:
            if self._throttled_since is None:
                self._throttled_since = self._last_wait = now
                self._announced, self._said, self._most_waiting = False, False, 0
            self._most_waiting = max(self._most_waiting, self._waiting)
            if self._announced or now - self._throttled_since < ANNOUNCE_AFTER:
                return
            self._announced = True
            waiting = self._most_waiting
        if isinstance(self._node, NodeBudget):
            try:
                if not self._node.claim_announcement(QUIET_SECONDS):
                    return  # another process of this node said it (its "no longer" line ends the episode)
            except OSError:
                pass
        with self._lock:
            self._said = True
        log.info("Outbound limit: %s; backlog of %d request(s) waiting", describe(self._settings), waiting)

    def _note(self, waited: float) -> None:
        now = self._clock()
        if waited > 0.001:
            with self._lock:
                self._last_wait = now
                self._episode_waits += 1
                self._episode_seconds += waited
            if isinstance(self._node, NodeBudget):
                with contextlib.suppress(OSError):
                    self._node.count_wait(waited)
            return
        with self._lock:
            over = self._throttled_since is not None and now - self._last_wait >= QUIET_SECONDS
            if not over:
                return
            waits, seconds, announced = self._episode_waits, self._episode_seconds, self._said
            self._throttled_since, self._episode_waits, self._episode_seconds = None, 0, 0.0
        if announced:
            log.info("Outbound limit: no longer throttling; %d request(s) waited %.1f s in all", waits, seconds)


def _foreign_owner(state_dir: Path) -> tuple[int, int] | None:
    """The state dir's owner when root runs in another user's state dir (``sudo smt-watch post``): the lock
    files root creates there are given to that user, or the service could not open them afterwards and would
    limit each of its processes alone."""
    if os.geteuid() != 0:
        return None
    st = state_dir.stat()
    return None if st.st_uid == 0 else (st.st_uid, st.st_gid)


def limits_dir(settings: Settings) -> Path:
    return settings.state_dir / "limits"


def limiter_for(settings: Settings, stop: threading.Event | None = None) -> Limiter:
    """The limiter the settings ask for: off, per node, or per fleet (node as its fallback)."""
    rate = Rate(settings.max_requests_per_second) if settings.max_requests_per_second else None
    slots = settings.max_in_flight
    if rate is None and not slots:
        return Limiter(settings, None, stop=stop)
    node: Budget
    try:
        node = NodeBudget(limits_dir(settings), rate, slots)
    except OSError as exc:
        log.warning("Outbound limit: cannot use %s (%s); limiting this process alone", limits_dir(settings),
                    exc.strerror or exc)
        node = LocalBudget(rate, slots)
    fleet: Budget | None = None
    if settings.ledger_url:
        from smt_watch.ledger.fleet import FleetBudget

        fleet = FleetBudget(settings.ledger_url, rate, slots)
    return Limiter(settings, node, fleet, stop=stop)


def node_stats_reader(settings: Settings) -> Callable[[], OutboundStats]:
    """For the metrics: a function reading the node's counters when scraped. With a fleet budget the node's
    slot files are not where requests hold their slots, so there is no in-flight gauge then."""
    directory, slots = limits_dir(settings), 0 if settings.ledger_url else settings.max_in_flight
    return lambda: read_node_stats(directory, slots)
