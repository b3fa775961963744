"""Early refusals the client can read: close a connection in stages, as nginx's ``lingering_close`` does.

A refusal sent before the request body is read (401, 403, 413, 429, 503) must end the connection, or a
client that never stops sending would hold it. But closing a socket whose receive buffer still holds the
client's bytes makes the kernel send a reset instead of a FIN, and a reset may erase the reply in the
client's input buffer before the client reads it (RFC 9112 §9.6): a browser still uploading shows
"Failed to fetch" instead of the 401's message. So a connection is closed in stages:

1. :class:`CloseUnreadBody` (ASGI middleware) marks every response that starts while the request body is
   not fully received ``Connection: close``, whatever route sent it; h11 then ends the connection after it.
2. :class:`LingeringH11Protocol` turns that close into a lingering one: the reply is sent and followed by a
   FIN (stop writing); whatever the client still sends is read and thrown away, not parsed; the socket is
   closed when the client closes its side, after ``SMT_LINGER_IDLE_SECONDS`` (5) without a byte (at most
   ``SMT_UPLOAD_IDLE_SECONDS``), after ``SMT_LINGER_SECONDS`` (30) in all, or past ``SMT_LINGER_MAX_BYTES``
   (64 MiB) discarded, whichever comes first (``serve`` sets them on its subclass,
   :func:`smt_watch.http_server.head_deadline_protocol`; the constants here are the defaults). A connection that
   has read its whole request closes at once as before.

uvicorn's own protocol has no such stage; the transport it is handed is a thin gate whose ``close`` lingers
when the request body is still unread, so uvicorn's code paths (response complete, keep-alive off) stay
uvicorn's.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Final, cast

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("smt_watch.server")

LINGER_SECONDS: Final = 30.0  # nginx's lingering_time
LINGER_IDLE_SECONDS: Final = 5.0  # nginx's lingering_timeout (capped by SMT_UPLOAD_IDLE_SECONDS)
LINGER_MAX_BYTES: Final = 64 * 1024 * 1024  # what one refused request may make us read and throw away
_UNREAD: Final = (h11.SEND_BODY, h11.ERROR)  # the client's side of a request whose body was not all read


class _Gate:
    """The transport uvicorn sees: every call goes to the real transport, except a ``close`` that should
    linger (see :meth:`LingeringH11Protocol._should_linger`)."""

    def __init__(self, real: asyncio.Transport, protocol: LingeringH11Protocol) -> None:
        self._real = real
        self._protocol = protocol

    def close(self) -> None:
        if self._protocol._should_linger():
            self._protocol._linger()
        else:
            self._real.close()

    def is_closing(self) -> bool:
        return self._protocol._lingering or self._real.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class LingeringH11Protocol(H11Protocol):
    """uvicorn's h11 protocol whose closes, while request bytes are still coming, linger (module docstring)."""

    linger_idle_seconds: float = LINGER_IDLE_SECONDS
    linger_seconds: float = LINGER_SECONDS
    linger_max_bytes: int = LINGER_MAX_BYTES
    _lingering: bool = False
    _lost: bool = False
    _real_transport: asyncio.Transport | None = None
    _linger_timer: asyncio.TimerHandle | None = None
    _linger_started: float = 0.0
    _discarded: int = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._real_transport = transport
        super().connection_made(cast(asyncio.Transport, _Gate(transport, self)))

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            self._discard(len(data))
            return
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._cancel_linger_timer()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        """A server stopping does not wait out a lingering connection."""
        if self._lingering:
            self._finish_linger()
        else:
            super().shutdown()

    # --- the lingering stage -------------------------------------------------------------------------------

    def _should_linger(self) -> bool:
        real = self._real_transport
        return (not self._lost and not self._lingering and real is not None and not real.is_closing()
                and self.conn.their_state in _UNREAD)

    def _linger(self) -> None:
        real = self._real_transport
        assert real is not None
        self._lingering = True
        self._linger_started = self.loop.time()
        if not real.can_write_eof():  # TLS inside the process: no half-close; close as before
            real.close()
            return
        real.write_eof()  # the FIN goes after the reply still in the write buffer
        real.resume_reading()
        self._arm_linger_timer()

    def _discard(self, n: int) -> None:
        self._discarded += n
        if self._discarded > self.linger_max_bytes:
            log.info("Closing a refused connection from %s: over %d bytes sent after the reply",
                     self.client[0] if self.client else "?", self.linger_max_bytes)
            self._finish_linger()
        else:
            self._arm_linger_timer()

    def _arm_linger_timer(self) -> None:
        self._cancel_linger_timer()
        left = min(self.linger_idle_seconds, self._linger_started + self.linger_seconds - self.loop.time())
        if left <= 0:
            self._finish_linger()
        else:
            self._linger_timer = self.loop.call_later(left, self._finish_linger)

    def _cancel_linger_timer(self) -> None:
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None

    def _finish_linger(self) -> None:
        self._cancel_linger_timer()
        real = self._real_transport
        if real is not None and not real.is_closing():
            real.close()


class CloseUnreadBody:
    """ASGI middleware: a response that starts before the request body was fully received carries
    ``Connection: close`` (and so ends the connection, lingering), from any route."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        unread = [headers.get(b"content-length", b"0").strip() not in (b"0", b"") or b"transfer-encoding" in headers]

        async def tracked_receive() -> Any:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                unread[0] = False
            return message

        async def closing_send(message: Any) -> None:
            if message["type"] == "http.response.start" and unread[0]:
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": [*kept, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, tracked_receive, closing_send)
