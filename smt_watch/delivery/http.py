"""The one HTTP poster every sink sends through: a keep-alive client, in-call retries, error mapping.

A sink decides what to send; :class:`Poster` decides how: for a plain target, one keep-alive HTTP/1.1
connection per sending thread over httpcore's network layer (:class:`_Http11`); behind a proxy or with
credentials in the URL, one ``httpx.Client`` per sink (shared by the watch's worker threads);
``SMT_RETRY_ATTEMPTS`` requests per call with exponential backoff that honours ``Retry-After``, and a
``Retry-After`` longer than :data:`IN_CALL_MAX_WAIT` ending the call at once (the row then waits as
``retrying``). httpx's transport errors become :class:`RetryableDelivery` in one place,
:func:`map_transport_errors`, as httpx maps httpcore's. Response bodies are scrubbed of every secret before
an error or the ledger quotes them.

Every request, retries and each raw-upload chunk included, first passes the outbound limit
(:mod:`smt_watch.limits`, ``SMT_MAX_REQUESTS_PER_SECOND``/``SMT_MAX_IN_FLIGHT``): an attempt is counted
only once the limiter let it through, and the backoff between attempts holds no in-flight slot.
"""

from __future__ import annotations

import logging
import random
import ssl
import threading
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Final

import httpcore
import httpx
import tenacity
from tenacity.stop import stop_base

from smt_watch.clock import pause
from smt_watch.config import redact_url
from smt_watch.delivery.base import Body, Classify, Progress, Reply, classify
from smt_watch.delivery.http11 import _answer, _decoded, _Http11, valid_header
from smt_watch.errors import ConfigError, DeliveryError, RetryableDelivery
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


_CORE_ERRORS: Final = (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError,
                       httpcore.ProxyError, httpcore.UnsupportedProtocol)


@contextmanager
def _as_httpx_errors() -> Iterator[None]:
    """httpcore's exceptions as httpx's of the same name, as httpx's own transport maps them."""
    try:
        yield
    except _CORE_ERRORS as exc:
        mapped = getattr(httpx, type(exc).__name__, None)
        if not (isinstance(mapped, type) and issubclass(mapped, httpx.TransportError)):
            mapped = httpx.TransportError
        raise mapped(str(exc)) from exc


HOLD_WRITE_BYTES: Final = 64 * 1024  # writes smaller than this wait for the next write or read (one send)


