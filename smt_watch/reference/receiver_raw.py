"""The reference receiver's ``raw-upload`` route: the real route's rules, chunks in, ``SmtInterval`` rows out.

Stands in for the web app's ``POST /api/admin/smt/raw-upload`` (IntelliWatt
``app/api/admin/smt/raw-upload/route.ts``) and takes and refuses what it does (the admin token is checked
by the caller, :mod:`smt_watch.reference.receiver`):

- a body that is not JSON counts as ``{}``. ``filename`` and ``sha256`` must be truthy (in the JavaScript
  sense), ``sizeBytes`` (else ``size_bytes``) a number; otherwise 400 ``VALIDATION`` with the real route's
  ``missing`` strings and ``receivedKeys``. Everything else is optional: ``contentType`` defaults to
  ``application/octet-stream``, ``storagePath`` to ``/adhocusage/<filename>``, ``source`` to ``adhocusage``.
- what passes that check but the real database would refuse (a ``filename`` that is not a string, a
  ``sizeBytes`` that is not a 32-bit integer, ...) is 500 ``DB``, as there.
- a ``sha256`` already stored is 200 with ``duplicate: true`` and the stored row.
- ``contentBase64`` is decoded as loosely as Node's ``Buffer.from(x, 'base64')``; without content (or
  when it decodes to nothing) only the row is recorded.

Where the real route is lenient (it never checks the content against ``sizeBytes``, ``sha256`` or the
``Idempotency-Key``, takes sloppy base64 and bodies without content), this receiver accepts too but
returns a :class:`RawMismatch` for each such thing, so tests of smt-watch can still catch a client bug.

Storage: a chunk named ``<name>.partN-of-M`` (any other name is a whole file, part 1 of 1) is stored once
by its ``sha256`` field. Interval rows with a kWh value become ``SmtInterval`` rows at their UTC instant,
unique on (esiid, meter, ts, direction), so a re-sent file changes no row counts. Instants need the labels
that came before on the same day (the repeated hour of a fall-back day may be split across chunks), so
the previous chunk's rows for that day are read as context.

Chunks of one upload form a *generation*, started by its part 1: a revised file sent under the same name
starts a new one, and a file is reassembled (header once, then every chunk's data lines) only from the
parts of one generation that all carried content, never from a mix of versions.
"""

from __future__ import annotations

import binascii
import csv
import enum
import hashlib
import io
import json
import math
import re
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from smt_watch.clock import utc_stamp
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
_ADDED_COLUMNS: Final = ("filename", "content_type", "storage_path")  # TEXT, added to older data dirs
Row = tuple[str, str, str, str, str, str]  # esiid, date, start time, kwh, estimated, direction

# The real route's ``missing`` strings, in its order.
MISSING_FILENAME: Final = "filename (string)"
MISSING_SIZE: Final = "size_bytes|sizeBytes (number)"
MISSING_SHA256: Final = "sha256 (string)"
_INT32: Final = range(-(2**31), 2**31)  # Prisma ``Int``


class Mismatch(enum.Enum):
    """Something the real route lets through that a correct client never sends: recorded, not refused."""

    SHA256 = "the content does not hash to the sha256 field"
    SIZE = "the content is not sizeBytes bytes long"
    IDEMPOTENCY_KEY = "the Idempotency-Key header is not the chunk's SHA-256"
    BASE64 = "contentBase64 is not strict base64 (decoded as loosely as Node's Buffer.from)"
    NO_CONTENT = "no content: only the row is recorded, sizeBytes and sha256 are not checked"
    NO_ADMIN_TOKEN = "no admin token configured here: the real route answers 503 ADMIN_TOKEN not configured"  # noqa: S105


@dataclass(frozen=True)
class RawMismatch:
    kind: Mismatch
    filename: str
    detail: str


@dataclass(frozen=True)
class ChunkRow:
    """A stored chunk as the real route's ``RawSmtFile`` row shows it."""

    id: int
    filename: str
    size_bytes: int
    sha256: str
    created_at: str


