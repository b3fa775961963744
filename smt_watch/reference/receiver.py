"""Reference receiver: a local stand-in for the IntelliWatt web app and the droplet upload server.

It accepts the delivery shapes of docs/contract.md §4 (inline JSON on ``/api/admin/smt/pull``, multipart on
``/upload``, raw-upload chunks by the real route's rules, see :mod:`smt_watch.reference.receiver_raw`), stores each
distinct file once (content by SHA-256 plus a ``RawSmtFile`` row in SQLite) and answers like the real
services, so demos and tests exercise the real client code over real HTTP. For tests it records every
delivery request and can inject faults (status, ``Retry-After``, delay, dropped connection) one request
at a time, in order.

As production runs (IntelliWatt on Vercel, ``NODE_ENV=production``):

- a body over :data:`~smt_watch.delivery.base.MAX_REQUEST_BYTES` (4.5 MB) to an app route (inline, raw-upload)
  is answered ``413`` with Vercel's ``FUNCTION_PAYLOAD_TOO_LARGE`` before the route runs;
- the inline route answers ``400 HOME_ID_REQUIRED`` when the body has no ``homeId`` and its ESIID matches no
  house (``homes``; None: every non-blank ESIID has one), then ``400 INLINE_DISABLED``, as
  ``app/api/admin/smt/pull/route.ts`` does. ``inline=True`` (``receive --dev-inline``) is the app under
  ``NODE_ENV=development``: inline files are stored.
- raw-upload keeps each chunk's text, ``source`` and ``storagePath`` (``/_receiver/chunks``).
"""

from __future__ import annotations

import asyncio
import binascii
import collections
import contextlib
import hashlib
import hmac
import json
import logging
import os
import socket
import sqlite3
import tempfile
import threading
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from smt_watch.clock import utc_stamp
from smt_watch.delivery.base import MAX_REQUEST_BYTES
from smt_watch.errors import MalformedUpload, UploadTooLarge
from smt_watch.reference.receiver_raw import Mismatch, RawMismatch, RawStore, handle_chunk
from smt_watch.uploads import read_multipart

log = logging.getLogger("smt_watch.receiver")  # the name its log lines have always carried

PULL_PATH = "/api/admin/smt/pull"
UPLOAD_PATH = "/upload"
RAW_UPLOAD_PATH = "/api/admin/smt/raw-upload"
ENCODINGS = ("base64", "base64+gzip")
_SCHEMA = """CREATE TABLE IF NOT EXISTS RawSmtFile (
    id INTEGER PRIMARY KEY, filename TEXT NOT NULL, sha256 TEXT NOT NULL UNIQUE, sizeBytes INTEGER NOT NULL,
    source TEXT, esiid TEXT, meter TEXT, captured_at TEXT, received_at TEXT NOT NULL, route TEXT NOT NULL,
    path TEXT NOT NULL)"""


@dataclass(frozen=True)
class Fault:
    """What to do to the next delivery request instead of (or before) handling it normally.

    ``delay`` is always applied first; then ``drop`` wins over ``status``; a fault with neither only
    delays the request, which is then handled normally. ``release`` (in-process tests only, never from
    JSON): the request is held until the test sets it (at most 120 s), not for a fixed time."""

    status: int | None = None
    delay: float = 0.0
    retry_after: str | None = None
    drop: bool = False
    body: dict[str, Any] | None = None
    release: threading.Event | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_json(cls, obj: object) -> Fault:
        """Build from the control route's JSON, refusing anything that would be silently ignored."""
        if not isinstance(obj, dict) or not set(obj) <= {"status", "delay", "retry_after", "drop", "body"}:
            raise ValueError(f"not a fault object: {obj!r}")
        status, delay, retry_after = obj.get("status"), obj.get("delay", 0.0), obj.get("retry_after")
        if status is not None and (type(status) is not int or not 100 <= status <= 599):
            raise ValueError(f"bad status {status!r}")
        if type(delay) not in (int, float) or delay < 0:
            raise ValueError(f"bad delay {delay!r}")
        if retry_after is not None and type(retry_after) not in (str, int):
            raise ValueError(f"bad retry_after {retry_after!r}")
        if type(obj.get("drop", False)) is not bool or not isinstance(obj.get("body") or {}, dict):
            raise ValueError("drop must be a boolean and body an object")
        return cls(status, float(delay), None if retry_after is None else str(retry_after),
                   obj.get("drop", False), obj.get("body"))


