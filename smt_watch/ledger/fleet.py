"""The fleet's outbound budget in PostgreSQL: the SQL behind per-fleet ``SMT_MAX_IN_FLIGHT`` and
``SMT_MAX_REQUESTS_PER_SECOND`` (:mod:`smt_watch.limits` decides when to use it and what to do without it).

- **In-flight slots** are session advisory locks ``(FLEET_LOCK, slot)`` for ``slot`` in ``0..N-1``, taken with
  ``pg_try_advisory_lock``: whichever droplet holds one is sending one request. A node that dies (or loses its
  connection) loses its session, and its slots with it; nothing has to expire. Session locks are re-entrant
  for their session, so the slots this process holds are remembered here and never asked for twice.
- **The rate** is one row per budget, ``tat`` (GCRA's theoretical arrival time in the server's epoch
  seconds), moved on in one ``INSERT … ON CONFLICT DO UPDATE`` that returns when this request may go, by the
  server's clock (``clock_timestamp()``), so the droplets' clocks do not matter. The row lock serialises
  concurrent takers; nothing else is read or written.

One short-lived-on-failure connection per process (autocommit), its own rather than the ledger's pool: the
locks belong to a session, and a pooled connection would hand them to whoever borrows it next. Every
database error becomes :class:`~smt_watch.errors.LedgerUnavailable`, after which the connection is dropped
(and with it the slots) and opened again at the next call.
"""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING, Final, Protocol

from smt_watch.errors import LedgerUnavailable

if TYPE_CHECKING:
    import psycopg

FLEET_LOCK: Final = 0x534D5480  # advisory lock class: "SMT" + 0x80 (the ledger's own keys are 0x534D54xx below)
BUDGET_NAME: Final = "outbound"
CONNECT_TIMEOUT: Final = 3  # seconds: a fleet budget that does not answer falls back to the node's
SCHEMA: Final = "smt_watch"  # the ledger's schema (smt_watch/ledger/postgres.py)

# In the ledger's schema, which its migrations made (CREATE SCHEMA IF NOT EXISTS would need CREATE on the
# database, which the ledger's user need not have). Made here, not in a ledger migration, so that the limit
# needs nothing of the ledger's version; a user that may not create it gets the per-node limit, said once.
CREATE_SQL: Final = f"""
CREATE TABLE IF NOT EXISTS {SCHEMA}.outbound_budget (
    name text PRIMARY KEY,
    tat double precision NOT NULL
)"""

# One slot at a time: a single statement over generate_series(...) LIMIT 1 may evaluate the lock on more
# rows than it returns, and a lock taken but not returned would be held by this session for good.
TAKE_SLOT_SQL: Final = "SELECT pg_try_advisory_lock(%(key)s, %(slot)s)"

RELEASE_SLOT_SQL: Final = "SELECT pg_advisory_unlock(%(key)s, %(slot)s)"

# GCRA in one statement: start = max(tat, now); tat := start + interval; wait = max(0, start - tau - now).
# The one-second-stale guard of limits.Rate.reserve is not needed: the server's epoch clock never restarts.
RESERVE_SQL: Final = f"""
WITH now AS (SELECT extract(epoch FROM clock_timestamp())::double precision AS t)
INSERT INTO {SCHEMA}.outbound_budget AS b (name, tat)
SELECT %(name)s, now.t + %(interval)s FROM now
ON CONFLICT (name) DO UPDATE SET tat = greatest(b.tat, (SELECT t FROM now)) + %(interval)s
RETURNING greatest(0, b.tat - %(interval)s - %(tau)s - (SELECT t FROM now))"""


class Rate(Protocol):
    """The GCRA parameters the budget row is reserved with (``smt_watch.limits.Rate`` is one; named here so the
    ledger never imports the limiter that imports it)."""

    @property
    def interval(self) -> float: ...

    @property
    def tau(self) -> float: ...


class FleetBudget:
    """Slots and tokens shared by every node on one PostgreSQL ledger (a :class:`smt_watch.limits.Budget`)."""

    where = "fleet"

    def __init__(self, url: str, rate: Rate | None, slots: int) -> None:
        self._url = url
        self._rate = rate
        self._slots = slots
        self._lock = threading.Lock()  # one connection for this process's threads; statements are short
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None
        self._held: set[int] = set()
        self._made = False  # the table exists (asked once per connection)

    def _connection(self) -> psycopg.Connection[tuple[object, ...]]:
        import psycopg

        if self._conn is None or self._conn.closed:
            self._held.clear()  # a new session holds no lock
            self._conn = psycopg.connect(self._url, autocommit=True, connect_timeout=CONNECT_TIMEOUT,
                                         application_name="smt-watch outbound limit")
            self._made = False
        if not self._made and self._rate is not None:
            with contextlib.suppress(psycopg.errors.UniqueViolation):  # another node made it at the same moment
                self._conn.execute(CREATE_SQL)
            self._made = True
        return self._conn

    def _run(self, sql: str, params: dict[str, object]) -> object:
        with self._lock:
            return self._execute(sql, params)

    def _execute(self, sql: str, params: dict[str, object]) -> object:
        """One statement on this process's connection; the caller holds ``_lock``."""
        import psycopg

        try:
            row = self._connection().execute(sql, params).fetchone()
        except psycopg.Error as exc:
            self._drop()
            # psycopg's messages name host, port and database, never the password
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise LedgerUnavailable(f"PostgreSQL: {first}") from None
        return None if row is None else row[0]

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):  # closing a broken connection: nothing more to learn
                self._conn.close()
        self._conn = None
        self._held.clear()

    def try_slot(self) -> int | None:
        with self._lock:  # held and taken together: the session's locks are re-entrant
            for slot in range(self._slots):
                if slot not in self._held and self._execute(TAKE_SLOT_SQL, {"key": FLEET_LOCK, "slot": slot}):
                    self._held.add(slot)
                    return slot
            return None

    def release(self, slot: int) -> None:
        with self._lock:
            if slot not in self._held:
                return  # the session it was taken in is gone, and the lock with it
            self._held.discard(slot)
            self._execute(RELEASE_SLOT_SQL, {"key": FLEET_LOCK, "slot": slot})

    def reserve(self) -> float:
        if self._rate is None:
            return 0.0
        wait = self._run(RESERVE_SQL, {"name": BUDGET_NAME, "interval": self._rate.interval, "tau": self._rate.tau})
        assert isinstance(wait, float)
        return wait

    def close(self) -> None:
        with self._lock:
            self._drop()
