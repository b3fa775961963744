"""The sink contract (docs/contract.md §4): what every delivery mode implements and what flows through it.

A sink (Vector's word) takes one :class:`Payload` and either returns :class:`Delivered` (the target answered
2xx and meant it) or raises a :class:`DeliveryError` saying whether trying again may help. The pipeline
marks a ledger row ``sent`` only on Delivered (``pipeline.Result`` is what became of a file, another idea).
Everything here is plain data and pure functions: no httpx at import time, so the package and its registry
load without the HTTP stack (a sink module loads it).

:func:`classify` is the default reading of a response (retryable statuses, ``Retry-After``, ``"ok":
false`` in a 2xx); a sink with a different contract passes its own to the poster, as Vector's sinks
override ``should_retry_response``.
"""

from __future__ import annotations

import email.utils
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

from smt_watch.clock import utc_stamp
from smt_watch.errors import DeliveryError, PermanentDelivery, RetryableDelivery

if TYPE_CHECKING:
    from smt_watch.config import Secret, Settings
    from smt_watch.readlease import ReadLease

RETRYABLE_STATUSES: Final = frozenset({408, 425, 429, 500, 502, 503, 504})
# The web app runs on Vercel, which refuses a request body over 4.5 MB before the route runs: every body
# smt-watch sends to the app (raw-upload chunks, inline by default) stays at or under this many bytes.
MAX_REQUEST_BYTES: Final = 4_500_000

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
    resend: bool = False  # a forced re-send (post --force): send every part again, acknowledged or not
    # The bytes that hashed to ``sha256``, when the hash pass kept them (a small file read once by a watch
    # worker, FileIdentity.data): a sink that builds its body from them sends what was hashed by
    # construction, with no re-read or re-hash. None: read ``path`` and verify as it streams.
    data: bytes | None = field(default=None, repr=False, compare=False)
    # The read lease ``post``'s hash pass held on a big file (FileIdentity.lease): the multipart sink (the one
    # with ``reads_lease``) reads its descriptor and, while it holds, need not hash the bytes again
    # (stream.verified_chunks); for any other sink it is closed before the send (it re-hashes).
    lease: ReadLease | None = field(default=None, repr=False, compare=False)

    @property
    def captured_at(self) -> str:
        return utc_stamp(self.mtime)


@dataclass(frozen=True)
class Body:
    """A request body that can be produced again for each attempt."""

    content_type: str
    length: int
    chunks: Callable[[Progress | None], Iterator[bytes]]


@dataclass(frozen=True)
class Delivered:
    """A delivery the target confirmed; ``destination`` is the URL without credentials."""

    status: int
    body: str
    attempts: int
    destination: str


class ChunkStore(Protocol):
    """Where a sink that sends a file in parts keeps the acknowledged ones (the ledger), so a later call
    resumes after them."""

    def acked_chunks(self, sha256: str, parts: int) -> dict[int, str]: ...

    def ack_chunk(self, sha256: str, part: int, parts: int, chunk_sha256: str) -> None: ...


@dataclass(frozen=True)
class SinkContext:
    """What the registry hands a sink's factory: the settings, the URL and token its mode entry derives
    from them, the chunk store (used by a sink that resumes; others ignore it), and whether to log the
    start line (a watch worker process does not: the watcher said it already)."""

    settings: Settings
    url: str
    token: Secret | None
    chunks: ChunkStore | None = None
    announce: bool = True
    stop: threading.Event | None = None  # set: a wait for the outbound limit ends, nothing sent (watch stopping)


class Sink(Protocol):
    """A delivery mode. ``url`` is where it posts (it may hold credentials: never log it);
    ``destination`` is the same URL fit for logs, errors and the ledger."""

    name: str
    url: str
    destination: str

    def send(self, payload: Payload, progress: Progress | None = None) -> Delivered:
        """Deliver with in-call retries; raise a :class:`DeliveryError` (``.attempts`` set) when it did
        not land."""
        ...

    def close(self) -> None: ...


class LeftOut(PermanentDelivery):
    """The target took the request but cannot use the file (an upload server that drops what is not an
    interval CSV): ``failed`` like any refusal, but a container whose other CSVs landed is still ``sent``."""


class Reply(Protocol):
    """What a verdict reads of an answer: an ``httpx.Response``, or the poster's lighter one for a request
    it sent itself (``delivery/http11.py``), which parses the body as JSON at most once."""

    @property
    def status_code(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]:
        """Look names up in lower case: the poster's own answer keys them so (httpx's are case-insensitive)."""
        ...

    @property
    def content(self) -> bytes: ...

    def json(self) -> Any: ...


Classify = Callable[[Reply, str, str], DeliveryError | None]


def classify(response: Reply, body: str, destination: str) -> DeliveryError | None:
    """The default verdict on a response: None when delivered, else the error to raise.

    ``body`` is the response's first bytes with secrets scrubbed (what an error may quote)."""
    status = response.status_code
    if status in RETRYABLE_STATUSES:
        return RetryableDelivery(
            f"HTTP {status} from {destination}",
            status=status, body=body, retry_after=parse_retry_after(response.headers.get("retry-after")),
        )
    if not 200 <= status < 300:
        return PermanentDelivery(f"HTTP {status} from {destination}: {body}", status=status, body=body)
    if _reports_failure(response):
        return PermanentDelivery(f"HTTP {status} with ok:false from {destination}: {body}", status=status, body=body)
    return None


def json_object(response: Reply) -> dict[str, Any] | None:
    """The answer's body as a JSON object, or None when it is not one. A body nested deeper than Python's
    recursion limit (``[`` * 100000) raises RecursionError, not ValueError: it is not an object either, not
    an internal error."""
    try:
        data = response.json()
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    return data if isinstance(data, dict) else None


def _reports_failure(response: Reply) -> bool:
    """A 2xx whose JSON body says ``"ok": false`` is a refusal, not a success."""
    data = json_object(response)
    return data is not None and data.get("ok") is False


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