@dataclass(frozen=True)
class RequestRecord:
    """One delivery request as the receiver saw it; ``status`` is None when no response reached the
    client (injected drop, client disconnect). ``fields`` holds the form fields or the inline JSON
    without its content, so tests can assert the metadata a client sent."""

    path: str
    status: int | None
    arrived: float
    fault: Fault | None
    sha256: str | None
    duplicate: bool | None
    headers: dict[str, str]
    fields: dict[str, Any] = field(default_factory=dict)


class FileStore:
    """Content-addressed files plus their ``RawSmtFile`` rows; every method is thread-safe."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.files_dir = data_dir / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(data_dir / "receiver.sqlite3", check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        with self._lock, self._db:
            self._db.execute(_SCHEMA)

    def lookup(self, sha256: str) -> int | None:
        with self._lock:
            row = self._db.execute("SELECT id FROM RawSmtFile WHERE sha256 = ?", (sha256,)).fetchone()
        return None if row is None else int(row["id"])

    def add(self, tmp_path: Path, sha256: str, size: int, meta: dict[str, str | None]) -> tuple[int, bool]:
        """Publish ``tmp_path`` (consumed either way) as ``files/<sha256>``; returns ``(id, duplicate)``.

        The file is renamed into place before its row is committed, so a row never points at nothing."""
        with self._lock:
            row = self._db.execute("SELECT id FROM RawSmtFile WHERE sha256 = ?", (sha256,)).fetchone()
            if row is not None:
                tmp_path.unlink(missing_ok=True)
                return int(row["id"]), True
            final = self.files_dir / sha256
            try:
                os.replace(tmp_path, final)
            except BaseException:
                tmp_path.unlink(missing_ok=True)
                raise
            with self._db:
                cur = self._db.execute(
                    "INSERT INTO RawSmtFile (filename, sha256, sizeBytes, source, esiid, meter,"
                    " captured_at, received_at, route, path) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (meta["filename"] or "", sha256, size, meta["source"], meta["esiid"], meta["meter"],
                     meta["captured_at"], utc_stamp(digits=6),
                     meta["route"] or "", str(final)),
                )
            assert cur.lastrowid is not None
            return cur.lastrowid, False

    def add_bytes(self, content: bytes, sha256: str, meta: dict[str, str | None]) -> tuple[int, bool]:
        """Store in-memory content (the inline route) through the same temp-file-and-rename path."""
        existing = self.lookup(sha256)
        if existing is not None:
            return existing, True
        fd, name = tempfile.mkstemp(prefix=".inline-", suffix=".part", dir=self.data_dir)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(content)
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        return self.add(Path(name), sha256, len(content), meta)

    def rows(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._db.execute("SELECT * FROM RawSmtFile ORDER BY id")]

    def read(self, sha256: str) -> bytes:
        if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256: {sha256!r}")
        return (self.files_dir / sha256).read_bytes()

    def close(self) -> None:
        with self._lock:
            self._db.close()


class ReceiverState:
    """Everything the app shares with tests; tests may append ``Fault``s to ``faults`` directly."""

    def __init__(self, data_dir: Path, admin_token: str | None, upload_token: str | None,
                 max_upload_bytes: int | None, *, inline: bool = False, homes: frozenset[str] | None = None,
                 max_body_bytes: int | None = MAX_REQUEST_BYTES) -> None:
        self.data_dir = data_dir
        self.admin_token = admin_token
        self.upload_token = upload_token
        self.max_upload_bytes = max_upload_bytes
        self.inline = inline  # NODE_ENV=development: the inline route stores files (production refuses them)
        self.homes = homes  # ESIIDs that have a house (None: every non-blank one)
        self.max_body_bytes = max_body_bytes  # Vercel's request limit on the app routes (None: no limit)
        self.faults: collections.deque[Fault] = collections.deque()
        self.requests: list[RequestRecord] = []
        self.store = FileStore(data_dir)
        self.raw = RawStore(data_dir)
        self.raw_mismatches: list[RawMismatch] = []  # what raw-upload let through, as the real route would
        self._changed = threading.Condition()

    def record(self, rec: RequestRecord) -> None:
        with self._changed:
            self.requests.append(rec)
            self._changed.notify_all()

    def wait_for_requests(self, count: int, timeout: float = 10.0) -> list[RequestRecord]:
        """Block until at least ``count`` delivery requests were answered (for background clients)."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.requests) >= count, timeout):
                raise TimeoutError(f"{len(self.requests)} of {count} requests after {timeout}s")
            return list(self.requests)


