"""All settings, read and validated in one place.

Every other module receives a :class:`Settings`; none reads ``os.environ``. Precedence, lowest first:
built-in default < ``--env-file`` < process environment < command-line flag. The env file is parsed the
way systemd's ``EnvironmentFile=`` is, so the ``/etc/default/intelliwatt-smt`` of the bash script it replaces
works unchanged (docs/contract.md §1).

Secrets are wrapped in :class:`Secret`, whose ``str``/``repr`` is ``***``: a settings object can be logged
or shown in an error without leaking a token.
"""

from __future__ import annotations

import difflib
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Final, TypeVar
from urllib.parse import unquote, urlsplit

from smt_watch.errors import ConfigError
from smt_watch.tickets import secret_weakness

# --- the delivery modes, one line each (smt_watch.delivery.registry does the rest) ------------------------
# Named here, sinks by "module:Class" string as uvicorn's config names its protocols, so that config stays
# the leaf every module imports and the registry (which needs Settings) is never imported by config.

LEGACY_INLINE_WARNING: Final = ("SMT_DELIVERY=inline: IntelliWatt's production route refuses it (400 "
                                 "INLINE_DISABLED); use SMT_DELIVERY=raw-upload unless this is a development app")


@dataclass(frozen=True)
class Setting:
    """A setting a mode reads: its :class:`~smt_watch.config.Settings` field and the variable that sets it."""

    field: str
    env: str

    def value(self, settings: Settings) -> object:
        return getattr(settings, self.field)


UPLOAD_URL: Final = Setting("upload_url", "SMT_UPLOAD_URL")
UPLOAD_TOKEN: Final = Setting("upload_token", "SMT_UPLOAD_TOKEN")
BASE_URL: Final = Setting("base_url", "INTELLIWATT_BASE_URL")
ADMIN_TOKEN: Final = Setting("admin_token", "ADMIN_TOKEN")


@dataclass(frozen=True)
class Mode:
    """One delivery mode. ``auto``: its place in the ``auto`` rule (1 is tried first) when ``needs`` is set;
    0: only when named. ``warning``: logged whenever the mode is used."""

    name: str
    needs: Setting  # the target setting it cannot run without
    url: Callable[[Settings], str]  # where it posts, derived from the settings
    token: Setting  # the credential it sends
    sink: str  # "module:Class" under smt_watch.delivery
    auto: int = 0
    warning: str = ""
    refuses: tuple[str, ...] = ()  # CSV kinds (smtcsv.classify) its target cannot read: recorded, never sent

    def secret(self, settings: Settings) -> Secret | None:
        """The token it sends (None: not set)."""
        token: Secret | None = getattr(settings, self.token.field)
        return token


MODES: Final[Mapping[str, Mode]] = MappingProxyType({m.name: m for m in (
    Mode("multipart", UPLOAD_URL, lambda s: s.upload_url or "", UPLOAD_TOKEN, "multipart:MultipartSink", auto=1),
    Mode("inline", BASE_URL, lambda s: f"{s.base_url}/api/admin/smt/pull", ADMIN_TOKEN, "inline:InlineSink",
         warning=LEGACY_INLINE_WARNING),
    Mode("raw-upload", BASE_URL, lambda s: f"{s.base_url}/api/admin/smt/raw-upload", ADMIN_TOKEN,
         "rawupload:RawUploadSink", auto=2, refuses=("smt-other",)),
)})


DELIVERY_MODES: Final = ("auto", *MODES)  # SMT_DELIVERY's choices
INLINE_ENCODINGS: Final = ("base64", "base64+gzip")
STATUS_TOKEN_MIN: Final = 16  # a web login: short tokens are guessable
# The old script's find: `-iname '*.csv' -o -iname '*.csv.*'` (plus its .asc names, which *.asc covers).
DEFAULT_PATTERNS: Final = ("*.csv", "*.csv.*", "*.asc", "*.zip")
# The web app calls the trigger at http://<droplet ip>:8787/ directly, so the old bridge listened on every
# address; the trigger needs one of the webhook secrets, and SMT_WEBHOOK_HOST narrows it.
ALL_ADDRESSES: Final = "0.0.0.0"  # noqa: S104
MAX_UPLOAD_WINDOW_MS: Final = 31 * 86_400_000  # the ledger keeps upload times for 31 days
BRIDGE_CLIENT_SHARE: Final = 4  # one client address may hold 1/this of the bridge's slots and body buffer
MAX_BRIDGE_BUFFER_BYTES: Final = 1 << 30  # SMT_BRIDGE_BUFFER_BYTES is memory: 1 GiB is past any sane droplet
MAX_LINGER_BYTES: Final = 1 << 40  # SMT_LINGER_MAX_BYTES: a bound on a count, not memory
# The units' StateDirectory=. When it exists, it is SMT_STATE_DIR's default for every command, so an operator's
# `smt-watch status` reads the service's ledger without flags. SMT_SERVICE_STATE_DIR names another (tests).
SERVICE_STATE_DIR: Final = Path("/var/lib/smt-watch")
HOME_STATE_DIR: Final = "~/.local/state/smt-watch"
SYNC_STALE_SECONDS: Final = 3600.0  # twice the shipped smt-sync.timer's 30 minutes
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
T = TypeVar("T")