@dataclass
class RawReply:
    """The route's answer (``body`` None: an empty 500, as a crash in the real route), plus what the
    receiver records: the request's fields without content, mismatches, and a file once complete."""

    status: int
    body: dict[str, Any] | None
    fields: dict[str, Any] = field(default_factory=dict)
    sha256: str | None = None
    duplicate: bool | None = None
    mismatches: list[RawMismatch] = field(default_factory=list)
    whole: tuple[str, bytes, dict[str, str | None]] | None = None  # (name, content, meta): a file completed


def _now() -> str:
    """As the web app's ``new Date().toISOString()``."""
    return utc_stamp(digits=3)


class RawStore:
    def __init__(self, data_dir: Path) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(data_dir / "raw.sqlite3", check_same_thread=False)
        with self._lock, self._db:
            for statement in _SCHEMA:
                self._db.execute(statement)
            have = {str(r[1]) for r in self._db.execute("PRAGMA table_info(RawChunk)")}
            for column in _ADDED_COLUMNS:
                if column not in have:
                    self._db.execute(f"ALTER TABLE RawChunk ADD COLUMN {column} TEXT")

    def lookup(self, sha256: str) -> ChunkRow | None:
        with self._lock:
            return self._lookup(sha256)

    def _lookup(self, sha256: str) -> ChunkRow | None:
        row = self._db.execute(
            "SELECT id, COALESCE(filename, name || '.part' || part || '-of-' || parts), sizeBytes, sha256,"
            " received_at FROM RawChunk WHERE sha256 = ?", (sha256,)).fetchone()
        return None if row is None else ChunkRow(int(row[0]), str(row[1]), int(row[2]), str(row[3]), str(row[4]))

    def add_chunk(self, filename: str, size: int, sha256: str, content: bytes, meta: dict[str, str | None]
                  ) -> tuple[ChunkRow, bool, tuple[int, str | None, str | None] | None, bytes | None]:
        """Store a chunk once by its sha256 field; returns (row, duplicate, (intervals written, first ts,
        last ts) when it had content, the whole file when this chunk completed one)."""
        name, part, parts = split_name(filename)
        with self._lock, self._db:
            db = self._db
            existing = self._lookup(sha256)
            if existing is not None:
                return existing, True, None, None
            if part == 1:
                generation = 0  # set to its own id below
            else:
                latest = db.execute("SELECT MAX(generation) FROM RawChunk WHERE name = ? AND parts = ? AND part = 1",
                                    (name, parts)).fetchone()[0]
                generation = int(latest or 0)
            created = _now()
            cur = db.execute(
                "INSERT INTO RawChunk (name, part, parts, generation, sha256, sizeBytes, esiid, meter, source,"
                " content, received_at, filename, content_type, storage_path)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (name, part, parts, generation, sha256, size, meta.get("esiid"), meta.get("meter"),
                 meta.get("source"), content, created, filename, meta.get("content_type"),
                 meta.get("storage_path")),
            )
            chunk_id = int(cur.lastrowid or 0)
            if part == 1:
                generation = chunk_id
                db.execute("UPDATE RawChunk SET generation = ? WHERE id = ?", (generation, chunk_id))
            row = ChunkRow(chunk_id, filename, size, sha256, created)
            if not content:
                return row, False, None, None
            context = b""
            if part > 1:
                prev = db.execute("SELECT content FROM RawChunk WHERE name = ? AND parts = ? AND part = ? AND"
                                  " generation = ?", (name, parts, part - 1, generation)).fetchone()
                context = bytes(prev[0]) if prev else b""
            written = self._intervals(content, context, meta.get("meter") or "")
            have = [(int(r[0]), int(r[1])) for r in db.execute(
                "SELECT part, length(content) FROM RawChunk WHERE name = ? AND parts = ? AND generation = ?"
                " ORDER BY part", (name, parts, generation))]
            whole = None
            # read the contents only once, when the file is complete (and every part carried content)
            if [p for p, _ in have] == list(range(1, parts + 1)) and all(n for _, n in have):
                whole = _assemble([bytes(r[0]) for r in db.execute(
                    "SELECT content FROM RawChunk WHERE name = ? AND parts = ? AND generation = ? ORDER BY part",
                    (name, parts, generation))])
            return row, False, written, whole

    def _intervals(self, content: bytes, context: bytes, meter: str) -> tuple[int, str | None, str | None]:
        rows = _rows(content)
        if rows is None:
            return 0, None, None
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
            ts = utc_stamp(instant)
            out.append((esiid, meter, ts, value, direction, est))
        self._db.executemany(
            "INSERT INTO SmtInterval (esiid, meter, ts, kwh, direction, estimated) VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (esiid, meter, ts, direction) DO UPDATE SET kwh = excluded.kwh,"
            " estimated = excluded.estimated", out)
        stamps = sorted(r[2] for r in out)
        return len(out), (stamps[0] if stamps else None), (stamps[-1] if stamps else None)

    def intervals_by_esiid(self) -> dict[str, int]:
        with self._lock:
            return {str(e): int(n) for e, n in
                    self._db.execute("SELECT esiid, COUNT(*) FROM SmtInterval GROUP BY esiid")}

    def interval_count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM SmtInterval").fetchone()[0])

    def chunk_rows(self) -> list[dict[str, Any]]:
        """Every stored chunk as the real route's row shows it, with the text it carried."""
        with self._lock:
            rows = self._db.execute(
                "SELECT filename, name, part, parts, sha256, sizeBytes, source, storage_path, content_type, esiid,"
                " meter, content FROM RawChunk ORDER BY id").fetchall()
        keys = ("filename", "name", "part", "parts", "sha256", "sizeBytes", "source", "storagePath", "contentType",
                "esiid", "meter")
        return [{**dict(zip(keys, r[:-1], strict=True)), "content": bytes(r[-1]).decode("utf-8", "replace")}
                for r in rows]

    def chunks(self) -> list[tuple[str, int, int]]:
        with self._lock:
            return [(str(n), int(p), int(m)) for n, p, m in
                    self._db.execute("SELECT name, part, parts FROM RawChunk ORDER BY id")]