class _HeldWrites(httpcore.NetworkStream):
    """A connection's stream whose small writes wait for the next write or read: a request's head is
    written on its own, then its body; held, they leave in ONE send, so a small file's request is one
    segment on the wire and one wake-up of the server, not two. Nothing waits past the next read (the
    response is read only after the whole request was written), and a write of ``HOLD_WRITE_BYTES`` or more
    (a big file's chunks) is sent at once with whatever was held, so memory stays flat."""

    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream
        self._held = b""
        self._timeout: float | None = None

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        held = self._held + buffer if self._held else buffer
        if len(held) < HOLD_WRITE_BYTES:
            self._held, self._timeout = held, timeout
            return
        self._held = b""
        self._stream.write(held, timeout)

    def _flush(self) -> None:
        if self._held:
            held, self._held = self._held, b""
            self._stream.write(held, self._timeout)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        self._flush()
        return self._stream.read(max_bytes, timeout)

    def close(self) -> None:
        self._held = b""  # a request cut short (its body raised) is never completed by a late flush
        self._stream.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        self._flush()
        return _HeldWrites(self._stream.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _HeldWritesBackend(httpcore.NetworkBackend):
    """httpcore's own synchronous backend, its streams wrapped in :class:`_HeldWrites`."""

    def __init__(self) -> None:
        self._backend = httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        return _HeldWrites(self._backend.connect_tcp(host, port, timeout, local_address, socket_options))

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        return _HeldWrites(self._backend.connect_unix_socket(path, timeout, socket_options))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


class _ThreadConnections:
    """One keep-alive connection per sending thread (:class:`_Http11`, no pool around it). A watch worker
    sends one request at a time, so a pool's bookkeeping per request (a pool request object, a lock, two
    passes assigning requests to connections, the response wrapped again) buys nothing; a connection the
    server closed, or whose keep-alive expired, is replaced before it is used, as the pool would.
    :meth:`close` closes every thread's connection."""

    def __init__(self, origin: httpcore.Origin, ssl_context: ssl.SSLContext | None, keepalive_expiry: float | None
                 ) -> None:
        self._origin, self._ssl_context, self._keepalive_expiry = origin, ssl_context, keepalive_expiry
        self._backend = _HeldWritesBackend()
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: set[_Http11] = set()

    def handle(self, head: bytes, length: int, chunks: Iterable[bytes], timeouts: dict[str, float | None]
               ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """Status, headers and the whole body of the answer to the request; httpcore's exceptions raised."""
        conn: _Http11 | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = _Http11(self._origin, self._ssl_context, self._backend, self._keepalive_expiry)
        elif not conn.usable():
            conn.close()
        if not conn.connected:  # (re)connects: tracked again, so close() reaches it even after an earlier close()
            with self._lock:
                self._open.add(conn)
        return conn.exchange(head, length, chunks, timeouts)

    def close(self) -> None:
        with self._lock:
            conns, self._open = list(self._open), set()
        for conn in conns:
            conn.close()


def direct_transport_is_enough(url: str) -> bool:
    """No credentials in the URL and no proxy variable for its scheme (``HTTP(S)_PROXY``, ``ALL_PROXY``;
    ``NO_PROXY`` is not consulted: any proxy setting takes the full path)."""
    parsed = httpx.URL(url)
    proxies = urllib.request.getproxies()
    return not parsed.userinfo and not (proxies.get(parsed.scheme) or proxies.get("all"))


def _let_go(chunks: object) -> None:
    """Close a request body's generator at once: one cut short holds an open file and a hash thread, which
    would otherwise live as long as the traceback tenacity keeps through its backoff."""
    close = getattr(chunks, "close", None)
    if close is not None:
        close()


class Poster:
    """POSTs bodies to one URL, with in-call retries: over each sending thread's own keep-alive connection
    (:class:`_ThreadConnections`) for a plain target, over one ``httpx.Client`` behind a proxy or with
    credentials in the URL.

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
        self._secrets = redaction_pattern(settings.secrets())
        t = settings.http_timeout
        limits = httpx.Limits(max_connections=16, max_keepalive_connections=8)
        # Loading the CA bundle costs ~60 ms per start; a plain-http target (the droplet's loopback upload
        # server) never uses it, and redirects are not followed, so it cannot reach https. SMT_CA_BUNDLE and
        # SMT_CLIENT_CERT/KEY apply to https targets (smt_watch/tls.py).
        verify = verify_for(settings, url)
        timeout = httpx.Timeout(connect=min(10.0, t), read=t, write=t, pool=t)
        # For a target without credentials in its URL or a proxy from the environment, requests go straight to
        # the thread's own HTTP/1.1 connection (:meth:`_attempt_direct`): what Client.send adds (cookies, auth
        # flows, redirects, hooks), the request/response wrapping and h11's state machine are unused there and
        # cost over a third of the watcher's CPU per small file. Credentials in the URL or a proxy need Client.send.
        self._pool: _ThreadConnections | None = None
        self._client: httpx.Client | None = None
        header, token = auth
        raw_token = token.reveal().encode("latin-1", "replace") if token else b""
        if token and not valid_header(header.encode("latin-1", "replace"), raw_token):
            # refused once, here (never quoted): sent, it would fail every attempt, as h11 refused it at each
            raise ConfigError(f"the {header} token for {self.destination} cannot travel in an HTTP header "
                              f"(a CR, LF or NUL in it, or spaces around it)")
        self._limiter = limiter_for(settings, stop)  # after the refusal: nothing of it is left open then
        if direct_transport_is_enough(url):
            parsed = httpx.URL(url)
            self._pool = _ThreadConnections(
                httpcore.Origin(parsed.raw_scheme, parsed.raw_host, parsed.port or (443 if parsed.scheme == "https"
                                                                                    else 80)),
                httpx.create_ssl_context(verify=verify) if parsed.scheme == "https" else None,
                limits.keepalive_expiry)
            self._timeouts = timeout.as_dict()
            fixed: list[tuple[bytes, bytes]] = [
                (b"Host", parsed.netloc), (b"User-Agent", b"smt-watch"),
                *([(header.encode("latin-1"), raw_token)] if token else []),
            ]
            self._head_start = b"POST %s HTTP/1.1\r\n" % parsed.raw_path + b"".join(
                b"%s: %s\r\n" % field for field in fixed)
        else:
            self._client = httpx.Client(timeout=timeout, limits=limits, verify=verify, follow_redirects=False)

    def close(self) -> None:
        self._limiter.close()
        if self._pool is not None:
            self._pool.close()
        if self._client is not None:
            self._client.close()

    def post(self, name: str, key: str, body: Body, progress: Progress | None) -> tuple[int, str, int]:
        """One request (``key`` its ``Idempotency-Key``) with in-call retries; returns status, body text and
        the number of attempts, or raises a :class:`DeliveryError` with ``.attempts`` set. ``name`` is what
        the retry log lines call it.

        The first attempt runs without tenacity: nearly every request lands at once, and building a
        ``Retrying`` (closures, its iterator, its attempt objects) cost about a tenth of the request's CPU.
        Only a retryable failure builds it, and hands it that failure as attempt 1, so the waits, the log
        lines and the stops are what they would have been had tenacity run from the start."""
        attempts = 0
        try:
            with self._limiter.request():
                attempts = 1  # only now: waiting for the limit is not an attempt
                status, text = self._attempt(key, body, progress)
            return status, text, attempts
        except RetryableDelivery as exc:
            first = exc
        except DeliveryError as exc:
            exc.attempts = attempts
            raise
        return self._retried(name, key, body, progress, first)

    def _retried(self, name: str, key: str, body: Body, progress: Progress | None,
                 first: RetryableDelivery) -> tuple[int, str, int]:
        """Attempts 2 … ``SMT_RETRY_ATTEMPTS`` after the first failed with ``first``."""
        attempts = 1
        s = self._settings
        replay: RetryableDelivery | None = first

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
            sleep=pause,
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    if replay is not None:  # attempt 1 happened in post(): tenacity judges its failure
                        exc, replay = replay, None
                        raise exc
                    with self._limiter.request():
                        attempts += 1  # only now: waiting for the limit is not an attempt
                        status, text = self._attempt(key, body, progress)
        except DeliveryError as exc:
            exc.attempts = attempts
            raise
        return status, text, attempts

    def _attempt(self, key: str, body: Body, progress: Progress | None) -> tuple[int, str]:
        if self._pool is not None:
            return self._attempt_direct(key, body, progress)
        header, token = self._auth
        headers = {
            "Content-Type": body.content_type,
            "Content-Length": str(body.length),
            "Idempotency-Key": key,
            "User-Agent": "smt-watch",
            **({header: token.reveal()} if token else {}),
        }
        assert self._client is not None
        chunks = body.chunks(progress)
        try:
            request = self._client.build_request("POST", self.url, headers=headers, content=chunks)
            with map_transport_errors(self.destination):
                response = self._client.send(request, stream=True)
                try:
                    reply = _decoded(response)
                finally:
                    response.close()
        finally:
            _let_go(chunks)
        return self._verdict(reply)

    def _attempt_direct(self, key: str, body: Body, progress: Progress | None) -> tuple[int, str]:
        """One request straight to this thread's connection (:class:`_ThreadConnections`, :class:`_Http11`) for
        a target without credentials in its URL or a proxy: the request line and the fixed headers are encoded
        once per poster, not per request. The headers h11 would refuse (CR, LF or NUL in a value) are refused
        here the same way, before a byte is sent. httpcore's errors become httpx's of the same name, so
        :func:`map_transport_errors` judges both paths alike."""
        assert self._pool is not None
        content_type, raw_key = body.content_type.encode("latin-1"), key.encode("latin-1")
        head = b"%sContent-Type: %s\r\nContent-Length: %d\r\nIdempotency-Key: %s\r\n\r\n" % (
            self._head_start, content_type, body.length, raw_key)
        chunks = body.chunks(progress)
        try:  # what map_transport_errors and _as_httpx_errors do together, without two context managers
            if not (valid_header(b"Content-Type", content_type) and valid_header(b"Idempotency-Key", raw_key)):
                raise httpcore.LocalProtocolError("Illegal header value")
            status, response_headers, content = self._pool.handle(head, body.length, chunks, self._timeouts)
            reply = _answer(status, response_headers, content)
        except (*_CORE_ERRORS, httpx.RemoteProtocolError) as exc:  # (httpx's: an encoded body _decoded refused)
            with map_transport_errors(self.destination), _as_httpx_errors():
                raise exc
        finally:
            _let_go(chunks)
        return self._verdict(reply)

    def _verdict(self, response: Reply) -> tuple[int, str]:
        text = self._scrub(response.content[:ERROR_BODY_BYTES].decode("utf-8", "replace"))
        error = self._classify(response, text, self.destination)
        if error is not None:
            raise error
        return response.status_code, text

    def _scrub(self, text: str) -> str:
        return redact_text(text, self._secrets)