class _Problem(Exception):
    """A client error answered as ``{"ok": false, "error": code, "detail": ...}``."""

    def __init__(self, status: int, code: str, detail: str = "") -> None:
        super().__init__(detail or code)
        self.status, self.code, self.detail = status, code, detail

    def response(self) -> JSONResponse:
        body: dict[str, Any] = {"ok": False, "error": self.code}
        if self.detail:
            body["detail"] = self.detail
        return JSONResponse(body, status_code=self.status)


@dataclass
class _Outcome:
    sha256: str | None = None
    duplicate: bool | None = None
    fields: dict[str, Any] = field(default_factory=dict)


class _DroppedResponse(Response):
    """Promise a body, send none, and return: uvicorn then closes the socket mid-response, which the
    client sees as a peer that vanished (httpx ``RemoteProtocolError``: incomplete message body)."""

    def __init__(self) -> None:
        super().__init__(status_code=200)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", b"1024")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})


class _TooLarge(Exception):
    """The body passed Vercel's limit: answered 413 before the route runs."""


async def _app_body(request: Request, state: ReceiverState) -> bytes:
    """The body of a request to an app route, read whole (as the route does) up to Vercel's limit; past it
    the rest is drained, so the client reads the 413 instead of a broken pipe."""
    limit = state.max_body_bytes
    if limit is None:
        return await request.body()
    parts: list[bytes] = []
    size = 0
    async for piece in request.stream():
        size += len(piece)
        if size <= limit:
            parts.append(piece)
    if size > limit:
        raise _TooLarge(size)
    return b"".join(parts)


def _too_large() -> Response:
    """What Vercel answers for a body over 4.5 MB (text, not the route's JSON)."""
    return Response("Request Entity Too Large\n\nFUNCTION_PAYLOAD_TOO_LARGE\n", status_code=413,
                    media_type="text/plain", headers={"x-vercel-error": "FUNCTION_PAYLOAD_TOO_LARGE"})


def _authorized(sent: str | None, expected: str | None) -> bool:
    if expected is None:
        return True
    return sent is not None and hmac.compare_digest(sent.encode(), expected.encode())


def _check_hashes(actual: str, *claimed: str | None) -> None:
    for value in claimed:
        if value is not None and value.strip().lower() != actual:
            raise _Problem(400, "SHA256_MISMATCH", f"content sha256 is {actual}, client said {value.strip()}")


def _stored(sha256: str, id_: int, size: int, duplicate: bool, outcome: _Outcome) -> JSONResponse:
    outcome.sha256, outcome.duplicate = sha256, duplicate
    return JSONResponse({"ok": True, "id": id_, "sha256": sha256, "sizeBytes": size, "duplicate": duplicate})


