"""The ``/status`` web app of ``serve`` (SMT_STATUS_TOKEN): sign-in with its throttle, sessions kept in the
ledger, CSRF-checked forms (retry, sign-out) and ``/status.json`` for scripts (docs/contract.md §5).

Its own module because its security model (a session cookie, CSRF, a wrong-token throttle) is not the
upload route's (an upload token or ticket, quotas); the pages themselves are :mod:`smt_watch.status_page`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import parse_qs

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from smt_watch import status_page
from smt_watch.config import Settings
from smt_watch.errors import UploadStalled, UploadTooLarge
from smt_watch.ledger import SHA256_RE, Ledger
from smt_watch.replies import client_text, error_reply, read_capped, same_origin
from smt_watch.sessions import SESSION_SECONDS, Sessions, SignInThrottle
from smt_watch.status import gather

log = logging.getLogger("smt_watch.server")  # the name operators grep for everything serve says

STATUS_FORM_MAX_BYTES: Final = 4096  # a status page form: a token, a hash, a CSRF token


@dataclass
class StatusWeb:
    """The ``/status`` routes, with the settings and ledger they read and the wrong-token throttle."""

    settings: Settings
    ledger: Ledger
    throttle: SignInThrottle = field(init=False)  # wrong status tokens, bounded by the settings

    def __post_init__(self) -> None:
        self.throttle = SignInThrottle.from_settings(self.settings)

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
            return error_reply(404, "status_disabled", "The status page is off: set SMT_STATUS_TOKEN")
        bearer = request.headers.get("authorization", "")
        sent = bearer[7:] if bearer[:7].lower() == "bearer " else None
        if await self._session(request) is None:
            if (wait := self._throttled(request)) is not None:
                return error_reply(429, "too_many_attempts", f"Too many wrong status tokens; try again in {wait} s",
                                   headers={"Retry-After": str(wait)})
            if not status_page.token_matches(token, sent):
                if sent is not None:
                    self._wrong_token(request)
                return error_reply(401, "unauthorized",
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
            log.warning("Status page: POST refused, Origin %s is not this server",
                        client_text(request.headers["origin"]))
            return {}, error_reply(403, "origin_not_allowed", "Refused: this form was sent from another site")
        try:
            form = await self._form(request)
        except (UploadTooLarge, UploadStalled, ValueError):
            return {}, error_reply(400, "invalid_form", "Not a status page form")
        if not status_page.csrf_valid(token, session, form.get("csrf")):
            log.warning("Status page: POST refused, missing or wrong CSRF token")
            return {}, error_reply(403, "csrf", "Refused: the form's CSRF token is missing or wrong; reload /status")
        return form, None

    async def status_retry(self, request: Request) -> Response:
        """The retry button: what ``smt-watch ledger retry SHA256`` does (the row back to ``pending``)."""
        form, refused = await self._checked_post(request)
        if refused is not None:
            return refused
        sha = form.get("sha256", "")
        if not SHA256_RE.fullmatch(sha):
            return error_reply(400, "invalid_sha256", "sha256 must be 64 lower-case hex digits")
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
