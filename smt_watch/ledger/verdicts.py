"""What ``verify`` found out about each delivered file, and what it still has to do (issue 26).

One row per file (its SHA-256, as ``files``): the last verdict and its detail (JSON), when the next
automatic check is due, and the re-send of the days the app's window dropped (which days, from when, and
how far it got). Kept apart from ``files`` so the delivery state machine stays as it is: a file is ``sent``
when the app said 2xx, and *stored* only when ``verify`` saw it stored.

The ledger mixes in :class:`VerdictStore` (its statements are written once for both databases); each
database's migration is one self-contained function or statement (:func:`sqlite_migration`,
:func:`postgres_migration`).
"""

from __future__ import annotations

import enum
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Final

from smt_watch.ledger.common import now_iso
from smt_watch.ledger.port import Port

COLUMNS: Final = ("sha256", "verdict", "detail", "checked_at", "check_due_at", "resend_due_at", "resend_days",
                  "resend_state", "resend_sha256", "older_said")


class Verdict(enum.StrEnum):
    """A file's verdict; the value is what ``verify`` prints."""

    UNCHECKED = "unchecked"  # a check is scheduled, none has run yet
    STORED = "stored"  # every day the app's own rules keep from the file is there, with the file's kWh
    PARTIAL = "partial"  # some days are there, some are not or differ (the detail lists them)
    OUTSIDE_WINDOW = "outside window"  # days the app's window dropped (newer: re-sent later; older: never)
    MISSING = "missing"  # no trace of the file in the app
    UNVERIFIABLE = "unverifiable"  # a read route refused or is absent; the detail says which and why


class Resend(enum.StrEnum):
    """Where the re-send of the days the window dropped stands."""

    WAITING = "waiting"  # due at ``resend_due_at``, once every dropped day is inside the window
    SENT = "sent"  # the rows of those days were delivered again (``resend_sha256``); verify again
    UNRESENDABLE = "unresendable"  # the file left the inbox: the days cannot be re-sent


@dataclass(frozen=True)
class VerdictRow:
    sha256: str
    verdict: str
    detail: str = "{}"  # JSON
    checked_at: str | None = None
    check_due_at: float | None = None
    resend_due_at: float | None = None
    resend_days: str | None = None  # JSON list of [esiid, meter, "YYYY-MM-DD"]
    resend_state: str | None = None
    resend_sha256: str | None = None
    older_said: int = 0  # the days older than the window have been reported (said once)

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _row(values: Mapping[str, Any]) -> VerdictRow:
    return VerdictRow(**{k: values[k] for k in COLUMNS})


def sqlite_migration(db: sqlite3.Connection) -> None:
    """The ``verdicts`` table (SQLite)."""
    db.execute(
        """CREATE TABLE verdicts (
            sha256 TEXT PRIMARY KEY,
            verdict TEXT NOT NULL,
            detail TEXT NOT NULL DEFAULT '{}',
            checked_at TEXT,
            check_due_at REAL,
            resend_due_at REAL,
            resend_days TEXT,
            resend_state TEXT,
            resend_sha256 TEXT,
            older_said INTEGER NOT NULL DEFAULT 0
        )"""
    )
    db.execute("CREATE INDEX verdicts_check_due ON verdicts(check_due_at)")
    db.execute("CREATE INDEX verdicts_resend_due ON verdicts(resend_due_at)")


def postgres_migration(schema: str) -> str:
    """The ``verdicts`` table (PostgreSQL), as one statement list for the backend's migration tuple."""
    return f"""
    CREATE TABLE IF NOT EXISTS {schema}.verdicts (
        sha256 TEXT PRIMARY KEY,
        verdict TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT '{{}}',
        checked_at TEXT,
        check_due_at DOUBLE PRECISION,
        resend_due_at DOUBLE PRECISION,
        resend_days TEXT,
        resend_state TEXT,
        resend_sha256 TEXT,
        older_said INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX IF NOT EXISTS verdicts_check_due ON {schema}.verdicts(check_due_at);
    CREATE INDEX IF NOT EXISTS verdicts_resend_due ON {schema}.verdicts(resend_due_at);
    """


_UPSERT_COLUMNS: Final = ", ".join(COLUMNS)
_UPDATES: Final = ", ".join(f"{c} = excluded.{c}" for c in COLUMNS[1:])


class VerdictStore:
    """The verdict half of the ledger (:class:`~smt_watch.ledger.store.SqlLedger`), one statement each for
    both databases."""

    _db: Port

    def save_verdict(self, row: VerdictRow) -> None:
        """Insert or replace the row of ``row.sha256``."""
        marks = ", ".join(f":{c}" for c in COLUMNS)
        self._db.execute(f"INSERT INTO verdicts ({_UPSERT_COLUMNS}) VALUES ({marks}) ON CONFLICT (sha256) DO UPDATE"
                         f" SET {_UPDATES}", row.to_json())

    def verdict(self, sha256: str) -> VerdictRow | None:
        rows = self._db.query(f"SELECT {_UPSERT_COLUMNS} FROM verdicts WHERE sha256 = ?", (sha256,))
        return _row(rows[0]) if rows else None

    def verdicts(self) -> dict[str, VerdictRow]:
        return {r["sha256"]: _row(r) for r in self._db.query(f"SELECT {_UPSERT_COLUMNS} FROM verdicts")}

    def checks_due(self, now: float) -> list[VerdictRow]:
        rows = self._db.query(f"SELECT {_UPSERT_COLUMNS} FROM verdicts WHERE check_due_at <= ?"
                              " ORDER BY check_due_at", (now,))
        return [_row(r) for r in rows]

    def resends_due(self, now: float) -> list[VerdictRow]:
        rows = self._db.query(f"SELECT {_UPSERT_COLUMNS} FROM verdicts WHERE resend_state = ? AND resend_due_at <= ?"
                              " ORDER BY resend_due_at", (Resend.WAITING.value, now))
        return [_row(r) for r in rows]

    def schedule_check(self, sha256: str, at: float) -> None:
        """Check ``sha256`` at ``at`` (the row is created ``unchecked`` if it has none); an earlier due time
        already set is kept."""
        self._db.execute("INSERT INTO verdicts (sha256, verdict, check_due_at) VALUES (?, ?, ?) ON CONFLICT (sha256)"
                         " DO UPDATE SET check_due_at = CASE WHEN verdicts.check_due_at IS NULL OR"
                         " verdicts.check_due_at > excluded.check_due_at THEN excluded.check_due_at"
                         " ELSE verdicts.check_due_at END", (sha256, Verdict.UNCHECKED.value, at))


def checked(row: VerdictRow, verdict: Verdict, detail: str, **changes: Any) -> VerdictRow:
    """``row`` with a new verdict, stamped now, its automatic check done."""
    return replace(row, verdict=verdict.value, detail=detail, checked_at=now_iso(), check_due_at=None, **changes)