Handler = Callable[[Request, ReceiverState, _Outcome], Awaitable[Response]]


def _delivery(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """Wrap a delivery route: apply the next fault first, then record what happened."""

    async def endpoint(request: Request) -> Response:
        state: ReceiverState = request.app.state.receiver
        arrived = time.monotonic()
        fault = state.faults.popleft() if state.faults else None
        outcome = _Outcome()
        response: Response | None = None
        try:
            if fault is not None:
                log.info("fault for %s: %s", request.url.path, fault)
                if fault.delay:
                    await asyncio.sleep(fault.delay)
                if fault.release is not None:
                    await asyncio.to_thread(fault.release.wait, 120)
                if fault.drop:
                    async for _ in request.stream():  # drain: the client must be reading, not writing
                        pass
                    return _DroppedResponse()
                if fault.status is not None:
                    extra = {"Retry-After": fault.retry_after} if fault.retry_after is not None else None
                    response = JSONResponse(fault.body if fault.body is not None else
                                            {"ok": False, "error": "injected"}, fault.status, headers=extra)
                    return response
            try:
                response = await handler(request, state, outcome)
            except _Problem as problem:
                response = problem.response()
            except _TooLarge as exc:
                log.warning("%s: a %s-byte body is over the %s-byte limit: 413", request.url.path, exc.args[0],
                            state.max_body_bytes)
                response = _too_large()
            return response
        except ClientDisconnect:
            log.warning("client disconnected during %s", request.url.path)
            return Response(status_code=400)  # never reaches anyone; uvicorn drops it
        except Exception:
            log.exception("receiver error on %s", request.url.path)
            response = JSONResponse({"ok": False, "error": "internal"}, status_code=500)
            return response
        finally:
            state.record(RequestRecord(
                path=request.url.path, status=None if response is None else response.status_code,
                arrived=arrived, fault=fault, sha256=outcome.sha256, duplicate=outcome.duplicate,
                headers={k.lower(): v for k, v in request.headers.items()}, fields=outcome.fields))

    return endpoint


async def _upload(request: Request, state: ReceiverState, outcome: _Outcome) -> Response:
    if not _authorized(request.headers.get("x-smt-upload-token"), state.upload_token):
        raise _Problem(401, "unauthorized")  # before a byte of the body is read
    try:
        form = await read_multipart(request, dest_dir=state.data_dir, max_bytes=state.max_upload_bytes)
    except UploadTooLarge as exc:
        return JSONResponse({"ok": False, "error": "too_large", "maxBytes": exc.max_bytes}, 413)
    except MalformedUpload as exc:
        raise _Problem(400, "MALFORMED_UPLOAD", str(exc)) from exc
    outcome.fields = dict(form.fields)
    if form.file is None:
        raise _Problem(400, 'Missing file field "file"')
    got, fields = form.file, form.fields
    try:
        _check_hashes(got.sha256, fields.get("sha256"), request.headers.get("idempotency-key"))
    except _Problem:
        got.tmp_path.unlink(missing_ok=True)
        raise
    meta: dict[str, str | None] = {
        "filename": got.filename, "source": fields.get("source"), "esiid": fields.get("esiid"),
        "meter": fields.get("meter"), "captured_at": fields.get("capturedAt"), "route": UPLOAD_PATH}
    id_, dup = await run_in_threadpool(state.store.add, got.tmp_path, got.sha256, got.size, meta)
    log.info("multipart %s (%d bytes) %s", got.sha256, got.size, "duplicate" if dup else "stored")
    return _stored(got.sha256, id_, got.size, dup, outcome)


def _optional_str(payload: dict[str, Any], key: str) -> str | None:
    value = payload.get(key)
    if value is not None and not isinstance(value, str):
        raise _Problem(400, "INVALID_FIELD", f"{key} must be a string or null")
    return value


def _size_field(payload: dict[str, Any], key: str) -> int:
    if key not in payload:
        raise _Problem(400, "MISSING_FIELD", key)
    value = payload[key]
    if type(value) is not int or value < 0:
        raise _Problem(400, "INVALID_FIELD", f"{key} must be a non-negative integer")
    return value


def _gunzip(data: bytes, limit: int) -> bytes:
    """Inflate one gzip member, at most ``limit + 1`` bytes: a lying ``sizeBytes`` cannot be a gzip bomb."""
    inflater = zlib.decompressobj(wbits=31)
    try:
        raw = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise _Problem(400, "INVALID_GZIP", str(exc)) from exc
    if len(raw) > limit:
        raise _Problem(400, "INLINE_SIZE_MISMATCH", f"decompresses to more than sizeBytes={limit}")
    if not inflater.eof or inflater.unused_data:
        raise _Problem(400, "INVALID_GZIP", "truncated gzip data, or data after the gzip member")
    return raw


def _decode_inline(payload: dict[str, Any]) -> tuple[bytes, str]:
    """Validate the inline fields; return the file bytes and their SHA-256 (run in a worker thread:
    base64, gzip and hashing are CPU-bound)."""
    for key in ("mode", "filename", "encoding", "content_b64"):
        if key not in payload:
            raise _Problem(400, "MISSING_FIELD", key)
    if payload["mode"] != "inline":
        raise _Problem(400, "INVALID_MODE", f"mode must be 'inline', got {payload['mode']!r}")
    filename = _optional_str(payload, "filename")
    if not filename:
        raise _Problem(400, "INVALID_FIELD", "filename must be a non-empty string")
    for key in ("source", "mime", "esiid", "meter", "captured_at"):
        _optional_str(payload, key)
    encoding, text = payload["encoding"], payload["content_b64"]
    if encoding not in ENCODINGS:
        raise _Problem(400, "INVALID_ENCODING", f"encoding must be one of {', '.join(ENCODINGS)}")
    size = _size_field(payload, "sizeBytes")
    compressed = _size_field(payload, "compressedBytes") if encoding == "base64+gzip" else None
    if not isinstance(text, str):
        raise _Problem(400, "INVALID_BASE64", "content_b64 must be a string")
    try:  # a2b_base64 reads an ASCII str in place: no intermediate bytes copy, unlike b64decode
        raw = binascii.a2b_base64(text, strict_mode=True)
    except ValueError as exc:
        raise _Problem(400, "INVALID_BASE64", str(exc)) from exc
    if compressed is not None:
        if len(raw) != compressed:
            detail = f"gzip data is {len(raw)} bytes, compressedBytes={compressed}"
            raise _Problem(400, "COMPRESSED_SIZE_MISMATCH", detail)
        raw = _gunzip(raw, size)
    if len(raw) != size:
        raise _Problem(400, "INLINE_SIZE_MISMATCH", f"content is {len(raw)} bytes, sizeBytes={size}")
    return raw, hashlib.sha256(raw).hexdigest()


def _refused_in_production(payload: dict[str, Any], state: ReceiverState) -> JSONResponse | None:
    """The real route's answers before it stores anything: ``HOME_ID_REQUIRED`` (no ``homeId``, and the ESIID
    matches no house), then, in production, ``INLINE_DISABLED`` for ``mode: "inline"``."""
    home_id, esiid = payload.get("homeId"), payload.get("esiid")
    if not (isinstance(home_id, str) and home_id.strip()):
        lookup = esiid.strip() if isinstance(esiid, str) else ""
        if not lookup or (state.homes is not None and lookup not in state.homes):
            return JSONResponse({"ok": False, "error": "HOME_ID_REQUIRED",
                                 "message": "homeId (or resolvable esiid) is required for SMT pull."}, 400)
    if payload.get("mode") == "inline" and not state.inline:
        return JSONResponse({"ok": False, "error": "INLINE_DISABLED",
                             "message": "Direct SMT upload is disabled in production. Use droplet large-file path."},
                            400)
    return None


async def _pull(request: Request, state: ReceiverState, outcome: _Outcome) -> Response:
    if not _authorized(request.headers.get("x-admin-token"), state.admin_token):
        raise _Problem(401, "unauthorized")
    try:
        payload = json.loads(await _app_body(request, state))
    except ValueError as exc:  # includes JSONDecodeError and UnicodeDecodeError
        raise _Problem(400, "INVALID_JSON", str(exc)) from exc
    if not isinstance(payload, dict):
        raise _Problem(400, "INVALID_JSON", "body must be a JSON object")
    outcome.fields = {k: v for k, v in payload.items() if k != "content_b64"}
    refused = _refused_in_production(payload, state)
    if refused is not None:
        return refused
    content, sha256 = await run_in_threadpool(_decode_inline, payload)
    _check_hashes(sha256, request.headers.get("idempotency-key"))
    meta: dict[str, str | None] = {key: payload.get(key) for key in ("filename", "source", "esiid", "meter",
                                                                     "captured_at")}
    meta["route"] = PULL_PATH
    id_, dup = await run_in_threadpool(state.store.add_bytes, content, sha256, meta)
    log.info("inline %s (%d bytes) %s", sha256, len(content), "duplicate" if dup else "stored")
    return _stored(sha256, id_, len(content), dup, outcome)


async def _raw_upload(request: Request, state: ReceiverState, outcome: _Outcome) -> Response:
    """One chunk, answered by the real route's rules (:func:`receiver_raw.handle_chunk`); mismatches it lets
    through are recorded on ``state.raw_mismatches`` and logged, and a completed file is stored whole."""
    if state.admin_token is not None:  # requireAdmin: the header, trimmed, must equal the token
        sent = request.headers.get("x-admin-token", "").strip()
        if not hmac.compare_digest(sent.encode(), state.admin_token.encode()):
            return JSONResponse({"error": "Unauthorized"}, status_code=401)
    reply = await run_in_threadpool(handle_chunk, state.raw, await _app_body(request, state),
                                    request.headers.get("idempotency-key"))
    outcome.fields, outcome.sha256, outcome.duplicate = reply.fields, reply.sha256, reply.duplicate
    filename = str(reply.fields.get("filename"))
    if state.admin_token is None:
        reply.mismatches.insert(0, RawMismatch(Mismatch.NO_ADMIN_TOKEN, filename, "accepted without a token check"))
    for mismatch in reply.mismatches:
        log.warning("raw-upload %s: %s (%s)", mismatch.filename, mismatch.kind.value, mismatch.detail)
        state.raw_mismatches.append(mismatch)
    if reply.whole is not None:
        name, whole, meta = reply.whole
        await run_in_threadpool(state.store.add_bytes, whole, hashlib.sha256(whole).hexdigest(),
                                {**meta, "filename": name, "route": RAW_UPLOAD_PATH})
    if reply.body is None:
        return Response(status_code=reply.status)
    if reply.status == 200:
        log.info("raw-upload %s: %s%s%s", filename, "duplicate" if reply.duplicate else "stored",
                 ", file complete" if reply.whole else "",
                 ", postIngest" if reply.fields.get("postIngest") is True else "")
    else:
        log.warning("raw-upload refused (%d): %s", reply.status, reply.body)
    return JSONResponse(reply.body, status_code=reply.status)


async def _add_faults(request: Request) -> Response:
    state: ReceiverState = request.app.state.receiver
    try:
        items = json.loads(await request.body())
        faults = [Fault.from_json(item) for item in (items if isinstance(items, list) else [items])]
    except ValueError as exc:
        return _Problem(400, "INVALID_FAULT", str(exc)).response()
    state.faults.extend(faults)
    return JSONResponse({"ok": True, "queued": len(state.faults)})


async def _list_requests(request: Request) -> Response:
    state: ReceiverState = request.app.state.receiver
    return JSONResponse([asdict(_without_release(rec)) for rec in list(state.requests)])


def _without_release(rec: RequestRecord) -> RequestRecord:
    """The record as JSON can carry it: a fault's ``release`` event is the in-process test's, not data."""
    if rec.fault is None or rec.fault.release is None:
        return rec
    return replace(rec, fault=replace(rec.fault, release=None))


async def _list_intervals(request: Request) -> Response:
    """SmtInterval rows per ESIID (the raw-upload route's table), for demos and tests."""
    state: ReceiverState = request.app.state.receiver
    return JSONResponse(await run_in_threadpool(state.raw.intervals_by_esiid))


SERVICE = "smt-watch-reference-receiver"


async def _health(request: Request) -> Response:
    """Names itself, as the Node server (``smt-upload-server``) and serve (``smt-watch``) do: smt-watch
    refuses to deliver to its own serve and recognises it by this field."""
    return JSONResponse({"ok": True, "service": SERVICE})


async def _list_chunks(request: Request) -> Response:
    """raw-upload's stored chunks (name, part, parts, sha256, source, storagePath, esiid, meter), for tests."""
    state: ReceiverState = request.app.state.receiver
    return JSONResponse(await run_in_threadpool(state.raw.chunk_rows))


async def _list_files(request: Request) -> Response:
    state: ReceiverState = request.app.state.receiver
    return JSONResponse(await run_in_threadpool(state.store.rows))


def create_app(data_dir: Path, *, admin_token: str | None = None, upload_token: str | None = None,
               max_upload_bytes: int | None = None, inline: bool = False, homes: Iterable[str] | None = None,
               max_body_bytes: int | None = MAX_REQUEST_BYTES) -> Starlette:
    """Build the receiver; tokens set to None are not checked (the real services' dev behaviour). ``inline``:
    store inline files (the app under NODE_ENV=development); ``homes``: the ESIIDs that have a house."""
    data_dir.mkdir(parents=True, exist_ok=True)
    routes = [
        Route(PULL_PATH, _delivery(_pull), methods=["POST"]),
        Route(UPLOAD_PATH, _delivery(_upload), methods=["POST"]),
        Route(RAW_UPLOAD_PATH, _delivery(_raw_upload), methods=["POST"]),
        Route("/_receiver/faults", _add_faults, methods=["POST"]),
        Route("/health", _health, methods=["GET"]),
        Route("/_receiver/requests", _list_requests, methods=["GET"]),
        Route("/_receiver/files", _list_files, methods=["GET"]),
        Route("/_receiver/chunks", _list_chunks, methods=["GET"]),
        Route("/_receiver/intervals", _list_intervals, methods=["GET"]),
    ]
    app = Starlette(routes=routes)
    app.state.receiver = ReceiverState(data_dir, admin_token, upload_token, max_upload_bytes, inline=inline,
                                       homes=None if homes is None else frozenset(homes),
                                       max_body_bytes=max_body_bytes)
    return app


@dataclass(frozen=True)
class ReceiverHandle:
    """A receiver running in the background, as yielded by ``running_receiver``."""

    url: str
    port: int
    state: ReceiverState

    def stored(self) -> list[dict[str, Any]]:
        return self.state.store.rows()

    def read(self, sha256: str) -> bytes:
        return self.state.store.read(sha256)


class _ThreadedServer(uvicorn.Server):
    """Signals ``ready`` once startup has finished or failed, so callers wait on an event, not a sleep;
    ``stop()`` wakes its main loop at once instead of at uvicorn's next 0.1 s tick (a test suite starts and
    stops hundreds of these)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()
        self._wake: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None

    async def main_loop(self) -> None:
        self._wake = (asyncio.get_running_loop(), asyncio.Event())
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 1) % 864000
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake[1].wait(), 0.1)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's shutdown, without its fixed 0.1 s pause for connections when there are none (the
        lifespan is off: app_in_thread below)."""
        if self.server_state.connections or self.server_state.tasks or sockets:
            await super().shutdown(sockets)
            return
        for server in self.servers:
            server.close()
        for server in self.servers:
            await server.wait_closed()

    def stop(self) -> None:
        """Ask the server to exit, from any thread."""
        self.should_exit = True
        if self._wake is not None:
            loop, event = self._wake
            with contextlib.suppress(RuntimeError):  # the loop has already closed
                loop.call_soon_threadsafe(event.set)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets)
        finally:
            self.ready.set()


