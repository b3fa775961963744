"""``smt-watch serve``: the droplet upload server and the trigger webhook (docs/contract.md §5).

Uploads only land in the inbox (a hidden temp file renamed into place when complete); ``watch`` delivers
them, so there is one delivery path. Every refusal (token, rate limit, size) happens before a byte is
written where the request already says enough, and nothing is left behind by a refused, broken or
abandoned upload. Rate-limit counts live in the ledger, so a restart does not reset them.

The trigger starts one ``sync`` pass in a background thread (the same code and lock as ``smt-watch
sync``); a trigger while one runs joins it. No shell command is ever built from request data. What
``serve`` does not handle itself (other paths and trigger reasons of IntelliWatt's webhook bridge) is
passed through unchanged to ``SMT_WEBHOOK_FORWARD_URL`` when it is set (see :mod:`smt_watch.bridge`).

Every reply carries a human ``message``: IntelliWatt's upload pages show ``message`` when a reply has one
and the raw body otherwise.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import hmac
import json
import logging
import os
import re
import signal
import socket
import threading
import time
import uuid
from collections.abc import Generator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

import h11
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from smt_watch import status_page
from smt_watch.bridge import Bridge
from smt_watch.clock import utc_stamp
from smt_watch.config import Secret, Settings
from smt_watch.errors import ConfigError, LedgerUnavailable, SmtWatchError
from smt_watch.esiids import InvalidLabel, Repost, clean_esiid, clean_meter, repost_esiid
from smt_watch.inbox import create_inbox, is_candidate
from smt_watch.ledger import SHA256_RE, Ledger
from smt_watch.linger import CloseUnreadBody, LingeringH11Protocol
from smt_watch.sessions import SESSION_SECONDS, Sessions, SignInThrottle
from smt_watch.status import gather
from smt_watch.tickets import TicketError, verify
from smt_watch.uploads import (
    MalformedUpload,
    ReceivedFile,
    UploadStalled,
    UploadTooLarge,
    idle_limited,
    read_multipart,
)

log = logging.getLogger("smt_watch.server")

SECRET_HEADERS: Final = (
    "x-intelliwatt-secret", "x-smt-secret", "x-webhook-secret", "x-proxy-secret", "x-droplet-webhook-secret",
)
REASONS: Final = frozenset({"smt_authorized", "admin_triggered", "admin_refresh", "user_refresh", "user_orchestrate"})
DEFAULT_ROLE: Final = "admin"  # an upload that names no role, as IntelliWatt's Node upload server counts it
RATE_MESSAGES: Final = {
    "admin": "Admin upload limit reached for the current 24-hour window",
    "customer": "Customer upload limit reached for the current 30-day window",
}
ANY_METHOD: Final = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
LEDGER_RETRY_AFTER: Final = 10  # seconds a client told 503 (the shared ledger is unreachable) should wait
BUSY_RETRY_AFTER: Final = 5  # seconds a client told 503 (too many uploads at once) should wait
WEBHOOK_MAX_BYTES: Final = 64 * 1024  # a trigger body is a small JSON object
STATUS_FORM_MAX_BYTES: Final = 4096  # a status page form: a token, a hash, a CSRF token
QUEUE_SAMPLE: Final = 20  # recent deliveries the queue's etaSeconds is estimated from
MAX_NAME_BYTES: Final = 200
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(raw: str) -> str:
    """The client's base name, made safe: no path parts, control characters or leading dots; ≤ 200 bytes.
    A long name loses the end of its stem, never its extension (which decides whether it is delivered)."""
    base = raw.replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(c for c in base if c.isprintable())
    base = _UNSAFE.sub("_", base).strip("._-")  # ASCII from here on
    if len(base) > MAX_NAME_BYTES:
        stem, dot, ext = base.rpartition(".")
        if dot and 0 < len(ext) <= 16 and stem:
            base = stem[: MAX_NAME_BYTES - len(ext) - 1].rstrip("._-") + "." + ext
        else:
            base = base[:MAX_NAME_BYTES]
    return base or "upload.csv"


def _matches(sent: str | None, secret: Secret) -> bool:
    return sent is not None and hmac.compare_digest(sent.encode(), secret.reveal().encode())


def _matches_any(request: Request, secrets: tuple[Secret, ...]) -> bool:
    """One of the secret headers holds one of the secrets. Lists, not generators: every header is compared
    with every secret, so the time taken does not say which header or which secret matched."""
    sent = [request.headers.get(h) for h in SECRET_HEADERS]
    return any([_matches(value, secret) for value in sent for secret in secrets])


def _error(status: int, error: str, message: str, *, headers: dict[str, str] | None = None,
           **extra: Any) -> JSONResponse:
    return JSONResponse({"ok": False, "error": error, "message": message, **extra}, status_code=status,
                        headers=headers)


def _shown(text: str, limit: int = 80) -> str:
    """Client-sent text fit for a message: printable, short (JSON escaping does the rest)."""
    text = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return text + ("…" if len(text) >= limit else "")


def human_bytes(n: int) -> str:
    """``1,073,741,824 bytes (1 GiB)``: the exact figure an operator set, and a readable one."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n:,} bytes ({n / size:.1f} {unit})".replace(".0 ", " ")
    return f"{n:,} bytes"


