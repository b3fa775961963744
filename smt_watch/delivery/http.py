"""The one HTTP poster every sink sends through: a keep-alive client, in-call retries, error mapping.

A sink decides what to send; :class:`Poster` decides how: one ``httpx.Client`` per sink (shared by the
watch's worker threads), ``SMT_RETRY_ATTEMPTS`` requests per call with exponential backoff that honours
``Retry-After``, and a ``Retry-After`` longer than :data:`IN_CALL_MAX_WAIT` ending the call at once (the row
then waits as ``retrying``). httpx's transport errors become :class:`RetryableDelivery` in one place,
:func:`map_transport_errors`, as httpx maps httpcore's. Response bodies are scrubbed of every secret before
an error or the ledger quotes them.

Every request, retries and each raw-upload chunk included, first passes the outbound limit
(:mod:`smt_watch.limits`, ``SMT_MAX_REQUESTS_PER_SECOND``/``SMT_MAX_IN_FLIGHT``): an attempt is counted
only once the limiter let it through, and the backoff between attempts holds no in-flight slot.
"""

from __future__ import annotations

import logging
import random
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Final

import httpx
import tenacity
from tenacity.stop import stop_base

from smt_watch.config import redact_url
from smt_watch.delivery.base import Body, Classify, Progress, classify
from smt_watch.errors import DeliveryError, RetryableDelivery
from smt_watch.limits import limiter_for
from smt_watch.logs import redact_text, redaction_pattern
from smt_watch.tls import plain_reason, verify_for

if TYPE_CHECKING:
    from smt_watch.config import Secret, Settings

log = logging.getLogger("smt_watch.delivery")

IN_CALL_MAX_WAIT: Final = 60.0  # longer Retry-After: give up this call, the row waits as `retrying`
RETRY_CAP: Final = 15 * 60.0  # docs/contract.md §4: backoff between calls is capped at 15 minutes
ERROR_BODY_BYTES: Final = 500


def backoff_delay(failures: int, base: float, retry_after: float | None = None, cap: float = RETRY_CAP) -> float:
    """Exponential backoff with full jitter on the upper half, honouring ``Retry-After`` as a floor."""
    step = min(cap, base * 2.0 ** max(0, failures - 1))
    delay = step / 2 + random.uniform(0, step / 2)
    if retry_after is not None:
        delay = max(delay, min(retry_after, cap))
    return delay


class _StopOnLongRetryAfter(stop_base):
    """A ``Retry-After`` longer than we wait in-call ends the call; the row then waits as ``retrying``."""

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        return isinstance(exc, DeliveryError) and (exc.retry_after or 0) > IN_CALL_MAX_WAIT


@contextmanager
def map_transport_errors(destination: str) -> Iterator[None]:
    """Every httpx transport error (connect, timeout, protocol, dropped connection) is retryable.

    Chained ``from exc``: its text is already in our message, which quotes ``destination`` (no
    credentials); the log filter redacts URL user-info should a library's own text carry it."""
    try:
        yield
    except httpx.TransportError as exc:
        plain = plain_reason(str(exc))
        raise RetryableDelivery(f"{plain or type(exc).__name__} talking to {destination}: {exc}") from exc


def direct_transport_is_enough(url: str) -> bool:
    """No credentials in the URL and no proxy variable for its scheme (``HTTP(S)_PROXY``, ``ALL_PROXY``;
    ``NO_PROXY`` is not consulted: any proxy setting takes the full path)."""
    parsed = httpx.URL(url)
    proxies = urllib.request.getproxies()
    return not parsed.userinfo and not (proxies.get(parsed.scheme) or proxies.get("all"))