def split_name(filename: str) -> tuple[str, int, int]:
    """(file name, part, parts) of a chunk name; a name without a valid ``.partN-of-M`` is part 1 of 1."""
    match = PART_RE.match(filename)
    if match and 1 <= int(match["part"]) <= int(match["parts"]):
        return match["name"], int(match["part"]), int(match["parts"])
    return filename, 1, 1


def handle_chunk(store: RawStore, body: bytes, idempotency_key: str | None) -> RawReply:
    """Answer one raw-upload request body as the real route would (after its token check)."""
    payload = _parse_json(body)
    if payload is None:  # the real route reads body.filename of null: an unhandled TypeError
        return RawReply(500, None)
    obj: dict[str, Any] = payload if isinstance(payload, dict) else {}  # a list or string has no such keys
    fields = {k: v for k, v in obj.items() if k != "contentBase64"}
    filename, sha256 = obj.get("filename"), obj.get("sha256")
    size = _coalesce(obj.get("sizeBytes"), obj.get("size_bytes"))
    missing = [text for text, bad in ((MISSING_FILENAME, not _truthy(filename)),
                                      (MISSING_SIZE, not _is_number(size)),
                                      (MISSING_SHA256, not _truthy(sha256))) if bad]
    if missing:
        return RawReply(400, {"ok": False, "error": "VALIDATION", "details": "Missing or invalid required fields",
                              "missing": missing, "receivedKeys": _js_keys(payload)}, fields)

    shown = filename if isinstance(filename, str) else json.dumps(filename)
    mismatches: list[RawMismatch] = []
    raw = obj.get("contentBase64")
    content = b""
    if _truthy(raw):
        if isinstance(raw, str):
            content, strict = node_base64(raw)
        elif isinstance(raw, list):  # Buffer.from(array) takes the entries as bytes
            content, strict = bytes(_uint8(v) for v in raw), False
        else:
            return _db_error(fields, f"TypeError: The first argument must be of type string or an instance of"
                                     f" Buffer, ArrayBuffer, or Array. Received {type(raw).__name__}")
        if not strict:
            mismatches.append(RawMismatch(Mismatch.BASE64, shown, f"{len(content)} bytes after loose decoding"))
    if not isinstance(sha256, str):
        return _db_error(fields, "Invalid value for argument `sha256`: Expected String.")
    actual = hashlib.sha256(content).hexdigest() if content else None
    if actual is None:
        mismatches.append(RawMismatch(Mismatch.NO_CONTENT, shown, f"sizeBytes={size}, sha256={sha256}"))
    else:
        if actual != sha256:
            mismatches.append(RawMismatch(Mismatch.SHA256, shown, f"content sha256 is {actual}, sha256={sha256}"))
        if len(content) != size:
            mismatches.append(RawMismatch(Mismatch.SIZE, shown, f"content is {len(content)} bytes, sizeBytes={size}"))
    if idempotency_key is not None and idempotency_key.strip().lower() != (actual or sha256.lower()):
        mismatches.append(RawMismatch(Mismatch.IDEMPOTENCY_KEY, shown,
                                      f"Idempotency-Key {idempotency_key.strip()}, chunk {actual or sha256}"))

    reply = RawReply(200, None, fields, sha256, True, mismatches)
    row = store.lookup(sha256)
    written: tuple[int, str | None, str | None] | None = None
    if row is None:
        meta, problem = _row_fields(obj, filename, size)
        if problem:
            return _db_error(fields, problem, mismatches)
        assert isinstance(filename, str)
        row, reply.duplicate, written, whole = store.add_chunk(filename, int(size), sha256, content, meta)
        if whole is not None:
            received = obj.get("receivedAt")
            meta["captured_at"] = received if isinstance(received, str) else None
            reply.whole = (split_name(filename)[0], whole, meta)
    reply.body = {"ok": True, **({"duplicate": True} if reply.duplicate else {}), "id": str(row.id),
                  "filename": row.filename, "sizeBytes": row.size_bytes, "sha256": row.sha256,
                  "createdAt": row.created_at, "normalizedInline": _summary(written, obj.get("postIngest") is True)}
    return reply


