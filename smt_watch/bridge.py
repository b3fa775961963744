"""Pass requests through to IntelliWatt's old webhook bridge (``SMT_WEBHOOK_FORWARD_URL``).

The bridge ``serve`` replaces did more than start ingest: it also serves ``/agreements``,
``/agreements-no-meter`` and ``/smt/*`` (an SMT API proxy), and trigger reasons such as
``smt_meter_info``. Moved to another port, it keeps doing those: ``serve`` hands it every request it does
not handle itself, unchanged (method, path, query, headers including the secret, body streamed) and
passes its reply back (status, headers, body streamed). Only hop-by-hop headers are dropped, as any proxy
must. When the bridge cannot be reached the client gets a clear 502 (504 on a time-out) in the same JSON
shape as every other ``serve`` error.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Final

import httpx
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from smt_watch.config import redact_url

log = logging.getLogger("smt_watch.bridge")

HOP_BY_HOP: Final = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
    "transfer-encoding", "upgrade", "host",
})
CONNECT_TIMEOUT: Final = 5.0
READ_TIMEOUT: Final = 120.0  # the bridge's SMT API proxy waits on SMT itself


class Bridge:
    """One pooled client to the bridge, shared by every forwarded request of a ``serve`` process."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.shown = redact_url(self.base_url)
        timeout = httpx.Timeout(READ_TIMEOUT, connect=CONNECT_TIMEOUT)
        self._client = httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def forward(self, request: Request, body: bytes | None = None) -> Response:
        """``body``: the bytes when the caller has read them already (the trigger route), else streamed."""
        url = self.base_url + request.url.path + (f"?{request.url.query}" if request.url.query else "")
        headers = [(k, v) for k, v in request.headers.raw if k.decode("latin-1").lower() not in HOP_BY_HOP]
        content: bytes | AsyncIterator[bytes] = body if body is not None else request.stream()
        outgoing = self._client.build_request(request.method, url, headers=headers, content=content)
        try:
            reply = await self._client.send(outgoing, stream=True)
        except httpx.TimeoutException:
            log.error("Webhook bridge at %s timed out on %s %s", self.shown, request.method, request.url.path)
            return _failed(504, "bridge_timeout", f"The webhook bridge at {self.shown} did not answer in time")
        except httpx.TransportError as exc:
            log.error("Webhook bridge at %s unreachable for %s %s: %s", self.shown, request.method,
                      request.url.path, type(exc).__name__)
            return _failed(502, "bridge_unreachable",
                           f"The webhook bridge at {self.shown} could not be reached ({type(exc).__name__})")
        log.info("Forwarded %s %s to the webhook bridge: %d", request.method, request.url.path, reply.status_code)
        response = StreamingResponse(reply.aiter_raw(), status_code=reply.status_code,
                                     background=BackgroundTask(reply.aclose))
        # raw pairs, not a mapping: repeated headers (Set-Cookie) come back as the bridge sent them
        response.raw_headers = [(k.lower(), v) for k, v in reply.headers.raw
                                if k.decode("latin-1").lower() not in HOP_BY_HOP]
        return response


def _failed(status: int, error: str, message: str) -> JSONResponse:
    return JSONResponse({"ok": False, "error": error, "message": message}, status_code=status)