class Poster:
    """POSTs bodies to one URL over one keep-alive ``httpx.Client``, with in-call retries.

    ``auth`` is the header a sink authenticates with and its token (sent only when set); ``classify``
    reads each response (the default: :func:`~smt_watch.delivery.base.classify`); ``stop``, once set, ends
    a wait for the outbound limit with :class:`~smt_watch.limits.LimiterClosed` (nothing sent).
    """

    def __init__(self, settings: Settings, url: str, auth: tuple[str, Secret | None],
                 classify: Classify = classify, stop: threading.Event | None = None) -> None:
        self.url = url
        self.destination = redact_url(url)
        self._auth = auth
        self._classify = classify
        self._settings = settings
        self._limiter = limiter_for(settings, stop)
        self._secrets = redaction_pattern(settings.secrets())
        t = settings.http_timeout
        limits = httpx.Limits(max_connections=16, max_keepalive_connections=8)
        # Loading the CA bundle costs ~60 ms per start; a plain-http target (the droplet's loopback upload
        # server) never uses it, and redirects are not followed, so it cannot reach https. SMT_CA_BUNDLE and
        # SMT_CLIENT_CERT/KEY apply to https targets (smt_watch/tls.py).
        verify = verify_for(settings, url)
        timeout = httpx.Timeout(connect=min(10.0, t), read=t, write=t, pool=t)
        # For a plain target the client only builds requests (URL, headers, timeouts) and they go straight to
        # its transport: what Client.send adds (cookies, auth flows, redirects, hooks) is unused there and
        # cost ~10 % of the watcher's CPU per small file. Credentials in the URL or a proxy from the
        # environment need Client.send, so such a target takes that path.
        self._transport: httpx.HTTPTransport | None = None
        if direct_transport_is_enough(url):
            self._transport = httpx.HTTPTransport(limits=limits, verify=verify)
            self._client = httpx.Client(timeout=timeout, transport=self._transport, follow_redirects=False)
        else:
            self._client = httpx.Client(timeout=timeout, limits=limits, verify=verify, follow_redirects=False)

    def close(self) -> None:
        self._limiter.close()
        self._client.close()

    def post(self, name: str, key: str, body: Body, progress: Progress | None) -> tuple[int, str, int]:
        """One request (``key`` its ``Idempotency-Key``) with in-call retries; returns status, body text and
        the number of attempts, or raises a :class:`DeliveryError` with ``.attempts`` set. ``name`` is what
        the retry log lines call it."""
        attempts = 0
        s = self._settings

        def wait(state: tenacity.RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            retry_after = exc.retry_after if isinstance(exc, DeliveryError) else None
            return backoff_delay(state.attempt_number, s.retry_backoff, retry_after, cap=IN_CALL_MAX_WAIT)

        def before_sleep(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            delay = state.next_action.sleep if state.next_action else 0.0
            log.warning("Retrying %s in %.1fs after %s (attempt %d of %d)",
                        name, delay, exc, state.attempt_number, s.retry_attempts)

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(RetryableDelivery),
            stop=tenacity.stop_any(tenacity.stop_after_attempt(s.retry_attempts), _StopOnLongRetryAfter()),
            wait=wait,
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt, self._limiter.request():
                    attempts += 1  # only now: waiting for the limit is not an attempt
                    status, text = self._attempt(key, body, progress)
        except DeliveryError as exc:
            exc.attempts = attempts
            raise
        return status, text, attempts

    def _attempt(self, key: str, body: Body, progress: Progress | None) -> tuple[int, str]:
        header, token = self._auth
        headers = {
            "Content-Type": body.content_type,
            "Content-Length": str(body.length),
            "Idempotency-Key": key,
            "User-Agent": "smt-watch",
            **({header: token.reveal()} if token else {}),
        }
        request = self._client.build_request("POST", self.url, headers=headers, content=body.chunks(progress))
        with map_transport_errors(self.destination):
            if self._transport is not None:
                response = self._transport.handle_request(request)
            else:
                response = self._client.send(request, stream=True)
            try:
                response.read()
            finally:
                response.close()
        text = self._scrub(response.content[:ERROR_BODY_BYTES].decode("utf-8", "replace"))
        error = self._classify(response, text, self.destination)
        if error is not None:
            raise error
        return response.status_code, text

    def _scrub(self, text: str) -> str:
        return redact_text(text, self._secrets)