@contextlib.contextmanager
def running_receiver(data_dir: Path, *, admin_token: str | None = None, upload_token: str | None = None,
                     host: str = "127.0.0.1", port: int = 0, max_upload_bytes: int | None = None,
                     start_timeout: float = 10.0, inline: bool = False, homes: Iterable[str] | None = None,
                     max_body_bytes: int | None = MAX_REQUEST_BYTES, app_routes: bool = False,
                     ) -> Iterator[ReceiverHandle]:
    """Run the receiver on a real socket in a daemon thread for the duration of the ``with`` block.
    ``app_routes``: also the app's read routes and what raw-upload stores, as ``smt-watch receive`` has."""
    app: Any = create_app(data_dir, admin_token=admin_token, upload_token=upload_token,
                          max_upload_bytes=max_upload_bytes, inline=inline, homes=homes,
                          max_body_bytes=max_body_bytes)
    if app_routes:
        from smt_watch.reference.app_routes import wrap

        app = wrap(app, data_dir, admin_token)
    state: ReceiverState = app.state.receiver
    try:
        with app_in_thread(app, host=host, port=port, start_timeout=start_timeout) as real_port:
            shown = f"[{host}]" if ":" in host else host
            yield ReceiverHandle(url=f"http://{shown}:{real_port}", port=real_port, state=state)
    finally:
        state.store.close()


