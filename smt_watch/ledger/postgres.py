"""The PostgreSQL ledger: the same rows and state machine as the SQLite ledger, shared by several droplets.

Set ``SMT_LEDGER_URL`` and every command on every node reads and writes one ledger: dedupe, claims,
retries, upload quotas and ``sync``'s memory of remote files are shared; each node keeps its own inbox and
its own stat cache (rows of ``seen`` carry the node's name).

What changes with several nodes:

- **Claims** are one ``INSERT … ON CONFLICT DO UPDATE … WHERE … RETURNING``: the row is taken only if it is
  not ``sent`` (unless forced), not backed off (for ``watch``), and not held by a live claim. A ``sending``
  row carries a lease (``lease_until``, by the database's clock) that the claiming process renews while it
  delivers; once it expires any node that holds the same bytes takes the row over. On the claimer's own
  node a dead process is noticed at once (its pid is gone), as with SQLite.
- **Schema**: versioned in ``smt_watch.schema_version``, migrated on open under an advisory lock, so two
  nodes starting at once take turns; a newer schema is refused.
- **Quotas** are counted under a per-account transaction-level advisory lock: two ``serve`` nodes share one.
- **sync's lock** is a session-level advisory lock: one pass across all nodes.
- **Connection loss**: an operation that meets a broken connection retries on a fresh one for up to
  ``reconnect_seconds`` (the pool reconnects), then raises :class:`LedgerUnavailable`. Writes are
  idempotent or guarded, so a retried one never marks a row ``sent`` that did not commit as such.

Timestamps shown to people (``first_seen``, ``updated_at``, ``sent_at``) are stored as the same ISO text as
in SQLite, so both backends give byte-identical ``ledger list --json`` and ``ledger copy`` is a plain copy.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Final, TypeVar

import psycopg
import psycopg_pool
from psycopg.rows import dict_row

from smt_watch.config import SETTINGS
from smt_watch.errors import ConfigError, LedgerError, LedgerUnavailable
from smt_watch.ledger import verdicts
from smt_watch.ledger.port import POSTGRES, Params, Record, pyformat
from smt_watch.ledger.schema import CHUNKS, FILES_CORE, LABELS, REMOTE_FILES, columns
from smt_watch.ledger.store import SqlLedger

log = logging.getLogger("smt_watch.ledger")

SCHEMA: Final = "smt_watch"
LOCK_MIGRATE: Final = 0x534D5401  # advisory lock keys: "SMT" + a number
LOCK_SYNC: Final = 0x534D5402
LOCK_QUOTA: Final = 0x534D5403  # two-key form with the account's hash

T = TypeVar("T")
# How long one operation waits for a lost connection to come back before it raises LedgerUnavailable: well
# inside systemd's WatchdogSec=60 for `watch`, whose loop waits on the ledger. Its default is the setting's.
RECONNECT_SECONDS: Final = float(SETTINGS["SMT_LEDGER_RECONNECT_SECONDS"].default or "")
# Our sessions only: the tables in our schema. synchronous_commit is left as the server has it (on by
# default: a commit returns once its WAL is on disk). It was off here while a drain committed twice a file;
# a drain now commits twice a group of up to 16 (one statement each), and with it on the drain measured the
# same (bench_ledger, same run: 449 against 304 files/s, 1.21 against 1.27 ms CPU a file, on a loaded
# machine). One file at a time pays the flush: claim + sent on their own went from ~300 to ~60 a second on
# this machine's disk.
# plan_cache_mode: every execution of a prepared statement is planned for its own parameters and the tables
# as they are now. A generic plan is kept until autovacuum's next ANALYZE (a minute or more): made while a
# new ledger was nearly empty, it read every row of `files` for each group's claims and outcomes once the
# table had grown. Measured (groups of 16 claimed and finished, 12,000 files on a new ledger): the server's
# CPU a file went 225 → 420 → 655 µs with the cached plans, and stays at 130–180 µs planned each time.
SESSION_OPTIONS: Final = f"-c search_path={SCHEMA} -c plan_cache_mode=force_custom_plan"

_MIGRATIONS: Final[tuple[str, ...]] = (
    f"""
    CREATE TABLE IF NOT EXISTS {SCHEMA}.files ({columns(FILES_CORE, big="BIGINT", real="DOUBLE PRECISION")}
        lease_until TIMESTAMPTZ,
        node TEXT,
        origin TEXT NOT NULL DEFAULT 'smt-watch',
        parent TEXT
    );
    CREATE INDEX IF NOT EXISTS files_state ON {SCHEMA}.files(state);
    CREATE INDEX IF NOT EXISTS files_path ON {SCHEMA}.files(path);
    CREATE TABLE IF NOT EXISTS {SCHEMA}.meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS {SCHEMA}.seen (
        node TEXT NOT NULL,
        path TEXT NOT NULL,
        device BIGINT NOT NULL,
        inode BIGINT NOT NULL,
        size BIGINT NOT NULL,
        mtime_ns BIGINT NOT NULL,
        sha256 TEXT NOT NULL,
        PRIMARY KEY (node, path)
    );
    CREATE INDEX IF NOT EXISTS seen_sha256 ON {SCHEMA}.seen(sha256);
    CREATE TABLE IF NOT EXISTS {SCHEMA}.remote_files ({columns(REMOTE_FILES, big="BIGINT", real="DOUBLE PRECISION")}
    );
    CREATE TABLE IF NOT EXISTS {SCHEMA}.uploads (
        role TEXT NOT NULL, account TEXT NOT NULL, at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX IF NOT EXISTS uploads_account ON {SCHEMA}.uploads(role, account, at);
    CREATE TABLE IF NOT EXISTS {SCHEMA}.chunks ({columns(CHUNKS, big="BIGINT", real="DOUBLE PRECISION")}
    );
    """,
    # 6: the ESIID and meter an uploader declared for some bytes, and the ESIID their delivery carried
    f"""
    CREATE TABLE IF NOT EXISTS {SCHEMA}.labels ({columns(LABELS, big="BIGINT", real="DOUBLE PRECISION")}
    );
    CREATE INDEX IF NOT EXISTS labels_esiid ON {SCHEMA}.labels(esiid);
    CREATE INDEX IF NOT EXISTS labels_declared_esiid ON {SCHEMA}.labels(declared_esiid);
    """,
    # 7: when the current delivery began (`post --force` of a sent row, an operator's retry); NULL: first_seen.
    f"ALTER TABLE {SCHEMA}.files ADD COLUMN IF NOT EXISTS started_at TEXT",
    verdicts.postgres_migration(SCHEMA),  # 8: verify's verdicts (issue 26)
)
SCHEMA_VERSION: Final = len(_MIGRATIONS)

_DISCONNECTS: Final = (psycopg.OperationalError, psycopg_pool.PoolTimeout, psycopg.InterfaceError)


def is_postgres_url(url: str | None) -> bool:
    return bool(url) and str(url).startswith(("postgresql://", "postgres://"))


class _Tx:
    """Statements on one pooled connection (autocommit: each its own transaction unless inside
    ``conn.transaction()``), in SQLite's placeholder style, translated once per statement."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def query(self, sql: str, params: Params = ()) -> list[Record]:
        with self._conn.cursor(row_factory=dict_row) as cur:
            cur.execute(*_bound(sql, params))
            rows: list[Record] = [*cur.fetchall()] if cur.description is not None else []
            return rows

    def tuples(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        cur = self._conn.execute(*_bound(sql, params))
        return cur.fetchall() if cur.description is not None else []

    def execute(self, sql: str, params: Params = ()) -> int:
        return self._conn.execute(*_bound(sql, params)).rowcount

    def lock(self, *key: str) -> None:
        """A transaction-level advisory lock keyed by ``key``'s hash (two keys that share one only wait for
        each other): two nodes counting one account's quota take turns."""
        self._conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (LOCK_QUOTA, "/".join(key)))


@functools.lru_cache(maxsize=512)
def _translated(sql: str) -> str:
    """``sql`` in psycopg's placeholder style, translated once (the ledger's statements are a few dozen)."""
    return pyformat(sql)


def _bound(sql: str, params: Params) -> tuple[str, Params | None]:
    """The statement and parameters for psycopg; without parameters psycopg takes the text as it is."""
    return (_translated(sql), params) if params else (sql, None)


class PostgresDb:
    """The port on a PostgreSQL schema: a pool of connections, one per concurrent operation; an operation that
    meets a lost connection runs again on a fresh one for up to ``reconnect_seconds``. Thread-safe."""

    dialect = POSTGRES

    def __init__(
        self,
        url: str,
        *,
        shown_as: str,
        reconnect_seconds: float = RECONNECT_SECONDS,
        max_connections: int = 10,
        connect_timeout: float = 10.0,
    ) -> None:
        self.path = shown_as  # what messages call this ledger: the URL without its password
        self._reconnect = reconnect_seconds
        self._connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self.closed = threading.Event()
        self._down_since: float | None = None
        self._pool = psycopg_pool.ConnectionPool(
            url,
            min_size=1,
            max_size=max(2, max_connections),
            kwargs={"autocommit": True, "connect_timeout": max(1, int(connect_timeout)),
                    "options": SESSION_OPTIONS},
            timeout=connect_timeout,
            # 0: a failed background attempt gives up at once; the next call that needs a connection makes
            # the pool try again, and reconnect_seconds bounds each call (see _run).
            reconnect_timeout=0,
            open=False,
            name="smt-watch-ledger",
        )
        try:
            # One plain connection first: a wrong password or an unknown database fails at once with the
            # server's reason; the pool would only say "initialization incomplete" after connect_timeout.
            psycopg.connect(url, connect_timeout=max(1, int(connect_timeout))).close()
            self._pool.open(wait=True, timeout=connect_timeout)
        except _DISCONNECTS as exc:
            self._pool.close()
            raise LedgerUnavailable(f"cannot connect to ledger {shown_as}: {_reason(exc)}") from exc
        except psycopg.Error as exc:  # the URL itself is wrong (an unknown query parameter, say): a setting
            self._pool.close()
            raise ConfigError(f"SMT_LEDGER_URL {shown_as}: {_reason(exc)}") from exc
        try:
            self._migrate()
        except BaseException:
            self._pool.close()
            raise

    def close(self) -> None:
        self.closed.set()
        self._pool.close()

    def _run(self, what: Callable[[psycopg.Connection[Any]], T], *, retry: bool = True) -> T:
        """Run ``what`` on a pooled connection; on a lost connection, again on a fresh one until
        ``reconnect_seconds`` have passed. ``what`` runs its own transaction (``with conn.transaction()``)."""
        deadline = time.monotonic() + self._reconnect
        delay = 0.1
        failures = 0
        while True:
            # Never wait for a connection past the deadline: the pool's own timeout (connect_timeout) would
            # hold a call 10 s whatever reconnect_seconds says (serve's 3 s wait took 10).
            wait = min(self._connect_timeout, max(0.05, deadline - time.monotonic()))
            try:
                with self._pool.connection(timeout=wait) as conn:
                    result = what(conn)
            except _DISCONNECTS as exc:
                failures += 1
                if failures == 1 and not self.closed.is_set() and time.monotonic() < deadline:
                    # One failure may be a pooled connection that died with a server that is back: drop every
                    # dead idle connection and try once more before calling it an outage (else a restart read
                    # as two outages: "reachable again", then the next stale connection, "unreachable"). Also
                    # without retry: the lease renewer's stale connection once opened a second outage.
                    self._drop_dead_connections()
                    continue
                if not retry or time.monotonic() + delay > deadline or self.closed.is_set():
                    self._went_down(exc)
                    raise LedgerUnavailable(f"ledger {self.path} is unreachable: {_reason(exc)}") from exc
                self._went_down(exc)
                self.closed.wait(delay)
                delay = min(delay * 2, 5.0)
                continue
            except psycopg.Error as exc:
                raise LedgerError(f"ledger {self.path}: {_reason(exc)}") from exc
            if self._down_since is not None:
                with self._lock:
                    if self._down_since is not None:
                        log.warning("Ledger %s reachable again after %.0fs", self.path,
                                    time.monotonic() - self._down_since)
                        self._down_since = None
            return result

    def _drop_dead_connections(self) -> None:
        with contextlib.suppress(psycopg.Error):  # the server is really gone: the retry loop says so
            self._pool.check()

    def _went_down(self, exc: BaseException) -> None:
        with self._lock:
            if self._down_since is None:  # say it once per outage
                self._down_since = time.monotonic()
                log.error("Ledger %s unreachable (%s); retrying", self.path, _reason(exc))

    def transaction(self, work: Callable[[_Tx], T], *, retry: bool = True) -> T:
        def run(conn: psycopg.Connection[Any]) -> T:
            with conn.transaction():
                return work(_Tx(conn))

        return self._run(run, retry=retry)

    def query(self, sql: str, params: Params = ()) -> list[Record]:
        return self._run(lambda conn: _Tx(conn).query(sql, params))

    def tuples(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        return self._run(lambda conn: _Tx(conn).tuples(sql, params))

    def execute(self, sql: str, params: Params = (), *, retry: bool = True) -> int:
        """One statement in its own transaction (the connections are in autocommit): one round trip, where
        BEGIN … COMMIT around it would be three."""
        return self._run(lambda conn: _Tx(conn).execute(sql, params), retry=retry)

    def lock(self, *key: str) -> None:
        """A lock outside a transaction holds nothing."""

    def _migrate(self) -> None:
        def run(conn: psycopg.Connection[Any]) -> None:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_MIGRATE,))
                # CREATE SCHEMA IF NOT EXISTS needs the CREATE right even when the schema exists: the
                # README's set-up creates it for the role, so ask first.
                if conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (SCHEMA,)).fetchone() is None:
                    conn.execute(f"CREATE SCHEMA {SCHEMA}")
                conn.execute(f"CREATE TABLE IF NOT EXISTS {SCHEMA}.schema_version (version INTEGER NOT NULL)")
                row = conn.execute(f"SELECT max(version) FROM {SCHEMA}.schema_version").fetchone()
                version = int(row[0]) if row and row[0] is not None else 0
                if version > SCHEMA_VERSION:
                    raise LedgerError(
                        f"ledger {self.path} has schema {version}, newer than this smt-watch ({SCHEMA_VERSION})"
                    )
                for number in range(version + 1, SCHEMA_VERSION + 1):
                    conn.execute(_MIGRATIONS[number - 1])
                    conn.execute(f"INSERT INTO {SCHEMA}.schema_version (version) VALUES (%s)", (number,))

        try:
            self._run(run, retry=False)
        except LedgerError:
            raise
        except psycopg.errors.InsufficientPrivilege as exc:  # pragma: no cover - wrapped by _run
            raise LedgerError(f"ledger {self.path}: {exc}") from exc

    def schema_version(self) -> int:
        rows = self.tuples(f"SELECT max(version) FROM {SCHEMA}.schema_version")
        return int(rows[0][0] or 0)

    def clock_offset(self) -> float:
        """Database clock minus this node's clock, in seconds (leases are judged by the database's)."""
        before = time.time()
        rows = self.tuples("SELECT extract(epoch FROM clock_timestamp())")
        after = time.time()
        return float(rows[0][0]) - (before + after) / 2

    def quick_check(self) -> str:
        rows = self.tuples("SELECT count(*) FROM files")
        return "ok" if rows else "no answer"

    @contextmanager
    def sync_lock(self, wait: bool) -> Iterator[bool]:
        """One ``sync`` pass across every node: a session advisory lock on a connection held for the pass."""
        try:
            conn = self._pool.getconn()
        except _DISCONNECTS as exc:
            raise LedgerUnavailable(f"ledger {self.path} is unreachable: {_reason(exc)}") from exc
        try:
            try:
                if wait:
                    conn.execute("SELECT pg_advisory_lock(%s)", (LOCK_SYNC,))
                    locked = True
                else:
                    row = conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_SYNC,)).fetchone()
                    locked = bool(row and row[0])
            except _DISCONNECTS as exc:
                raise LedgerUnavailable(f"ledger {self.path} is unreachable: {_reason(exc)}") from exc
            try:
                yield locked
            finally:
                if locked and not conn.closed:
                    with contextlib.suppress(psycopg.Error):  # else the connection is gone, and its lock
                        conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_SYNC,))
        finally:
            self._pool.putconn(conn)