def _row_fields(payload: dict[str, Any], filename: object, size: object) -> tuple[dict[str, str | None], str]:
    """The new row's fields as the real route derives them, or what its database would refuse."""
    source = _coalesce(payload.get("source"), "adhocusage")
    content_type = _coalesce(payload.get("contentType"), payload.get("content_type"), "application/octet-stream")
    storage_path = _coalesce(payload.get("storagePath"), payload.get("storage_path"), f"/adhocusage/{filename}")
    if not isinstance(filename, str):
        return {}, "Invalid value for argument `filename`: Expected String."
    whole = int(size) if isinstance(size, int) or (isinstance(size, float) and size.is_integer()) else None
    if whole is None or whole not in _INT32:
        return {}, f"Invalid value for argument `size_bytes`: {size} is not a 32-bit integer."
    for key, value in (("source", source), ("content_type", content_type), ("storage_path", storage_path)):
        if not isinstance(value, str):
            return {}, f"Invalid value for argument `{key}`: Expected String."
    meta: dict[str, str | None] = {"source": source, "content_type": content_type, "storage_path": storage_path}
    for key in ("esiid", "meter"):
        value = payload.get(key)
        meta[key] = value.strip() if isinstance(value, str) and value.strip() else None
    return meta, ""


def _summary(written: tuple[int, str | None, str | None] | None, post_ingest: bool) -> dict[str, Any] | None:
    """``normalizedInline``: None without content (and for a duplicate, which is not normalized again)."""
    if written is None:
        return None
    count, first, last = written
    summary: dict[str, Any] = {"intervalsInserted": count, "inserted": count, "skipped": 0, "records": count,
                               "tsMin": _js_time(first), "tsMax": _js_time(last)}
    if count:
        summary["postIngestDeferred"] = post_ingest
    return summary