def same_origin(origin: str, host: str | None) -> bool:
    """The page that sent the request was served by this server (its own ``GET /`` page)."""
    return host is not None and urlsplit(origin).netloc.lower() == host.lower()


def counted_role(declared: str) -> str:
    """The role an upload is counted under, as IntelliWatt's Node upload server counts it: ``customer`` is
    a customer, any other role (``admin``, the bash script's ``smt-ingest``, anything) is ``admin``."""
    return "customer" if declared.strip().lower() == "customer" else "admin"


def upload_labels(fields: dict[str, str]) -> tuple[str | None, str | None]:
    """The ``esiid`` and ``meter`` form fields (the bash script sends both), checked; InvalidLabel if not."""
    return clean_esiid(fields.get("esiid")), clean_meter(fields.get("meter"))


def _repost_said(r: Repost, esiid: str) -> str:
    gone = f", {r.gone} no longer in the inbox" if r.gone else ""
    return f"{r.files} file(s) of ESIID {esiid} already in the inbox will be sent again{gone}"


class _Refused(Exception):
    """Raised from inside the multipart parser to answer with ``response`` before any byte is stored."""

    def __init__(self, response: Response) -> None:
        super().__init__("refused")
        self.response = response


PAGE_CSP: Final = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                   "connect-src 'self'; form-action 'self'; frame-ancestors 'none'")


@functools.cache
def upload_page() -> str:
    return resources.files("smt_watch").joinpath("upload_page.html").read_text(encoding="utf-8")


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


def _storage_error(exc: OSError) -> JSONResponse:
    log.error("Upload not stored: %s", exc.strerror or exc)
    if exc.errno == errno.ENOSPC:
        return _error(507, "insufficient_storage", "The server's disk is full; the upload was not stored")
    return _error(507, "storage_error", f"The upload could not be stored: {exc.strerror or 'I/O error'}")