@contextlib.contextmanager
def app_in_thread(app: Any, *, host: str = "127.0.0.1", port: int = 0, start_timeout: float = 10.0,
                  name: str = "smt-watch-asgi") -> Iterator[int]:
    """Serve an ASGI app with uvicorn on a real socket in a daemon thread; yields the bound port.

    For tests, demos and benches (the receiver, ``serve``'s app): waits on startup, never sleeps.
    ``log_config=None`` leaves the process's logging alone, so pytest captures uvicorn's messages too.
    """
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off", log_config=None,
                            timeout_graceful_shutdown=5)
    server = _ThreadedServer(config)
    thread = threading.Thread(target=server.run, name=name, daemon=True)
    thread.start()
    try:
        if not server.ready.wait(start_timeout) or not server.started:
            raise RuntimeError(f"server did not start on {host}:{port}")
        yield int(server.servers[0].sockets[0].getsockname()[1])
    finally:
        server.stop()
        thread.join(start_timeout)


def serve(data_dir: Path, *, host: str, port: int, admin_token: str | None,
          upload_token: str | None, inline: bool = False) -> None:
    """Run the receiver in the foreground until SIGINT/SIGTERM (``smt-watch receive``)."""
    from smt_watch.reference.app_routes import wrap

    # with the app's read routes (verify) and what its raw-upload route keeps of each chunk
    app = wrap(create_app(data_dir, admin_token=admin_token, upload_token=upload_token, inline=inline), data_dir,
               admin_token)
    log.info("reference receiver on http://%s:%d, data in %s (admin token %s, upload token %s, inline %s)", host,
             port, data_dir, "set" if admin_token else "unset", "set" if upload_token else "unset",
             "stored (development)" if inline else "refused (production)")
    try:
        uvicorn.Server(uvicorn.Config(app, host=host, port=port, lifespan="off")).run()
    finally:
        app.state.receiver.store.close()
