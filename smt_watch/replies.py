"""What every ``serve`` route shares: the JSON refusal, client text made fit to show, the same-origin test
and a capped body read.

Kept apart from the routes so that the upload route (:mod:`smt_watch.server`) and the status web app
(:mod:`smt_watch.status_web`) answer alike without importing each other.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse

from smt_watch.errors import UploadTooLarge
from smt_watch.uploads import idle_limited


def error_reply(status: int, error: str, message: str, *, headers: dict[str, str] | None = None,
                **extra: Any) -> JSONResponse:
    """``{"ok": false, "error", "message", …}``: IntelliWatt's pages show ``message`` when a reply has one."""
    return JSONResponse({"ok": False, "error": error, "message": message, **extra}, status_code=status,
                        headers=headers)


def client_text(text: str, limit: int = 80) -> str:
    """Client-sent text fit for a message: printable, short (JSON escaping does the rest)."""
    text = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return text + ("…" if len(text) >= limit else "")


def same_origin(origin: str, host: str | None) -> bool:
    """The page that sent the request was served by this server (its own ``GET /`` page)."""
    return host is not None and urlsplit(origin).netloc.lower() == host.lower()


async def read_capped(request: Request, limit: int, idle_seconds: float) -> bytes:
    """The whole body, refused past ``limit`` bytes (declared or sent) or after ``idle_seconds`` of silence."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise UploadTooLarge(limit)
    body = bytearray()
    async for chunk in idle_limited(request.stream(), idle_seconds):
        body += chunk
        if len(body) > limit:
            raise UploadTooLarge(limit)
    return bytes(body)
