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
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

from smt_watch.clock import utc_stamp
from smt_watch.errors import LedgerError
from smt_watch.hashing import Signature
from smt_watch.ledger import verdicts
from smt_watch.ledger.common import (
    COPIED_COLUMNS,
    COPIED_TABLES,
    FILE_COLUMNS,
    REPOST_NOTE,
    STATES,
    Claim,
    Labels,
    LedgerBase,
    Remember,
    Row,
    Seen,
    claimer_alive,
    column_text,
    delivery_seconds,
    epoch_of,
    now_iso,
    process_id,
    row_from,
    rows_query,
)
from smt_watch.names import shown, stored, unstored

# --- migrations: numbered, each runs in the transaction that bumps user_version ---------------------


def _migration_1(db: sqlite3.Connection) -> None:
    db.execute(
        """CREATE TABLE files (
            sha256 TEXT PRIMARY KEY,
            filename TEXT NOT NULL,
            path TEXT,
            size INTEGER,
            state TEXT NOT NULL CHECK (state IN ('pending','sending','sent','retrying','failed')),
            attempts INTEGER NOT NULL DEFAULT 0,
            http_status INTEGER,
            last_error TEXT,
            first_seen TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            sent_at TEXT,
            destination TEXT,
            mode TEXT,
            next_attempt_at REAL,
            claimed_by TEXT,
            claimed_at REAL,
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
        """CREATE TABLE remote_files (
            remote_path TEXT PRIMARY KEY,
            size INTEGER NOT NULL,
            mtime INTEGER NOT NULL,
            sha256 TEXT NOT NULL,
            local_path TEXT NOT NULL,
            fetched_at TEXT NOT NULL
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
        """CREATE TABLE chunks (
            sha256 TEXT NOT NULL,
            part INTEGER NOT NULL,
            parts INTEGER NOT NULL,
            chunk_sha256 TEXT NOT NULL,
            acked_at TEXT NOT NULL,
            PRIMARY KEY (sha256, part)
        )"""
    )


def _migration_6(db: sqlite3.Connection) -> None:
    """The ESIID and meter an uploader declared for some bytes, and the ESIID their delivery carried."""
    db.execute(
        """CREATE TABLE labels (
            sha256 TEXT PRIMARY KEY,
            declared_esiid TEXT,
            declared_meter TEXT,
            esiid TEXT,
            at REAL NOT NULL
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


_NOTE_SQL: Final = ("INSERT INTO labels (sha256, esiid, at) VALUES (?, ?, ?)"
                    " ON CONFLICT (sha256) DO UPDATE SET esiid = excluded.esiid")
_REMEMBER_SQL = "INSERT OR REPLACE INTO seen (path, device, inode, size, mtime_ns, sha256) VALUES (?, ?, ?, ?, ?, ?)"


def _remember_params(r: Remember) -> tuple[str, int, int, int, int, str]:
    sig = r.signature
    return (stored(r.path), sig.device, sig.inode, sig.size, sig.mtime_ns, r.sha256)


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


class SqliteLedger(LedgerBase, verdicts.SqliteVerdicts):
    """The ledger database. Thread-safe: one connection guarded by a lock (writes are short)."""

    def __init__(self, path: Path, *, busy_timeout: float = 30.0, node: str | None = None,
                 readonly: bool = False) -> None:
        """``readonly``: for the commands that only read (``status``, ``ledger list``, ``doctor``), opened with
        SQLite's ``mode=ro``: never created, never migrated, and readable by a user who may not write it
        (a monitoring user in the service's group)."""
        self.path = path
        self._lock = threading.RLock()
        self._me = process_id(node)
        self._node = self._me.rpartition(":")[0]
        # Claims this process is really working on. A row left `sending` under our own name but not in
        # here (its final write failed, e.g. on a full disk) is taken over instead of waiting forever.
        self._inflight: set[str] = set()
        # ESIIDs noted for claims in flight, written in the transaction that records their outcome (a
        # transaction of their own would cost about a tenth of watch's drain rate)
        self._noted: dict[str, str] = {}
        if readonly:
            self._db = _open_readonly(path, busy_timeout)
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
            self._migrate()

    # --- plumbing -----------------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def atomic(self) -> Iterator[sqlite3.Connection]:
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
                yield self._db
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

    def _query(self, sql: str, params: Iterable[Any] = (), *, tuples: bool = False) -> list[Any]:
        """Rows as ``sqlite3.Row``; ``tuples``: plain tuples, a third cheaper for bulk look-ups."""
        with self._lock:
            try:
                cursor = self._db.cursor()
                if tuples:
                    cursor.row_factory = None
                return cursor.execute(sql, tuple(params)).fetchall()
            except sqlite3.Error as exc:
                raise LedgerError(f"ledger {self.path}: {exc}") from exc

    def _migrate(self) -> None:
        version = int(self._query("PRAGMA user_version")[0][0])
        if version > SCHEMA_VERSION:
            raise LedgerError(
                f"ledger {self.path} has schema {version}, newer than this smt-watch ({SCHEMA_VERSION})"
            )
        for number in range(version + 1, SCHEMA_VERSION + 1):
            with self.atomic() as db:
                # Another process may have migrated while we waited for the write lock.
                if int(db.execute("PRAGMA user_version").fetchone()[0]) >= number:
                    continue
                MIGRATIONS[number - 1](db)
                db.execute(f"PRAGMA user_version = {number}")

    @property
    def schema_version(self) -> int:
        return int(self._query("PRAGMA user_version")[0][0])

    # --- reads --------------------------------------------------------------------------------------

    def get(self, sha256: str) -> Row | None:
        rows = self._query(f"SELECT {FILE_COLUMNS} FROM files WHERE sha256 = ?", (sha256,))
        return row_from(rows[0]) if rows else None

    def rows(self, state: str | None = None, *, since: float | None = None, http_status: int | None = None
             ) -> list[Row]:
        """Rows oldest first; ``state``, ``since`` (changed at or after: ``updated_at``) and ``http_status``
        narrow them."""
        found = self._query(*rows_query("?", state, since, http_status))
        return [row_from(r) for r in found]

    def find(self, *, sha_prefix: str | None = None, path: str | None = None) -> list[Row]:
        if sha_prefix is not None:
            found = self._query(
                f"SELECT {FILE_COLUMNS} FROM files WHERE sha256 LIKE ? ESCAPE '\\'", (sha_prefix + "%",)
            )
        else:
            found = self._query(f"SELECT {FILE_COLUMNS} FROM files WHERE path = ?", (stored(path or ""),))
        return [row_from(r) for r in found]

    def counts(self) -> dict[str, int]:
        found = {str(r[0]): int(r[1]) for r in self._query("SELECT state, COUNT(*) FROM files GROUP BY state")}
        return {state: int(found.get(state, 0)) for state in STATES}

    def undelivered_count(self) -> int:
        """Rows still to be delivered: ``pending``, ``sending`` and ``retrying``."""
        rows = self._query("SELECT COUNT(*) FROM files WHERE state IN ('pending', 'sending', 'retrying')")
        return int(rows[0][0])

    def recent_send_seconds(self, limit: int, since: float) -> list[float]:
        """Seconds from first sight to ``sent`` of the latest files sent on their first request since
        ``since``: a delivery's own duration, without backoff waits."""
        cutoff = utc_stamp(since, digits=6)
        rows = self._query("SELECT COALESCE(started_at, first_seen), sent_at FROM files WHERE state = 'sent'"
                           " AND attempts = 1 AND sent_at >= ? ORDER BY sent_at DESC LIMIT ?", (cutoff, limit),
                           tuples=True)
        return [max(0.0, epoch_of(sent) - epoch_of(first)) for first, sent in rows]

    def meta(self, key: str) -> str | None:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    def set_meta(self, key: str, value: str) -> None:
        with self.atomic() as db:
            db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def meta_prefix(self, prefix: str) -> dict[str, str]:
        """Every meta entry whose key starts with ``prefix`` (e.g. each node's ``watch`` heartbeat)."""
        return {str(r[0]): str(r[1]) for r in self._query(
            "SELECT key, value FROM meta WHERE substr(key, 1, ?) = ? ORDER BY key", (len(prefix), prefix), tuples=True)}

    def recent_deliveries(self, limit: int) -> list[Row]:
        """The latest ``sent`` rows, newest first (hashes brought in by ``ledger import`` are not deliveries)."""
        return [row_from(r) for r in self._query(
            f"SELECT {FILE_COLUMNS} FROM files WHERE state = 'sent' AND origin <> 'import' AND sent_at IS NOT NULL"
            " ORDER BY sent_at DESC, sha256 LIMIT ?", (limit,))]

    def delivery_times(self, since: float) -> list[tuple[float, float]]:
        """(when sent, seconds from first sight) of every delivery since ``since``, oldest first."""
        rows = self._query("SELECT COALESCE(started_at, first_seen), sent_at FROM files WHERE state = 'sent'"
                           " AND origin <> 'import' AND sent_at >= ? ORDER BY sent_at", (utc_stamp(since, digits=6),),
                           tuples=True)
        return [(epoch_of(sent), delivery_seconds(first, sent)) for first, sent in rows]

    def upload_counts(self, role: str, since: float) -> dict[str, int]:
        """account -> uploads accepted for it in the window, most first."""
        return {str(r[0]): int(r[1]) for r in self._query(
            "SELECT account, COUNT(*) AS n FROM uploads WHERE role = ? AND at > ? GROUP BY account"
            " ORDER BY n DESC, account", (role, since), tuples=True)}

    # --- the delivery state machine ----------------------------------------------------------------

    def claim(
        self,
        sha256: str,
        *,
        filename: str,
        path: str | None,
        size: int,
        mode: str,
        force: bool = False,
        respect_backoff: bool = False,
        parent: str | None = None,
        remember: Remember | None = None,
    ) -> Claim:
        """Take the row for delivery unless it is already sent (and not forced) or in flight elsewhere.

        ``respect_backoff`` (the watcher): leave ``failed`` rows alone until ``ledger forget``, and
        ``retrying`` rows until their ``next_attempt_at``. ``post`` delivers those on request.
        ``remember``: a stat-cache row (:meth:`remember`) written in the same transaction, whatever the
        claim's answer; a transaction less per new file is about a fifth of ``watch``'s drain rate.
        """
        now = now_iso()
        path = None if path is None else stored(path)
        filename = column_text(filename)
        with self.atomic() as db:
            if remember is not None:
                db.execute(_REMEMBER_SQL, _remember_params(remember))
            row = db.execute(
                "SELECT state, claimed_by, claimed_at, next_attempt_at FROM files WHERE sha256 = ?", (sha256,)
            ).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO files (sha256, filename, path, size, state, first_seen, updated_at, mode,"
                    " claimed_by, claimed_at, parent, started_at) VALUES (?, ?, ?, ?, 'sending', ?, ?, ?, ?, ?, ?, ?)",
                    (sha256, filename, path, size, now, now, mode, self._me, time.time(), parent, now),
                )
                self._inflight.add(sha256)
                return Claim.CLAIMED
            if row["state"] == "sent" and not force:
                return Claim.DUPLICATE
            if respect_backoff and (
                row["state"] == "failed"
                or (row["state"] == "retrying" and (row["next_attempt_at"] or 0) > time.time())
            ):
                return Claim.LATER
            if row["state"] == "sending" and (
                sha256 in self._inflight
                or (row["claimed_by"] != self._me and claimer_alive(row["claimed_by"], row["claimed_at"], self._node))
            ):
                return Claim.BUSY
            db.execute(
                "UPDATE files SET state = 'sending', filename = ?, path = ?, size = ?, mode = ?,"
                " updated_at = ?, claimed_by = ?, claimed_at = ?, next_attempt_at = NULL,"
                " parent = COALESCE(?, parent),"
                " started_at = CASE WHEN state = 'sent' THEN ? ELSE started_at END WHERE sha256 = ?",
                (filename, path, size, mode, now, self._me, time.time(), parent, now, sha256),
            )
            self._inflight.add(sha256)
            return Claim.CLAIMED

    def _finish(self, sha256: str, state: str, attempts: int, **values: Any) -> None:
        values = {k: column_text(v) if isinstance(v, str) else v for k, v in values.items()}
        values.update(state=state, updated_at=now_iso(), claimed_by=None, claimed_at=None)
        assignments = ", ".join(f"{k} = ?" for k in values)
        try:
            with self.atomic() as db:
                db.execute(
                    f"UPDATE files SET {assignments}, attempts = attempts + ? WHERE sha256 = ?",
                    (*values.values(), attempts, sha256),
                )
                if (esiid := self._noted.get(sha256)) is not None:
                    db.execute(_NOTE_SQL, (sha256, esiid, time.time()))
        finally:
            with self._lock:
                self._inflight.discard(sha256)
                self._noted.pop(sha256, None)

    # --- operator commands --------------------------------------------------------------------------

    def forget(self, sha256s: Iterable[str]) -> int:
        with self.atomic() as db:
            removed = 0
            for s in sha256s:
                removed += db.execute("DELETE FROM files WHERE sha256 = ?", (s,)).rowcount
                db.execute("DELETE FROM chunks WHERE sha256 = ?", (s,))
            return removed

    def retry(self, sha256s: Iterable[str]) -> list[str]:
        """``failed`` or ``retrying`` rows back to ``pending``, so ``watch`` delivers them at its next look at
        due rows; a CSV unpacked from an .asc/.zip takes its parent with it. Returns the hashes moved (a
        row in another state is left alone: retrying twice is the same as once)."""
        moved: list[str] = []
        with self.atomic() as db:
            for sha in sha256s:
                row = db.execute("SELECT state, parent FROM files WHERE sha256 = ?", (sha,)).fetchone()
                if row is None:
                    continue
                for target in (sha, row["parent"]):
                    if target and db.execute(
                            "UPDATE files SET state = 'pending', next_attempt_at = NULL, claimed_by = NULL,"
                            " claimed_at = NULL, updated_at = ?1, started_at = ?1"
                            " WHERE sha256 = ?2 AND state IN ('failed', 'retrying')",
                            (now_iso(), target)).rowcount:
                        moved.append(target)
        return moved

    def repost(self, sha256s: Iterable[str]) -> list[str]:
        """``forceRepost``: rows in any state but ``sending`` (already on its way) back to ``pending``, and
        their acknowledged raw-upload chunks forgotten, so ``watch`` sends every byte again. The caller
        names the parent of an unpacked CSV itself. Returns the hashes moved."""
        moved: list[str] = []
        with self.atomic() as db:
            for sha in sha256s:
                if db.execute(
                        "UPDATE files SET state = 'pending', next_attempt_at = NULL, claimed_by = NULL,"
                        " claimed_at = NULL, last_error = ?, updated_at = ? WHERE sha256 = ? AND state <> 'sending'",
                        (REPOST_NOTE, now_iso(), sha)).rowcount:
                    db.execute("DELETE FROM chunks WHERE sha256 = ?", (sha,))
                    moved.append(sha)
        return moved

    # --- labels: what an uploader declared, what a delivery carried -----------------------------------

    def declare_labels(self, sha256: str, esiid: str | None, meter: str | None) -> None:
        """What an uploader said of these bytes; a field it left out keeps what an earlier upload said."""
        with self.atomic() as db:
            db.execute(
                "INSERT INTO labels (sha256, declared_esiid, declared_meter, at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (sha256) DO UPDATE SET"
                " declared_esiid = COALESCE(excluded.declared_esiid, declared_esiid),"
                " declared_meter = COALESCE(excluded.declared_meter, declared_meter), at = excluded.at",
                (sha256, esiid, meter, time.time()))

    def note_esiid(self, sha256: str, esiid: str) -> None:
        """The ESIID a delivery of these bytes carries: for a claim of this process, written with its
        outcome (sent, failed or retrying alike), else at once."""
        with self._lock:
            if sha256 in self._inflight:
                self._noted[sha256] = esiid
                return
        with self.atomic() as db:
            db.execute(_NOTE_SQL, (sha256, esiid, time.time()))

    def labels(self, sha256s: list[str]) -> dict[str, Labels]:
        marks = ",".join("?" * len(sha256s))
        return {str(r[0]): Labels(r[1], r[2], r[3]) for r in self._query(
            f"SELECT sha256, declared_esiid, declared_meter, esiid FROM labels WHERE sha256 IN ({marks})",
            sha256s, tuples=True)} if sha256s else {}

    def with_esiid(self, esiid: str, limit: int) -> list[str]:
        """Hashes of content delivered with this ESIID or declared for it by an uploader, newest first."""
        return [str(r[0]) for r in self._query(
            "SELECT sha256 FROM labels WHERE esiid = ? OR declared_esiid = ? ORDER BY at DESC, sha256 LIMIT ?",
            (esiid, esiid, limit), tuples=True)]

    def import_hashes(self, entries: Iterable[tuple[str, str | None]], origin: str) -> int:
        """Record already-delivered hashes as ``sent``; existing rows are left alone. Returns rows added."""
        now = now_iso()
        added = 0
        with self.atomic() as db:
            for sha256, name in entries:
                cur = db.execute(
                    "INSERT OR IGNORE INTO files (sha256, filename, state, first_seen, updated_at, sent_at,"
                    " destination, origin) VALUES (?, ?, 'sent', ?, ?, ?, ?, 'import')",
                    (sha256, name or "(imported)", now, now, now, origin),
                )
                added += cur.rowcount
        return added

    # --- the watcher's stat cache and schedules ------------------------------------------------------

    def remember(self, entry: Remember) -> None:
        with self.atomic() as db:
            db.execute(_REMEMBER_SQL, _remember_params(entry))

    def unremember(self, path: str) -> None:
        with self.atomic() as db:
            db.execute("DELETE FROM seen WHERE path = ?", (stored(path),))

    def due(self, now: float) -> list[Row]:
        """Rows the watcher should deliver again now: expired ``retrying`` rows and ``pending`` rows."""
        found = self._query(
            f"SELECT {FILE_COLUMNS} FROM files WHERE (state = 'retrying' AND next_attempt_at <= ?)"
            " OR state = 'pending' ORDER BY next_attempt_at",
            (now,),
        )
        return [row_from(r) for r in found]

    def next_due_time(self) -> float | None:
        rows = self._query("SELECT MIN(next_attempt_at) FROM files WHERE state = 'retrying'")
        return float(rows[0][0]) if rows and rows[0][0] is not None else None

    def recover_stale(self) -> list[Row]:
        """``sending`` rows whose claimer died (a crash) go back to ``pending`` so they are sent again."""
        stale: list[Row] = []
        with self.atomic() as db:
            for r in db.execute(f"SELECT {FILE_COLUMNS}, claimed_at FROM files WHERE state = 'sending'").fetchall():
                if r["claimed_by"] != self._me and not claimer_alive(r["claimed_by"], r["claimed_at"], self._node):
                    db.execute(
                        "UPDATE files SET state = 'pending', claimed_by = NULL, claimed_at = NULL, updated_at = ?"
                        " WHERE sha256 = ?",
                        (now_iso(), r["sha256"]),
                    )
                    values = dict(r)
                    values.pop("claimed_at")
                    stale.append(Row(**values))
        return stale

    # --- sync's record of remote files ---------------------------------------------------------------

    def remote_files(self) -> dict[str, tuple[int, int]]:
        """remote path -> (size, mtime) of the version last fetched."""
        return {str(r[0]): (int(r[1]), int(r[2])) for r in self._query(
            "SELECT remote_path, size, mtime FROM remote_files")}

    def record_fetch(self, remote_path: str, size: int, mtime: int, sha256: str, local_path: str) -> None:
        """Remember that ``sync`` fetched this version of ``remote_path``; a fetch without its hash is refused."""
        if not sha256:
            raise LedgerError(f"ledger {self.path}: fetch of {shown(remote_path)} recorded without its SHA-256")
        with self.atomic() as db:
            db.execute(
                "INSERT OR REPLACE INTO remote_files (remote_path, size, mtime, sha256, local_path, fetched_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (remote_path, size, mtime, sha256, local_path, now_iso()),
            )

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

    # --- serve's upload rate limits ------------------------------------------------------------------

    def uploads_since(self, role: str, account: str, since: float) -> list[float]:
        """Times of accepted uploads by this account in the window, oldest first."""
        return [float(r[0]) for r in self._query(
            "SELECT at FROM uploads WHERE role = ? AND account = ? AND at > ? ORDER BY at", (role, account, since))]

    def take_upload_slot(self, role: str, account: str, since: float, limit: int, at: float) -> bool:
        """Record an accepted upload if the account is under ``limit`` in the window (atomically)."""
        with self.atomic() as db:
            count = db.execute(
                "SELECT COUNT(*) FROM uploads WHERE role = ? AND account = ? AND at > ?", (role, account, since)
            ).fetchone()[0]
            if count >= limit:
                return False
            db.execute("INSERT INTO uploads (role, account, at) VALUES (?, ?, ?)", (role, account, at))
            db.execute("DELETE FROM uploads WHERE at < ?", (at - 31 * 86400,))  # nothing older matters
            return True

    def clock_offset(self) -> float:
        """The database's clock minus ours: always 0 for a file on this machine."""
        return 0.0

    def quick_check(self) -> str:
        """``ok``, or SQLite's description of the first problems found."""
        return "; ".join(str(r[0]) for r in self._query("PRAGMA quick_check"))

    # --- raw-upload chunk progress --------------------------------------------------------------------

    def acked_chunks(self, sha256: str, parts: int) -> dict[int, str]:
        """part number -> chunk SHA-256 acknowledged for this file split into ``parts`` chunks."""
        return {int(r[0]): str(r[1]) for r in self._query(
            "SELECT part, chunk_sha256 FROM chunks WHERE sha256 = ? AND parts = ?", (sha256, parts))}

    def ack_chunk(self, sha256: str, part: int, parts: int, chunk_sha256: str) -> None:
        with self.atomic() as db:
            db.execute(
                "INSERT OR REPLACE INTO chunks (sha256, part, parts, chunk_sha256, acked_at) VALUES (?, ?, ?, ?, ?)",
                (sha256, part, parts, chunk_sha256, now_iso()),
            )

    # --- stat-cache look-ups without holding the cache in memory --------------------------------------

    _SEEN_SQL = (
        "SELECT seen.path, seen.device, seen.inode, seen.size, seen.mtime_ns, seen.sha256, files.state"
        " FROM seen LEFT JOIN files ON files.sha256 = seen.sha256 WHERE seen.path IN ({})"
    )

    def seen_many(self, paths: list[str]) -> dict[str, Seen]:
        """What the stat cache knows of each of ``paths`` (those it does not know are left out)."""
        out: dict[str, Seen] = {}
        for i in range(0, len(paths), 500):
            batch = [stored(p) for p in paths[i : i + 500]]
            sql = self._SEEN_SQL.format(",".join("?" * len(batch)))
            for path, device, inode, size, mtime_ns, sha256, state in self._query(sql, batch, tuples=True):
                out[unstored(path)] = Seen(Signature(device, inode, size, mtime_ns), sha256, state)
        return out


    # --- ledger copy --------------------------------------------------------------------------------------

    def export_rows(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every row of every table, as ``(table, columns)``, for ``ledger copy`` (stat-cache rows are this
        node's)."""
        for table in COPIED_TABLES:
            for r in self._query(f"SELECT * FROM {table}"):
                yield table, dict(r)

    def import_rows(self, rows: Iterable[tuple[str, dict[str, Any]]]) -> int:
        """Write rows from :meth:`export_rows` of any ledger; a row already here with the same key is
        replaced, an upload already counted is not counted twice. Returns the rows written."""
        written = 0
        with self.atomic() as db:
            for table, values in rows:
                values = {k: v for k, v in values.items() if k in COPIED_COLUMNS[table]}
                names = ", ".join(values)
                marks = ", ".join("?" * len(values))
                if table == "uploads":
                    cur = db.execute(f"INSERT INTO uploads ({names}) SELECT {marks} WHERE NOT EXISTS (SELECT 1 FROM"
                                     " uploads WHERE role = ? AND account = ? AND at = ?)",
                                     (*values.values(), values["role"], values["account"], values["at"]))
                else:
                    cur = db.execute(f"INSERT OR REPLACE INTO {table} ({names}) VALUES ({marks})",
                                     tuple(values.values()))
                written += max(0, cur.rowcount)
        return written