class Secret:
    """A value that must never be printed; ``reveal()`` is the only way to read it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


class AfterSend(StrEnum):
    """``SMT_AFTER_SEND``: what ``watch`` does with a file in the inbox once its bytes are delivered."""

    KEEP = "keep"  # leave it; the stat cache keeps it from being read again
    MOVE = "move"  # into SMT_ARCHIVE_DIR, its path relative to the inbox kept, never overwriting
    DELETE = "delete"


class WorkerMode(StrEnum):
    """``SMT_WORKER_MODE``: where ``watch``'s ``SMT_WORKERS`` deliveries run."""

    THREAD = "thread"  # in the watcher's threads, sharing its ledger connection and HTTP client
    PROCESS = "process"  # each worker thread hands its files to a process of its own


@dataclass(frozen=True)
class Settings:
    """Typed settings; field docs name the environment variable each comes from."""

    local_dir: Path  # SMT_LOCAL_DIR
    state_dir: Path  # SMT_STATE_DIR
    state_file: Path | None = None  # STATE_FILE
    delivery: str = "auto"  # SMT_DELIVERY
    upload_url: str | None = None  # SMT_UPLOAD_URL
    upload_token: Secret | None = None  # SMT_UPLOAD_TOKEN
    base_url: str | None = None  # INTELLIWATT_BASE_URL
    admin_token: Secret | None = None  # ADMIN_TOKEN
    inline_encoding: str = "base64"  # SMT_INLINE_ENCODING
    inline_max_bytes: int = 4_500_000  # SMT_INLINE_MAX_BYTES (Vercel refuses bodies over 4.5 MB)
    raw_lines_per_chunk: int = 5000  # SMT_RAW_LINES_PER_CHUNK
    source_tag: str = "adhocusage"  # SOURCE_TAG
    meter_default: str = "M1"  # METER_DEFAULT
    esiid_default: str | None = None  # ESIID_DEFAULT
    smt_host: str | None = None  # SMT_HOST
    smt_port: int = 22  # SMT_PORT
    smt_user: str | None = None  # SMT_USER
    smt_key: Path | None = None  # SMT_KEY
    smt_key_passphrase: Secret | None = None  # SMT_KEY_PASSPHRASE
    smt_remote_dirs: tuple[str, ...] = ("/",)  # SMT_REMOTE_DIR
    known_hosts: Path = field(default_factory=lambda: Path("~/.ssh/known_hosts").expanduser())
    gnupghome: Path | None = None  # GNUPGHOME
    gpg_passphrase: Secret | None = None  # SMT_GPG_PASSPHRASE: for a passphrase-protected decryption key
    upload_host: str = "127.0.0.1"  # SMT_UPLOAD_HOST
    upload_port: int = 8081  # SMT_UPLOAD_PORT: the Node upload server's port, which nginx proxies to
    webhook_host: str = ALL_ADDRESSES  # SMT_WEBHOOK_HOST: the web app calls the trigger directly, as the old bridge
    webhook_port: int | None = 8787  # SMT_WEBHOOK_PORT (0: off, the upload port alone serves the trigger)
    upload_max_bytes: int = 1_073_741_824  # SMT_UPLOAD_MAX_BYTES
    upload_admin_limit: int = 40_000  # SMT_UPLOAD_ADMIN_LIMIT, else the Node server's SMT_ADMIN_UPLOAD_DAILY_LIMIT
    upload_customer_limit: int = 5  # SMT_UPLOAD_CUSTOMER_LIMIT, else SMT_CUSTOMER_UPLOAD_MONTHLY_LIMIT
    upload_admin_window: float = 86_400.0  # SMT_ADMIN_UPLOAD_WINDOW_MS (the Node server's), in seconds here
    upload_customer_window: float = 30 * 86_400.0  # SMT_CUSTOMER_UPLOAD_WINDOW_MS, in seconds here
    cors_origins: tuple[str, ...] = ("https://intelliwatt.com",)  # SMT_UPLOAD_CORS_ORIGINS
    upload_ticket_secret: Secret | None = None  # SMT_UPLOAD_TICKET_SECRET: identity only from signed tickets
    upload_idle_seconds: float = 30.0  # SMT_UPLOAD_IDLE_SECONDS: no byte for this long closes the connection
    upload_max_concurrent: int = 16  # SMT_UPLOAD_MAX_CONCURRENT: uploads taken at once; beyond, 503
    trusted_proxies: tuple[str, ...] = ()  # SMT_TRUSTED_PROXIES: peers whose X-Forwarded-For is believed
    webhook_secrets: tuple[Secret, ...] = ()  # INTELLIWATT_WEBHOOK_SECRET and DROPLET_WEBHOOK_SECRET: either matches
    webhook_forward_url: str | None = None  # SMT_WEBHOOK_FORWARD_URL: the old bridge, for what serve does not handle
    status_token: Secret | None = None  # SMT_STATUS_TOKEN: opens serve's /status page (unset: no page)
    status_signin_attempts: int = 5  # SMT_STATUS_SIGNIN_ATTEMPTS: wrong status tokens per address per minute
    status_signin_attempts_total: int = 30  # SMT_STATUS_SIGNIN_ATTEMPTS_TOTAL: wrong status tokens in all per minute
    bridge_max_body_bytes: int = 1_048_576  # SMT_BRIDGE_MAX_BODY_BYTES: one pass-through body; beyond, 413
    bridge_buffer_bytes: int = 33_554_432  # SMT_BRIDGE_BUFFER_BYTES: all pass-through bodies being read at once
    linger_seconds: float = 30.0  # SMT_LINGER_SECONDS: a refused connection's lingering close, in all
    linger_idle_seconds: float = 5.0  # SMT_LINGER_IDLE_SECONDS: ... without a byte (at most SMT_UPLOAD_IDLE_SECONDS)
    linger_max_bytes: int = 67_108_864  # SMT_LINGER_MAX_BYTES: what a refused client may make us read and discard
    settle_seconds: float = 1.0  # SMT_SETTLE_SECONDS
    rescan_seconds: float = 300.0  # SMT_RESCAN_SECONDS
    workers: int = 2  # SMT_WORKERS
    worker_mode: WorkerMode = WorkerMode.THREAD  # SMT_WORKER_MODE (not in the bash script it replaces)
    patterns: tuple[str, ...] = DEFAULT_PATTERNS  # SMT_PATTERNS
    after_send: AfterSend = AfterSend.KEEP  # SMT_AFTER_SEND
    archive_dir: Path | None = None  # SMT_ARCHIVE_DIR (None: state_dir/archive)
    validate: bool = True  # SMT_VALIDATE
    max_zip_entries: int = 100  # SMT_MAX_ZIP_ENTRIES: a ZIP with more entries fails as a whole
    max_unpacked_bytes: int = 1_073_741_824  # SMT_MAX_UNPACKED_BYTES
    plot_max_days: int = 800  # SMT_PLOT_MAX_DAYS: rows of `inspect --plot`'s grid (the file's latest days)
    # Ours (the bash script it replaces had none of these); documented in the README.
    ledger_url: str | None = None  # SMT_LEDGER_URL: a PostgreSQL ledger shared by several droplets (holds a password)
    node_name: str = field(default_factory=socket.gethostname)  # SMT_NODE_NAME: this droplet, in shared claims
    ledger_lease_seconds: float = 60.0  # SMT_LEDGER_LEASE_SECONDS: a claim another node may take over after
    retry_attempts: int = 5  # SMT_RETRY_ATTEMPTS: HTTP attempts within one delivery call
    retry_backoff: float = 1.0  # SMT_RETRY_BACKOFF_SECONDS: first backoff step, doubled per attempt
    http_timeout: float = 60.0  # SMT_HTTP_TIMEOUT: connect/read/write timeout in seconds
    ca_bundle: Path | None = None  # SMT_CA_BUNDLE: the CAs an https target's certificate must chain to
    client_cert: Path | None = None  # SMT_CLIENT_CERT: a client certificate (PEM) for an https target
    client_key: Path | None = None  # SMT_CLIENT_KEY: its private key, when not in SMT_CLIENT_CERT
    sftp_timeout: float = 30.0  # SMT_SFTP_TIMEOUT: connect, handshake and per-read timeout for sync
    metrics_port: int | None = None  # SMT_METRICS_PORT: Prometheus metrics for `watch` on 127.0.0.1
    grace_seconds: float = 30.0  # SMT_STOP_GRACE_SECONDS: how long in-flight deliveries may finish on stop
    create_inbox: bool = False  # SMT_CREATE_INBOX: `watch` creates a missing inbox instead of exiting 2
    sync_stale_seconds: float = SYNC_STALE_SECONDS  # SMT_SYNC_STALE_SECONDS: `status` alerts past this (0: never)
    verify_delay_seconds: float = 300.0  # SMT_VERIFY_DELAY_SECONDS: after a delivery, wait before verifying
    verify_requests_per_second: float = 2.0  # SMT_VERIFY_REQUESTS_PER_SECOND: verify's reads from the app
    verify_timeout: float = 30.0  # SMT_VERIFY_TIMEOUT_SECONDS: deadline of one read request
    verify_file_seconds: float = 900.0  # SMT_VERIFY_FILE_SECONDS: deadline of one file's verification
    # Set by systemd for Type=notify units.
    notify_socket: str | None = None  # NOTIFY_SOCKET
    watchdog_usec: int | None = None  # WATCHDOG_USEC
    # Not a setting: what load_settings noticed (a misspelt SMT_* name), for the CLI and doctor to say.
    warnings: tuple[str, ...] = ()

    @property
    def webhook_secret(self) -> Secret | None:
        """The first webhook secret (INTELLIWATT_WEBHOOK_SECRET, else DROPLET_WEBHOOK_SECRET), or None."""
        return self.webhook_secrets[0] if self.webhook_secrets else None

    def upload_limit(self, role: str) -> int:
        """Uploads one account of ``role`` (``admin`` or ``customer``) may make per :meth:`upload_window`."""
        return self.upload_admin_limit if role == "admin" else self.upload_customer_limit

    def upload_window(self, role: str) -> float:
        """The rolling window, in seconds, that :meth:`upload_limit` counts over."""
        return self.upload_admin_window if role == "admin" else self.upload_customer_window

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / "ledger.sqlite3"

    @property
    def archive_path(self) -> Path:
        return self.archive_dir if self.archive_dir is not None else self.state_dir / "archive"

    def secrets(self) -> list[str]:
        """Every secret value, for the log redaction filter."""
        out = []
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Secret) and value.reveal():
                out.append(value.reveal())
            elif isinstance(value, tuple):
                out.extend(v.reveal() for v in value if isinstance(v, Secret) and v.reveal())
        for url in self.urls():
            out.extend(url_secrets(url))  # also inside text a library produced (httpx quotes URLs in errors)
        return out

    def urls(self) -> list[str]:
        """Every setting that is a URL; each is shown only through :func:`redact_url`."""
        return [u for u in (self.upload_url, self.base_url, self.webhook_forward_url, self.ledger_url) if u]


