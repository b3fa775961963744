"""Pass requests through to IntelliWatt's old webhook bridge (``SMT_WEBHOOK_FORWARD_URL``).

The bridge ``serve`` replaces did more than start ingest: it also serves ``/agreements``,
``/agreements-no-meter`` and ``/smt/*`` (an SMT API proxy), and trigger reasons such as
``smt_meter_info``. Moved to another port, it keeps doing those: ``serve`` hands it every request it does
not handle itself and passes its reply back (status, headers, body streamed).

This is a public path, so it is bounded like uploads are:

- **The request target goes through as it came**: the raw path and query, never percent-decoded and
  rebuilt (``%2F`` stays ``%2F``), under the base path of ``SMT_WEBHOOK_FORWARD_URL``. A path with a ``.``
  or ``..`` segment, plain or percent-encoded (``..%2f``), is ``400``: it could climb out of that base.
- **Headers**: the hop-by-hop ones and every header named in ``Connection`` are dropped (RFC 9110 §7.6.1),
  both ways; so is everything of ``serve``'s own authentication (the status session cookie,
  ``x-smt-upload-token``, ``x-smt-upload-ticket``, an ``Authorization`` carrying the status token). The
  bridge's own secrets (``x-intelliwatt-secret``, its ``Authorization: Bearer``) go through.
- **The body is read first** (at most ``SMT_BRIDGE_MAX_BODY_BYTES``, 1 MiB, ``413``; a client silent for
  ``SMT_UPLOAD_IDLE_SECONDS`` is ``408``), as nginx buffers a request, so a client holding a POST open
  mid-body holds no connection to the bridge. Bodies being read share
  ``SMT_BRIDGE_BUFFER_BYTES`` (32 MiB) of memory, a client address at most a quarter of it.
- **At most ``SMT_UPLOAD_MAX_CONCURRENT`` requests are at the bridge at once**, and one client address at
  most a quarter of them (at least one): beyond, ``503`` (all busy) or ``429`` (this client's share is
  taken) with ``Retry-After``, so one client cannot take the pool from the rest.
- **A client that goes away cancels its upstream request** (and the connection to the bridge is dropped),
  while it waits for the bridge and while the reply streams; a client that stops reading the reply for
  ``SMT_UPLOAD_IDLE_SECONDS`` is dropped too.

When the bridge cannot be reached the client gets a clear 502 (504 on a time-out) in the same JSON shape as
every other ``serve`` error.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Callable, Mapping
from typing import Any, Final
from urllib.parse import unquote_to_bytes, urlsplit

import httpx
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from smt_watch.config import BRIDGE_CLIENT_SHARE, Secret, Settings, redact_url
from smt_watch.errors import UploadStalled, UploadTooLarge
from smt_watch.names import shown
from smt_watch.uploads import idle_limited

log = logging.getLogger("smt_watch.bridge")

HOP_BY_HOP: Final = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te", "trailer",
    "trailers", "transfer-encoding", "upgrade", "host", "content-length", "expect",
})
SERVE_AUTH_HEADERS: Final = frozenset({"x-smt-upload-token", "x-smt-upload-ticket"})
STATUS_COOKIE: Final = "smt_status"  # status_page.COOKIE (not imported: the page module imports the HTML code)
CONNECT_TIMEOUT: Final = 5.0
READ_TIMEOUT: Final = 120.0  # the bridge's SMT API proxy waits on SMT itself
CLIENT_SHARE: Final = BRIDGE_CLIENT_SHARE  # one client address may hold 1/CLIENT_SHARE of the slots and buffer
BUSY_RETRY_AFTER: Final = 5


class FairPool:
    """``total`` units (connections, bytes) shared by client addresses, each holding at most ``per_client``.
    One event loop: plain counts are exact. Only clients holding something have an entry (bounded)."""

    def __init__(self, total: int, per_client: int) -> None:
        self.total = total
        self.per_client = per_client
        self.used = 0
        self.held: dict[str, int] = {}

    def take(self, client: str, n: int = 1) -> str | None:
        """None when taken; else why not: ``"client"`` (this client's share is used) or ``"busy"``."""
        if self.held.get(client, 0) + n > self.per_client:
            return "client"
        if self.used + n > self.total:
            return "busy"
        self.used += n
        self.held[client] = self.held.get(client, 0) + n
        return None

    def give(self, client: str, n: int = 1) -> None:
        left = self.held.get(client, 0) - n
        if left > 0:
            self.held[client] = left
        else:
            self.held.pop(client, None)
        self.used -= n


def pass_through_target(base_path: bytes, raw_path: bytes, query: bytes) -> bytes | None:
    """The request target for the bridge, byte for byte under ``base_path``; None when the path could leave
    it (not absolute, or a ``.``/``..`` segment, percent-encoded or not, ``/`` or ``\\`` separated)."""
    if not raw_path.startswith(b"/"):
        return None
    decoded = unquote_to_bytes(raw_path).replace(b"\\", b"/")
    if any(segment in (b".", b"..") for segment in decoded.split(b"/")):
        return None
    return base_path + raw_path + (b"?" + query if query else b"")


def _connection_named(raw: list[tuple[bytes, bytes]]) -> set[str]:
    return {token.strip().lower() for k, v in raw if k.lower() == b"connection"
            for token in v.decode("latin-1").split(",") if token.strip()}


def end_to_end(raw: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Headers less the hop-by-hop ones and those the ``Connection`` header names (RFC 9110 §7.6.1)."""
    drop = HOP_BY_HOP | _connection_named(raw)
    return [(k, v) for k, v in raw if k.decode("latin-1").lower() not in drop]


def without_cookie(value: bytes, name: str) -> bytes:
    """A ``Cookie`` header less the pairs called ``name``."""
    kept = [pair for pair in value.split(b";") if pair.strip().split(b"=", 1)[0].strip() != name.encode()]
    return b";".join(kept).strip()


class Bridge:
    """One pooled client to the bridge, shared by every forwarded request of a ``serve`` process."""

    def __init__(self, base_url: str, settings: Settings) -> None:
        parts = urlsplit(base_url)
        self.base_url = f"{parts.scheme}://{parts.netloc}"
        self.base_path = parts.path.rstrip("/").encode("ascii", "replace")
        self.shown = redact_url(base_url.rstrip("/"))
        self.idle_seconds = settings.upload_idle_seconds
        self.status_token: Secret | None = settings.status_token
        total = settings.upload_max_concurrent
        self.max_body_bytes = settings.bridge_max_body_bytes
        self.slots = FairPool(total, max(1, total // CLIENT_SHARE))
        buffer = settings.bridge_buffer_bytes
        self.buffer = FairPool(buffer, buffer // CLIENT_SHARE)
        timeout = httpx.Timeout(READ_TIMEOUT, connect=CONNECT_TIMEOUT)
        limits = httpx.Limits(max_connections=total, max_keepalive_connections=total)
        self._client = httpx.AsyncClient(timeout=timeout, limits=limits, follow_redirects=False, trust_env=False)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def forward(self, request: Request, body: bytes | None = None) -> Response:
        """The pass-through as a response. ``body``: the bytes when the caller has read them already (the
        trigger route), else read here."""
        return _PassThrough(self, request, body)

    def outgoing_headers(self, raw: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """End-to-end headers, less ``serve``'s own authentication."""
        out: list[tuple[bytes, bytes]] = []
        for k, v in end_to_end(raw):
            name = k.decode("latin-1").lower()
            if name in SERVE_AUTH_HEADERS:
                continue
            if name == "authorization" and self._is_status_token(v):
                continue
            if name == "cookie":
                v = without_cookie(v, STATUS_COOKIE)
                if not v:
                    continue
            out.append((k, v))
        return out

    def _is_status_token(self, value: bytes) -> bool:
        if self.status_token is None:
            return False
        sent = value[7:].strip() if value[:7].lower() == b"bearer " else value.strip()
        return hmac.compare_digest(sent, self.status_token.reveal().encode())

    async def read_body(self, request: Request, client: str) -> bytes:
        """The whole body, at most SMT_BRIDGE_MAX_BODY_BYTES, idle-limited, counted against the shared buffer."""
        limit = self.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise UploadTooLarge(limit)
        body = bytearray()
        try:
            async for chunk in idle_limited(request.stream(), self.idle_seconds):
                if len(body) + len(chunk) > limit:
                    raise UploadTooLarge(limit)
                if (why := self.buffer.take(client, len(chunk))) is not None:
                    raise _Busy(why)
                body += chunk
        finally:
            if body:
                self.buffer.give(client, len(body))
        return bytes(body)


class _Busy(Exception):
    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


def _failed(status: int, error: str, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"ok": False, "error": error, "message": message}, status_code=status, headers=headers)


def _busy(why: str, what: str) -> JSONResponse:
    if why == "client":
        return _failed(429, "too_many_requests",
                       f"This client has too many {what} at the webhook bridge already; try again shortly",
                       {"Retry-After": str(BUSY_RETRY_AFTER)})
    return _failed(503, "busy", f"The webhook bridge is busy with too many {what}; try again shortly",
                   {"Retry-After": str(BUSY_RETRY_AFTER)})


class _PassThrough(Response):
    """One forwarded request, run when Starlette sends the response (an ASGI callable): read the body, take
    a slot, send upstream while watching for the client leaving, stream the reply back."""

    def __init__(self, bridge: Bridge, request: Request, body: bytes | None) -> None:  # no super(): not a body
        self.bridge = bridge
        self.request = request
        self.body_bytes = body
        self.status_code = 0
        self.background = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        bridge, request = self.bridge, self.request
        client = request.client.host if request.client else "-"
        path_shown = shown(scope.get("raw_path", b"").decode("latin-1"))[:200]
        target = pass_through_target(bridge.base_path, scope.get("raw_path", b""), scope.get("query_string", b""))
        if target is None:
            log.warning("Not passed to the webhook bridge: path %s from %s could leave its base", path_shown, client)
            await _failed(400, "bad_path", "The path is not absolute or has a '.' or '..' segment (plain or "
                          "percent-encoded); it is not passed on")(scope, receive, send)
            return
        body = self.body_bytes
        if body is None:
            try:
                body = await bridge.read_body(request, client)
            except UploadTooLarge:
                await _failed(413, "too_large", "A body for the webhook bridge is at most "
                              f"{bridge.max_body_bytes:,} bytes")(scope, receive, send)
                return
            except UploadStalled as exc:
                log.warning("Pass-through from %s abandoned: no data for %g s", client, exc.idle_seconds)
                await _failed(408, "timeout", f"No data for {exc.idle_seconds:g} s")(scope, receive, send)
                return
            except _Busy as exc:
                log.warning("Pass-through from %s refused: bodies being read fill the buffer (%s)", client, exc.why)
                await _busy(exc.why, "requests being received")(scope, receive, send)
                return
            except ClientDisconnect:
                return
        if (why := bridge.slots.take(client)) is not None:
            log.warning("Pass-through of %s from %s refused: %s", path_shown, client,
                        "this client's share of the bridge's connections is taken" if why == "client"
                        else "every connection to the webhook bridge is taken (SMT_UPLOAD_MAX_CONCURRENT)")
            await _busy(why, "requests")(scope, receive, send)
            return
        try:
            await _relay(bridge, scope, receive, send, target, body, path_shown, self.request.method)
        finally:
            bridge.slots.give(client)


async def _relay(bridge: Bridge, scope: Any, receive: Any, send: Any, target: bytes, body: bytes, path: str,
                 method: str) -> None:
    """The exchange with the bridge, cancelled if the client disconnects first."""
    finished = [False]
    work = asyncio.ensure_future(_exchange(bridge, scope, receive, send, target, body, path, method,
                                           lambda: finished.__setitem__(0, True)))
    watch = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if work.done() or finished[0]:
            await work
            return
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        log.info("Pass-through of %s %s: the client left; the request to the webhook bridge is cancelled",
                 method, path)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()


async def _disconnected(receive: Callable[[], Any]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _exchange(bridge: Bridge, scope: Any, receive: Any, send: Any, target: bytes, body: bytes, path: str,
                    method: str, done: Callable[[], None]) -> None:
    headers = bridge.outgoing_headers(list(scope["headers"]))
    outgoing = bridge._client.build_request(method, bridge.base_url + "/", headers=headers, content=body,
                                            extensions={"target": target})
    try:
        reply = await bridge._client.send(outgoing, stream=True)
    except httpx.TimeoutException:
        log.error("Webhook bridge at %s timed out on %s %s", bridge.shown, method, path)
        await _failed(504, "bridge_timeout", f"The webhook bridge at {bridge.shown} did not answer in time"
                      )(scope, receive, send)
        done()
        return
    except httpx.TransportError as exc:
        log.error("Webhook bridge at %s unreachable for %s %s: %s", bridge.shown, method, path, type(exc).__name__)
        await _failed(502, "bridge_unreachable",
                      f"The webhook bridge at {bridge.shown} could not be reached ({type(exc).__name__})"
                      )(scope, receive, send)
        done()
        return
    try:
        log.info("Forwarded %s %s to the webhook bridge: %d", method, path, reply.status_code)
        # raw pairs, not a mapping: repeated headers (Set-Cookie) come back as the bridge sent them
        response_headers = [(k.lower(), v) for k, v in end_to_end(list(reply.headers.raw))]
        await _send_within(bridge.idle_seconds, send, {"type": "http.response.start", "status": reply.status_code,
                                                        "headers": response_headers})
        async for chunk in reply.aiter_raw():
            await _send_within(bridge.idle_seconds, send, {"type": "http.response.body", "body": chunk,
                                                           "more_body": True})
        done()
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    except TimeoutError:
        log.warning("Pass-through of %s %s: the client read nothing for %g s; dropped", method, path,
                    bridge.idle_seconds)
    except httpx.HTTPError as exc:
        log.error("Webhook bridge at %s broke off its reply to %s %s: %s", bridge.shown, method, path,
                  type(exc).__name__)
    finally:
        await reply.aclose()


async def _send_within(seconds: float, send: Any, message: dict[str, Any]) -> None:
    """``send``, which waits while the client does not read, for at most ``seconds``."""
    async with asyncio.timeout(seconds):
        await send(message)
