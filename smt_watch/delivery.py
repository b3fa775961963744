"""HTTP delivery of one file: the modes (multipart, inline), streaming bodies, retries.

A mode turns a :class:`Payload` into a :class:`Body`: headers, an exact length, and a factory for a fresh
byte iterator (every retry re-reads the file). The file is read in chunks and hashed as it streams; the
last chunk is held back until the hash is known, so a file that changed since it was hashed is never
sent complete (:class:`FileChanged` aborts the request mid-body). Memory stays flat in file size.

``raw-upload`` (:mod:`smt_watch.rawupload`) sends chunks of lines, each its own request with its own
retries, recording acknowledged chunks so a later attempt resumes after them.
"""

from __future__ import annotations

import base64
import email.utils
import gzip
import hashlib
import json
import logging
import os
import queue
import random
import re
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Protocol

import httpx
import tenacity
from tenacity.stop import stop_base

from smt_watch.config import Settings, redact_url
from smt_watch.errors import DeliveryError, FileChanged, PermanentDelivery, RetryableDelivery
from smt_watch.rawupload import ChunkStore, RawUploadMode, iter_chunks, plan_chunks

log = logging.getLogger("smt_watch.delivery")

RETRYABLE_STATUSES: Final = frozenset({408, 425, 429, 500, 502, 503, 504})
IN_CALL_MAX_WAIT: Final = 60.0  # longer Retry-After: give up this call, the row waits as `retrying`
RETRY_CAP: Final = 15 * 60.0  # SPEC §4: backoff between calls is capped at 15 minutes
READ_CHUNK: Final = 3 * 256 * 1024  # a multiple of 3, so base64 of each chunk concatenates cleanly
READ_AHEAD_MIN: Final = 4 * READ_CHUNK  # smaller files are read inline: a thread costs more than it saves
READ_AHEAD_DEPTH: Final = 4  # chunks buffered ahead of the socket (3 MiB): memory stays flat
ERROR_BODY_BYTES: Final = 500
METER_RE: Final = re.compile(r"M\d+")

Progress = Callable[[int], None]