_SECRET_NAME = re.compile(r"pass|pwd|secret|token|key|sig|auth|cred|session", re.IGNORECASE)
_SHOWN_NAMES: Final = frozenset({"passfile"})  # a path: shown, and its contents are never read here
_QUERY_PARAM = re.compile(r"[?&;]([^=&?#;]*)=([^&#;]*)")
_DSN_PARAM = re.compile(r"([A-Za-z_][\w%]*)\s*=\s*('(?:[^'\\]|\\.)*'?|\S*)")


def _secret_name(name: str) -> bool:
    """A parameter whose value is a secret: libpq's ``password``, ``sslpassword``, ``sslkey`` and the like,
    an HTTP ``token``, ``key``, ``sig``...; libpq percent-decodes a URI's parameter names, so this does too."""
    plain = unquote(name).strip().lower()
    return plain not in _SHOWN_NAMES and bool(_SECRET_NAME.search(plain))


def _secret_spans(url: str) -> list[tuple[int, int]]:
    """Where the secrets are in ``url`` (a URL or a libpq ``key=value`` DSN), as (start, end) offsets.

    Done on the text, not on a parse: a password holding ``#``, ``/``, ``?`` or ``@`` misleads every URL
    parser. So all from ``://`` to the last ``@`` is user information (a path holding ``@`` loses a little
    more than it needs to), and every ``?name=value`` / ``&name=value`` with a secret name is found
    wherever it stands."""
    scheme, sep, rest = url.partition("://")
    spans: list[tuple[int, int]] = []
    if not sep:
        for m in _DSN_PARAM.finditer(url):
            if _secret_name(m[1]) and m.end(2) > m.start(2):
                spans.append((m.start(2), m.end(2)))
        return spans
    base = len(scheme) + len(sep)
    if "@" in rest:
        spans.append((base, base + rest.rindex("@")))
    for m in _QUERY_PARAM.finditer(rest):
        if _secret_name(m[1]) and m.end(2) > m.start(2):
            spans.append((base + m.start(2), base + m.end(2)))
    return spans


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def redact_url(url: str) -> str:
    """``url`` with every secret it can carry replaced by ``***``: ``user:password@``, and any query
    parameter named like a secret (``?password=``, ``sslpassword``, ``sslkey``, ``token``...); for a libpq
    ``key=value`` DSN, the values of such keys. The one function every output, error, log line and ledger
    row uses to show a URL setting (SMT_UPLOAD_URL, INTELLIWATT_BASE_URL, SMT_WEBHOOK_FORWARD_URL,
    SMT_LEDGER_URL)."""
    out, last = [], 0
    for start, end in _merged(_secret_spans(url)):
        out.append(url[last:start] + "***")
        last = end
    return "".join(out) + url[last:]


