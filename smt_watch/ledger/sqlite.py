"""The SQLite ledger (the embedded default): what was seen, what is being sent, what was delivered.

One row per distinct content (SHA-256). A row moves ``pending → sending → sent | retrying | failed``;
``sending`` carries the claimer (``host:pid``) so two processes (``post`` and ``watch``) never deliver the
same bytes at once, and a row left in ``sending`` by a process that died is taken over.

WAL mode lets readers (``ledger list``) run beside a writer; ``busy_timeout`` makes writers queue instead
of failing. ``synchronous=NORMAL``: an application crash loses nothing; a power cut may forget the last
few ``sent`` marks, which only means a re-delivery that the receiver de-duplicates by ``Idempotency-Key``.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import quote

from smt_watch.errors import LedgerError
from smt_watch.ledger import verdicts
from smt_watch.ledger.port import SQLITE, Params, Record
from smt_watch.ledger.schema import CHUNKS, FILES_CORE, LABELS, REMOTE_FILES, columns
from smt_watch.ledger.store import SqlLedger

T = TypeVar("T")
# The shared statements need upserts with RETURNING (the claim) and NULLS FIRST: SQLite 3.35 (2021).
MIN_SQLITE: Final = (3, 35, 0)

# --- migrations: numbered, each runs in the transaction that bumps user_version ---------------------


def _migration_1(db: sqlite3.Connection) -> None:
    db.execute(
        f"""CREATE TABLE files ({columns(FILES_CORE, big="INTEGER", real="REAL")}
            origin TEXT NOT NULL DEFAULT 'smt-watch'
        )"""
    )
    db.execute("CREATE INDEX files_state ON files(state)")
    db.execute("CREATE INDEX files_path ON files(path)")
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")


def _migration_2(db: sqlite3.Connection) -> None:
    """The stat cache: a rescan over files already handled reads none of them again."""
    db.execute(
        """CREATE TABLE seen (
            path TEXT PRIMARY KEY,
            device INTEGER NOT NULL,
            inode INTEGER NOT NULL,
            size INTEGER NOT NULL,
            mtime_ns INTEGER NOT NULL,
            sha256 TEXT NOT NULL
        )"""
    )
    db.execute("CREATE INDEX seen_sha256 ON seen(sha256)")


def _migration_3(db: sqlite3.Connection) -> None:
    """What ``sync`` fetched: a remote file is fetched again only when its size or mtime changed."""
    db.execute(
        f"""CREATE TABLE remote_files ({columns(REMOTE_FILES, big="INTEGER", real="REAL")}
        )"""
    )


def _migration_4(db: sqlite3.Connection) -> None:
    """Accepted uploads to ``serve``, for rate limits that survive a restart."""
    db.execute("CREATE TABLE uploads (role TEXT NOT NULL, account TEXT NOT NULL, at REAL NOT NULL)")
    db.execute("CREATE INDEX uploads_account ON uploads(role, account, at)")


def _migration_5(db: sqlite3.Connection) -> None:
    """CSVs unpacked from an .asc/.zip name their parent; raw-upload remembers acknowledged chunks."""
    db.execute("ALTER TABLE files ADD COLUMN parent TEXT")
    db.execute(
        f"""CREATE TABLE chunks ({columns(CHUNKS, big="INTEGER", real="REAL")}
        )"""
    )


def _migration_6(db: sqlite3.Connection) -> None:
    """The ESIID and meter an uploader declared for some bytes, and the ESIID their delivery carried."""
    db.execute(
        f"""CREATE TABLE labels ({columns(LABELS, big="INTEGER", real="REAL")}
        )"""
    )
    db.execute("CREATE INDEX labels_esiid ON labels(esiid)")
    db.execute("CREATE INDEX labels_declared_esiid ON labels(declared_esiid)")


def _migration_7(db: sqlite3.Connection) -> None:
    """When the current delivery began (``post --force`` of a sent row, an operator's retry), so latency is
    not counted from a first sight days ago; NULL means ``first_seen``."""
    db.execute("ALTER TABLE files ADD COLUMN started_at TEXT")


MIGRATIONS: Final[tuple[Callable[[sqlite3.Connection], None], ...]] = (
    _migration_1, _migration_2, _migration_3, _migration_4, _migration_5, _migration_6, _migration_7,
    verdicts.sqlite_migration,  # 8: verify's verdicts (issue 26)
)
SCHEMA_VERSION: Final = len(MIGRATIONS)


@contextmanager
def _opening(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``<ledger>.lock`` while a process opens the ledger (none where the state
    directory is read-only: opening an existing WAL ledger there needs no switch)."""
    try:
        fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _open_readonly(path: Path, busy_timeout: float) -> sqlite3.Connection:
    """A ``mode=ro`` connection. With no ``-wal``/``-shm`` beside the file (no writer has it open) and a
    directory this user cannot write, SQLite cannot set up its WAL index and refuses; the file then holds
    every committed row, and is read as ``immutable`` (no locks, nothing written)."""
    uri = f"file:{quote(str(path.absolute()))}?mode=ro"
    last: sqlite3.Error | None = None
    for extra in ("", "&immutable=1"):
        try:
            db = sqlite3.connect(uri + extra, uri=True, timeout=busy_timeout, isolation_level=None,
                                 check_same_thread=False)
            db.row_factory = sqlite3.Row
            db.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return db
        except sqlite3.Error as exc:
            last = exc
            if path.with_name(path.name + "-wal").exists():
                break  # a writer is at work: an immutable read could see a torn state
    raise LedgerError(f"cannot open ledger {path}: {last}")



class _Tx:
    """Statements on the connection, inside :meth:`SqliteDb.transaction` or each committed on its own."""

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self._conn = db
        self._path = path

    def query(self, sql: str, params: Params = ()) -> list[Record]:
        return self._conn.execute(sql, params).fetchall()

    def tuples(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        """Plain tuples: a third cheaper than ``sqlite3.Row`` for bulk look-ups."""
        cursor = self._conn.cursor()
        cursor.row_factory = None
        return cursor.execute(sql, params).fetchall()

    def execute(self, sql: str, params: Params = ()) -> int:
        return self._conn.execute(sql, params).rowcount

    def lock(self, *key: str) -> None:
        """Nothing to take: ``BEGIN IMMEDIATE`` already holds the database's one write lock."""


class SqliteDb:
    """The port on one SQLite file: one connection guarded by a lock (writes are short). Thread-safe."""

    dialect = SQLITE

    def __init__(self, path: Path, *, busy_timeout: float = 30.0, readonly: bool = False) -> None:
        """``readonly``: for the commands that only read (``status``, ``ledger list``, ``doctor``), opened with
        SQLite's ``mode=ro``: never created, never migrated, and readable by a user who may not write it
        (a monitoring user in the service's group)."""
        self.path = path
        self._lock = threading.RLock()
        if sqlite3.sqlite_version_info < MIN_SQLITE:
            raise LedgerError(f"cannot open ledger {path}: SQLite {sqlite3.sqlite_version} is too old "
                              "(3.35 or newer is needed)")
        if readonly:
            self._db = _open_readonly(path, busy_timeout)
            self._tx = _Tx(self._db, path)
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LedgerError(f"cannot open ledger {path}: {exc}") from exc
        # Two processes opening a new ledger at once: SQLite answers the switch to WAL with "database is
        # locked" at once (its busy handler is not used there), so opening and migrating take turns.
        with _opening(path):
            try:
                self._db = sqlite3.connect(
                    path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
                )
                self._db.row_factory = sqlite3.Row
                self._db.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
                self._db.execute("PRAGMA journal_mode = WAL")
                self._db.execute("PRAGMA synchronous = NORMAL")
            except (OSError, sqlite3.Error) as exc:
                raise LedgerError(f"cannot open ledger {path}: {exc}") from exc
            self._tx = _Tx(self._db, path)
            self._migrate()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def atomic(self) -> Iterator[_Tx]:
        """One write transaction, taken up front (``BEGIN IMMEDIATE``) so read-then-write is race free.

        Any ``sqlite3.Error`` inside it (a full disk, a broken constraint) rolls back and comes out as
        :class:`LedgerError`, so no caller needs to know the ledger is SQLite.
        """
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise LedgerError(f"ledger {self.path} is not writable: {exc}") from exc
            try:
                yield self._tx
            except sqlite3.Error as exc:
                self._rollback()
                raise LedgerError(f"ledger {self.path}: {exc}") from exc
            except BaseException:
                self._rollback()
                raise
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise LedgerError(f"ledger {self.path}: commit failed: {exc}") from exc

    def _rollback(self) -> None:
        """End a failed transaction; SQLite may have rolled it back already (a full disk does)."""
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def transaction(self, work: Callable[[_Tx], T], *, retry: bool = True) -> T:
        """``work`` in one ``BEGIN IMMEDIATE`` transaction (``retry``: nothing to reconnect to)."""
        with self.atomic() as tx:
            return work(tx)

    def _read(self, run: Callable[[], T]) -> T:
        with self._lock:
            try:
                return run()
            except sqlite3.Error as exc:
                raise LedgerError(f"ledger {self.path}: {exc}") from exc

    def query(self, sql: str, params: Params = ()) -> list[Record]:
        return self._read(lambda: self._tx.query(sql, params))

    def tuples(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        return self._read(lambda: self._tx.tuples(sql, params))

    def execute(self, sql: str, params: Params = ()) -> int:
        """One write in its own ``BEGIN IMMEDIATE`` transaction: a deferred one could meet "database is
        locked" at its upgrade to a writer without waiting (WAL)."""
        with self.atomic() as tx:
            return tx.execute(sql, params)

    def lock(self, *key: str) -> None:
        """A lock outside a transaction holds nothing."""

    def _migrate(self) -> None:
        version = self.schema_version()
        if version > SCHEMA_VERSION:
            raise LedgerError(
                f"ledger {self.path} has schema {version}, newer than this smt-watch ({SCHEMA_VERSION})"
            )
        for number in range(version + 1, SCHEMA_VERSION + 1):
            with self.atomic():
                # Another process may have migrated while we waited for the write lock.
                if int(self._db.execute("PRAGMA user_version").fetchone()[0]) >= number:
                    continue
                MIGRATIONS[number - 1](self._db)
                self._db.execute(f"PRAGMA user_version = {number}")

    def schema_version(self) -> int:
        return int(self.tuples("PRAGMA user_version")[0][0])

    def clock_offset(self) -> float:
        """The database's clock minus ours: always 0 for a file on this machine."""
        return 0.0

    def quick_check(self) -> str:
        """``ok``, or SQLite's description of the first problems found."""
        return "; ".join(str(r[0]) for r in self.tuples("PRAGMA quick_check"))

    @contextmanager
    def sync_lock(self, wait: bool) -> Iterator[bool]:
        """One ``sync`` pass at a time on this droplet: an ``flock`` on ``sync.lock`` beside the ledger. Yields
        True holding it, or False at once when another pass holds it and ``wait`` is off."""
        with (self.path.parent / "sync.lock").open("a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


class SqliteLedger(SqlLedger):
    """The ledger in an SQLite file (:class:`~smt_watch.ledger.store.SqlLedger` on :class:`SqliteDb`)."""

    def __init__(self, path: Path, *, busy_timeout: float = 30.0, node: str | None = None,
                 readonly: bool = False) -> None:
        super().__init__(SqliteDb(path, busy_timeout=busy_timeout, readonly=readonly), node)