@dataclass(frozen=True)
class Payload:
    """One file to deliver, with the identity recorded before sending."""

    path: Path
    filename: str
    sha256: str
    size: int
    mtime: float
    esiid: str
    meter: str
    source: str

    @property
    def captured_at(self) -> str:
        return datetime.fromtimestamp(self.mtime, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Body:
    """A request body that can be produced again for each attempt."""

    content_type: str
    length: int
    chunks: Callable[[Progress | None], Iterator[bytes]]


@dataclass(frozen=True)
class Result:
    status: int
    body: str
    attempts: int
    destination: str


def meter_for(filename: str, default: str) -> str:
    """SPEC §4: the first ``M<digits>`` in the file name, else ``METER_DEFAULT``."""
    match = METER_RE.search(filename)
    return match.group(0) if match else default


# --- verified streaming -----------------------------------------------------------------------------


def _read_verified(path: Path, size: int, sha256: str, chunk: int) -> Iterator[bytes]:
    """Exactly ``size`` bytes of ``path``; after the last chunk, raise unless they hash to ``sha256``."""
    digest = hashlib.sha256()
    remaining = size
    with open(path, "rb", buffering=0) as fh:
        while remaining > 0:
            data = fh.read(min(chunk, remaining))
            if not data:
                raise FileChanged(f"{path.name}: shrank while being sent")
            digest.update(data)
            remaining -= len(data)
            yield data
        if fh.read(1):
            raise FileChanged(f"{path.name}: grew while being sent")
    if digest.hexdigest() != sha256:
        raise FileChanged(f"{path.name}: content changed since it was hashed")


def _read_ahead(source: Iterator[bytes], depth: int) -> Iterator[bytes]:
    """Run ``source`` in a helper thread up to ``depth`` chunks ahead of the consumer.

    Reading and hashing then overlap with socket writes (hashlib and socket calls release the GIL), which
    matters for big files: a second SHA-256 pass would otherwise add its full time to every send.
    """
    q: queue.Queue[bytes | BaseException | None] = queue.Queue(depth)
    stop = threading.Event()

    def put(item: bytes | BaseException | None) -> None:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def run() -> None:
        try:
            for data in source:
                if stop.is_set():
                    return
                put(data)
            put(None)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put(exc)

    thread = threading.Thread(target=run, name="smt-watch-read-ahead", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def verified_chunks(
    path: Path, size: int, sha256: str, progress: Progress | None = None, chunk: int = READ_CHUNK
) -> Iterator[bytes]:
    """Yield exactly ``size`` bytes of ``path``, holding the last chunk back until the hash matches."""
    source = _read_verified(path, size, sha256, chunk)
    if size > READ_AHEAD_MIN:
        source = _read_ahead(source, READ_AHEAD_DEPTH)
    held: bytes | None = None
    for data in source:  # raises FileChanged after the last chunk, before it is released
        if held is not None:
            yield held
            if progress:
                progress(len(held))
        held = data
    if held is not None:
        yield held
        if progress:
            progress(len(held))


def _b64_stream(chunks: Iterator[bytes]) -> Iterator[bytes]:
    carry = b""
    for data in chunks:
        data = carry + data
        cut = len(data) - len(data) % 3
        carry = data[cut:]
        if cut:
            yield base64.b64encode(data[:cut])
    if carry:
        yield base64.b64encode(carry)


def _b64_len(n: int) -> int:
    return 4 * ((n + 2) // 3)


# --- modes ------------------------------------------------------------------------------------------


class Mode(Protocol):
    """A delivery mode: where to send, with which auth header, and how to encode the file."""

    name: str
    url: str

    def auth_headers(self) -> dict[str, str]: ...

    def prepare(self, payload: Payload) -> AbstractContextManager[Body]:
        """Build the body; the context owns any temporary file it needs across retries."""
        ...


class MultipartMode:
    """SPEC §4 multipart: text fields first, then the file, so a receiver sees ``sha256`` before data."""

    name = "multipart"

    def __init__(self, settings: Settings) -> None:
        assert settings.upload_url is not None
        self.url = settings.upload_url
        self._token = settings.upload_token

    def auth_headers(self) -> dict[str, str]:
        return {"x-smt-upload-token": self._token.reveal()} if self._token else {}

    def prepare(self, payload: Payload) -> AbstractContextManager[Body]:
        boundary = uuid.uuid4().hex
        fields = {
            "esiid": payload.esiid,
            "meter": payload.meter,
            "capturedAt": payload.captured_at,
            "source": payload.source,
            "sha256": payload.sha256,
            "accountKey": "smt-watch",
            "role": "admin",
        }
        head = b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
            for k, v in fields.items()
        )
        head += (
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"{_quote_filename(payload.filename)}\"\r\nContent-Type: text/csv\r\n\r\n"
        ).encode()
        tail = f"\r\n--{boundary}--\r\n".encode()

        def chunks(progress: Progress | None) -> Iterator[bytes]:
            yield head
            yield from verified_chunks(payload.path, payload.size, payload.sha256, progress)
            yield tail

        return nullcontext(
            Body(f"multipart/form-data; boundary={boundary}", len(head) + payload.size + len(tail), chunks)
        )


def _quote_filename(name: str) -> str:
    """Escape a file name for a Content-Disposition parameter the way browsers do."""
    name = name.replace("\\", "\\\\").replace('"', "%22")
    return "".join(c if c.isprintable() else f"%{ord(c):02X}" for c in name)


class InlineMode:
    """SPEC §4 inline JSON, with ``content_b64`` produced on the fly (gzip first goes to a temp file)."""

    name = "inline"

    def __init__(self, settings: Settings) -> None:
        assert settings.base_url is not None
        self.url = settings.base_url + "/api/admin/smt/pull"
        self._token = settings.admin_token
        self._encoding = settings.inline_encoding
        self._max = settings.inline_max_bytes
        self._tmp = settings.state_dir / "tmp"

    def auth_headers(self) -> dict[str, str]:
        return {"x-admin-token": self._token.reveal()} if self._token else {}

    @contextmanager
    def prepare(self, payload: Payload) -> Iterator[Body]:
        meta: dict[str, object] = {
            "mode": "inline",
            "source": payload.source,
            "filename": payload.filename,
            "mime": "text/csv",
            "encoding": self._encoding,
            "sizeBytes": payload.size,
            "esiid": payload.esiid,
            "meter": payload.meter,
            "captured_at": payload.captured_at,
        }
        gz_path: Path | None = None
        try:
            if self._encoding == "base64+gzip":
                gz_path = self._compress(payload)
                meta["compressedBytes"] = raw_size = gz_path.stat().st_size
            else:
                raw_size = payload.size
            head = (json.dumps(meta, ensure_ascii=True)[:-1] + ', "content_b64": "').encode()
            tail = b'"}'
            length = len(head) + _b64_len(raw_size) + len(tail)
            if length > self._max:
                raise PermanentDelivery(
                    f"{payload.filename}: inline body would be {length} bytes, over SMT_INLINE_MAX_BYTES"
                    f" ({self._max}); set SMT_UPLOAD_URL to deliver large files by multipart upload"
                )

            def chunks(progress: Progress | None) -> Iterator[bytes]:
                yield head
                if gz_path is not None:
                    yield from _b64_stream(_plain_chunks(gz_path, progress))
                else:
                    yield from _b64_stream(
                        verified_chunks(payload.path, payload.size, payload.sha256, progress)
                    )
                yield tail

            yield Body("application/json", length, chunks)
        finally:
            if gz_path is not None:
                gz_path.unlink(missing_ok=True)

    def _compress(self, payload: Payload) -> Path:
        """Gzip to a private temp file while hashing, so the exact body length is known up front."""
        self._tmp.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".gz-", suffix=".part", dir=self._tmp)
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as gz:
                for data in verified_chunks(payload.path, payload.size, payload.sha256):
                    gz.write(data)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return path


def _plain_chunks(path: Path, progress: Progress | None) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while data := fh.read(READ_CHUNK):
            yield data
            if progress:
                progress(len(data))


def make_mode(settings: Settings, mode: str) -> Mode | RawUploadMode:
    if mode == "multipart":
        return MultipartMode(settings)
    if mode == "inline":
        return InlineMode(settings)
    if mode == "raw-upload":
        return RawUploadMode(settings)
    raise DeliveryError(f"delivery mode {mode!r} is not available")


# --- retries ----------------------------------------------------------------------------------------


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds from now: an integer, or an HTTP-date. Garbage is ignored."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


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


class Deliverer:
    """Delivers payloads over one shared keep-alive ``httpx.Client`` with in-call retries."""

    def __init__(self, settings: Settings, mode: str, *, announce: bool = True) -> None:
        self.mode = make_mode(settings, mode)
        self.destination = redact_url(self.mode.url)
        self._settings = settings
        self._secrets = settings.secrets()
        t = settings.http_timeout
        limits = httpx.Limits(max_connections=16, max_keepalive_connections=8)
        # Loading the CA bundle costs ~60 ms per start; a plain-http target (the droplet's loopback upload
        # server) never uses it, and redirects are not followed, so it cannot reach https.
        verify = self.mode.url.startswith("https://")
        timeout = httpx.Timeout(connect=min(10.0, t), read=t, write=t, pool=t)
        # For a plain target the client only builds requests (URL, headers, timeouts) and they go straight to
        # its transport: what Client.send adds (cookies, auth flows, redirects, hooks) is unused there and
        # cost ~10 % of the watcher's CPU per small file. Credentials in the URL or a proxy from the
        # environment need Client.send, so such a target takes that path.
        self._transport: httpx.HTTPTransport | None = None
        if direct_transport_is_enough(self.mode.url):
            self._transport = httpx.HTTPTransport(limits=limits, verify=verify)
            self._client = httpx.Client(timeout=timeout, transport=self._transport, follow_redirects=False)
        else:
            self._client = httpx.Client(timeout=timeout, limits=limits, verify=verify, follow_redirects=False)
        if not announce:  # a watch worker process: the watcher said it already
            pass
        elif self.mode.name == "multipart":
            log.info("Using droplet upload server at %s", self.destination)
        else:
            log.info("Using %s delivery to %s", self.mode.name, self.destination)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Deliverer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def deliver(
        self, payload: Payload, progress: Progress | None = None, chunks: ChunkStore | None = None
    ) -> Result:
        """Send with retries; raise a :class:`DeliveryError` (``.attempts`` set) when it did not land.

        ``chunks`` (raw-upload only) remembers acknowledged chunks, so a later call resumes after them.
        """
        if isinstance(self.mode, RawUploadMode):
            return self._deliver_raw(self.mode, payload, progress, chunks)
        with self.mode.prepare(payload) as body:
            status, text, attempts = self._send(payload.filename, body, payload.sha256, progress)
        if self.mode.name == "multipart":
            log.info("Droplet upload success (%d): %s", status, text[:200])
        else:
            log.info("Inline POST success (%d): %s", status, text[:200])
        return Result(status=status, body=text, attempts=attempts, destination=self.destination)

    def _deliver_raw(
        self, mode: RawUploadMode, payload: Payload, progress: Progress | None, store: ChunkStore | None
    ) -> Result:
        plan = plan_chunks(payload.path, payload.size, payload.sha256, mode.lines_per_chunk)
        total = len(plan)
        acked = store.acked_chunks(payload.sha256, total) if store else {}
        attempts, status, text = 0, 200, ""
        digest = hashlib.sha256()
        number = 0
        try:
            for number, content in enumerate(iter_chunks(payload.path, mode.lines_per_chunk, digest), start=1):
                if number > total:
                    raise FileChanged(f"{payload.filename}: grew while its chunks were being sent")
                chunk_sha, _ = plan[number - 1]
                if acked.get(number) == chunk_sha:
                    continue
                if hashlib.sha256(content).hexdigest() != chunk_sha:
                    raise FileChanged(f"{payload.filename}: changed while its chunks were being sent")
                data = mode.chunk_json(payload.filename, payload.esiid, payload.meter, payload.source, number, total,
                                       content, chunk_sha)
                body = Body("application/json", len(data), _constant(data))
                status, text, used = self._send(f"{payload.filename} part {number}/{total}", body, chunk_sha, None)
                attempts += used
                if store:
                    store.ack_chunk(payload.sha256, number, total, chunk_sha)
                if progress:
                    progress(len(content))
            if number != total or digest.hexdigest() != payload.sha256:
                # Every chunk sent matched the plan, but the file as a whole is no longer the one hashed
                # (cut short, or changed in a part already acknowledged): do not call it sent.
                raise FileChanged(f"{payload.filename}: changed while its chunks were being sent")
        except DeliveryError as exc:
            exc.attempts += attempts
            raise
        log.info("Raw upload success (%d): %s in %d chunk(s): %s", status, payload.filename, total, text[:200])
        return Result(status=status, body=text, attempts=attempts, destination=self.destination)

    def _send(self, name: str, body: Body, key: str, progress: Progress | None) -> tuple[int, str, int]:
        """One request with in-call retries; returns status, body text and the number of attempts."""
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
                with attempt:
                    attempts += 1
                    status, text = self._attempt(key, body, progress)
        except DeliveryError as exc:
            exc.attempts = attempts
            raise
        return status, text, attempts

    def _attempt(self, key: str, body: Body, progress: Progress | None) -> tuple[int, str]:
        headers = {
            "Content-Type": body.content_type,
            "Content-Length": str(body.length),
            "Idempotency-Key": key,
            "User-Agent": "smt-watch",
            **self.mode.auth_headers(),
        }
        request = self._client.build_request("POST", self.mode.url, headers=headers, content=body.chunks(progress))
        try:
            if self._transport is not None:
                response = self._transport.handle_request(request)
            else:
                response = self._client.send(request, stream=True)
            try:
                response.read()
            finally:
                response.close()
        except httpx.TransportError as exc:
            raise RetryableDelivery(f"{type(exc).__name__} talking to {self.destination}: {exc}") from None
        text = self._scrub(response.content[:ERROR_BODY_BYTES].decode("utf-8", "replace"))
        status = response.status_code
        if status in RETRYABLE_STATUSES:
            raise RetryableDelivery(
                f"HTTP {status} from {self.destination}",
                status=status, body=text, retry_after=parse_retry_after(response.headers.get("retry-after")),
            )
        if not 200 <= status < 300:
            raise PermanentDelivery(f"HTTP {status} from {self.destination}: {text}", status=status, body=text)
        if _reports_failure(response):
            raise PermanentDelivery(
                f"HTTP {status} with ok:false from {self.destination}: {text}", status=status, body=text
            )
        return status, text

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


def direct_transport_is_enough(url: str) -> bool:
    """No credentials in the URL and no proxy variable for its scheme (``HTTP(S)_PROXY``, ``ALL_PROXY``;
    ``NO_PROXY`` is not consulted: any proxy setting takes the full path)."""
    parsed = httpx.URL(url)
    proxies = urllib.request.getproxies()
    return not parsed.userinfo and not (proxies.get(parsed.scheme) or proxies.get("all"))


def _constant(data: bytes) -> Callable[[Progress | None], Iterator[bytes]]:
    """A body factory for a chunk already in memory (bounded by SMT_RAW_LINES_PER_CHUNK lines)."""

    def chunks(_progress: Progress | None) -> Iterator[bytes]:
        yield data

    return chunks


def _reports_failure(response: httpx.Response) -> bool:
    """A 2xx whose JSON body says ``"ok": false`` is a refusal, not a success."""
    try:
        data = response.json()
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and data.get("ok") is False