def url_secrets(url: str | None) -> list[str]:
    """Every secret text in ``url`` as written and percent-decoded (for the log redaction filter, so a
    library's error that quotes the URL, or a part of it, is redacted too)."""
    if not url:
        return []
    out: list[str] = []
    for start, end in _secret_spans(url):
        text = url[start:end]
        if "://" in url and start == len(url.partition("://")[0]) + 3:  # user information
            user, colon, password = text.partition(":")
            # a bare user name is not a secret (and a short one would redact every word like it), but a
            # long one may be a token (https://TOKEN@host)
            if not colon and len(user) < 16:
                continue
            out.extend(t for t in (password, unquote(password)) if t)
        out.append(text)
        out.extend(v for v in {unquote(text), unquote(text.strip("'"))} if v != text)
    return [t for t in out if t]


# --- env file --------------------------------------------------------------------------------------


def parse_env_file(path: Path) -> dict[str, str]:
    """Parse a systemd ``EnvironmentFile``: ``KEY=VALUE`` lines, ``#``/``;`` comments, optional quotes.

    Errors name the file and line but never echo a value (it may be a token).
    """
    if path.exists() and not path.is_file():
        raise ConfigError(f"--env-file {path}: not a regular file")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"--env-file {path}: no such file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        # from None: a UnicodeDecodeError carries the file's bytes, which hold tokens
        raise ConfigError(f"--env-file {path}: cannot read: {exc.__class__.__name__}") from None
    result: dict[str, str] = {}
    pending = ""
    start_line = 0
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if not pending:
            start_line = lineno
        line = pending + raw
        if line.endswith("\\") and not line.endswith("\\\\"):
            pending = line[:-1]
            continue
        pending = ""
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        if stripped.startswith("export "):
            stripped = stripped[len("export ") :].lstrip()
        key, sep, value = stripped.partition("=")
        key = key.strip()
        if not sep or not _KEY_RE.match(key):
            raise ConfigError(f"--env-file {path}:{start_line}: expected KEY=VALUE")
        result[key] = _unquote(value.strip(), path, start_line)
    return result