class PostgresLedger(SqlLedger):
    """The ledger in PostgreSQL (:class:`~smt_watch.ledger.store.SqlLedger` on :class:`PostgresDb`), shared by
    several nodes; while this process holds claims, a thread renews their leases."""

    def __init__(
        self,
        url: str,
        *,
        shown_as: str,
        node: str | None = None,
        lease_seconds: float = 60.0,
        reconnect_seconds: float = RECONNECT_SECONDS,
        max_connections: int = 10,
        connect_timeout: float = 10.0,
    ) -> None:
        self._pg = PostgresDb(url, shown_as=shown_as, reconnect_seconds=reconnect_seconds,
                              max_connections=max_connections, connect_timeout=connect_timeout)
        super().__init__(self._pg, node, lease_seconds=lease_seconds)
        self._renewer: threading.Thread | None = None

    def close(self) -> None:
        self._pg.closed.set()
        if self._renewer is not None:
            self._renewer.join()
        self._pg.close()

    def _on_claim(self) -> None:
        with self._lock:
            if self._renewer is not None or self._pg.closed.is_set():
                return
            self._renewer = threading.Thread(target=self._renew_leases, name="smt-watch-lease", daemon=True)
            self._renewer.start()

    def _renew_leases(self) -> None:
        """Extend the lease of every row this process is delivering, a third of a lease at a time."""
        while not self._pg.closed.wait(self._lease / 3):
            held = self._held()
            if not held:
                continue
            with contextlib.suppress(LedgerError):  # said once by the port; the next round tries again
                self._pg.execute("UPDATE files SET lease_until = now() + make_interval(secs => :lease)"
                                 " WHERE sha256 = ANY(:held) AND state = 'sending' AND claimed_by = :me",
                                 {"lease": self._lease, "held": held, "me": self._me}, retry=False)


def _reason(exc: BaseException) -> str:
    """psycopg's message, first line only (it never holds the password: libpq does not echo it)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