class SyncRunner:
    """At most one sync pass per server at a time; a trigger while one runs joins it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._current: tuple[str, threading.Thread] | None = None

    def trigger(self, force_repost: bool) -> tuple[str, bool]:
        with self._lock:
            if self._current is not None and self._current[1].is_alive():
                return self._current[0], True
            sync_id = uuid.uuid4().hex
            thread = threading.Thread(target=self._run, args=(sync_id, force_repost), name="smt-sync", daemon=True)
            self._current = (sync_id, thread)
            thread.start()
            return sync_id, False

    def join(self, timeout: float | None = None) -> None:
        current = self._current
        if current is not None:
            current[1].join(timeout)

    def _run(self, sync_id: str, force_repost: bool) -> None:
        from smt_watch.sync import run_sync

        log.info("Sync %s started by trigger%s", sync_id[:8], " (forceRepost)" if force_repost else "")
        try:
            report = run_sync(self.settings, wait=True, force_repost=force_repost)
            log.info("Sync %s: %s", sync_id[:8], report.summary() if report else "skipped")
        except SmtWatchError as exc:
            log.error("Sync %s failed: %s", sync_id[:8], exc)
        except Exception:
            log.exception("Sync %s failed unexpectedly", sync_id[:8])


@dataclass
class Server:
    """The routes, with the settings, ledger and sync runner they share."""

    settings: Settings
    ledger: Ledger
    runner: SyncRunner
    bridge: Bridge | None = None
    _active: int = 0  # uploads in progress
    throttle: SignInThrottle = field(init=False)  # wrong status tokens, bounded by the settings

    def __post_init__(self) -> None:
        self.throttle = SignInThrottle.from_settings(self.settings)

    # --- POST /upload -------------------------------------------------------------------------------

    def _limit(self, role: str) -> int:
        return self.settings.upload_limit(role)

    def _limited(self, role: str, account: str, times: list[float]) -> JSONResponse:
        window = self.settings.upload_window(role)
        reset = times[0] + window if times else time.time() + window
        return _error(429, "rate_limited", f"{RATE_MESSAGES[role]}; it resets at {utc_stamp(reset)}",
                      role=role, accountKey=account, limit=self._limit(role), remaining=0, resetAt=utc_stamp(reset),
                      headers={"Retry-After": str(max(1, int(reset - time.time()) + 1))})

    def _origin_refused(self, request: Request) -> JSONResponse | None:
        """A browser page from an origin not in SMT_UPLOAD_CORS_ORIGINS (nor this server's own page)."""
        origin = request.headers.get("origin")
        allowed = self.settings.cors_origins
        if origin is None or "*" in allowed or origin in allowed or same_origin(origin, request.headers.get("host")):
            return None
        log.warning("Upload refused: origin %s is not in SMT_UPLOAD_CORS_ORIGINS", _shown(origin))
        return _error(403, "origin_not_allowed",
                      f"Uploads from {_shown(origin)} are not allowed here (SMT_UPLOAD_CORS_ORIGINS)")

    async def upload(self, request: Request) -> Response:
        """At most SMT_UPLOAD_MAX_CONCURRENT uploads at once (one event loop: a plain count is exact);
        beyond that ``503`` with ``Retry-After`` before a byte of the body is read."""
        if self._active >= self.settings.upload_max_concurrent:
            log.warning("Upload refused: %d uploads already in progress (SMT_UPLOAD_MAX_CONCURRENT)", self._active)
            return _error(503, "busy", f"The server is taking {self._active} uploads already; try again shortly",
                          headers={"Retry-After": str(BUSY_RETRY_AFTER)})
        self._active += 1
        try:
            response = await self._upload(request)
        finally:
            self._active -= 1
        if response.status_code >= 400:
            # A refusal may come before the body was read: close, so that a client still sending (or one
            # that never stops) cannot hold the connection open.
            response.headers["connection"] = "close"
        return response

    async def _upload(self, request: Request) -> Response:
        """Refusals that the headers decide come before the body; the identity (role, account) is the
        whole request's: when the headers or the fields before the file part already name both, an upload
        over its limit is refused before a byte is stored; otherwise the file streams to the hidden temp
        file and the limit is judged (atomically, with the slot taken) once the form is complete."""
        s = self.settings
        if (foreign := self._origin_refused(request)) is not None:
            return foreign
        if s.upload_token is not None and not _matches(request.headers.get("x-smt-upload-token"), s.upload_token):
            return _error(401, "unauthorized", "Invalid or missing SMT upload token")
        ctype = (request.headers.get("content-type") or "").split(";", 1)[0].strip().lower()
        if ctype != "multipart/form-data":
            return _error(415, "unsupported_media_type",
                          'Send the file as multipart/form-data, in the form field "file"')
        client = request.client.host if request.client else "-"
        ticketed = s.upload_ticket_secret is not None
        header_role: str | None
        header_account: str | None
        if ticketed:  # the identity comes from a signed ticket only; fields and headers cannot declare it
            try:
                header_role, header_account = self._ticket_identity(request, client)
            except TicketError as exc:
                return _error(401, "invalid_ticket", f"Upload refused: {exc}")
        else:
            sent_role = (request.headers.get("x-smt-upload-role") or "").strip()
            header_role = counted_role(sent_role) if sent_role else None
            header_account = request.headers.get("x-smt-upload-account-key") or None

        def named(fields: dict[str, str]) -> tuple[str | None, str | None]:
            if ticketed:
                return header_role, header_account
            sent = (fields.get("role") or "").strip()
            return counted_role(sent) if sent else header_role, fields.get("accountKey") or header_account

        def check_early(fields: dict[str, str]) -> None:
            """At the start of the file part: refuse now only if the request already named who it is, or
            sent an esiid or meter that is not one."""
            try:
                upload_labels(fields)
            except InvalidLabel as exc:
                raise _Refused(_error(400, "invalid_label", f"Upload refused: {exc}")) from None
            role, account = named(fields)
            if role is None or account is None:
                return  # decided once the whole form is read
            times = self.ledger.uploads_since(role, account, time.time() - self.settings.upload_window(role))
            if len(times) >= self._limit(role):
                raise _Refused(self._limited(role, account, times))

        if header_role is not None and header_account is not None:
            try:  # the headers name the identity outright: refuse before reading the body at all
                await run_in_threadpool(check_early, {})
            except _Refused as refused:
                return refused.response
        try:
            parsed = await read_multipart(request, dest_dir=s.local_dir, max_bytes=s.upload_max_bytes,
                                          before_file=check_early, idle_seconds=s.upload_idle_seconds)
        except _Refused as refused:
            return refused.response
        except UploadStalled as exc:
            log.warning("Upload abandoned: the client sent nothing for %g s; nothing stored", exc.idle_seconds)
            return _error(408, "timeout", f"No data for {exc.idle_seconds:g} s: the upload was abandoned")
        except UploadTooLarge:
            return _error(413, "too_large", f"File too large: the limit is {human_bytes(s.upload_max_bytes)}",
                          maxBytes=s.upload_max_bytes)
        except MalformedUpload as exc:
            return _error(400, "malformed_upload", f"The upload could not be read: {exc}")
        except ClientDisconnect:
            log.warning("Upload abandoned by the client; nothing stored")
            return _error(400, "client_disconnected", "The upload was cut off before it was complete")
        except OSError as exc:
            return _storage_error(exc)
        if parsed.file is None:
            return _error(400, 'Missing file field "file"', 'The upload has no file: send it in the form field "file"')
        try:
            role, account = named(parsed.fields)  # fields after the file part count too
            try:
                labels = upload_labels(parsed.fields)
            except InvalidLabel as exc:
                return _error(400, "invalid_label", f"Upload refused: {exc}")
            try:
                return await run_in_threadpool(self._accept, parsed.file, role or DEFAULT_ROLE, account or client,
                                               labels)
            except OSError as exc:
                return _storage_error(exc)
        finally:
            parsed.file.tmp_path.unlink(missing_ok=True)  # accepted files were renamed away already

    def _ticket_identity(self, request: Request, client: str) -> tuple[str, str]:
        """With SMT_UPLOAD_TICKET_SECRET: a valid ticket's role and account; no ticket: an anonymous
        customer counted by client address. A ticket that is present but bad raises TicketError."""
        assert self.settings.upload_ticket_secret is not None
        raw = request.headers.get("x-smt-upload-ticket")
        if raw is None:
            return "customer", client
        ticket = verify(self.settings.upload_ticket_secret.reveal(), raw)
        return ticket.role, ticket.account

    def _accept(self, received: ReceivedFile, role: str, account: str,
                labels: tuple[str | None, str | None] = (None, None)) -> JSONResponse:
        """``labels``: the upload's ``esiid`` and ``meter``, kept for the delivery of these bytes before the
        file is visible in the inbox (so ``watch`` cannot take it without them)."""
        now = time.time()
        window = self.settings.upload_window(role)
        since = now - window
        row = self.ledger.get(received.sha256)  # before the slot: a ledger lost here counts and stores nothing
        if not self.ledger.take_upload_slot(role, account, since, self._limit(role), now):
            return self._limited(role, account, self.ledger.uploads_since(role, account, since))
        name = f"{datetime.fromtimestamp(now, UTC):%Y%m%dT%H%M%S}_{safe_name(received.filename or '')}"
        duplicate = row is not None and row.state == "sent"
        if duplicate:
            log.info("Upload %s is a duplicate of sent content (sha256 %s); not stored", name, received.sha256[:12])
            message = f"Already delivered: this file's content was sent before (sha256 {received.sha256[:12]})"
        else:
            os.chmod(received.tmp_path, 0o640)
            if any(labels):
                self.ledger.declare_labels(received.sha256, *labels)
            name = self._publish(received.tmp_path, name)
            log.info("Stored upload %s (%d bytes, sha256 %s, %s %s%s)", name, received.size, received.sha256[:12],
                     role, _shown(account), "".join(f", {k} {v}" for k, v in zip(("esiid", "meter"), labels,
                                                                                     strict=True) if v))
            if is_candidate(PurePosixPath(name), self.settings.patterns):
                message = f"Upload accepted and queued for delivery as {name}"
            else:
                message = (f"Upload stored as {name}, but that name does not match SMT_PATTERNS "
                           f"({','.join(self.settings.patterns)}): it will not be delivered")
        limit = self._limit(role)
        remaining: int | None
        try:
            times = self.ledger.uploads_since(role, account, since)
            queue = self._queue(0 if duplicate else 1)
            remaining = max(0, limit - len(times))
        except LedgerUnavailable:  # stored and counted already: say so, leaving out what cannot be known now
            times, queue, remaining = [], {"position": None, "etaSeconds": None}, None
        return JSONResponse(
            {"ok": True, "message": message, "duplicate": duplicate,
             "file": {"name": name, "size": received.size, "sha256": received.sha256,
                      "path": None if duplicate else str(self.settings.local_dir / name),
                      "interval": "interval" in name.lower()},  # the Node server's own test of a name
             "ingest": {"queued": not duplicate, "filesProcessed": 0, "intervalsInserted": 0, "normalized": False},
             "remaining": remaining,
             "meta": {"role": role, "accountKey": account, "limit": limit, "remaining": remaining,
                      "resetAt": utc_stamp((times[0] if times else now) + window)},
             "queue": queue},
            status_code=202,
        )

    def _queue(self, this: int) -> dict[str, float | int | None]:
        """``position``: files not delivered yet, this one included (1: it is next); ``etaSeconds``: that
        many deliveries at the recent pace per worker, plus the settle time; null without recent ones."""
        waiting = self.ledger.undelivered_count() + this
        recent = self.ledger.recent_send_seconds(QUEUE_SAMPLE, since=time.time() - 86400)
        eta = None
        if recent and waiting:
            per_file = sorted(recent)[len(recent) // 2]
            rounds = -(-waiting // max(1, self.settings.workers))
            eta = round(self.settings.settle_seconds + rounds * per_file, 1)
        return {"position": waiting, "etaSeconds": eta}

    def _publish(self, tmp: Path, name: str) -> str:
        """Hard-link the finished temp file under its final name, never over another upload, then drop
        the temp name. ``link`` fails atomically if the name exists, so two same-second uploads of one
        name cannot overwrite each other (a check-then-rename could)."""
        stamp, _, base = name.partition("_")
        n = 0
        while True:
            dest = self.settings.local_dir / (name if n == 0 else f"{stamp}_{n}_{base}")
            try:
                os.link(tmp, dest)
            except FileExistsError:
                n += 1
                continue
            tmp.unlink()
            return dest.name

    # --- POST /trigger/smt-now ----------------------------------------------------------------------

    async def trigger(self, request: Request) -> Response:
        """Reasons that mean "fetch new SMT files" start (or join) one sync pass. Any other reason is the
        old bridge's business: passed through to it when SMT_WEBHOOK_FORWARD_URL is set, else answered
        ``200 {started: false}`` as the bridge answers reasons it does not know (nothing runs)."""
        s = self.settings
        if not s.webhook_secrets:
            if self.bridge is not None:
                return await self.bridge.forward(request)  # the bridge checks its own secret
            return _error(503, "webhook_disabled",
                          "The trigger webhook is disabled: set INTELLIWATT_WEBHOOK_SECRET (or DROPLET_WEBHOOK_SECRET)")
        # either secret, as the bridge: the app sends one or the other from different routes
        if not _matches_any(request, s.webhook_secrets):
            return _error(401, "unauthorized", "Missing or wrong webhook secret header")
        try:
            raw = await read_capped(request, WEBHOOK_MAX_BYTES, s.upload_idle_seconds)
        except UploadTooLarge:
            return _error(413, "too_large", f"A trigger body is at most {human_bytes(WEBHOOK_MAX_BYTES)}",
                          maxBytes=WEBHOOK_MAX_BYTES)
        except UploadStalled as exc:
            return _error(408, "timeout", f"No data for {exc.idle_seconds:g} s", headers={"Connection": "close"})
        try:
            body = json.loads(raw) if raw.strip() else {}
        except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
            return _error(400, "invalid_json", "The body must be JSON")
        if not isinstance(body, dict):
            return _error(400, "invalid_json", "The body must be a JSON object")
        reason = body.get("reason")
        if reason is not None and not isinstance(reason, str):
            return _error(400, "invalid_reason", "reason must be a string")
        if reason is not None and reason not in REASONS:
            if self.bridge is not None:
                return await self.bridge.forward(request, raw)
            log.info("Trigger reason %s is not handled here; nothing started", _shown(reason, 64))
            return JSONResponse({"ok": True, "started": False, "reason": reason,
                                 "message": f"Reason {_shown(reason, 64)!r} is not handled here; nothing started"})
        if not (s.smt_host and s.smt_user and s.smt_key):
            return _error(503, "sync_not_configured", "Sync is not configured: set SMT_HOST, SMT_USER and SMT_KEY")
        force = body.get("forceRepost") is True
        esiid: str | None = None
        if force:  # per customer, as the old bridge ran its script for the payload's ESIID, and nothing without
            try:
                sent = body.get("esiid")
                esiid = clean_esiid(sent if isinstance(sent, str) or sent is None else json.dumps(sent))
            except InvalidLabel as exc:
                return _error(400, "invalid_esiid", f"forceRepost refused: {exc}")
        # that customer's files already in the inbox, sent or not; and what this pass fetches (sync forgets it)
        reposted = await run_in_threadpool(repost_esiid, s, self.ledger, esiid) if esiid else None
        sync_id, joined = self.runner.trigger(esiid is not None)
        message = "Joined the sync pass already running" if joined else "Sync pass started"
        if reposted is not None:
            message += f"; {_repost_said(reposted, esiid or '')}"
        elif force:
            message += "; forceRepost needs the payload's esiid (whose files to send again): nothing re-posted"
        reply = {"ok": True, "syncId": sync_id, "joined": joined, "started": True, "message": message}
        if force:  # files of that ESIID already in the inbox that watch sends again
            reply["reposted"] = reposted.files if reposted else 0
        return JSONResponse(reply, status_code=202)

    async def elsewhere(self, request: Request, owned: dict[str, list[str]]) -> Response:
        """Every path ``serve`` does not route: the old bridge's (``/agreements``, ``/smt/*``, …).
        ``owned``: this app's own paths and their methods (another method there is a 405, not the bridge's)."""
        if request.url.path in owned:
            return _error(405, "method_not_allowed", f"{request.method} is not allowed on {request.url.path}",
                          headers={"Allow": ", ".join(owned[request.url.path])})
        if self.bridge is not None:
            return await self.bridge.forward(request)
        return _error(404, "not_found", f"No such route: {request.method} {_shown(request.url.path)}")

    # --- GET / ---------------------------------------------------------------------------------------

    async def page(self, request: Request) -> Response:
        """The built-in upload page: for operators when the web app is down, and for testing by hand."""
        return HTMLResponse(upload_page(), headers={"Cache-Control": "no-store", "X-Frame-Options": "DENY",
                                                  "Content-Security-Policy": PAGE_CSP})

    # --- /status: the status page (SMT_STATUS_TOKEN) ----------------------------------------------------

    async def _session(self, request: Request) -> str | None:
        """The request's status session cookie, if it is a valid one (of the ledger's current generation)."""
        token = self.settings.status_token
        cookie = request.cookies.get(status_page.COOKIE)
        if token is None or not cookie:
            return None
        return cookie if await run_in_threadpool(Sessions(token, self.ledger).valid, cookie) else None

    def _throttled(self, request: Request) -> int | None:
        """Seconds this client must wait before its next status token is looked at, or None."""
        return self.throttle.retry_after(request.client.host if request.client else "-")

    def _wrong_token(self, request: Request) -> None:
        self.throttle.failed(request.client.host if request.client else "-")

    def _foreign(self, request: Request) -> bool:
        """A POST whose Origin is not this server (a missing Origin is judged by the CSRF token alone)."""
        origin = request.headers.get("origin")
        return origin is not None and not same_origin(origin, request.headers.get("host"))

    @staticmethod
    def _html(body: str, status: int = 200, headers: dict[str, str] | None = None) -> HTMLResponse:
        # Referrer-Policy same-origin, not no-referrer: under no-referrer the forms' Origin would be "null"
        return HTMLResponse(body, status_code=status, headers={
            "Cache-Control": "no-store", "X-Frame-Options": "DENY", "Referrer-Policy": "same-origin",
            "Content-Security-Policy": status_page.CSP, **(headers or {})})

    @staticmethod
    def _see_status(notice: str | None = None) -> Response:
        return Response(status_code=303, headers={"Location": "/status" + (f"?done={notice}" if notice else ""),
                                                  "Cache-Control": "no-store"})

    async def _form(self, request: Request) -> dict[str, str]:
        raw = await read_capped(request, STATUS_FORM_MAX_BYTES, self.settings.upload_idle_seconds)
        pairs = parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True, max_num_fields=8)
        return {k: v[0] for k, v in pairs.items()}

    async def status(self, request: Request) -> Response:
        if self.settings.status_token is None:
            return self._html(status_page.disabled_page(), 404)
        session = await self._session(request)
        if session is None:
            return self._html(status_page.login_page(), 401)
        state = await run_in_threadpool(gather, self.settings, self.ledger)
        done = request.query_params.get("done", "")
        notice = (f"Back to pending: {done}; watch delivers it shortly" if re.fullmatch(r"[0-9a-f]{12}", done)
                  else "Nothing to retry: that row is not failed or retrying any more" if done == "none" else None)
        return self._html(status_page.status_page(state, status_page.csrf_token(self.settings.status_token, session),
                                                  notice=notice))

    async def status_json(self, request: Request) -> Response:
        token = self.settings.status_token
        if token is None:
            return _error(404, "status_disabled", "The status page is off: set SMT_STATUS_TOKEN")
        bearer = request.headers.get("authorization", "")
        sent = bearer[7:] if bearer[:7].lower() == "bearer " else None
        if await self._session(request) is None:
            if (wait := self._throttled(request)) is not None:
                return _error(429, "too_many_attempts", f"Too many wrong status tokens; try again in {wait} s",
                              headers={"Retry-After": str(wait)})
            if not status_page.token_matches(token, sent):
                if sent is not None:
                    self._wrong_token(request)
                return _error(401, "unauthorized",
                              "Sign in at /status, or send Authorization: Bearer <SMT_STATUS_TOKEN>")
        state = await run_in_threadpool(gather, self.settings, self.ledger)
        return JSONResponse(state.to_json(), headers={"Cache-Control": "no-store"})

    async def status_login(self, request: Request) -> Response:
        token = self.settings.status_token
        if token is None:
            return self._html(status_page.disabled_page(), 404)
        if self._foreign(request):
            return self._html(status_page.login_page("Refused: this form was sent from another site."), 403)
        if (wait := self._throttled(request)) is not None:  # before the form is read: the token is not looked at
            return self._html(status_page.login_page(f"Too many wrong tokens: try again in {wait} s."), 429,
                              {"Retry-After": str(wait)})
        try:
            form = await self._form(request)
        except (UploadTooLarge, UploadStalled, ValueError):
            return self._html(status_page.login_page("Refused: not a sign-in form."), 400)
        if not status_page.token_matches(token, form.get("token")):
            self._wrong_token(request)  # logged there, within a bound per window
            return self._html(status_page.login_page("Wrong token."), 401)
        # https as the client sees it: uvicorn takes X-Forwarded-Proto from SMT_TRUSTED_PROXIES only
        secure = "; Secure" if request.url.scheme == "https" else ""
        session = await run_in_threadpool(Sessions(token, self.ledger).new)
        cookie = (f"{status_page.COOKIE}={session}; Path=/status; HttpOnly; SameSite=Strict; "
                  f"Max-Age={SESSION_SECONDS}{secure}")
        response = self._see_status()
        response.headers["Set-Cookie"] = cookie
        return response

    async def _checked_post(self, request: Request) -> tuple[dict[str, str], Response | None]:
        """The form of a signed-in POST, or the refusal: no session 401, foreign Origin or bad CSRF 403."""
        token = self.settings.status_token
        if token is None:
            return {}, self._html(status_page.disabled_page(), 404)
        session = await self._session(request)
        if session is None:
            return {}, self._html(status_page.login_page("Sign in first."), 401)
        if self._foreign(request):
            log.warning("Status page: POST refused, Origin %s is not this server", _shown(request.headers["origin"]))
            return {}, _error(403, "origin_not_allowed", "Refused: this form was sent from another site")
        try:
            form = await self._form(request)
        except (UploadTooLarge, UploadStalled, ValueError):
            return {}, _error(400, "invalid_form", "Not a status page form")
        if not status_page.csrf_valid(token, session, form.get("csrf")):
            log.warning("Status page: POST refused, missing or wrong CSRF token")
            return {}, _error(403, "csrf", "Refused: the form's CSRF token is missing or wrong; reload /status")
        return form, None

    async def status_retry(self, request: Request) -> Response:
        """The retry button: what ``smt-watch ledger retry SHA256`` does (the row back to ``pending``)."""
        form, refused = await self._checked_post(request)
        if refused is not None:
            return refused
        sha = form.get("sha256", "")
        if not SHA256_RE.fullmatch(sha):
            return _error(400, "invalid_sha256", "sha256 must be 64 lower-case hex digits")
        moved = await run_in_threadpool(self.ledger.retry, [sha])
        client = request.client.host if request.client else "-"
        log.info("Status page: retry of %s from %s: %s", sha[:12], client,
                 "back to pending" if moved else "nothing to retry")
        return self._see_status(sha[:12] if moved else "none")

    async def status_logout(self, request: Request) -> Response:
        """Sign-out ends every session issued so far (the ledger's session generation goes up), not only
        this browser's cookie."""
        _, refused = await self._checked_post(request)
        if refused is not None:
            return refused
        assert self.settings.status_token is not None  # _checked_post refuses without one
        await run_in_threadpool(Sessions(self.settings.status_token, self.ledger).end_all)
        log.info("Status page: signed out from %s; every session issued before is ended",
                 request.client.host if request.client else "-")
        response = self._see_status()
        response.headers["Set-Cookie"] = (f"{status_page.COOKIE}=; Path=/status; HttpOnly; SameSite=Strict; "
                                          "Max-Age=0")
        return response

    # --- GET /health --------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        counts = await run_in_threadpool(self.ledger.counts)
        inbox = str(self.settings.local_dir)
        # service, uploadDir and maxBytes as IntelliWatt's Node upload server answers; inbox and ledger ours
        return JSONResponse({"ok": True, "service": "smt-watch", "uploadDir": inbox,
                             "maxBytes": self.settings.upload_max_bytes, "inbox": inbox, "ledger": counts})

    def app(self, *, uploads: bool = True) -> Starlette:
        routes = [
            Route("/trigger/smt-now", self.trigger, methods=["POST"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/healthz", self.health, methods=["GET"]),
        ]
        if uploads:
            routes[:0] = [Route("/upload", self.upload, methods=["POST"]),
                          Route("/", self.page, methods=["GET"]),
                          Route("/status", self.status, methods=["GET"]),
                          Route("/status.json", self.status_json, methods=["GET"]),
                          Route("/status/login", self.status_login, methods=["POST"]),
                          Route("/status/retry", self.status_retry, methods=["POST"]),
                          Route("/status/logout", self.status_logout, methods=["POST"])]
        owned = {r.path: sorted(r.methods or ()) for r in routes}

        async def elsewhere(request: Request) -> Response:
            return await self.elsewhere(request, owned)

        routes.append(Route("/{path:path}", elsewhere, methods=list(ANY_METHOD)))
        cors = Middleware(
            CORSMiddleware, allow_origins=list(self.settings.cors_origins), allow_methods=["POST", "GET"],
            allow_headers=["content-type", "x-smt-upload-token", "x-smt-upload-role", "x-smt-upload-account-key",
                           "x-smt-upload-ticket"],
            max_age=600,
        )
        return Starlette(routes=routes, middleware=[Middleware(CloseUnreadBody), cors],
                         exception_handlers={LedgerUnavailable: self._ledger_unavailable})

    async def _ledger_unavailable(self, request: Request, exc: Exception) -> Response:
        """The shared ledger cannot be reached: nothing was stored (an upload's temp file is removed on the
        way out), and the client is told when to try again."""
        return _error(503, "ledger_unavailable", "The ledger cannot be reached right now; try again shortly",
                      headers={"Retry-After": str(LEDGER_RETRY_AFTER), "Connection": "close"})


def head_deadline_protocol(settings: Settings) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a deadline for each request head (SMT_UPLOAD_IDLE_SECONDS). uvicorn has
    none: a client that opens a connection and never finishes its headers (slowloris) holds it forever. The
    deadline runs from the connection (or the first byte of a later request's head) to the end of the head,
    so dribbling bytes does not extend it; once the head is complete, the body's own idle timeout takes
    over. Its lingering close has the SMT_LINGER_* bounds, the idle one at most SMT_UPLOAD_IDLE_SECONDS."""
    seconds = settings.upload_idle_seconds

    class HeadDeadline(LingeringH11Protocol):
        _head_timer: asyncio.TimerHandle | None = None
        linger_idle_seconds = min(settings.linger_idle_seconds, seconds)
        linger_seconds = settings.linger_seconds
        linger_max_bytes = settings.linger_max_bytes

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._watch_head()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch_head()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

        def _watch_head(self) -> None:
            if self.conn.their_state is h11.IDLE:  # no complete request head yet
                if self._head_timer is None:
                    self._head_timer = self.loop.call_later(seconds, self._head_expired)
            else:
                self._cancel_head_timer()

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_expired(self) -> None:
            self._head_timer = None
            if not self.transport.is_closing():
                log.warning("Closing a connection from %s: no complete request head in %g s",
                            self.client[0] if self.client else "?", seconds)
                self.transport.close()

    return HeadDeadline


def uvicorn_config(app: Starlette, settings: Settings) -> uvicorn.Config:
    """How ``serve`` runs uvicorn: the head deadline, and proxy headers believed only from
    SMT_TRUSTED_PROXIES (uvicorn's default trusts X-Forwarded-For from 127.0.0.1, so any local client could
    pick its own rate-limit account)."""
    trusted = list(settings.trusted_proxies)
    return uvicorn.Config(app, log_config=None, lifespan="off", timeout_graceful_shutdown=30,
                          http=head_deadline_protocol(settings),
                          proxy_headers=bool(trusted), forwarded_allow_ips=trusted or None)


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: ``serve`` runs two of them and stops both together."""

    @contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def build(settings: Settings, ledger: Ledger) -> Server:
    create_inbox(settings.local_dir)
    if settings.status_token is not None:
        Sessions(settings.status_token, ledger).adopt_token()
    bridge = Bridge(settings.webhook_forward_url, settings) if settings.webhook_forward_url else None
    return Server(settings, ledger, SyncRunner(settings), bridge)


def _listen(host: str, port: int) -> socket.socket:
    """Bind before serving, so a port in use is one clear error instead of uvicorn exiting a task."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        raise SmtWatchError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


async def serve_forever(server: Server) -> None:
    """Listen on SMT_UPLOAD_HOST:SMT_UPLOAD_PORT, and on SMT_WEBHOOK_HOST:SMT_WEBHOOK_PORT for the trigger,
    health and pass-through routes only (the web app calls the trigger there directly, as the old bridge on
    0.0.0.0:8787). SMT_WEBHOOK_PORT=0: the upload port alone, which serves the trigger too."""
    s = server.settings
    if s.webhook_port is not None and s.webhook_port == s.upload_port:
        raise ConfigError(f"SMT_WEBHOOK_PORT {s.webhook_port} is SMT_UPLOAD_PORT too: give the trigger another "
                          "port, or set SMT_WEBHOOK_PORT=0 to serve it on the upload port alone")
    apps = [(server.app(), s.upload_host, s.upload_port)]
    if s.webhook_port:
        apps.append((server.app(uploads=False), s.webhook_host, s.webhook_port))
    sockets: list[socket.socket] = []
    try:
        for _, host, port in apps:
            sockets.append(_listen(host, port))
    except SmtWatchError:
        for sock in sockets:
            sock.close()
        raise
    servers = [_Uvicorn(uvicorn_config(app, s)) for app, _, _ in apps]
    loop = asyncio.get_running_loop()

    def stop() -> None:
        for srv in servers:
            srv.force_exit = srv.should_exit
            srv.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    ports = [sock.getsockname()[1] for sock in sockets]
    log.info("Serving uploads on http://%s:%d/upload%s", s.upload_host, ports[0],
             f" and the webhook on http://{s.webhook_host}:{ports[1]}/trigger/smt-now" if len(ports) > 1 else "")
    if server.bridge is not None:
        log.info("Passing what serve does not handle to the webhook bridge at %s", server.bridge.shown)
    try:
        await asyncio.gather(*(srv.serve(sockets=[sock]) for srv, sock in zip(servers, sockets, strict=True)))
    finally:
        if server.bridge is not None:
            await server.bridge.aclose()


def run(settings: Settings, ledger: Ledger) -> None:
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uv = logging.getLogger(name)
        uv.handlers = logging.getLogger("smt_watch").handlers
        uv.setLevel(logging.INFO)
        uv.propagate = False
    asyncio.run(serve_forever(build(settings, ledger)))