def _unquote(value: str, path: Path, lineno: int) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        inner = value[1:-1]
        if value[0] == '"':
            inner = re.sub(r"\\(.)", r"\1", inner)
        return inner
    if value[:1] in ("'", '"'):
        raise ConfigError(f"--env-file {path}:{lineno}: unterminated quote")
    return value


# --- typed readers ---------------------------------------------------------------------------------


class _Reader:
    """Reads one merged mapping; each method validates and names the variable on error."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.asked: set[str] = set()  # every name some setting read: the known names

    def raw(self, name: str) -> str | None:
        self.asked.add(name)
        value = self.env.get(name)
        if value is None:
            return None
        value = value.strip()
        return value or None

    def _convert(self, name: str, default: T, conv: Callable[[str], T], what: str, show: bool = True) -> T:
        value = self.raw(name)
        if value is None:
            return default
        try:
            return conv(value)
        except (ValueError, TypeError, KeyError):
            shown = f": {value!r}" if show else ""
            # from None: the cause's text quotes the value, which may be a token (show=False)
            raise ConfigError(f"{name} must be {what}{shown}") from None

    def text(self, name: str, default: str | None = None) -> str | None:
        value = self.raw(name)
        return value if value is not None else default

    def secret(self, *names: str, header: bool = True, min_length: int = 0,
               strong: Callable[[str], str | None] | None = None) -> Secret | None:
        """``header``: the value travels in (or is compared with) an HTTP header, so it must be visible
        ASCII with no spaces; a passphrase may hold spaces but no control characters. A value that breaks
        the rule is refused now, naming the variable and the rule and never the value: sent later it would
        fail every attempt, and the library's error would quote it."""
        self.asked.update(names)
        for name in names:
            value = self.raw(name)
            if value is None:
                continue
            if header and not all("!" <= c <= "~" for c in value):
                raise ConfigError(f"{name} must be visible ASCII with no spaces (it is sent in an HTTP header)")
            if not header and not value.isprintable():
                raise ConfigError(f"{name} must not hold control characters (a newline, for one)")
            if len(value) < min_length:
                raise ConfigError(f"{name} must be at least {min_length} characters (e.g. `openssl rand -hex 24`)")
            if strong is not None and (why := strong(value)) is not None:
                raise ConfigError(f"{name} {why}")
            return Secret(value)
        return None

    def path(self, name: str, default: Path | None = None) -> Path | None:
        value = self.raw(name)
        return Path(value).expanduser() if value is not None else default

    def integer(self, name: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
        def conv(v: str) -> int:
            n = int(v)
            if n < minimum or (maximum is not None and n > maximum):
                raise ValueError
            return n

        bounds = f"an integer ≥ {minimum}" + (f" and ≤ {maximum}" if maximum is not None else "")
        return self._convert(name, default, conv, bounds)

    def number(self, name: str, default: float, minimum: float = 0.0, maximum: float | None = None) -> float:
        def conv(v: str) -> float:
            n = float(v)
            if not n >= minimum or n == float("inf") or (maximum is not None and not n <= maximum):
                raise ValueError
            return n

        bounds = f"a number ≥ {minimum:g}" + (f" and ≤ {maximum:g}" if maximum is not None else "")
        return self._convert(name, default, conv, bounds)

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        def conv(v: str) -> str:
            if v.lower() not in choices:
                raise ValueError
            return v.lower()

        return self._convert(name, default, conv, "one of " + ", ".join(choices))

    def boolean(self, name: str, default: bool) -> bool:
        table = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False}
        table["off"] = False
        return self._convert(name, default, lambda v: table[v.lower()], "1 or 0", show=True)

    def url(self, name: str, schemes: tuple[str, ...] = ("http", "https")) -> str | None:
        value = self.raw(name)
        if value is None:
            return None
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 (parsing the port is the check: "Invalid port" when user-info misleads it)
        except ValueError:
            # from None: the cause's text may quote the URL, password included
            raise ConfigError(f"{name} is not a valid URL: {redact_url(value)!r} (in a user name or password, "
                              "percent-encode # / ? @ and :)") from None
        if schemes == ("http", "https") and (parts.scheme not in schemes or not parts.hostname):
            raise ConfigError(f"{name} must be an http:// or https:// URL: {redact_url(value)!r}")
        if parts.scheme not in schemes:  # PostgreSQL: no host means libpq's default socket directory
            raise ConfigError(f"{name} must be a {' or '.join(s + '://' for s in schemes)} URL: {redact_url(value)!r}")
        return value.rstrip("/") if name == "INTELLIWATT_BASE_URL" else value

    def items(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self.raw(name)
        if value is None:
            return default
        parts = tuple(p.strip() for p in value.split(",") if p.strip())
        if not parts:
            raise ConfigError(f"{name} must list at least one item")
        return parts


def default_state_dir(service_dir: Path) -> Path:
    """``SMT_STATE_DIR`` when it is not set: the service's directory (``/var/lib/smt-watch``, which the units'
    ``StateDirectory=`` creates) when it exists, so the CLI and the service share one ledger whoever runs
    it; else ``~/.local/state/smt-watch`` (a laptop, a test box without the units)."""
    return service_dir if service_dir.is_dir() else Path(HOME_STATE_DIR).expanduser()


def load_settings(
    environ: Mapping[str, str],
    *,
    env_file: Path | None = None,
    overrides: Mapping[str, str | None] | None = None,
) -> Settings:
    """Build settings from the env file, then the process environment, then CLI overrides.

    ``overrides`` uses environment-variable names (a flag ``--upload-url`` passes ``SMT_UPLOAD_URL``), so
    a flag and its variable share one validation path; ``None`` values are ignored.
    """
    merged: dict[str, str] = {}
    if env_file is not None:
        merged.update(parse_env_file(env_file))
    # An empty environment variable counts as unset, so it does not blank a value from the file.
    merged.update({k: v for k, v in environ.items() if v.strip()})
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
    r = _Reader(merged)
    bridge_buffer = r.integer("SMT_BRIDGE_BUFFER_BYTES", 33_554_432, minimum=BRIDGE_CLIENT_SHARE,
                              maximum=MAX_BRIDGE_BUFFER_BYTES)
    bridge_body = r.integer("SMT_BRIDGE_MAX_BODY_BYTES", 1_048_576, minimum=1,
                            maximum=bridge_buffer // BRIDGE_CLIENT_SHARE)
    home_state = default_state_dir(r.path("SMT_SERVICE_STATE_DIR", SERVICE_STATE_DIR) or SERVICE_STATE_DIR)
    settings = Settings(
        # SMT_UPLOAD_DIR: the Node upload server's name for the same inbox (its unit sets it)
        local_dir=r.path("SMT_LOCAL_DIR", r.path("SMT_UPLOAD_DIR", Path("~/smt_inbox").expanduser())) or Path(),
        state_dir=r.path("SMT_STATE_DIR", home_state) or home_state,
        state_file=r.path("STATE_FILE"),
        delivery=r.choice("SMT_DELIVERY", "auto", DELIVERY_MODES),
        upload_url=r.url("SMT_UPLOAD_URL"),
        upload_token=r.secret("SMT_UPLOAD_TOKEN"),
        base_url=r.url("INTELLIWATT_BASE_URL"),
        admin_token=r.secret("ADMIN_TOKEN"),
        inline_encoding=r.choice("SMT_INLINE_ENCODING", "base64", INLINE_ENCODINGS),
        inline_max_bytes=r.integer("SMT_INLINE_MAX_BYTES", 4_500_000, minimum=1),
        raw_lines_per_chunk=r.integer("SMT_RAW_LINES_PER_CHUNK", 5000, minimum=1),
        source_tag=r.text("SOURCE_TAG", "adhocusage") or "adhocusage",
        meter_default=r.text("METER_DEFAULT", "M1") or "M1",
        esiid_default=r.text("ESIID_DEFAULT"),
        smt_host=r.text("SMT_HOST"),
        smt_port=r.integer("SMT_PORT", 22, minimum=1, maximum=65535),
        smt_user=r.text("SMT_USER"),
        smt_key=r.path("SMT_KEY"),
        smt_key_passphrase=r.secret("SMT_KEY_PASSPHRASE", header=False),
        smt_remote_dirs=r.items("SMT_REMOTE_DIR", ("/",)),
        known_hosts=r.path("SMT_KNOWN_HOSTS", Path("~/.ssh/known_hosts").expanduser()) or Path(),
        gnupghome=r.path("GNUPGHOME"),
        gpg_passphrase=r.secret("SMT_GPG_PASSPHRASE", header=False),
        upload_host=r.text("SMT_UPLOAD_HOST", "127.0.0.1") or "127.0.0.1",
        upload_port=r.integer("SMT_UPLOAD_PORT", 8081, minimum=0, maximum=65535),
        webhook_host=r.text("SMT_WEBHOOK_HOST", ALL_ADDRESSES) or ALL_ADDRESSES,
        webhook_port=r.integer("SMT_WEBHOOK_PORT", 8787, minimum=0, maximum=65535) or None,
        upload_max_bytes=r.integer("SMT_UPLOAD_MAX_BYTES", 1_073_741_824, minimum=1),
        # Ours win; else the Node upload server's names, so its env file keeps its meaning.
        upload_admin_limit=r.integer("SMT_UPLOAD_ADMIN_LIMIT", r.integer("SMT_ADMIN_UPLOAD_DAILY_LIMIT", 40_000)),
        upload_customer_limit=r.integer("SMT_UPLOAD_CUSTOMER_LIMIT",
                                        r.integer("SMT_CUSTOMER_UPLOAD_MONTHLY_LIMIT", 5)),
        upload_admin_window=r.integer("SMT_ADMIN_UPLOAD_WINDOW_MS", 86_400_000, minimum=1000,
                                      maximum=MAX_UPLOAD_WINDOW_MS) / 1000,
        upload_customer_window=r.integer("SMT_CUSTOMER_UPLOAD_WINDOW_MS", 30 * 86_400_000, minimum=1000,
                                         maximum=MAX_UPLOAD_WINDOW_MS) / 1000,
        cors_origins=r.items("SMT_UPLOAD_CORS_ORIGINS", ("https://intelliwatt.com",)),
        upload_ticket_secret=r.secret("SMT_UPLOAD_TICKET_SECRET", strong=secret_weakness),
        upload_idle_seconds=r.number("SMT_UPLOAD_IDLE_SECONDS", 30.0, minimum=0.1),
        upload_max_concurrent=r.integer("SMT_UPLOAD_MAX_CONCURRENT", 16, minimum=1),
        trusted_proxies=r.items("SMT_TRUSTED_PROXIES", ()),
        webhook_secrets=tuple(x for x in (r.secret("INTELLIWATT_WEBHOOK_SECRET"), r.secret("DROPLET_WEBHOOK_SECRET"))
                              if x is not None),
        webhook_forward_url=r.url("SMT_WEBHOOK_FORWARD_URL"),
        status_token=r.secret("SMT_STATUS_TOKEN", min_length=STATUS_TOKEN_MIN),
        status_signin_attempts=r.integer("SMT_STATUS_SIGNIN_ATTEMPTS", 5, minimum=1, maximum=10_000),
        status_signin_attempts_total=r.integer("SMT_STATUS_SIGNIN_ATTEMPTS_TOTAL", 30, minimum=1, maximum=1_000_000),
        bridge_max_body_bytes=bridge_body,
        bridge_buffer_bytes=bridge_buffer,
        linger_seconds=r.number("SMT_LINGER_SECONDS", 30.0, minimum=0.1, maximum=3600.0),
        linger_idle_seconds=r.number("SMT_LINGER_IDLE_SECONDS", 5.0, minimum=0.1, maximum=3600.0),
        linger_max_bytes=r.integer("SMT_LINGER_MAX_BYTES", 67_108_864, minimum=0, maximum=MAX_LINGER_BYTES),
        settle_seconds=r.number("SMT_SETTLE_SECONDS", 1.0),
        rescan_seconds=r.number("SMT_RESCAN_SECONDS", 300.0, minimum=1.0),
        workers=r.integer("SMT_WORKERS", 2, minimum=1, maximum=64),
        worker_mode=WorkerMode(r.choice("SMT_WORKER_MODE", "thread", tuple(WorkerMode))),
        patterns=tuple(p.lower() for p in r.items("SMT_PATTERNS", DEFAULT_PATTERNS)),
        after_send=AfterSend(r.choice("SMT_AFTER_SEND", "keep", tuple(AfterSend))),
        archive_dir=r.path("SMT_ARCHIVE_DIR"),
        validate=r.boolean("SMT_VALIDATE", True),
        max_unpacked_bytes=r.integer("SMT_MAX_UNPACKED_BYTES", 1_073_741_824, minimum=1),
        max_zip_entries=r.integer("SMT_MAX_ZIP_ENTRIES", 100, minimum=1),
        plot_max_days=r.integer("SMT_PLOT_MAX_DAYS", 800, minimum=1, maximum=36_600),
        ledger_url=r.url("SMT_LEDGER_URL", schemes=("postgresql", "postgres")),
        node_name=r.text("SMT_NODE_NAME", socket.gethostname()) or socket.gethostname(),
        ledger_lease_seconds=r.number("SMT_LEDGER_LEASE_SECONDS", 60.0, minimum=1.0),
        retry_attempts=r.integer("SMT_RETRY_ATTEMPTS", 5, minimum=1, maximum=100),
        retry_backoff=r.number("SMT_RETRY_BACKOFF_SECONDS", 1.0),
        http_timeout=r.number("SMT_HTTP_TIMEOUT", 60.0, minimum=0.1),
        ca_bundle=r.path("SMT_CA_BUNDLE"),
        client_cert=r.path("SMT_CLIENT_CERT"),
        client_key=r.path("SMT_CLIENT_KEY"),
        sftp_timeout=r.number("SMT_SFTP_TIMEOUT", 30.0, minimum=0.1),
        metrics_port=r.integer("SMT_METRICS_PORT", 0, minimum=0, maximum=65535) or None,
        grace_seconds=r.number("SMT_STOP_GRACE_SECONDS", 30.0),
        create_inbox=r.boolean("SMT_CREATE_INBOX", False),
        sync_stale_seconds=r.number("SMT_SYNC_STALE_SECONDS", SYNC_STALE_SECONDS),
        verify_delay_seconds=r.number("SMT_VERIFY_DELAY_SECONDS", 300.0),
        verify_requests_per_second=r.number("SMT_VERIFY_REQUESTS_PER_SECOND", 2.0, minimum=0.01),
        verify_timeout=r.number("SMT_VERIFY_TIMEOUT_SECONDS", 30.0, minimum=0.1),
        verify_file_seconds=r.number("SMT_VERIFY_FILE_SECONDS", 900.0, minimum=1.0),
        notify_socket=r.text("NOTIFY_SOCKET"),
        watchdog_usec=r.integer("WATCHDOG_USEC", 0) or None,
    )
    return replace(settings, warnings=unknown_names(merged, r.asked))


# Names IntelliWatt's own droplet tools read from the same env file (the bash script, the Node upload
# server, the webhook bridge, the SMT API proxy): they are not ours, but not typos either.
FOREIGN_NAMES: Final = frozenset({
    "SMT_ADMIN_UPLOAD_DAILY_LIMIT", "SMT_ADMIN_UPLOAD_WINDOW_MS", "SMT_API_BASE_URL", "SMT_CAPTURED_AT",
    "SMT_CUSTOMER_UPLOAD_MONTHLY_LIMIT", "SMT_CUSTOMER_UPLOAD_WINDOW_MS", "SMT_DEBUG", "SMT_ESIID",
    "SMT_FILE_PATH", "SMT_FORCE_REPOST", "SMT_INGEST_SERVICE_NAME", "SMT_METER", "SMT_NORMALIZE_LIMIT",
    "SMT_PASSWORD", "SMT_PROCESS_ONE", "SMT_PROXY", "SMT_PROXY_TOKEN", "SMT_PROXY_URL", "SMT_REQUESTOR_AUTH_ID",
    "SMT_SERVICE_ID", "SMT_SIZE_BYTES", "SMT_SOURCE", "SMT_UPLOAD_DELAY", "SMT_UPLOAD_DIR", "SMT_USERNAME",
    # our own demo and test tooling, passed down to the processes it starts
    "SMT_DEMO_DIR", "SMT_FAULTS_AS_USER", "SMT_FAULTS_SEED", "SMT_SANDBOX_TEST",
})
OUR_PREFIXES: Final = ("SMT_", "INTELLIWATT_")


def unknown_names(given: Mapping[str, str], known: set[str]) -> tuple[str, ...]:
    """One warning per ``SMT_*``/``INTELLIWATT_*`` name that no setting reads, with the closest known name:
    a misspelt ``SMT_UPLOAD_ULR`` would otherwise leave smt-watch in another mode without a word."""
    out = []
    for name in sorted(given):
        if not name.startswith(OUR_PREFIXES) or name in known or name in FOREIGN_NAMES:
            continue
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
        hint = f"; did you mean {close[0]}?" if close else ""
        out.append(f"unknown setting {name} is ignored{hint}")
    return tuple(out)

