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

import errno
import functools
import hmac
import json
import logging
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Final

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from smt_watch.bridge import Bridge
from smt_watch.clock import utc_stamp
from smt_watch.config import Secret, Settings
from smt_watch.errors import (
    LedgerUnavailable,
    MalformedUpload,
    SmtWatchError,
    TicketError,
    UploadStalled,
    UploadTooLarge,
)
from smt_watch.esiids import InvalidLabel, Repost, clean_esiid, clean_meter, repost_esiid
from smt_watch.inbox import create_inbox, is_candidate
from smt_watch.ledger import Ledger
from smt_watch.linger import CloseUnreadBody
from smt_watch.replies import client_text, error_reply, read_capped, same_origin
from smt_watch.sessions import Sessions
from smt_watch.sizes import exact_bytes
from smt_watch.status_web import StatusWeb
from smt_watch.tickets import verify
from smt_watch.uploads import ReceivedFile, read_multipart

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


def _storage_error(exc: OSError) -> JSONResponse:
    log.error("Upload not stored: %s", exc.strerror or exc)
    if exc.errno == errno.ENOSPC:
        return error_reply(507, "insufficient_storage", "The server's disk is full; the upload was not stored")
    return error_reply(507, "storage_error", f"The upload could not be stored: {exc.strerror or 'I/O error'}")


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
    status_web: StatusWeb = field(init=False)  # the /status web app, on the upload port only

    def __post_init__(self) -> None:
        self.status_web = StatusWeb(self.settings, self.ledger)

    # --- POST /upload -------------------------------------------------------------------------------

    def _limit(self, role: str) -> int:
        return self.settings.upload_limit(role)

    def _limited(self, role: str, account: str, times: list[float]) -> JSONResponse:
        window = self.settings.upload_window(role)
        reset = times[0] + window if times else time.time() + window
        return error_reply(429, "rate_limited", f"{RATE_MESSAGES[role]}; it resets at {utc_stamp(reset)}",
                           role=role, accountKey=account, limit=self._limit(role), remaining=0,
                           resetAt=utc_stamp(reset),
                           headers={"Retry-After": str(max(1, int(reset - time.time()) + 1))})

    def _origin_refused(self, request: Request) -> JSONResponse | None:
        """A browser page from an origin not in SMT_UPLOAD_CORS_ORIGINS (nor this server's own page)."""
        origin = request.headers.get("origin")
        allowed = self.settings.cors_origins
        if origin is None or "*" in allowed or origin in allowed or same_origin(origin, request.headers.get("host")):
            return None
        log.warning("Upload refused: origin %s is not in SMT_UPLOAD_CORS_ORIGINS", client_text(origin))
        return error_reply(403, "origin_not_allowed",
                           f"Uploads from {client_text(origin)} are not allowed here (SMT_UPLOAD_CORS_ORIGINS)")

    async def upload(self, request: Request) -> Response:
        """At most SMT_UPLOAD_MAX_CONCURRENT uploads at once (one event loop: a plain count is exact);
        beyond that ``503`` with ``Retry-After`` before a byte of the body is read."""
        if self._active >= self.settings.upload_max_concurrent:
            log.warning("Upload refused: %d uploads already in progress (SMT_UPLOAD_MAX_CONCURRENT)", self._active)
            return error_reply(503, "busy", f"The server is taking {self._active} uploads already; try again shortly",
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
            return error_reply(401, "unauthorized", "Invalid or missing SMT upload token")
        ctype = (request.headers.get("content-type") or "").split(";", 1)[0].strip().lower()
        if ctype != "multipart/form-data":
            return error_reply(415, "unsupported_media_type",
                               'Send the file as multipart/form-data, in the form field "file"')
        client = request.client.host if request.client else "-"
        ticketed = s.upload_ticket_secret is not None
        header_role: str | None
        header_account: str | None
        if ticketed:  # the identity comes from a signed ticket only; fields and headers cannot declare it
            try:
                header_role, header_account = self._ticket_identity(request, client)
            except TicketError as exc:
                return error_reply(401, "invalid_ticket", f"Upload refused: {exc}")
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
                raise _Refused(error_reply(400, "invalid_label", f"Upload refused: {exc}")) from None
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
            return error_reply(408, "timeout", f"No data for {exc.idle_seconds:g} s: the upload was abandoned")
        except UploadTooLarge:
            return error_reply(413, "too_large", f"File too large: the limit is {exact_bytes(s.upload_max_bytes)}",
                               maxBytes=s.upload_max_bytes)
        except MalformedUpload as exc:
            return error_reply(400, "malformed_upload", f"The upload could not be read: {exc}")
        except ClientDisconnect:
            log.warning("Upload abandoned by the client; nothing stored")
            return error_reply(400, "client_disconnected", "The upload was cut off before it was complete")
        except OSError as exc:
            return _storage_error(exc)
        if parsed.file is None:
            return error_reply(400, 'Missing file field "file"',
                               'The upload has no file: send it in the form field "file"')
        try:
            role, account = named(parsed.fields)  # fields after the file part count too
            try:
                labels = upload_labels(parsed.fields)
            except InvalidLabel as exc:
                return error_reply(400, "invalid_label", f"Upload refused: {exc}")
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
                     role, client_text(account), "".join(f", {k} {v}" for k, v in zip(("esiid", "meter"), labels,
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
            return error_reply(503, "webhook_disabled",
                               "The trigger webhook is disabled: set INTELLIWATT_WEBHOOK_SECRET "
                               "(or DROPLET_WEBHOOK_SECRET)")
        # either secret, as the bridge: the app sends one or the other from different routes
        if not _matches_any(request, s.webhook_secrets):
            return error_reply(401, "unauthorized", "Missing or wrong webhook secret header")
        try:
            raw = await read_capped(request, WEBHOOK_MAX_BYTES, s.upload_idle_seconds)
        except UploadTooLarge:
            return error_reply(413, "too_large", f"A trigger body is at most {exact_bytes(WEBHOOK_MAX_BYTES)}",
                               maxBytes=WEBHOOK_MAX_BYTES)
        except UploadStalled as exc:
            return error_reply(408, "timeout", f"No data for {exc.idle_seconds:g} s", headers={"Connection": "close"})
        try:
            body = json.loads(raw) if raw.strip() else {}
        except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
            return error_reply(400, "invalid_json", "The body must be JSON")
        if not isinstance(body, dict):
            return error_reply(400, "invalid_json", "The body must be a JSON object")
        reason = body.get("reason")
        if reason is not None and not isinstance(reason, str):
            return error_reply(400, "invalid_reason", "reason must be a string")
        if reason is not None and reason not in REASONS:
            if self.bridge is not None:
                return await self.bridge.forward(request, raw)
            log.info("Trigger reason %s is not handled here; nothing started", client_text(reason, 64))
            return JSONResponse({"ok": True, "started": False, "reason": reason,
                                 "message": f"Reason {client_text(reason, 64)!r} is not handled here; nothing started"})
        if not (s.smt_host and s.smt_user and s.smt_key):
            return error_reply(503, "sync_not_configured", "Sync is not configured: set SMT_HOST, SMT_USER and SMT_KEY")
        force = body.get("forceRepost") is True
        esiid: str | None = None
        if force:  # per customer, as the old bridge ran its script for the payload's ESIID, and nothing without
            try:
                sent = body.get("esiid")
                esiid = clean_esiid(sent if isinstance(sent, str) or sent is None else json.dumps(sent))
            except InvalidLabel as exc:
                return error_reply(400, "invalid_esiid", f"forceRepost refused: {exc}")
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
            return error_reply(405, "method_not_allowed", f"{request.method} is not allowed on {request.url.path}",
                               headers={"Allow": ", ".join(owned[request.url.path])})
        if self.bridge is not None:
            return await self.bridge.forward(request)
        return error_reply(404, "not_found", f"No such route: {request.method} {client_text(request.url.path)}")

    # --- GET / ---------------------------------------------------------------------------------------

    async def page(self, request: Request) -> Response:
        """The built-in upload page: for operators when the web app is down, and for testing by hand."""
        return HTMLResponse(upload_page(), headers={"Cache-Control": "no-store", "X-Frame-Options": "DENY",
                                                  "Content-Security-Policy": PAGE_CSP})

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
                          Route("/status", self.status_web.status, methods=["GET"]),
                          Route("/status.json", self.status_web.status_json, methods=["GET"]),
                          Route("/status/login", self.status_web.status_login, methods=["POST"]),
                          Route("/status/retry", self.status_web.status_retry, methods=["POST"]),
                          Route("/status/logout", self.status_web.status_logout, methods=["POST"])]
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
        return error_reply(503, "ledger_unavailable", "The ledger cannot be reached right now; try again shortly",
                           headers={"Retry-After": str(LEDGER_RETRY_AFTER), "Connection": "close"})


def build(settings: Settings, ledger: Ledger) -> Server:
    create_inbox(settings.local_dir)
    if settings.status_token is not None:
        Sessions(settings.status_token, ledger).adopt_token()
    bridge = Bridge(settings.webhook_forward_url, settings) if settings.webhook_forward_url else None
    return Server(settings, ledger, SyncRunner(settings), bridge)

