"""The reference receiver's ``raw-upload`` store: chunks in, ``SmtInterval`` rows out, files reassembled.

Stands in for the web app's ``POST /api/admin/smt/raw-upload``. Each chunk (``<name>.partN-of-M``, the CSV
header repeated) is stored once by SHA-256. Interval rows with a kWh value become ``SmtInterval`` rows at
their UTC instant, unique on (esiid, meter, ts, direction), so a re-sent file changes no row counts.
Instants need the labels that came before on the same day (the repeated hour of a fall-back day may be
split across chunks), so the previous chunk's rows for that day are read as context.

Chunks of one upload form a *generation*, started by its part 1: a revised file sent under the same name
starts a new one, and a file is reassembled (header once, then every chunk's data lines) only from the
parts of one generation, never from a mix of versions.
"""

from __future__ import annotations

import csv
import io
import re
import sqlite3
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from smt_watch.smtcsv import INTERVAL_HEADER, Placer, clean_esiid, header_fields

PART_RE: Final = re.compile(r"^(?P<name>.+)\.part(?P<part>\d+)-of-(?P<parts>\d+)$")
_SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS RawChunk (
        id INTEGER PRIMARY KEY, name TEXT NOT NULL, part INTEGER NOT NULL, parts INTEGER NOT NULL,
        generation INTEGER NOT NULL, sha256 TEXT NOT NULL UNIQUE, sizeBytes INTEGER NOT NULL, esiid TEXT,
        meter TEXT, source TEXT, content BLOB NOT NULL, received_at TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS SmtInterval (
        id INTEGER PRIMARY KEY, esiid TEXT NOT NULL, meter TEXT NOT NULL, ts TEXT NOT NULL, kwh REAL NOT NULL,
        direction TEXT NOT NULL, estimated TEXT, UNIQUE (esiid, meter, ts, direction))""",
)
Row = tuple[str, str, str, str, str, str]  # esiid, date, start time, kwh, estimated, direction


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class RawStore:
    def __init__(self, data_dir: Path) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(data_dir / "raw.sqlite3", check_same_thread=False)
        with self._lock, self._db:
            for statement in _SCHEMA:
                self._db.execute(statement)

    def add_chunk(self, name: str, part: int, parts: int, sha256: str, content: bytes,
                  meta: dict[str, str | None]) -> tuple[int, bool, int, bytes | None]:
        """Store a chunk; returns (chunk id, duplicate, interval rows written, whole file when complete)."""
        with self._lock, self._db:
            db = self._db
            row = db.execute("SELECT id FROM RawChunk WHERE sha256 = ?", (sha256,)).fetchone()
            if row is not None:
                return int(row[0]), True, 0, None
            if part == 1:
                generation = 0  # set to its own id below
            else:
                latest = db.execute("SELECT MAX(generation) FROM RawChunk WHERE name = ? AND parts = ? AND part = 1",
                                    (name, parts)).fetchone()[0]
                generation = int(latest or 0)
            cur = db.execute(
                "INSERT INTO RawChunk (name, part, parts, generation, sha256, sizeBytes, esiid, meter, source,"
                " content, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (name, part, parts, generation, sha256, len(content), meta.get("esiid"), meta.get("meter"),
                 meta.get("source"), content, _now()),
            )
            chunk_id = int(cur.lastrowid or 0)
            if part == 1:
                generation = chunk_id
                db.execute("UPDATE RawChunk SET generation = ? WHERE id = ?", (generation, chunk_id))
            context = b""
            if part > 1:
                prev = db.execute("SELECT content FROM RawChunk WHERE name = ? AND parts = ? AND part = ? AND"
                                  " generation = ?", (name, parts, part - 1, generation)).fetchone()
                context = bytes(prev[0]) if prev else b""
            written = self._intervals(content, context, meta.get("meter") or "")
            have = [int(r[0]) for r in db.execute(
                "SELECT part FROM RawChunk WHERE name = ? AND parts = ? AND generation = ? ORDER BY part",
                (name, parts, generation))]
            whole = None
            if have == list(range(1, parts + 1)):  # read the contents only once, when the file is complete
                whole = _assemble([bytes(r[0]) for r in db.execute(
                    "SELECT content FROM RawChunk WHERE name = ? AND parts = ? AND generation = ? ORDER BY part",
                    (name, parts, generation))])
            return chunk_id, False, written, whole

    def _intervals(self, content: bytes, context: bytes, meter: str) -> int:
        rows = _rows(content)
        if rows is None:
            return 0
        placer = Placer()
        first_day = rows[0][1] if rows else None
        for esiid, day, start, _kwh, _est, direction in _rows(context) or []:
            if day == first_day:  # earlier labels of the same day decide which hour a repeat is
                placer.place((esiid, direction), day, start)
        out = []
        for esiid, day, start, kwh, est, direction in rows:
            _, instant = placer.place((esiid, direction), day, start)
            if instant is None or not kwh:
                continue
            try:
                value = float(kwh)
            except ValueError:
                continue
            ts = datetime.fromtimestamp(instant, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            out.append((esiid, meter, ts, value, direction, est))
        self._db.executemany(
            "INSERT INTO SmtInterval (esiid, meter, ts, kwh, direction, estimated) VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (esiid, meter, ts, direction) DO UPDATE SET kwh = excluded.kwh,"
            " estimated = excluded.estimated", out)
        return len(out)

    def intervals_by_esiid(self) -> dict[str, int]:
        with self._lock:
            return {str(e): int(n) for e, n in
                    self._db.execute("SELECT esiid, COUNT(*) FROM SmtInterval GROUP BY esiid")}

    def interval_count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM SmtInterval").fetchone()[0])

    def chunks(self) -> list[tuple[str, int, int]]:
        with self._lock:
            return [(str(n), int(p), int(m)) for n, p, m in
                    self._db.execute("SELECT name, part, parts FROM RawChunk ORDER BY id")]


def _rows(content: bytes) -> list[Row] | None:
    """The data rows of an interval chunk, or None when it is another kind of CSV."""
    if not content:
        return None
    reader = csv.reader(io.StringIO(content.decode("utf-8-sig", "replace")))
    header = next(reader, [])
    if tuple(header_fields(",".join(header))[: len(INTERVAL_HEADER)]) != INTERVAL_HEADER:
        return None
    direction = {True: "generation", False: "consumption"}
    return [(clean_esiid(r[0]), r[1].strip(), r[3].strip(), r[5].strip(), r[6].strip(),
             direction[r[7].strip().lower().startswith("surplus")]) for r in reader if len(r) >= 8]


def _assemble(chunks: list[bytes]) -> bytes:
    """One header, then every chunk's data lines in order."""
    header, _, first = chunks[0].partition(b"\n")
    return b"".join([header + b"\n", first, *(c.partition(b"\n")[2] for c in chunks[1:])])
