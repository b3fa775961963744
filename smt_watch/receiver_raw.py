"""The reference receiver's ``raw-upload`` store: chunks in, ``SmtInterval`` rows out, files reassembled.

Stands in for the web app's ``POST /api/admin/smt/raw-upload``: each chunk (``<name>.partN-of-M``, the CSV
header repeated) is stored once by SHA-256; interval rows with a kWh value become ``SmtInterval`` rows;
when all M parts of a name are in, the data lines are joined under one header and handed back so the
receiver can store the whole file like the other routes do.
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

from smt_watch.smtcsv import INTERVAL_HEADER, clean_esiid, header_fields

PART_RE: Final = re.compile(r"^(?P<name>.+)\.part(?P<part>\d+)-of-(?P<parts>\d+)$")
_SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS RawChunk (
        id INTEGER PRIMARY KEY, name TEXT NOT NULL, part INTEGER NOT NULL, parts INTEGER NOT NULL,
        sha256 TEXT NOT NULL UNIQUE, sizeBytes INTEGER NOT NULL, esiid TEXT, meter TEXT, source TEXT,
        content BLOB NOT NULL, received_at TEXT NOT NULL, UNIQUE (name, parts, part))""",
    """CREATE TABLE IF NOT EXISTS SmtInterval (
        id INTEGER PRIMARY KEY, chunk_id INTEGER NOT NULL, esiid TEXT NOT NULL, usage_date TEXT NOT NULL,
        start_time TEXT NOT NULL, kwh REAL NOT NULL, estimated TEXT, direction TEXT)""",
)


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
        """Store a chunk; returns (chunk id, duplicate, interval rows added, whole file when complete)."""
        with self._lock, self._db:
            row = self._db.execute("SELECT id FROM RawChunk WHERE sha256 = ?", (sha256,)).fetchone()
            if row is not None:
                return int(row[0]), True, 0, None
            cur = self._db.execute(
                "INSERT OR REPLACE INTO RawChunk (name, part, parts, sha256, sizeBytes, esiid, meter, source,"
                " content, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (name, part, parts, sha256, len(content), meta.get("esiid"), meta.get("meter"), meta.get("source"),
                 content, _now()),
            )
            chunk_id = int(cur.lastrowid or 0)
            rows = list(_interval_rows(content))
            self._db.executemany(
                "INSERT INTO SmtInterval (chunk_id, esiid, usage_date, start_time, kwh, estimated, direction)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(chunk_id, *r) for r in rows],
            )
            have = self._db.execute(
                "SELECT part, content FROM RawChunk WHERE name = ? AND parts = ? ORDER BY part", (name, parts)
            ).fetchall()
            whole = _assemble([bytes(c) for _, c in have]) if [p for p, _ in have] == list(range(1, parts + 1)) \
                else None
            return chunk_id, False, len(rows), whole

    def interval_count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM SmtInterval").fetchone()[0])

    def chunks(self) -> list[tuple[str, int, int]]:
        with self._lock:
            return [(str(n), int(p), int(m)) for n, p, m in
                    self._db.execute("SELECT name, part, parts FROM RawChunk ORDER BY id")]


def _interval_rows(content: bytes) -> list[tuple[str, str, str, float, str, str]]:
    reader = csv.reader(io.StringIO(content.decode("utf-8-sig", "replace")))
    header = next(reader, [])
    if tuple(header_fields(",".join(header))[: len(INTERVAL_HEADER)]) != INTERVAL_HEADER:
        return []
    out = []
    for row in reader:
        if len(row) >= 8 and row[5].strip():
            try:
                kwh = float(row[5])
            except ValueError:
                continue
            out.append((clean_esiid(row[0]), row[1].strip(), row[3].strip(), kwh, row[6].strip(), row[7].strip()))
    return out


def _assemble(chunks: list[bytes]) -> bytes:
    """One header, then every chunk's data lines in order."""
    header, _, first = chunks[0].partition(b"\n")
    body = [header + b"\n", first]
    body += [c.partition(b"\n")[2] for c in chunks[1:]]
    return b"".join(body)
