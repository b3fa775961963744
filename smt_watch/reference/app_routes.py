"""The web app's SMT read routes and interval table, for the reference receiver (issue 26).

Stands in for what IntelliWatt does with a raw-upload chunk after accepting it, and for the admin routes
that read the result, so ``smt-watch verify`` can be proven against real HTTP:

- ``POST /api/admin/smt/raw-upload`` (observed, or answered when there is no inner receiver): the chunk's
  content goes through the app's own parser (:mod:`smt_watch.expect`), intervals outside the coverage
  window of *this process's* today are dropped (:mod:`smt_watch.window`: the wall clock, so tests move it
  with libfaketime), and per ESIID and meter the chunk's kept range is deleted and re-inserted, as
  ``replaceNormalizedSmtIntervals`` does. A duplicate ``sha256`` is normalized again, as there. With
  ``postIngest: true``, a deferred post-ingest task row is queued per ESIID whose intervals survived.
- ``POST /api/admin/smt/pull`` with ``mode: "inline"`` (observed: only the receiver's ``--dev-inline`` accepts
  it, production answers ``INLINE_DISABLED``): the whole file as the inline route stores it
  (:func:`smt_watch.expect.inline_points`: no window, nothing deleted, the table's own meter for an ESIID it
  holds under one meter, slots it holds left as they were).
- ``GET /api/admin/analysis/intervals?esiid&meter&date&tz``, ``GET /api/admin/smt/interval-coverage?esiid``,
  ``GET /api/admin/debug/smt/raw-files?limit&esiid&source``: the real routes' parameters, shapes, status
  codes and ``requireAdmin`` gate (no token configured: 503; a wrong one: 401).
- ``POST /_app/faults`` (ours, for tests): make a read route slow, answer a status, or be absent (404).

:class:`AppRoutes` wraps the receiver's ASGI app (``AppRoutes(create_app(...), AppStore(dir), token)``);
``python -m smt_watch.reference.app_server`` runs the wrapped receiver in the foreground for tests and demos.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import math
import sqlite3
import threading
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Final, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from smt_watch.expect import AppModel, chunk_lines, inline_points, normalize_chunk, stored_kwh
from smt_watch.window import Window, coverage_window

T = TypeVar("T")
log = logging.getLogger("smt_watch.reference.app")

RAW_UPLOAD_PATH: Final = "/api/admin/smt/raw-upload"
PULL_PATH: Final = "/api/admin/smt/pull"
INTERVALS_PATH: Final = "/api/admin/analysis/intervals"
COVERAGE_PATH: Final = "/api/admin/smt/interval-coverage"
RAW_FILES_PATH: Final = "/api/admin/debug/smt/raw-files"
FAULTS_PATH: Final = "/_app/faults"
READ_ROUTES: Final = {INTERVALS_PATH: "intervals", COVERAGE_PATH: "coverage", RAW_FILES_PATH: "raw-files"}
DEFERRED_POST_INGEST_SOURCE: Final = "smt-post-ingest-deferred"
TZ_BUILD_ID: Final = "smt-watch-reference"
_SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS SmtInterval (esiid TEXT NOT NULL, meter TEXT NOT NULL, ts INTEGER NOT NULL,
        kwh TEXT NOT NULL, source TEXT, PRIMARY KEY (esiid, meter, ts))""",
    """CREATE TABLE IF NOT EXISTS RawSmtFile (id INTEGER PRIMARY KEY AUTOINCREMENT, filename TEXT NOT NULL,
        size_bytes INTEGER NOT NULL, sha256 TEXT NOT NULL UNIQUE, created_at TEXT NOT NULL, received_at TEXT,
        source TEXT, storage_path TEXT, content_type TEXT)""",
)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _now_iso(now: datetime) -> str:
    return now.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class AppStore:
    """``SmtInterval`` and ``RawSmtFile`` in SQLite (``app.sqlite3`` in the data dir); thread-safe."""

    def __init__(self, data_dir: Path, now: Callable[[], datetime] | None = None) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(data_dir / "app.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        self.now = now or (lambda: datetime.now(UTC))  # the wall clock: libfaketime moves it in tests
        with self._lock:
            for sql in _SCHEMA:
                self._db.execute(sql)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def window(self) -> Window:
        return coverage_window(self.now())

    # --- the raw-upload route, after its validation ---------------------------------------------------

    def ingest(self, body: dict[str, Any]) -> dict[str, Any]:
        """What the route does with an accepted chunk: the ``RawSmtFile`` row (once per sha256), then the
        intervals the window keeps, then post-ingest tasks. Returns a summary like ``normalizedInline``."""
        now = self.now()
        filename = str(body.get("filename"))
        sha256 = str(body.get("sha256"))
        source = body.get("source") if isinstance(body.get("source"), str) else "adhocusage"
        esiid = body["esiid"].strip() if isinstance(body.get("esiid"), str) and body["esiid"].strip() else None
        meter = body["meter"].strip() if isinstance(body.get("meter"), str) and body["meter"].strip() else None
        storage = body.get("storagePath") or body.get("storage_path") or f"/adhocusage/{filename}"
        content_type = body.get("contentType") or body.get("content_type") or "application/octet-stream"
        received = body.get("receivedAt") or body.get("received_at")
        size = body.get("sizeBytes", body.get("size_bytes"))
        content = _loose_base64(body.get("contentBase64"))
        window = coverage_window(now)
        summary = self._with_raw_file_row(
            (filename, int(size) if isinstance(size, (int, float)) and math.isfinite(size) else 0, sha256,
             _now_iso(now), str(received) if received else _now_iso(now), source, str(storage), str(content_type)),
            lambda: self._normalize(content, esiid, meter, str(source), window, body.get("postIngest") is True, now)
            if content else None)
        return {"normalizedInline": summary}

    def _with_raw_file_row(self, row: tuple[object, ...], then: Callable[[], T]) -> T:
        """The ``RawSmtFile`` row (a duplicate sha256 keeps the first) and what the route then stores, in one
        transaction."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT OR IGNORE INTO RawSmtFile (filename, size_bytes, sha256, created_at, received_at, source,"
                    " storage_path, content_type) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row)
                result = then()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return result

    def ingest_inline(self, body: dict[str, Any]) -> dict[str, Any]:
        """What the inline route (``mode: "inline"``, the app in development) does with an accepted file: the
        ``RawSmtFile`` row, then ``persistParsedNormalizedSmtIntervals`` over the whole file: no window,
        nothing deleted, one canonical meter per ESIID (the one the app already holds, if exactly one),
        slots the app already holds left as they were (``dualWriteUsageIntervals``)."""
        now = self.now()
        content = _loose_base64(body.get("content_b64"))
        if body.get("encoding") == "base64+gzip":
            try:
                content = zlib.decompress(content, 16 + zlib.MAX_WBITS)
            except zlib.error:
                return {"intervalNormalized": False}
        esiid = body["esiid"].strip().strip("'").strip() if isinstance(body.get("esiid"), str) else ""
        meter = body["meter"].strip() if isinstance(body.get("meter"), str) and body["meter"].strip() else None
        source = str(body.get("source") or "adhocusage").strip() or "adhocusage"
        filename = str(body.get("filename") or "adhoc.csv").strip().lstrip("/\\")
        records = self._with_raw_file_row(
            (filename, len(content), hashlib.sha256(content).hexdigest(), _now_iso(now), _now_iso(now), source,
             f"/{source}/{filename}", str(body.get("mime") or "text/csv")),
            lambda: self._persist_inline(inline_points(chunk_lines(content), esiid or None, meter), source))
        return {"intervalNormalized": True, "records": records}

    def _persist_inline(self, points: dict[tuple[str, str], dict[int, Decimal]], source: str) -> int:
        """``dualWriteUsageIntervals`` against what the table holds already (``points`` are grouped under
        the file's own canonical meter; the table's meters for the ESIID decide the final one)."""
        records = 0
        for (esiid, incoming), slots in points.items():
            existing = [r[0] for r in self._db.execute(
                "SELECT DISTINCT meter FROM SmtInterval WHERE esiid = ? LIMIT 10", (esiid,)).fetchall()]
            real = [m for m in existing if m != "unknown"]
            canonical = existing[0] if len(existing) == 1 else real[0] if real else incoming
            if existing == ["unknown"] and canonical != "unknown":
                self._db.execute("UPDATE OR IGNORE SmtInterval SET meter = ? WHERE esiid = ? AND meter = 'unknown'",
                                 (canonical, esiid))
            if "unknown" in existing and real:
                self._db.execute("DELETE FROM SmtInterval WHERE esiid = ? AND meter = 'unknown' AND ts IN (SELECT ts"
                                 " FROM SmtInterval WHERE esiid = ? AND meter <> 'unknown')", (esiid, esiid))
            cur = self._db.executemany(
                "INSERT OR IGNORE INTO SmtInterval (esiid, meter, ts, kwh, source) VALUES (?, ?, ?, ?, ?)",
                [(esiid, canonical, ms, str(k), source) for ms, k in slots.items()])
            records += max(0, cur.rowcount)
        return records

    def _normalize(self, content: bytes, esiid: str | None, meter: str | None, source: str, window: Window,
                   post_ingest: bool, now: datetime) -> dict[str, Any]:
        model = AppModel()
        pairs = normalize_chunk(chunk_lines(content), esiid, meter)
        kept_esiids: set[str] = set()
        records = 0
        for (e, m), slots in pairs.items():
            e, m = e.strip(), m.strip()
            kept = {ms: stored_kwh(kwh) for ms, kwh in slots.items() if model.day_of(ms) in window}
            if not kept or not e or not m:
                continue
            kept_esiids.add(e)
            records += len(kept)
            self._db.execute("DELETE FROM SmtInterval WHERE esiid = ? AND meter = ? AND ts BETWEEN ? AND ?",
                             (e, m, min(kept), max(kept)))
            self._db.executemany("INSERT INTO SmtInterval (esiid, meter, ts, kwh, source) VALUES (?, ?, ?, ?, ?)",
                                 [(e, m, ms, str(k), source) for ms, k in kept.items()])
        queued = 0
        if post_ingest and kept_esiids:
            queued = self._enqueue_post_ingest(sorted(kept_esiids), window, now)
        return {"inserted": records, "records": records, "postIngestDeferred": post_ingest,
                "deferredTasksEnqueued": queued}

    def _enqueue_post_ingest(self, esiids: list[str], window: Window, now: datetime) -> int:
        """``enqueueDeferredPostIngestTasks``: one ``RawSmtFile`` row per ESIID and window, never twice."""
        start = datetime(window.start.year, window.start.month, window.start.day, tzinfo=ZoneInfo("America/Chicago"))
        end_day = window.end + timedelta(days=1)
        end = datetime(end_day.year, end_day.month, end_day.day, tzinfo=ZoneInfo("America/Chicago"))
        queued = 0
        for esiid in esiids:
            task = {"esiid": esiid, "rangeStartIso": _now_iso(start),
                    "rangeEndIso": _now_iso(end - timedelta(milliseconds=1))}
            path = "deferred-post-ingest://" + base64.urlsafe_b64encode(
                json.dumps(task, separators=(",", ":")).encode()).decode().rstrip("=")
            cur = self._db.execute(
                "INSERT OR IGNORE INTO RawSmtFile (filename, size_bytes, sha256, created_at, received_at, source,"
                " storage_path, content_type) VALUES (?, 0, ?, ?, ?, ?, ?, 'application/json')",
                (f"deferred-post-ingest-{esiid}-{task['rangeEndIso'][:10]}.json",
                 hashlib.sha256(path.encode()).hexdigest(), _now_iso(now), _now_iso(now),
                 DEFERRED_POST_INGEST_SOURCE, path))
            queued += max(0, cur.rowcount)
        return queued

    # --- what the read routes read ----------------------------------------------------------------------

    def day_rows(self, esiid: str, meter: str, start_ms: int, end_ms: int, limit: int) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(
                "SELECT ts, kwh, source FROM SmtInterval WHERE esiid = ? AND meter = ? AND ts >= ? AND ts < ?"
                " ORDER BY ts LIMIT ?", (esiid, meter, start_ms, end_ms, limit)).fetchall()

    def coverage(self, esiid: str) -> tuple[int, int | None, int | None]:
        with self._lock:
            row = self._db.execute("SELECT COUNT(*), MIN(ts), MAX(ts) FROM SmtInterval WHERE esiid = ?",
                                   (esiid,)).fetchone()
        return int(row[0]), row[1], row[2]

    def raw_files(self, limit: int, esiid: str | None, source: str | None) -> list[dict[str, Any]]:
        sql, params = "SELECT * FROM RawSmtFile WHERE 1=1", []
        if source:
            sql += " AND source = ?"
            params.append(source)
        if esiid:
            sql += " AND (instr(filename, ?) > 0 OR instr(COALESCE(storage_path, ''), ?) > 0)"
            params += [esiid, esiid]
        sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
        with self._lock:
            rows = self._db.execute(sql, (*params, limit)).fetchall()
        return [{"id": str(r["id"]), "filename": r["filename"], "sizeBytes": r["size_bytes"], "sha256": r["sha256"],
                 "createdAt": r["created_at"], "receivedAt": r["received_at"], "source": r["source"],
                 "storagePath": r["storage_path"], "contentType": r["content_type"]} for r in rows]

    def post_ingest_tasks(self) -> list[str]:
        """The ESIIDs with a queued post-ingest task (for tests)."""
        with self._lock:
            rows = self._db.execute("SELECT filename FROM RawSmtFile WHERE source = ? ORDER BY id",
                                    (DEFERRED_POST_INGEST_SOURCE,)).fetchall()
        return [r[0].removeprefix("deferred-post-ingest-").rsplit("-", 3)[0] for r in rows]


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None when the client went away first."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _accepted(reply: bytes) -> bool:
    try:
        answer = json.loads(reply)
    except ValueError:
        return False
    return isinstance(answer, dict) and answer.get("ok") is not False


def _loose_base64(value: object) -> bytes:
    """``Buffer.from(x, 'base64')``: non-alphabet characters skipped, missing padding tolerated."""
    if not isinstance(value, str) or not value:
        return b""
    cleaned = "".join(c for c in value.replace("-", "+").replace("_", "/")
                      if c.isascii() and (c.isalnum() or c in "+/"))
    cleaned = cleaned[: len(cleaned) - len(cleaned) % 4 + (len(cleaned) % 4 if len(cleaned) % 4 > 1 else 0)]
    try:
        return base64.b64decode(cleaned + "=" * (-len(cleaned) % 4))
    except (binascii.Error, ValueError):
        return b""


@dataclass
class RouteFault:
    """What a read route does instead of answering (tests): wait, answer a status, or not exist."""

    delay: float = 0.0
    status: int | None = None
    absent: bool = False


def _js_number(text: str | None, default: float) -> float:
    if text is None or text == "":
        return default
    try:
        return float(text.strip()) if text.strip() else 0.0
    except ValueError:
        return math.nan


class AppRoutes:
    """ASGI wrapper: the read routes and the fault control answered here, raw-upload observed on its way to
    ``inner`` (or answered here when there is none), everything else passed to ``inner``."""

    def __init__(self, inner: ASGIApp | None, store: AppStore, admin_token: str | None) -> None:
        self.inner = inner
        self.store = store
        self.admin_token = admin_token
        self.faults: dict[str, RouteFault] = {}
        self.reads = 0  # read requests answered (tests measure verify's load with it)

    @property
    def state(self) -> Any:
        """The wrapped receiver's ``app.state``, so code holding the wrapper finds ``state.receiver`` as before."""
        return getattr(self.inner, "state", None)

    def close(self) -> None:
        self.store.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if self.inner is not None:
                await self.inner(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        if path in READ_ROUTES and method == "GET":
            response = await self._read(Request(scope, receive), READ_ROUTES[path])
        elif path == FAULTS_PATH and method == "POST":
            response = await self._set_faults(Request(scope, receive))
        elif path == RAW_UPLOAD_PATH and method == "POST":
            await self._raw_upload(scope, receive, send)
            return
        elif path == PULL_PATH and method == "POST" and self.inner is not None:
            await self._pull(scope, receive, send)
            return
        elif self.inner is not None:
            await self.inner(scope, receive, send)
            return
        else:
            response = JSONResponse({"error": "Not Found"}, status_code=404)
        await response(scope, receive, send)

    def _gate(self, request: Request) -> JSONResponse | None:
        """``requireAdmin``."""
        if not self.admin_token:
            return JSONResponse({"error": "ADMIN_TOKEN not configured"}, status_code=503)
        if request.headers.get("x-admin-token", "").strip() != self.admin_token:
            return JSONResponse({"error": "Unauthorized"}, status_code=401)
        return None

    async def _raw_upload(self, scope: Scope, receive: Receive, send: Send) -> None:
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        raw = b"".join(chunks)
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {}
        if self.inner is None:
            request = Request(scope)
            refused = self._gate(request) or _validate(body)
            if refused is not None:
                await refused(scope, receive, send)
                return
            summary = await run_in_threadpool(self.store.ingest, body)
            await JSONResponse({"ok": True, "sha256": body.get("sha256"), **summary})(scope, receive, send)
            return
        async def accepted(reply: bytes) -> None:
            if isinstance(body, dict):
                await self._after_accept(reply, body)

        await self._observe(scope, raw, send, accepted)

    async def _pull(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The inline route, observed: an accepted ``mode: "inline"`` file is normalized as the app does."""
        raw = await _read_body(receive)
        if raw is None:
            return
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {}

        async def accepted(reply: bytes) -> None:
            if isinstance(body, dict) and body.get("mode") == "inline" and _accepted(reply):
                await run_in_threadpool(self.store.ingest_inline, body)

        await self._observe(scope, raw, send, accepted)

    async def _observe(self, scope: Scope, raw: bytes, send: Send,
                       accepted: Callable[[bytes], Awaitable[None]]) -> None:
        """Pass the request (its body already read) to the receiver and watch its answer: a 200's whole reply
        goes to ``accepted`` before it is sent on, so the app's store holds the file once the client sees ok."""
        status: list[int] = []
        reply: list[bytes] = []
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if delivered:
                return {"type": "http.disconnect"}
            delivered = True
            return {"type": "http.request", "body": raw, "more_body": False}

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            elif message["type"] == "http.response.body":
                reply.append(message.get("body", b""))
                if not message.get("more_body", False) and status and status[0] == 200:
                    await accepted(b"".join(reply))
            await send(message)

        assert self.inner is not None
        await self.inner(scope, replay, capture)

    async def _after_accept(self, reply: bytes, body: dict[str, Any]) -> None:
        try:
            answer = json.loads(reply)
        except ValueError:
            return
        if isinstance(answer, dict) and answer.get("ok") is not False:
            await run_in_threadpool(self.store.ingest, body)

    async def _set_faults(self, request: Request) -> Response:
        obj = await request.json()
        if obj.get("clear"):
            self.faults.clear()
            return JSONResponse({"ok": True})
        names = list(READ_ROUTES.values()) if obj.get("route", "all") == "all" else [obj["route"]]
        for name in names:
            self.faults[name] = RouteFault(float(obj.get("delaySeconds", 0)), obj.get("status"),
                                           bool(obj.get("absent", False)))
        return JSONResponse({"ok": True})

    async def _read(self, request: Request, name: str) -> Response:
        fault = self.faults.get(name)
        if fault is not None:
            if fault.delay:
                await asyncio.sleep(fault.delay)  # a slow app, not synchronisation
            if fault.absent:
                return Response("Not Found", status_code=404)
            if fault.status is not None:
                return JSONResponse({"ok": False, "error": f"injected {fault.status}"}, status_code=fault.status)
        refused = self._gate(request)
        if refused is not None:
            return refused
        self.reads += 1
        q = request.query_params
        if name == "intervals":
            return await run_in_threadpool(self._intervals, q.get("esiid") or "", q.get("meter") or "",
                                           q.get("date"), q.get("tz") or "America/Chicago", q.get("limit"))
        if name == "coverage":
            return await run_in_threadpool(self._coverage, (q.get("esiid") or "").strip())
        return await run_in_threadpool(self._raw_files, q.get("limit"), q.get("esiid"), q.get("source"))

    def _intervals(self, esiid: str, meter: str, day_text: str | None, tz: str, limit_text: str | None) -> Response:
        if not esiid or not meter:
            return JSONResponse({"ok": False, "error": "MISSING_KEYS", "details": "esiid and meter are required",
                                 "tzBuild": TZ_BUILD_ID}, status_code=400)
        if not day_text:
            return JSONResponse({"ok": False, "error": "MISSING_DATE", "details": "date (YYYY-MM-DD) is required",
                                 "tzBuild": TZ_BUILD_ID}, status_code=400)
        try:
            zone = ZoneInfo(tz)
            day = date.fromisoformat(day_text)
        except (ValueError, ZoneInfoNotFoundError):
            return JSONResponse({"ok": False, "error": "BAD_DATE", "details": "Invalid date or tz",
                                 "tzBuild": TZ_BUILD_ID}, status_code=400)
        limit = _js_number(limit_text, 5000)
        limit = min(limit, 50000)
        start = datetime(day.year, day.month, day.day, tzinfo=zone)
        following = day + timedelta(days=1)
        end = datetime(following.year, following.month, following.day, tzinfo=zone)
        expected = round((end.timestamp() - start.timestamp()) / 900)
        rows = self.store.day_rows(esiid, meter, int(start.timestamp() * 1000), int(end.timestamp() * 1000),
                                   int(limit) if math.isfinite(limit) and limit > 0 else 5000)
        kwh_total = float(sum((Decimal(r["kwh"]) for r in rows), Decimal(0)))
        return JSONResponse({
            "ok": True, "tzBuild": TZ_BUILD_ID, "esiid": esiid, "meter": meter, "tz": tz, "date": day_text,
            "expected": expected, "actual": len(rows), "missing": max(0, expected - len(rows)),
            "kwhTotal": kwh_total, "filledCount": 0,
            "points": [{"ts": _iso(r["ts"]), "kwh": float(r["kwh"]), "filled": False, "source": r["source"]}
                       for r in rows],
        })

    def _coverage(self, esiid: str) -> Response:
        if not esiid:
            return JSONResponse({"ok": False, "error": "ESIID_REQUIRED"}, status_code=400)
        rows, lo, hi = self.store.coverage(esiid)
        days = (hi - lo) // 86_400_000 + 1 if lo is not None and hi is not None else 0
        return JSONResponse({"ok": True, "esiid": esiid, "smtInterval": {
            "rows": rows, "minTs": _iso(lo) if lo is not None else None,
            "maxTs": _iso(hi) if hi is not None else None, "daysCovered": days}})

    def _raw_files(self, limit_text: str | None, esiid: str | None, source: str | None) -> Response:
        limit = min(max(_js_number(limit_text, 5), 1), 100)
        if math.isnan(limit):
            return JSONResponse({"ok": False, "error": "DB", "details": "take must be a number"}, status_code=500)
        rows = self.store.raw_files(int(limit), esiid.strip() if esiid and esiid.strip() else None,
                                    source if source and source != "all" else None)
        return JSONResponse({"ok": True, "count": len(rows), "rows": rows})


def _validate(body: object) -> JSONResponse | None:
    """The real route's required fields (when there is no inner receiver to judge them)."""
    obj = body if isinstance(body, dict) else {}
    missing = []
    if not obj.get("filename"):
        missing.append("filename (string)")
    size = obj.get("sizeBytes", obj.get("size_bytes"))
    if not isinstance(size, (int, float)) or isinstance(size, bool) or (isinstance(size, float) and math.isnan(size)):
        missing.append("size_bytes|sizeBytes (number)")
    if not obj.get("sha256"):
        missing.append("sha256 (string)")
    if missing:
        return JSONResponse({"ok": False, "error": "VALIDATION", "details": "Missing or invalid required fields",
                             "missing": missing, "receivedKeys": list(obj)}, status_code=400)
    return None


def wrap(inner: ASGIApp, data_dir: Path, admin_token: str | None) -> AppRoutes:
    """The one-line hook for the reference receiver: ``app = wrap(app, data_dir, admin_token)``."""
    return AppRoutes(inner, AppStore(data_dir), admin_token)
