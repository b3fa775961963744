"""The ledger written once: the state machine, the claim decision, the stat cache, sync's memory, quotas,
labels, chunks and status reads, over a :class:`~smt_watch.ledger.port.Port`.

Each statement is here once, for both databases (SQLite's placeholder style; the PostgreSQL adapter
translates). Where the databases really differ the statement takes its part from the port's
:class:`~smt_watch.ledger.port.Dialect`: the lease and node columns of the shared ledger, the lock a quota
takes, lists as arrays. The adapters (:mod:`.sqlite`, :mod:`.postgres`) hold what is theirs alone: opening,
migrations, transactions, reconnects, the lease renewer and ``sync``'s lock.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Final, Self

from smt_watch.clock import utc_stamp
from smt_watch.errors import LedgerError
from smt_watch.hashing import Signature
from smt_watch.ledger.common import (
    COPIED_COLUMNS,
    COPIED_TABLES,
    FILE_COLUMNS,
    REPOST_NOTE,
    STATES,
    Claim,
    ClaimRequest,
    Labels,
    Mark,
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
from smt_watch.ledger.port import Port, Record, Tx, batches
from smt_watch.ledger.verdicts import VerdictStore
from smt_watch.names import shown, stored, unstored

# The conflict target of each copied table (``seen``'s is the dialect's: PostgreSQL keys it by node too).
KEYS: Final[dict[str, tuple[str, ...]]] = {
    "files": ("sha256",), "chunks": ("sha256", "part"), "remote_files": ("remote_path",), "meta": ("key",),
    "labels": ("sha256",), "verdicts": ("sha256",), "uploads": (),
}


def note_statement(source: str) -> str:
    """The ESIID a delivery carried, upserted from ``source`` (``VALUES`` of one, or a group's rows)."""
    return (f"INSERT INTO labels (sha256, esiid, at) {source}"
            " ON CONFLICT (sha256) DO UPDATE SET esiid = excluded.esiid")


NOTE_SQL: Final = note_statement("VALUES (:sha, :esiid, :at)")
UPLOAD_WINDOW_KEPT: Final = 31 * 86400  # nothing older matters to any quota
# A claim's lease stands while the database's clock has not passed it (databases with leases): the one
# judgement the claim upsert, its fallback and start-up recovery all make.
LEASE_STANDS: Final = "lease_until > now()"


def like_prefix(prefix: str) -> str:
    """A ``LIKE … ESCAPE '\\'`` pattern for what starts with ``prefix`` (its own ``%``/``_`` taken literally)."""
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def sent_mark(sha256: str, *, status: int | None, destination: str, attempts: int) -> Mark:
    """What :meth:`SqlLedger.mark_sent` writes, as a :class:`Mark` (a group commit holds these)."""
    now = now_iso()
    return Mark(sha256, "sent", attempts, (("http_status", status), ("destination", destination),
                                           ("sent_at", now), ("last_error", None), ("next_attempt_at", None)), now)


def retrying_mark(sha256: str, *, status: int | None, error: str, attempts: int, next_attempt_at: float) -> Mark:
    return Mark(sha256, "retrying", attempts, (("http_status", status), ("last_error", error),
                                               ("next_attempt_at", next_attempt_at)), now_iso())


def failed_mark(sha256: str, *, status: int | None, error: str, attempts: int) -> Mark:
    return Mark(sha256, "failed", attempts, (("http_status", status), ("last_error", error),
                                             ("next_attempt_at", None)), now_iso())


def released_mark(sha256: str, *, error: str, attempts: int) -> Mark:
    return Mark(sha256, "pending", attempts, (("last_error", error),), now_iso())


class SqlLedger(VerdictStore):
    """The :class:`~smt_watch.ledger.common.Ledger` on any :class:`Port`. Thread-safe as its port is."""

    def __init__(self, db: Port, node: str | None, *, lease_seconds: float = 0.0) -> None:
        self._db = db
        self._lease = lease_seconds  # how long a claim holds without renewal (databases with leases)
        self._dialect = db.dialect
        self.path = db.path
        self._me = process_id(node)
        self._node = self._me.rpartition(":")[0]
        self._lock = threading.RLock()
        # Claims this process is really working on. A row left `sending` under our own name but not in
        # here (its final write failed, e.g. on a full disk) is taken over instead of waiting forever.
        self._inflight: set[str] = set()
        # ESIIDs noted for claims in flight, written with the outcome of their claim (a transaction of their
        # own would cost about a tenth of watch's drain rate)
        self._noted: dict[str, str] = {}
        self._claim_sql = self._claim_statement()
        self._remember_sql = self._remember_statement()
        # Labels of the rows a group claim took (None: no labels row), read in its statement: the delivery
        # of each asks for them next (:meth:`labels`). Kept until the claim's outcome is written.
        self._claim_labels: dict[str, Labels | None] = {}
        self._claim_group_sql = ""
        if self._dialect.json_rows:
            self._claim_group_sql = (
                f"WITH remembered AS ({self._remember_statement(group=True)}),"
                f" claimed AS ({self._claim_statement(group=True)})"
                " SELECT claimed.sha256, labels.declared_esiid, labels.declared_meter, labels.esiid,"
                " labels.sha256 IS NOT NULL AS labelled FROM claimed LEFT JOIN labels"
                # the group's hashes named again (:hashes): the planner takes the JSON rows for 100, and would
                # rather read every labels row than look 100 up (a drain slowing as the ledger grows)
                " ON labels.sha256 = claimed.sha256 AND labels.sha256 = ANY(:hashes)")

    # --- plumbing ---------------------------------------------------------------------------------------

    @property
    def port(self) -> Port:
        """The database under this ledger (its adapter's own tests, ``doctor``)."""
        return self._db

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        return self._db.schema_version()

    def quick_check(self) -> str:
        return self._db.quick_check()

    def clock_offset(self) -> float:
        """The database's clock minus ours (leases are judged by the database's)."""
        return self._db.clock_offset()

    def sync_lock(self, wait: bool) -> AbstractContextManager[bool]:
        """One ``sync`` pass at a time (on this droplet, or across nodes sharing PostgreSQL)."""
        return self._db.sync_lock(wait)

    def _params(self, **values: Any) -> dict[str, Any]:
        return {"node": self._node, **values}

    def _write_both(self, first: str, then: str, params: Mapping[str, Any]) -> list[Record]:
        """Two writes committed together: one statement where the database has a data-modifying WITH (one
        round trip, one commit), else one transaction. Returns what ``then`` returns."""
        if self._dialect.write_with:
            return self._db.query(f"WITH done AS ({first}) {then}", params)

        def work(tx: Tx) -> list[Record]:
            tx.execute(first, params)
            return tx.query(then, params)

        return self._db.transaction(work)

    # --- reads ------------------------------------------------------------------------------------------

    def get(self, sha256: str) -> Row | None:
        rows = self._db.query(f"SELECT {FILE_COLUMNS} FROM files WHERE sha256 = ?", (sha256,))
        return row_from(rows[0]) if rows else None

    def rows(self, state: str | None = None, *, since: float | None = None, http_status: int | None = None
             ) -> list[Row]:
        """Rows oldest first; ``state``, ``since`` (changed at or after: ``updated_at``) and ``http_status``
        narrow them."""
        return [row_from(r) for r in self._db.query(*rows_query("?", state, since, http_status))]

    def find(self, *, sha_prefix: str | None = None, path: str | None = None) -> list[Row]:
        if sha_prefix is not None:
            found = self._db.query(f"SELECT {FILE_COLUMNS} FROM files WHERE sha256 LIKE ? ESCAPE '\\'",
                                   (like_prefix(sha_prefix),))
        else:
            found = self._db.query(f"SELECT {FILE_COLUMNS} FROM files WHERE path = ?", (stored(path or ""),))
        return [row_from(r) for r in found]

    def counts(self) -> dict[str, int]:
        found = {str(r[0]): int(r[1]) for r in self._db.tuples("SELECT state, COUNT(*) FROM files GROUP BY state")}
        return {state: found.get(state, 0) for state in STATES}

    def undelivered_count(self) -> int:
        """Rows still to be delivered: ``pending``, ``sending`` and ``retrying``."""
        return int(self._db.tuples(
            "SELECT COUNT(*) FROM files WHERE state IN ('pending', 'sending', 'retrying')")[0][0])

    def recent_send_seconds(self, limit: int, since: float) -> list[float]:
        """Seconds from the start of a delivery to ``sent`` of the latest files sent on their first request
        since ``since``: a delivery's own duration, without backoff waits."""
        rows = self._db.tuples("SELECT COALESCE(started_at, first_seen), sent_at FROM files WHERE state = 'sent'"
                               " AND attempts = 1 AND sent_at >= ? ORDER BY sent_at DESC LIMIT ?",
                               (utc_stamp(since, digits=6), limit))
        return [max(0.0, epoch_of(sent) - epoch_of(began)) for began, sent in rows]

    def meta(self, key: str) -> str | None:
        rows = self._db.tuples("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    def set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT INTO meta (key, value) VALUES (?, ?)"
                         " ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value))

    def meta_prefix(self, prefix: str) -> dict[str, str]:
        """Every meta entry whose key starts with ``prefix`` (e.g. each node's ``watch`` heartbeat)."""
        return {str(r[0]): str(r[1]) for r in self._db.tuples(
            "SELECT key, value FROM meta WHERE substr(key, 1, ?) = ? ORDER BY key", (len(prefix), prefix))}

    def recent_deliveries(self, limit: int) -> list[Row]:
        """The latest ``sent`` rows, newest first (hashes brought in by ``ledger import`` are not deliveries)."""
        return [row_from(r) for r in self._db.query(
            f"SELECT {FILE_COLUMNS} FROM files WHERE state = 'sent' AND origin <> 'import' AND sent_at IS NOT NULL"
            " ORDER BY sent_at DESC, sha256 LIMIT ?", (limit,))]

    def delivery_times(self, since: float) -> list[tuple[float, float]]:
        """(when sent, seconds from the start of its delivery) of every delivery since ``since``, oldest first."""
        rows = self._db.tuples("SELECT COALESCE(started_at, first_seen), sent_at FROM files WHERE state = 'sent'"
                               " AND origin <> 'import' AND sent_at >= ? ORDER BY sent_at",
                               (utc_stamp(since, digits=6),))
        return [(epoch_of(sent), delivery_seconds(began, sent)) for began, sent in rows]

    def upload_counts(self, role: str, since: float) -> dict[str, int]:
        """account -> uploads accepted for it in the window, most first."""
        return {str(r[0]): int(r[1]) for r in self._db.tuples(
            "SELECT account, COUNT(*) AS n FROM uploads WHERE role = ? AND at > ? GROUP BY account"
            " ORDER BY n DESC, account", (role, since))}

    # --- the delivery state machine ---------------------------------------------------------------------

    def _claim_statement(self, group: bool = False) -> str:
        """The claim as one upsert: the row is taken unless it is ``sent`` (and not forced), backed off (for
        ``watch``), or held by a live claim. On PostgreSQL a claim of another node lives while its lease
        has not expired (the database's clock); what the statement cannot judge (whether a claimer's process
        lives) :meth:`claim` decides after it and names the dead claimer (``:dead``). A row ``sending`` under
        this process's own name is taken (its final write failed, e.g. on a full disk): a claim this process
        is working on never reaches the statement (:meth:`claim` answers BUSY first).

        ``group``: every row of the JSON parameter ``:claims`` (:meth:`claim_many` on a database with
        :attr:`~smt_watch.ledger.port.Dialect.json_rows`), in hash order (two nodes' groups lock rows in
        the same order), each judged as one claim would be; what each claim brings is then its row's column
        instead of a parameter."""
        leases = self._dialect.leases
        columns = ", lease_until, node" if leases else ""
        values = ", now() + make_interval(secs => :lease), :node" if leases else ""
        sets = ", lease_until = excluded.lease_until, node = excluded.node" if leases else ""
        live = f"f.{LEASE_STANDS}" if leases else "TRUE"
        sha, filename, path, size, mode, parent = (
            (f"c.{k}" for k in ("sha256", "filename", "path", "size", "mode", "parent")) if group
            else (":sha", ":filename", ":path", ":size", ":mode", ":parent"))
        row = f"{sha}, {filename}, {path}, {size}, 'sending', :now, :now, {mode}, :me, :epoch, {parent}, :now{values}"
        source = (f"SELECT {row} FROM {self._dialect.rows('files', 'claims')} AS c ORDER BY c.sha256" if group
                  else f"VALUES ({row})")
        return f"""
INSERT INTO files AS f (sha256, filename, path, size, state, first_seen, updated_at, mode,
                        claimed_by, claimed_at, parent, started_at{columns})
{source}
ON CONFLICT (sha256) DO UPDATE SET
    state = 'sending', filename = excluded.filename, path = excluded.path, size = excluded.size,
    mode = excluded.mode, updated_at = excluded.updated_at, claimed_by = excluded.claimed_by,
    claimed_at = excluded.claimed_at, next_attempt_at = NULL,
    parent = COALESCE(excluded.parent, f.parent),
    started_at = CASE WHEN f.state = 'sent' THEN excluded.started_at ELSE f.started_at END{sets}
WHERE (f.state <> 'sent' OR :force)
  AND NOT (:backoff AND (f.state = 'failed' OR (f.state = 'retrying' AND f.next_attempt_at > :epoch)))
  AND NOT (f.state = 'sending' AND (f.claimed_by IS NULL OR f.claimed_by NOT IN (:me, COALESCE(:dead, '')))
           AND {live})
RETURNING sha256"""

    def _leased(self, value: Any) -> bool | None:
        """A claim's lease as the database judged it (``None``: a database without leases)."""
        return bool(value) if self._dialect.leases else None

    @property
    def _leased_column(self) -> str:
        return LEASE_STANDS if self._dialect.leases else "NULL"

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
        ``remember``: a stat-cache row (:meth:`remember`) written with the claim, whatever its answer; a
        transaction less per new file is about a fifth of ``watch``'s drain rate.
        """
        params = self._claim_params(sha256, filename, path, size, mode, parent=parent, force=force,
                                    respect_backoff=respect_backoff, now=now_iso(), epoch=time.time())
        # Reserved before the database is asked: another thread of this process claiming the same bytes
        # meanwhile (another worker, another name) is told BUSY, not handed the row this one is taking.
        with self._lock:
            mine = sha256 in self._inflight
            self._inflight.add(sha256)
        if mine:
            if remember is not None:
                self.remember(remember)
            return Claim.BUSY
        claim = Claim.BUSY
        try:
            claim = self._decide(sha256, params, force=force, respect_backoff=respect_backoff, remember=remember)
        finally:
            if claim is not Claim.CLAIMED:
                with self._lock:
                    self._inflight.discard(sha256)
        if claim is Claim.CLAIMED:
            self._on_claim()
        return claim

    def _claim_params(self, sha256: str, filename: str, path: str | None, size: int, mode: str, *,
                      parent: str | None, force: bool, respect_backoff: bool, now: str, epoch: float
                      ) -> dict[str, Any]:
        """The claim statement's parameters, for :meth:`claim` and each of :meth:`claim_many`'s requests."""
        return self._params(
            sha=sha256, filename=column_text(filename), path=None if path is None else stored(path), size=size,
            mode=mode, me=self._me, lease=self._lease, parent=parent, force=force, backoff=respect_backoff,
            dead=None, now=now, epoch=epoch)

    def _decide(self, sha256: str, params: dict[str, Any], *, force: bool, respect_backoff: bool,
                remember: Remember | None) -> Claim:
        """The claim's statement, and when it did not take the row, why not (or a takeover of a dead
        claimer's row)."""
        if remember is not None:
            params.update(self._remember_params(remember))
        if self._dialect.write_with:
            # A new (or claimable) row, and its stat-cache row: one statement, one round trip (a drain is
            # mostly these). Not taken: the transaction below finds out why.
            first = (self._write_both(self._remember_sql, self._claim_sql, params) if remember is not None
                     else self._db.query(self._claim_sql, params))
            if first:
                return Claim.CLAIMED
            remember = None

        return self._db.transaction(
            lambda tx: self._decide_in(tx, sha256, params, force=force, respect_backoff=respect_backoff,
                                       remember=remember))

    def _decide_in(self, tx: Tx, sha256: str, params: dict[str, Any], *, force: bool, respect_backoff: bool,
                   remember: Remember | None) -> Claim:
        """The claim inside a transaction: the upsert, and when it did not take the row, why not."""
        if remember is not None:
            tx.execute(self._remember_sql, params)
        # (again, on PostgreSQL: so that the upsert locks the row until COMMIT)
        if tx.query(self._claim_sql, params):
            return Claim.CLAIMED
        found = tx.query("SELECT state, claimed_by, claimed_at, next_attempt_at,"
                         f" {self._leased_column} AS leased FROM files WHERE sha256 = ?", (sha256,))
        if not found:  # pragma: no cover - the upsert either inserted or found the row
            return Claim.BUSY
        row = found[0]
        if row["state"] == "sent" and not force:
            return Claim.DUPLICATE
        if respect_backoff and (
            row["state"] == "failed"
            or (row["state"] == "retrying" and (row["next_attempt_at"] or 0) > params["epoch"])
        ):
            return Claim.LATER
        # Held by a process that died (on this node: its pid is gone): take it over now.
        if row["claimed_by"] != self._me and not claimer_alive(
                row["claimed_by"], row["claimed_at"], self._node, leased=self._leased(row["leased"])):
            params["dead"] = row["claimed_by"]
            if tx.query(self._claim_sql, params):
                return Claim.CLAIMED
        return Claim.BUSY

    def claim_many(self, requests: Sequence[ClaimRequest]) -> list[Claim]:
        """:meth:`claim` for several files in ONE transaction (group commit), their stat-cache rows in it:
        a worker claims the ready files it took from the queue together, and pays one commit (SQLite) or
        one statement (PostgreSQL, :meth:`_claim_group`) for all of them. Each answer is what :meth:`claim` would
        have said; the same bytes twice in one group: the second is BUSY, as for a second worker."""
        grouped = self._dialect.json_rows and len({r.respect_backoff for r in requests}) == 1
        if len(requests) == 1 and not grouped:
            r = requests[0]
            return [self.claim(r.sha256, filename=r.filename, path=r.path, size=r.size, mode=r.mode,
                               respect_backoff=r.respect_backoff, remember=r.remember)]
        now, epoch = now_iso(), time.time()
        answers: list[Claim | None] = []
        with self._lock:  # reserved before the database is asked, as claim() does
            for r in requests:
                mine = r.sha256 in self._inflight
                self._inflight.add(r.sha256)
                answers.append(Claim.BUSY if mine else None)
        asked = [(i, r) for i, r in enumerate(requests) if answers[i] is None]

        def work(tx: Tx) -> list[Claim]:
            got: list[Claim] = []
            for i, r in enumerate(requests):  # a BUSY one's stat-cache row is written too, as claim() does
                if r.remember is not None and answers[i] is Claim.BUSY:
                    tx.execute(self._remember_sql, self._remember_params(r.remember))
            for _, r in asked:
                params = self._claim_params(r.sha256, r.filename, r.path, r.size, r.mode, parent=None, force=False,
                                            respect_backoff=r.respect_backoff, now=now, epoch=epoch)
                remember = r.remember
                if remember is not None:
                    params.update(self._remember_params(remember))
                    if self._dialect.write_with:  # both writes in one statement, one round trip (PostgreSQL)
                        if tx.query(f"WITH done AS ({self._remember_sql}) {self._claim_sql}", params):
                            got.append(Claim.CLAIMED)
                            continue
                        remember = None
                got.append(self._decide_in(tx, r.sha256, params, force=False, respect_backoff=r.respect_backoff,
                                           remember=remember))
            return got

        decided: list[Claim] = []
        try:
            decided = (self._claim_group(requests, [r for _, r in asked], now, epoch) if grouped
                       else self._db.transaction(work))
        finally:
            taken = {r.sha256 for (_, r), c in zip(asked, decided, strict=False) if c is Claim.CLAIMED}
            with self._lock:
                for _, r in asked:
                    if r.sha256 not in taken:
                        self._inflight.discard(r.sha256)
                        self._claim_labels.pop(r.sha256, None)
        for (i, _), claim in zip(asked, decided, strict=True):
            answers[i] = claim
        if any(c is Claim.CLAIMED for c in decided):
            self._on_claim()
        return [Claim.BUSY if a is None else a for a in answers]

    def _claim_group(self, requests: Sequence[ClaimRequest], asked: list[ClaimRequest], now: str, epoch: float
                     ) -> list[Claim]:
        """:meth:`claim_many`'s work in ONE statement (databases with JSON row parameters): every request's
        stat-cache row, every claim of ``asked`` (the requests not already BUSY), and the labels of the rows
        it took, which the delivery asks for next (:meth:`labels` answers them from memory until the claim's
        outcome). A claim the statement did not take is decided as :meth:`claim` decides it, all of them in
        one transaction: why not, or a dead claimer's row taken over. One round trip where a transaction of
        one statement per file took N + 2."""
        seen = {stored(r.remember.path): self._seen_row(r.remember) for r in requests if r.remember is not None}
        claims = [{"sha256": r.sha256, "filename": column_text(r.filename),
                   "path": None if r.path is None else stored(r.path), "size": r.size, "mode": r.mode}
                  for r in asked]
        backoff = requests[0].respect_backoff
        params = self._params(me=self._me, lease=self._lease, force=False, backoff=backoff, dead=None, now=now,
                              epoch=epoch, claims=json.dumps(claims), seen=json.dumps(list(seen.values())),
                              hashes=[r.sha256 for r in asked])
        taken = {str(r["sha256"]): Labels(r["declared_esiid"], r["declared_meter"], r["esiid"])
                 if r["labelled"] else None for r in self._db.query(self._claim_group_sql, params)}
        with self._lock:
            self._claim_labels.update(taken)
        rest = [r for r in asked if r.sha256 not in taken]

        def work(tx: Tx) -> list[Claim]:
            return [self._decide_in(tx, r.sha256, self._claim_params(
                r.sha256, r.filename, r.path, r.size, r.mode, parent=None, force=False, respect_backoff=backoff,
                now=now, epoch=epoch), force=False, respect_backoff=backoff, remember=None) for r in rest]

        later = dict(zip((r.sha256 for r in rest), self._db.transaction(work) if rest else [], strict=True))
        return [Claim.CLAIMED if r.sha256 in taken else later[r.sha256] for r in asked]

    def _on_claim(self) -> None:
        """What an adapter does once this process holds a claim (PostgreSQL: renew its lease)."""

    def _held(self) -> list[str]:
        with self._lock:
            return list(self._inflight)

    def mark_sent(self, sha256: str, *, status: int | None, destination: str, attempts: int) -> None:
        self.finish_many([sent_mark(sha256, status=status, destination=destination, attempts=attempts)])

    def mark_retrying(
        self, sha256: str, *, status: int | None, error: str, attempts: int, next_attempt_at: float
    ) -> None:
        self.finish_many([retrying_mark(sha256, status=status, error=error, attempts=attempts,
                                        next_attempt_at=next_attempt_at)])

    def mark_failed(self, sha256: str, *, status: int | None, error: str, attempts: int) -> None:
        self.finish_many([failed_mark(sha256, status=status, error=error, attempts=attempts)])

    def release(self, sha256: str, *, error: str, attempts: int) -> None:
        """Back to ``pending``: the attempt was abandoned for a reason that is not the target's fault."""
        self.finish_many([released_mark(sha256, error=error, attempts=attempts)])

    def _outcome_values(self, mark: Mark) -> dict[str, Any]:
        """The columns a claim's outcome sets (attempts aside: they are added)."""
        values = {k: column_text(v) if isinstance(v, str) else v for k, v in mark.values}
        values.update(state=mark.state, updated_at=mark.decided_at, claimed_by=None, claimed_at=None)
        return values

    def _finish_update(self, columns: Iterable[str], group: str | None = None) -> str:
        """The UPDATE that writes outcomes setting ``columns``: one, from parameters; or (``group``) every row
        of that JSON parameter, each onto its own hash."""
        if group is None:
            sets = ", ".join(f"{k} = :{k}" for k in columns)
            return (f"UPDATE files SET {sets}{self._dialect.unlease}, attempts = attempts + :attempts_add"
                    " WHERE sha256 = :sha")
        sets = ", ".join(f"{k} = m.{k}" for k in columns)
        # (the hashes named again, :hashes: else the planner, taking the JSON rows for 100, reads every row)
        return (f"UPDATE files AS f SET {sets}{self._dialect.unlease}, attempts = f.attempts + m.attempts"
                f" FROM {self._dialect.rows('files', group)} AS m"
                " WHERE f.sha256 = ANY(:hashes) AND f.sha256 = m.sha256")

    def _finish_statement(self, mark: Mark) -> tuple[str, dict[str, Any], str | None]:
        """A claim's outcome as one UPDATE, and the ESIID noted for it (:meth:`note_esiid`) to write with it."""
        values = self._outcome_values(mark)
        esiid = self._noted.get(mark.sha256)
        params = {**values, "attempts_add": mark.attempts, "sha": mark.sha256, "esiid": esiid, "at": time.time()}
        return self._finish_update(values), params, esiid

    def _finish_group(self, marks: Sequence[Mark]) -> tuple[str, dict[str, Any]]:
        """Outcomes of distinct hashes and their noted ESIIDs as ONE statement (databases with JSON row
        parameters): one UPDATE per set of columns written (a drain's are all ``sent``), the ESIIDs' upsert,
        joined by a data-modifying WITH. One round trip and one commit, all of it or none."""
        outcomes: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        notes: list[dict[str, Any]] = []
        at = time.time()
        for m in marks:
            values = self._outcome_values(m)
            outcomes.setdefault(tuple(values), []).append({**values, "sha256": m.sha256, "attempts": m.attempts})
            esiid = self._noted.get(m.sha256)
            if esiid is not None:
                notes.append({"sha256": m.sha256, "esiid": esiid, "at": at})
        writes: list[str] = []
        params: dict[str, Any] = {"hashes": [m.sha256 for m in marks]}
        if notes:
            writes.append(note_statement(f"SELECT n.sha256, n.esiid, n.at FROM {self._dialect.rows('labels', 'notes')}"
                                         " AS n"))
            params["notes"] = json.dumps(notes)
        for i, (columns, rows) in enumerate(outcomes.items()):
            writes.append(self._finish_update(columns, f"outcomes{i}"))
            params[f"outcomes{i}"] = json.dumps(rows)
        *first, last = writes
        if first:
            last = f"WITH {', '.join(f'w{i} AS ({w})' for i, w in enumerate(first))} {last}"
        return last, params

    def finish_many(self, marks: Sequence[Mark]) -> None:
        """Claims' outcomes, each with the ESIID noted for it, committed together (group commit: one
        transaction for a worker's group of files). Nothing is acknowledged before this returns."""
        if not marks:
            return
        done = False
        try:
            if len(marks) == 1:
                update, params, esiid = self._finish_statement(marks[0])
                if esiid is None:
                    self._db.execute(update, params)
                else:
                    self._write_both(NOTE_SQL, update, params)
                done = True
                return
            if self._dialect.json_rows and len({m.sha256 for m in marks}) == len(marks):
                self._db.execute(*self._finish_group(marks))
                done = True
                return
            statements = [self._finish_statement(m) for m in marks]

            def work(tx: Tx) -> None:
                for update, params, esiid in statements:
                    if esiid is not None:
                        tx.execute(NOTE_SQL, params)
                    tx.execute(update, params)

            self._db.transaction(work)
            done = True
        finally:
            with self._lock:
                for m in marks:
                    self._inflight.discard(m.sha256)
                    self._claim_labels.pop(m.sha256, None)
                    if done:  # (kept when not written: a later call with the same outcomes writes it)
                        self._noted.pop(m.sha256, None)

    # --- operator commands ------------------------------------------------------------------------------

    def forget(self, sha256s: Iterable[str]) -> int:
        shas = list(sha256s)

        def work(tx: Tx) -> int:
            removed = 0
            for batch in batches(shas, self._dialect.batch):
                clause, params = self._dialect.among("sha256", batch)
                removed += tx.execute(f"DELETE FROM files WHERE {clause}", params)
                tx.execute(f"DELETE FROM chunks WHERE {clause}", params)
            return removed

        return self._db.transaction(work)

    def retry(self, sha256s: Iterable[str]) -> list[str]:
        """``failed`` or ``retrying`` rows back to ``pending``, so ``watch`` delivers them at its next look at
        due rows; a CSV unpacked from an .asc/.zip takes its parent with it. Returns the hashes moved (a
        row in another state is left alone: retrying twice is the same as once). The row keeps its node,
        whose ``watch`` delivers it."""
        shas = list(dict.fromkeys(sha256s))

        def work(tx: Tx) -> list[str]:
            parents: dict[str, str] = {}
            for batch in batches(shas, self._dialect.batch):
                clause, params = self._dialect.among("sha256", batch)
                parents.update((str(s), str(p)) for s, p in tx.tuples(
                    f"SELECT sha256, parent FROM files WHERE {clause} AND parent IS NOT NULL", params))
            targets = list(dict.fromkeys(t for s in shas for t in (s, parents.get(s)) if t))
            moved = self._set_pending(tx, targets, "state IN ('failed', 'retrying')",
                                      "started_at = :now")
            return [t for t in targets if t in moved]

        return self._db.transaction(work)

    def repost(self, sha256s: Iterable[str]) -> list[str]:
        """``forceRepost``: rows in any state but ``sending`` (already on its way) back to ``pending``, and
        their acknowledged raw-upload chunks forgotten, so ``watch`` sends every byte again. The caller
        names the parent of an unpacked CSV itself. Returns the hashes moved."""
        shas = list(dict.fromkeys(sha256s))

        def work(tx: Tx) -> list[str]:
            moved = self._set_pending(tx, shas, "state <> 'sending'", "last_error = :note")
            for batch in batches([s for s in shas if s in moved], self._dialect.batch):
                clause, params = self._dialect.among("sha256", batch)
                tx.execute(f"DELETE FROM chunks WHERE {clause}", params)
            return [s for s in shas if s in moved]

        return self._db.transaction(work)

    def _set_pending(self, tx: Tx, shas: list[str], condition: str, also: str) -> set[str]:
        """Rows of ``shas`` meeting ``condition`` back to ``pending``, unclaimed; the hashes moved."""
        moved: set[str] = set()
        for batch in batches(shas, self._dialect.batch):
            clause, params = self._dialect.among("sha256", batch)
            moved.update(str(r[0]) for r in tx.tuples(
                f"UPDATE files SET state = 'pending', next_attempt_at = NULL, claimed_by = NULL, claimed_at = NULL"
                f"{self._dialect.unlease}, updated_at = :now, {also} WHERE {clause} AND {condition}"
                " RETURNING sha256", {**params, "now": now_iso(), "note": REPOST_NOTE}))
        return moved

    def import_hashes(self, entries: Iterable[tuple[str, str | None]], origin: str) -> int:
        """Record already-delivered hashes as ``sent``; existing rows are left alone. Returns rows added."""
        items = list(entries)

        def work(tx: Tx) -> int:
            now = now_iso()
            return sum(tx.execute(
                "INSERT INTO files (sha256, filename, state, first_seen, updated_at, sent_at, destination, origin)"
                " VALUES (?, ?, 'sent', ?, ?, ?, ?, 'import') ON CONFLICT (sha256) DO NOTHING",
                (sha256, name or "(imported)", now, now, now, origin)) for sha256, name in items)

        return self._db.transaction(work)

    # --- labels: what an uploader declared, what a delivery carried ---------------------------------------

    def declare_labels(self, sha256: str, esiid: str | None, meter: str | None) -> None:
        """What an uploader said of these bytes; a field it left out keeps what an earlier upload said."""
        with self._lock:
            self._claim_labels.pop(sha256, None)
        self._db.execute(
            "INSERT INTO labels (sha256, declared_esiid, declared_meter, at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (sha256) DO UPDATE SET"
            " declared_esiid = COALESCE(excluded.declared_esiid, labels.declared_esiid),"
            " declared_meter = COALESCE(excluded.declared_meter, labels.declared_meter), at = excluded.at",
            (sha256, esiid, meter, time.time()))

    def note_esiid(self, sha256: str, esiid: str) -> None:
        """The ESIID a delivery of these bytes carries: for a claim of this process, written with its
        outcome (sent, failed or retrying alike), else at once."""
        with self._lock:
            if sha256 in self._inflight:
                self._noted[sha256] = esiid
                return
        self._db.execute(NOTE_SQL, {"sha": sha256, "esiid": esiid, "at": time.time()})

    def labels(self, sha256s: list[str]) -> dict[str, Labels]:
        with self._lock:  # each of them claimed in a group, its labels read with the claim: no round trip
            if sha256s and all(s in self._claim_labels for s in sha256s):
                return {s: found for s in sha256s if (found := self._claim_labels[s]) is not None}
        out: dict[str, Labels] = {}
        for batch in batches(sha256s, self._dialect.batch):
            clause, params = self._dialect.among("sha256", batch)
            out.update((str(r[0]), Labels(r[1], r[2], r[3])) for r in self._db.tuples(
                f"SELECT sha256, declared_esiid, declared_meter, esiid FROM labels WHERE {clause}", params))
        return out

    def with_esiid(self, esiid: str, limit: int) -> list[str]:
        """Hashes of content delivered with this ESIID or declared for it by an uploader, newest first."""
        return [str(r[0]) for r in self._db.tuples(
            "SELECT sha256 FROM labels WHERE esiid = ? OR declared_esiid = ? ORDER BY at DESC, sha256 LIMIT ?",
            (esiid, esiid, limit))]

    # --- the watcher's stat cache and schedules -----------------------------------------------------------

    def _remember_statement(self, group: bool = False) -> str:
        """A stat-cache row's upsert; ``group``: every row of the JSON parameter ``:seen`` (:meth:`claim_many`)."""
        node = ("node, ", ":node, ") if self._dialect.seen_node else ("", "")
        source = (f"SELECT {node[1]}s.path, s.device, s.inode, s.size, s.mtime_ns, s.sha256"
                  f" FROM {self._dialect.rows('seen', 'seen')} AS s" if group
                  else f"VALUES ({node[1]}:r_path, :r_device, :r_inode, :r_size, :r_mtime_ns, :r_sha)")
        return (f"INSERT INTO seen ({node[0]}path, device, inode, size, mtime_ns, sha256) {source}"
                f" ON CONFLICT ({', '.join(self._dialect.seen_key)}) DO UPDATE SET device = excluded.device,"
                " inode = excluded.inode, size = excluded.size, mtime_ns = excluded.mtime_ns,"
                " sha256 = excluded.sha256")

    def _seen_row(self, r: Remember) -> dict[str, Any]:
        """A stat-cache row by column (a row of :meth:`_claim_group`'s ``:seen``)."""
        sig = r.signature
        return {"path": stored(r.path), "device": sig.device, "inode": sig.inode, "size": sig.size,
                "mtime_ns": sig.mtime_ns, "sha256": r.sha256}

    def _remember_params(self, r: Remember) -> dict[str, Any]:
        return self._params(**{f"r_{'sha' if k == 'sha256' else k}": v for k, v in self._seen_row(r).items()})

    def remember(self, entry: Remember) -> None:
        self._db.execute(self._remember_sql, self._remember_params(entry))

    def unremember(self, path: str) -> None:
        self._db.execute(f"DELETE FROM seen WHERE {self._dialect.scope('seen')} AND path = :path",
                         self._params(path=stored(path)))

    def seen_many(self, paths: list[str]) -> dict[str, Seen]:
        """What this node's stat cache knows of each of ``paths`` (those it does not know are left out)."""
        out: dict[str, Seen] = {}
        for batch in batches([stored(p) for p in paths], self._dialect.batch):
            clause, params = self._dialect.among("seen.path", batch)
            for path, device, inode, size, mtime_ns, sha256, state in self._db.tuples(
                    "SELECT seen.path, seen.device, seen.inode, seen.size, seen.mtime_ns, seen.sha256, files.state"
                    f" FROM seen LEFT JOIN files ON files.sha256 = seen.sha256 WHERE {self._dialect.scope('seen')}"
                    f" AND {clause}", self._params(**params)):
                out[unstored(path)] = Seen(Signature(device, inode, size, mtime_ns), sha256, state)
        return out

    def seen(self, path: str) -> Seen | None:
        return self.seen_many([path]).get(path)

    def due(self, now: float) -> list[Row]:
        """Rows this node should deliver again now: expired ``retrying`` rows and ``pending`` rows."""
        return [row_from(r) for r in self._db.query(
            f"SELECT {FILE_COLUMNS} FROM files WHERE ((state = 'retrying' AND next_attempt_at <= :now)"
            f" OR state = 'pending') AND {self._dialect.scope('files')} ORDER BY next_attempt_at NULLS FIRST",
            self._params(now=now))]

    def next_due_time(self) -> float | None:
        rows = self._db.tuples("SELECT MIN(next_attempt_at) FROM files WHERE state = 'retrying'"
                               f" AND {self._dialect.scope('files')}", self._params())
        return float(rows[0][0]) if rows and rows[0][0] is not None else None

    def recover_stale(self) -> list[Row]:
        """``sending`` rows whose claimer died (a crash), or whose lease expired, go back to ``pending`` so
        they are sent again."""

        def work(tx: Tx) -> list[Row]:
            stale: list[Row] = []
            for r in tx.query(f"SELECT {FILE_COLUMNS}, claimed_at, {self._leased_column} AS leased FROM files"
                              f" WHERE state = 'sending'{self._dialect.skip_locked}"):
                values = dict(r)
                leased, claimed_at = self._leased(values.pop("leased")), values.pop("claimed_at")
                if r["claimed_by"] == self._me or claimer_alive(r["claimed_by"], claimed_at, self._node,
                                                                leased=leased):
                    continue
                tx.execute("UPDATE files SET state = 'pending', claimed_by = NULL, claimed_at = NULL"
                           f"{self._dialect.unlease}, updated_at = ? WHERE sha256 = ?", (now_iso(), r["sha256"]))
                stale.append(row_from(values))
            return stale

        return self._db.transaction(work)

    # --- sync's record of remote files ----------------------------------------------------------------------

    def remote_files(self) -> dict[str, tuple[int, int]]:
        """remote path -> (size, mtime) of the version last fetched."""
        return {str(r[0]): (int(r[1]), int(r[2])) for r in self._db.tuples(
            "SELECT remote_path, size, mtime FROM remote_files")}

    def record_fetch(self, remote_path: str, size: int, mtime: int, sha256: str, local_path: str) -> None:
        """Remember that ``sync`` fetched this version of ``remote_path``; a fetch without its hash is refused."""
        if not sha256:
            raise LedgerError(f"ledger {self.path}: fetch of {shown(remote_path)} recorded without its SHA-256")
        self._db.execute(
            "INSERT INTO remote_files (remote_path, size, mtime, sha256, local_path, fetched_at)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (remote_path) DO UPDATE SET size = excluded.size,"
            " mtime = excluded.mtime, sha256 = excluded.sha256, local_path = excluded.local_path,"
            " fetched_at = excluded.fetched_at",
            (remote_path, size, mtime, sha256, local_path, now_iso()),
        )

    # --- serve's upload rate limits ---------------------------------------------------------------------------

    def uploads_since(self, role: str, account: str, since: float) -> list[float]:
        """Times of accepted uploads by this account in the window, oldest first. An account is stored as
        :func:`column_text` makes it (PostgreSQL text holds no NUL), here and in :meth:`take_upload_slot`."""
        return [float(r[0]) for r in self._db.tuples(
            "SELECT at FROM uploads WHERE role = ? AND account = ? AND at > ? ORDER BY at",
            (role, column_text(account), since))]

    def take_upload_slot(self, role: str, account: str, since: float, limit: int, at: float) -> bool:
        """Record an accepted upload if the account is under ``limit`` in the window. Atomic across processes
        and nodes: the count and the insert run under the account's own lock."""
        account = column_text(account)

        def work(tx: Tx) -> bool:
            tx.lock(role, account)
            count = tx.tuples("SELECT COUNT(*) FROM uploads WHERE role = ? AND account = ? AND at > ?",
                              (role, account, since))[0][0]
            if int(count) >= limit:
                return False
            tx.execute("INSERT INTO uploads (role, account, at) VALUES (?, ?, ?)", (role, account, at))
            tx.execute("DELETE FROM uploads WHERE role = ? AND account = ? AND at < ?",
                       (role, account, at - UPLOAD_WINDOW_KEPT))
            return True

        return self._db.transaction(work, retry=False)

    # --- raw-upload chunk progress ------------------------------------------------------------------------------

    def acked_chunks(self, sha256: str, parts: int) -> dict[int, str]:
        """part number -> chunk SHA-256 acknowledged for this file split into ``parts`` chunks."""
        return {int(r[0]): str(r[1]) for r in self._db.tuples(
            "SELECT part, chunk_sha256 FROM chunks WHERE sha256 = ? AND parts = ?", (sha256, parts))}

    def ack_chunk(self, sha256: str, part: int, parts: int, chunk_sha256: str) -> None:
        self._db.execute(
            "INSERT INTO chunks (sha256, part, parts, chunk_sha256, acked_at) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (sha256, part) DO UPDATE SET parts = excluded.parts,"
            " chunk_sha256 = excluded.chunk_sha256, acked_at = excluded.acked_at",
            (sha256, part, parts, chunk_sha256, now_iso()),
        )

    # --- ledger copy ----------------------------------------------------------------------------------------

    def export_rows(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every row of every table, as ``(table, columns)``, for ``ledger copy`` (stat-cache rows are this
        node's)."""
        for table in COPIED_TABLES:
            where = f" WHERE {self._dialect.scope('seen')}" if table == "seen" else ""
            for r in self._db.query(f"SELECT {', '.join(COPIED_COLUMNS[table])} FROM {table}{where}",
                                    self._params()):
                yield table, dict(r)

    def import_rows(self, rows: Iterable[tuple[str, dict[str, Any]]]) -> int:
        """Write rows from :meth:`export_rows` of any ledger; a row already here with the same key is
        replaced, an upload already counted is not counted twice. Returns the rows written."""
        items = list(rows)
        keys = {**KEYS, "seen": self._dialect.seen_key}

        def work(tx: Tx) -> int:
            written = 0
            for table, values in items:
                values = {k: v for k, v in values.items() if k in COPIED_COLUMNS[table]}
                if table == "seen" and self._dialect.seen_node:
                    values["node"] = self._node
                names = ", ".join(values)
                marks = ", ".join(f":{k}" for k in values)
                if table == "uploads":
                    sql = (f"INSERT INTO uploads ({names}) SELECT {marks} WHERE NOT EXISTS (SELECT 1 FROM uploads"
                           " WHERE role = :role AND account = :account AND at = :at)")
                else:
                    updates = ", ".join(f"{k} = excluded.{k}" for k in values if k not in keys[table])
                    sql = (f"INSERT INTO {table} ({names}) VALUES ({marks})"
                           f" ON CONFLICT ({', '.join(keys[table])}) DO UPDATE SET {updates}")
                written += max(0, tx.execute(sql, values))
            return written

        return self._db.transaction(work)