def _js_time(ts: str | None) -> str | None:
    return None if ts is None else ts.removesuffix("Z") + ".000Z"


def _db_error(fields: dict[str, Any], detail: str, mismatches: list[RawMismatch] | None = None) -> RawReply:
    return RawReply(500, {"ok": False, "error": "DB", "details": detail}, fields, mismatches=mismatches or [])


# --- JavaScript's view of the body -------------------------------------------------------------------


def _parse_json(body: bytes) -> Any:
    """``await req.json().catch(() => ({}))``: UTF-8 (BOM dropped, bad bytes replaced), JSON.parse rules."""
    text = body.decode("utf-8", "replace").removeprefix("\ufeff")
    try:
        return json.loads(text, parse_constant=_no_constant)
    except ValueError:
        return {}


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # JSON.parse refuses NaN and Infinity


def _coalesce(*values: object) -> Any:
    """JavaScript ``a ?? b ?? c``."""
    return next((v for v in values if v is not None), None)


def _truthy(value: object) -> bool:
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return value != ""
    if isinstance(value, int | float):
        return value == value and value != 0
    return True  # arrays and objects, even empty ones


def _is_number(value: object) -> bool:
    """``typeof v === 'number' && !Number.isNaN(v)``."""
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


def _js_keys(value: object) -> list[str]:
    """``Object.keys(body)``: integer-like keys first, ascending, then the rest in order."""
    if isinstance(value, list):
        return [str(i) for i in range(len(value))]
    if isinstance(value, str):
        return [str(i) for i in range(len(value.encode("utf-16-le", "surrogatepass")) // 2)]
    if not isinstance(value, dict):
        return []

    def index(key: str) -> bool:
        return key.isascii() and key.isdigit() and (key == "0" or key[0] != "0") and int(key) < 2**32 - 1

    return sorted((k for k in value if index(k)), key=int) + [k for k in value if not index(k)]


_B64_KEEP: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_DROP: Final = bytes(c for c in range(256) if c not in _B64_KEEP)
_URL_SAFE: Final = bytes.maketrans(b"-_", b"+/")


def node_base64(text: str) -> tuple[bytes, bool]:
    """Decode like Node's ``Buffer.from(text, 'base64')``; also say whether ``text`` was strict base64.

    Node reads each UTF-16 unit's low byte, takes the URL-safe alphabet too, skips every other character,
    stops at the first ``=``, and decodes a trailing partial group (a lone last character gives nothing).
    """
    try:
        return binascii.a2b_base64(text, strict_mode=True), True
    except (binascii.Error, ValueError):  # ValueError: not ASCII
        pass
    units = text.encode("utf-16-le", "surrogatepass")[::2].translate(_URL_SAFE).partition(b"=")[0]
    units = units.translate(None, _B64_DROP)
    if len(units) % 4 == 1:
        units = units[:-1]
    return binascii.a2b_base64(units + b"=" * (-len(units) % 4)), False


def _uint8(value: object) -> int:
    """An array entry as ``Buffer.from(array)`` stores it (ToNumber, then modulo 256); entries that are
    not numbers, booleans or null count as 0 (JavaScript would also convert numeric strings)."""
    if not isinstance(value, int | float):  # bool is an int; None -> 0
        return 0
    try:
        number = float(value)
    except OverflowError:  # an integer past a double's range is Infinity in JavaScript
        return 0
    return int(number) % 256 if math.isfinite(number) else 0


# --- CSV ---------------------------------------------------------------------------------------------


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
    """One header, then every chunk's data lines in order (a chunk need not end with a newline: the
    Node server joins its lines with ``\\n`` and adds none at the end)."""
    header = chunks[0].partition(b"\n")[0]
    bodies = [c.partition(b"\n")[2] for c in chunks]
    return header + b"\n" + b"".join(b if not b or b.endswith(b"\n") or i == len(bodies) - 1 else b + b"\n"
                                     for i, b in enumerate(bodies))
