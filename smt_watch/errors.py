"""One exception tree for smt-watch, so the CLI can turn any failure into one clear line.

    SmtWatchError                 anything smt-watch reports to a person (exit 1 unless a subclass says)
    ├── ConfigError               bad or missing setting, bad usage (exit 2)
    │   └── HostKeyError          the SFTP server's host key is unknown or changed (exit 2)
    ├── LedgerError               the ledger (SQLite or PostgreSQL) cannot be opened, read or written
    │   ├── LedgerUnavailable     the PostgreSQL ledger cannot be reached now (a later attempt may)
    │   └── NoLedger              a reading command found no ledger (it never creates one)
    ├── InputError                a named file is missing, unreadable, a directory or a symlink
    ├── ContentError              a ready file cannot become a delivery (undecryptable, unsafe ZIP, not SMT)
    │   └── LineTooLong           a line past the sniffer's cap (also a ValueError)
    ├── UploadError               ``serve`` refuses a request body (answered over HTTP, never an exit)
    │   ├── UploadTooLarge        past the byte limit: 413
    │   ├── UploadStalled         silent for SMT_UPLOAD_IDLE_SECONDS: 408
    │   └── MalformedUpload       not an acceptable multipart form: 400
    ├── TicketError               an upload ticket is refused: 401 (also a ValueError)
    ├── SftpError                 an SFTP connection or transfer problem a later attempt may not have
    └── DeliveryError             one delivery attempt did not end in a 2xx
        ├── RetryableDelivery     connection error, timeout, 408/425/429/5xx: try again later
        ├── PermanentDelivery     other 4xx, or 2xx with ``"ok": false``: do not retry
        └── FileChanged           the bytes read while sending are not the bytes hashed

:func:`reason` is how a caught exception is said in one line.

Library errors (httpx, paramiko, sqlite3, gpg, OSError) are wrapped at the boundary with
``raise ... from exc``; ``from None`` only where the cause's text could hold a secret (a URL with a
password, a token), with a comment saying so. Messages never contain tokens: callers build them from
status codes, URLs without credentials and response bodies (which the remote side chose to send us).
"""

from __future__ import annotations


class SmtWatchError(Exception):
    """Base class: ``str(exc)`` is the one line printed to the operator."""

    exit_code = 1


class ConfigError(SmtWatchError):
    """A setting or command-line usage is wrong; nothing was done."""

    exit_code = 2


class LedgerError(SmtWatchError):
    """The ledger database could not be used."""


class LedgerUnavailable(LedgerError):
    """The shared ledger cannot be reached (connection lost, server restarting): ``watch`` waits and tries
    again, ``serve`` answers 503 with ``Retry-After``; nothing is marked done meanwhile."""


class NoLedger(LedgerError):
    """``status``, ``ledger list`` and the other reading commands found no ledger where the settings point:
    they say where they looked instead of creating an empty one."""


class InputError(SmtWatchError):
    """A file named on the command line cannot be delivered as given."""


class ContentError(SmtWatchError):
    """The file cannot become a delivery (undecryptable, unsafe ZIP, not SMT data): the row is ``failed``."""


class SftpError(SmtWatchError):
    """A connection or transfer problem that a later attempt may not have (exit 1)."""


class SizeMismatch(SftpError):
    """The server served a different number of bytes than it listed: trying again in this pass would get
    the same, so the file fails now (its part removed) and the next pass lists it afresh."""


class HostKeyError(ConfigError):
    """The server's key is unknown or changed: nothing is fetched until an operator decides (exit 2)."""


class DeliveryError(SmtWatchError):
    """One delivery did not succeed.

    ``status`` is the HTTP status when a response arrived, ``body`` its first 500 bytes, and
    ``attempts`` how many HTTP requests were made for this delivery.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        body: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = body
        self.retry_after = retry_after
        self.attempts = 0


class RetryableDelivery(DeliveryError):
    """The target may accept the file later (network trouble, overload, maintenance)."""


class PermanentDelivery(DeliveryError):
    """The target refused the file; repeating the same request will not help."""


class FileChanged(DeliveryError):
    """The file changed between hashing and sending; the attempt was abandoned mid-body."""


class LineTooLong(ContentError, ValueError):
    """A line past the sniffer's cap (``smtcsv.MAX_LINE_BYTES``): refused before it is held in memory or
    scanned again and again."""

    def __init__(self, line: int, limit: int) -> None:
        super().__init__(f"line {line} is longer than {limit:,} bytes (not SMT data)")


class UploadError(SmtWatchError):
    """A request body the upload server (or the reference receiver) refuses; each maps to an HTTP status."""


class UploadTooLarge(UploadError):
    """The file part (or the declared body) exceeds ``max_bytes``; maps naturally to HTTP 413."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(f"upload exceeds {max_bytes} bytes")
        self.max_bytes = max_bytes


class UploadStalled(UploadError):
    """No byte of the body arrived for ``idle_seconds``: the client stalled (or is holding us on purpose)."""

    def __init__(self, idle_seconds: float) -> None:
        super().__init__(f"no data for {idle_seconds:g} s")
        self.idle_seconds = idle_seconds


class MalformedUpload(UploadError):
    """The body is not an acceptable multipart form; maps naturally to HTTP 400."""


class TicketError(SmtWatchError, ValueError):
    """Why a ticket is refused; the message is shown to the client (it never holds the secret)."""


def reason(exc: BaseException) -> str:
    """A caught exception in one line: ours as written for the operator, anything else with its type (a
    bare ``str()`` of a library's error can be empty or say nothing of what failed)."""
    return str(exc) if isinstance(exc, SmtWatchError) else f"{type(exc).__name__}: {exc}"
