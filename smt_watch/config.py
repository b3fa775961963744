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
from dataclasses import dataclass, fields, replace
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
class Target:
    """A setting a mode reads: its :class:`~smt_watch.config.Settings` field and the variable that sets it."""

    field: str
    env: str

    def value(self, settings: Settings) -> object:
        return getattr(settings, self.field)


UPLOAD_URL: Final = Target("upload_url", "SMT_UPLOAD_URL")
UPLOAD_TOKEN: Final = Target("upload_token", "SMT_UPLOAD_TOKEN")
BASE_URL: Final = Target("base_url", "INTELLIWATT_BASE_URL")
ADMIN_TOKEN: Final = Target("admin_token", "ADMIN_TOKEN")


@dataclass(frozen=True)
class Mode:
    """One delivery mode. ``auto``: its place in the ``auto`` rule (1 is tried first) when ``needs`` is set;
    0: only when named. ``warning``: logged whenever the mode is used."""

    name: str
    needs: Target  # the target setting it cannot run without
    url: Callable[[Settings], str]  # where it posts, derived from the settings
    token: Target  # the credential it sends
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
MAX_UPLOAD_WINDOW_MS: Final = 31 * 86_400_000  # the ledger keeps upload times for 31 days
BRIDGE_CLIENT_SHARE: Final = 4  # one client address may hold 1/this of the bridge's slots and body buffer
MAX_BRIDGE_BUFFER_BYTES: Final = 1 << 30  # SMT_BRIDGE_BUFFER_BYTES is memory: 1 GiB is past any sane droplet
MAX_LINGER_BYTES: Final = 1 << 40  # SMT_LINGER_MAX_BYTES: a bound on a count, not memory
HOME_STATE_DIR: Final = "~/.local/state/smt-watch"
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
T = TypeVar("T")


@dataclass(frozen=True)
class Setting:
    """One environment variable, its default and its meaning, written here once.

    ``default`` is the text an operator would write in the env file (``None``: unset), and ``load_settings``
    converts and checks it exactly as it would an operator's value, so the default cannot be one the
    validation refuses. ``docs/settings.md`` and the list in ``docs/contract.md`` §1 are generated from this
    table (``python scripts/docs.py --write``; tests/test_docs.py fails when they are stale)."""

    name: str
    default: str | None
    meaning: str
    shown: str | None = None  # a default computed at run time, in words (``default`` is then None)
    aliases: tuple[str, ...] = ()  # other tools' names for it, read when this one is unset


def _group(title: str, *settings: Setting) -> tuple[str, tuple[Setting, ...]]:
    return title, settings


# To add a setting: one row below (name, default as env-file text, meaning), its field in `Settings`, the line
# in `load_settings` that converts it; then `python scripts/docs.py --write`. Nowhere else states its default.
SETTING_GROUPS: Final = (
    _group(
        "Inbox and state",
        Setting("SMT_LOCAL_DIR", "~/smt_inbox", "the inbox that is watched, synced into and uploaded into",
                aliases=("SMT_UPLOAD_DIR",)),
        Setting("SMT_STATE_DIR", None, "the ledger (`ledger.sqlite3`), work and temporary files, locks",
                shown=f"`SMT_SERVICE_STATE_DIR` when that directory exists (the units' `StateDirectory=`), else "
                      f"`{HOME_STATE_DIR}`: the CLI and the units share one ledger whoever runs it"),
        Setting("SMT_SERVICE_STATE_DIR", "/var/lib/smt-watch",
                "the service's state directory, which `SMT_STATE_DIR` defaults to when it exists (ours; set it "
                "only to try the rule without root)"),
        Setting("SMT_CREATE_INBOX", "0",
                "`1`: `watch` creates a missing inbox (mode 0750); `0`: a missing inbox is exit 2 in one line, so "
                "a typo in `SMT_LOCAL_DIR` never means watching an empty directory (ours; also `--create-inbox`)"),
        Setting("STATE_FILE", None,
                "the bash script's `.posted_sha256`; when it exists (and changed since the last import) its "
                "hashes are imported as `sent`, idempotently, by every command that opens the ledger"),
        Setting("SMT_PATTERNS", "*.csv,*.csv.*,*.asc,*.zip",
                "comma-separated globs of the files `watch` and `sync` take, case-insensitive; a pattern with "
                "`/` matches the path under the inbox, otherwise the name; `*.csv.*` as the old script's `find` "
                "took it (`IntervalData.csv.1`); a temporary name (`x.csv.part`) never counts"),
    ),
    _group(
        "Delivery",
        Setting("SMT_DELIVERY", "auto",
                "`auto` (multipart if `SMT_UPLOAD_URL`, else raw-upload if `INTELLIWATT_BASE_URL`), "
                "`multipart`, `inline` (only by name: production refuses it), `raw-upload`"),
        Setting("SMT_UPLOAD_URL", None, "multipart target; never smt-watch's own `serve` (exit 2)"),
        Setting("SMT_UPLOAD_TOKEN", None,
                "sent as `x-smt-upload-token` (multipart); required by `serve`'s `/upload` when set"),
        Setting("INTELLIWATT_BASE_URL", None,
                "the web app's root: raw-upload posts to `{base}/api/admin/smt/raw-upload`, inline to "
                "`{base}/api/admin/smt/pull`; `verify` reads from it"),
        Setting("ADMIN_TOKEN", None, "sent as `x-admin-token` (raw-upload, inline, `verify`)"),
        Setting("SMT_INLINE_ENCODING", "base64", "`base64` or `base64+gzip`"),
        Setting("SMT_INLINE_MAX_BYTES", "4500000",
                "an inline body larger than this fails before any request (Vercel refuses bodies over 4.5 MB)"),
        Setting("SMT_RAW_LINES_PER_CHUNK", "5000",
                "data lines per raw-upload chunk (the header is repeated in each; also cut so each body stays "
                "≤ 4,500,000 bytes)"),
        Setting("SOURCE_TAG", "adhocusage", "payload field `source` of multipart and inline deliveries"),
        Setting("METER_DEFAULT", "M1", "the meter when the file name holds no `M<digits>`"),
        Setting("ESIID_DEFAULT", None, "the ESIID when the file holds not exactly one"),
        Setting("SMT_RETRY_ATTEMPTS", "5", "HTTP attempts within one delivery call, 1–100 (ours)"),
        Setting("SMT_RETRY_BACKOFF_SECONDS", "1", "first in-call backoff step, doubled each attempt; also the first "
                "wait before `sync` fetches a file again (ours)"),
        Setting("SMT_HTTP_TIMEOUT", "60", "connect (at most 10 s), read and write timeout in seconds (ours)"),
        Setting("SMT_MAX_REQUESTS_PER_SECOND", "10",
                "requests toward the target (raw-upload chunks and retries included) at most this many a second, "
                "per node, or per fleet with `SMT_LEDGER_URL`; `0`: no rate limit (ours; see \"Outbound limits\" "
                "in docs/how-it-works.md for why 10)"),
        Setting("SMT_MAX_IN_FLIGHT", "2",
                "requests toward the target out at once, per node, or per fleet with `SMT_LEDGER_URL`; `0`: no "
                "limit (ours; see \"Outbound limits\")"),
        Setting("SMT_CA_BUNDLE", None,
                "outbound TLS to an https target (delivery, `verify`, `doctor`): the PEM CAs its certificate "
                "must chain to, instead of the public ones; a file that does not load is exit 2"),
        Setting("SMT_CLIENT_CERT", None, "a client certificate (PEM) for an https target"),
        Setting("SMT_CLIENT_KEY", None, "its private key, when it is not in `SMT_CLIENT_CERT`'s file"),
    ),
    _group(
        "watch",
        Setting("SMT_SETTLE_SECONDS", "1", "a file must be closed and unchanged this long before it is delivered"),
        Setting("SMT_RESCAN_SECONDS", "300", "full inbox rescan interval, a backstop for dropped inotify events"),
        Setting("SMT_WORKERS", "2", "concurrent deliveries in `watch` (1–64)"),
        Setting("SMT_WORKER_MODE", "thread",
                "`thread` (the `SMT_WORKERS` deliveries run in the watcher's process) or `process` (each has a "
                "worker process of its own: a backlog of small files drains about 1.3× faster on 2 cores, for "
                "~40–45 MB per worker; ours)"),
        Setting("SMT_ONE_CPU", "1",
                "`1`: with `SMT_WORKER_MODE=thread`, `watch` keeps its threads on one CPU (the one it runs on "
                "when it starts watching): they run Python one at a time anyway, and files handed between "
                "threads across CPUs cost ~1.8× the CPU on an idle 2-core machine; `0`: the kernel places "
                "them (ours)"),
        Setting("SMT_AFTER_SEND", "keep",
                "`keep` (what the bash script did), `move` (to `SMT_ARCHIVE_DIR`), `delete`"),
        Setting("SMT_ARCHIVE_DIR", None,
                "where `move` puts delivered files (outside the inbox), keeping their path under the inbox",
                shown="`$SMT_STATE_DIR/archive`"),
        Setting("SMT_VALIDATE", "1", "`1`: a CSV that is not SMT data is `failed`; `0`: deliver any matching file"),
        Setting("SMT_MAX_UNPACKED_BYTES", "1073741824",
                "the most taken out of one ZIP, and the largest gpg output of one `.asc`"),
        Setting("SMT_MAX_ZIP_ENTRIES", "100", "a ZIP with more entries fails as a whole"),
        Setting("SMT_GPG_PASSPHRASE", None, "passphrase of the decryption key, if it has one (ours)"),
        Setting("GNUPGHOME", None,
                "the keyring that decrypts SMT's `.asc` files; only read (gpg runs in a private copy)",
                shown="`~/.gnupg` of the service user (gpg's default)"),
        Setting("SMT_METRICS_PORT", None,
                "`watch` serves Prometheus metrics on 127.0.0.1 at this port (ours; also `--metrics-port`)"),
        Setting("SMT_STOP_GRACE_SECONDS", "30",
                "on SIGTERM or Ctrl-C, how long in-flight deliveries may finish; the first Ctrl-C says so, a "
                "second quits at once (ours)"),
    ),
    _group(
        "sync (the SMT SFTP server)",
        Setting("SMT_HOST", None, "the SFTP server"),
        Setting("SMT_PORT", "22", "its port"),
        Setting("SMT_USER", None, "the SFTP user"),
        Setting("SMT_KEY", None, "the SSH private key (mode 0600)"),
        Setting("SMT_KEY_PASSPHRASE", None, "its passphrase, if it has one"),
        Setting("SMT_REMOTE_DIR", "/", "remote directories to take files from, comma-separated"),
        Setting("SMT_KNOWN_HOSTS", "~/.ssh/known_hosts",
                "host keys `sync` trusts (OpenSSH format, `[host]:port` for a port other than 22); an unknown "
                "or changed key is refused"),
        Setting("SMT_SFTP_TIMEOUT", "30",
                "connect, handshake and per-read timeout in seconds; a stalled server fails the file, which is "
                "retried (ours)"),
        Setting("SMT_SYNC_STALE_SECONDS", "3600",
                "`status` exits 1 when the last `sync` pass finished longer ago than this (twice the shipped "
                "`smt-sync.timer`'s 30 minutes); `0`: never (ours)"),
    ),
    _group(
        "serve (uploads, trigger webhook, status page)",
        Setting("SMT_UPLOAD_HOST", "127.0.0.1", "where `serve` takes uploads"),
        Setting("SMT_UPLOAD_PORT", "8081",
                "its port: the Node upload server's, which nginx proxies `smt-upload.intelliwatt.com` to"),
        Setting("SMT_WEBHOOK_HOST", "0.0.0.0",  # noqa: S104 (the web app calls the trigger at <droplet ip>:8787)
                "where `serve` also listens for the trigger, health and pass-through routes (no uploads): the "
                "web app calls `http://<droplet ip>:8787/trigger/smt-now` directly, as it called the old bridge "
                "on every address"),
        Setting("SMT_WEBHOOK_PORT", "8787",
                "its port; `0`: no second listener (the upload port serves the trigger too); the same port as "
                "`SMT_UPLOAD_PORT` is exit 2"),
        Setting("SMT_UPLOAD_MAX_BYTES", "1073741824",
                "the largest upload `serve` accepts (every part of the form counts)"),
        Setting("SMT_UPLOAD_ADMIN_LIMIT", "40000",
                "uploads per admin account (any role but `customer`) per rolling window; the Node server's "
                "default, so IntelliWatt's admin page is never throttled (without upload tickets a role is "
                "self-declared anyway)", aliases=("SMT_ADMIN_UPLOAD_DAILY_LIMIT",)),
        Setting("SMT_UPLOAD_CUSTOMER_LIMIT", "5", "uploads per customer account per rolling window",
                aliases=("SMT_CUSTOMER_UPLOAD_MONTHLY_LIMIT",)),
        Setting("SMT_ADMIN_UPLOAD_WINDOW_MS", "86400000",
                "the admin window, in milliseconds (at most 31 days; rolling here, the Node server's name)"),
        Setting("SMT_CUSTOMER_UPLOAD_WINDOW_MS", "2592000000",
                "the customer window, in milliseconds (at most 31 days; rolling here, the Node server's name)"),
        Setting("SMT_UPLOAD_CORS_ORIGINS", "https://intelliwatt.com",
                "comma-separated origins allowed to POST from a browser (`*`: any)"),
        Setting("SMT_UPLOAD_TICKET_SECRET", None,
                "when set, an upload's role and account come only from a signed `x-smt-upload-ticket`; at least "
                "32 random bytes (`openssl rand -base64 32`), a weaker one is exit 2"),
        Setting("SMT_UPLOAD_IDLE_SECONDS", "30",
                "`serve` closes a connection that sends no byte for this long (request head or body)"),
        Setting("SMT_UPLOAD_MAX_CONCURRENT", "16", "uploads `serve` takes at once; beyond, `503` with `Retry-After`"),
        Setting("SMT_TRUSTED_PROXIES", None,
                "comma-separated peers whose `X-Forwarded-For` and `X-Forwarded-Proto` are believed",
                shown="none"),
        Setting("INTELLIWATT_WEBHOOK_SECRET", None,
                "a secret for `POST /trigger/smt-now` (constant-time; either this or `DROPLET_WEBHOOK_SECRET` "
                "matches, as the old bridge took both)", shown="unset (the trigger answers `503`)"),
        Setting("DROPLET_WEBHOOK_SECRET", None, "the trigger's other secret"),
        Setting("SMT_WEBHOOK_FORWARD_URL", None,
                "the old webhook bridge (e.g. `http://127.0.0.1:8788`): what `serve` does not handle is passed "
                "through to it"),
        Setting("SMT_STATUS_TOKEN", None,
                "opens `serve`'s `/status` page and `/status.json`; at least 16 visible ASCII characters "
                "(`openssl rand -hex 24`); never logged or shown (ours)", shown="unset: no status page"),
        Setting("SMT_STATUS_SIGNIN_ATTEMPTS", "5",
                "wrong status tokens from one client address per minute; beyond, `429` with `Retry-After` "
                "(1–10000; ours)"),
        Setting("SMT_STATUS_SIGNIN_ATTEMPTS_TOTAL", "30",
                "wrong status tokens from all addresses per minute; beyond, `429` (1–1000000; ours)"),
        Setting("SMT_BRIDGE_MAX_BODY_BYTES", "1048576",
                "the largest pass-through body; beyond, `413` (at most a quarter of `SMT_BRIDGE_BUFFER_BYTES`; "
                "ours)"),
        Setting("SMT_BRIDGE_BUFFER_BYTES", "33554432",
                "memory all pass-through bodies being read share, a quarter per client address (at most 1 GiB; "
                "ours)"),
        Setting("SMT_LINGER_SECONDS", "30",
                "a refused connection's lingering close lasts at most this long in all (0.1–3600; ours)"),
        Setting("SMT_LINGER_IDLE_SECONDS", "5",
                "… and ends after this long without a byte, at most `SMT_UPLOAD_IDLE_SECONDS` (0.1–3600; ours)"),
        Setting("SMT_LINGER_MAX_BYTES", "67108864",
                "… and ends once this many bytes sent after the reply were read and thrown away (ours)"),
    ),
    _group(
        "verify and inspect",
        Setting("SMT_VERIFY_DELAY_SECONDS", "300",
                "after a delivery, how long the app gets to normalize before the automatic check (ours)"),
        Setting("SMT_VERIFY_REQUESTS_PER_SECOND", "2",
                "`verify`'s read requests to the app, at most this many a second (ours)"),
        Setting("SMT_VERIFY_TIMEOUT_SECONDS", "30", "deadline of one read request of `verify` (ours)"),
        Setting("SMT_VERIFY_FILE_SECONDS", "900",
                "deadline of one file's verification; past it the file is `unverifiable` (ours)"),
        Setting("SMT_SYNC_VERIFY", "0",
                "`1`: each `sync` pass (the timer's too) also verifies the day's deliveries and runs the "
                "re-sends due, paced like `watch`'s (ours; see verify)"),
        Setting("SMT_PLOT_MAX_DAYS", "800",
                "`inspect --plot` draws at most this many days (the file's latest); it says what it left out"),
    ),
    _group(
        "Several droplets (a shared PostgreSQL ledger)",
        Setting("SMT_LEDGER_URL", None,
                "a PostgreSQL ledger shared by several droplets (`postgresql://user:password@host:port/db`; "
                "tables in schema `smt_watch`); holds a password: never logged, shown as "
                "`postgresql://***@host…` (ours)", shown="unset: SQLite in `SMT_STATE_DIR`"),
        Setting("SMT_NODE_NAME", None,
                "this droplet's name in shared claims and its stat cache; different on every node (ours)",
                shown="the host name"),
        Setting("SMT_LEDGER_LEASE_SECONDS", "60",
                "a `sending` claim's lease, renewed every third of it while the delivery runs; another node "
                "holding the same bytes takes over a claim whose lease expired (ours)"),
        Setting("SMT_LEDGER_RECONNECT_SECONDS", "15",
                "how long one ledger operation keeps trying a lost PostgreSQL on fresh connections before it gives "
                "up (the file waits and is tried again after a rescan); longer rides out a slow fail-over "
                "without an outage (`serve` answers 503 after 3 s whatever this says) (ours)"),
    ),
    _group(
        "Set by systemd",
        Setting("NOTIFY_SOCKET", None, "for `Type=notify` units: `watch` reports `READY=1`, `STATUS=`, `STOPPING=1`"),
        Setting("WATCHDOG_USEC", None, "`watch` sends `WATCHDOG=1` at half of it"),
    ),
)
SETTINGS: Final = {s.name: s for _, group in SETTING_GROUPS for s in group}


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
    """Typed settings; field docs name the environment variable each comes from. Only ``load_settings``
    builds one, so no field has a default here: each default is written once, in ``SETTINGS``."""

    local_dir: Path  # SMT_LOCAL_DIR
    state_dir: Path  # SMT_STATE_DIR
    state_file: Path | None  # STATE_FILE
    delivery: str  # SMT_DELIVERY
    upload_url: str | None  # SMT_UPLOAD_URL
    upload_token: Secret | None  # SMT_UPLOAD_TOKEN
    base_url: str | None  # INTELLIWATT_BASE_URL
    admin_token: Secret | None  # ADMIN_TOKEN
    inline_encoding: str  # SMT_INLINE_ENCODING
    inline_max_bytes: int  # SMT_INLINE_MAX_BYTES (Vercel refuses bodies over 4.5 MB)
    raw_lines_per_chunk: int  # SMT_RAW_LINES_PER_CHUNK
    source_tag: str  # SOURCE_TAG
    meter_default: str  # METER_DEFAULT
    esiid_default: str | None  # ESIID_DEFAULT
    smt_host: str | None  # SMT_HOST
    smt_port: int  # SMT_PORT
    smt_user: str | None  # SMT_USER
    smt_key: Path | None  # SMT_KEY
    smt_key_passphrase: Secret | None  # SMT_KEY_PASSPHRASE
    smt_remote_dirs: tuple[str, ...]  # SMT_REMOTE_DIR
    known_hosts: Path  # SMT_KNOWN_HOSTS
    gnupghome: Path | None  # GNUPGHOME
    gpg_passphrase: Secret | None  # SMT_GPG_PASSPHRASE: for a passphrase-protected decryption key
    upload_host: str  # SMT_UPLOAD_HOST
    upload_port: int  # SMT_UPLOAD_PORT: the Node upload server's port, which nginx proxies to
    webhook_host: str  # SMT_WEBHOOK_HOST: the web app calls the trigger directly, as the old bridge
    webhook_port: int | None  # SMT_WEBHOOK_PORT (0: off, the upload port alone serves the trigger)
    upload_max_bytes: int  # SMT_UPLOAD_MAX_BYTES
    upload_admin_limit: int  # SMT_UPLOAD_ADMIN_LIMIT, else the Node server's SMT_ADMIN_UPLOAD_DAILY_LIMIT
    upload_customer_limit: int  # SMT_UPLOAD_CUSTOMER_LIMIT, else SMT_CUSTOMER_UPLOAD_MONTHLY_LIMIT
    upload_admin_window: float  # SMT_ADMIN_UPLOAD_WINDOW_MS (the Node server's), in seconds here
    upload_customer_window: float  # SMT_CUSTOMER_UPLOAD_WINDOW_MS, in seconds here
    cors_origins: tuple[str, ...]  # SMT_UPLOAD_CORS_ORIGINS
    upload_ticket_secret: Secret | None  # SMT_UPLOAD_TICKET_SECRET: identity only from signed tickets
    upload_idle_seconds: float  # SMT_UPLOAD_IDLE_SECONDS: no byte for this long closes the connection
    upload_max_concurrent: int  # SMT_UPLOAD_MAX_CONCURRENT: uploads taken at once; beyond, 503
    trusted_proxies: tuple[str, ...]  # SMT_TRUSTED_PROXIES: peers whose X-Forwarded-For is believed
    webhook_secrets: tuple[Secret, ...]  # INTELLIWATT_WEBHOOK_SECRET and DROPLET_WEBHOOK_SECRET: either matches
    webhook_forward_url: str | None  # SMT_WEBHOOK_FORWARD_URL: the old bridge, for what serve does not handle
    status_token: Secret | None  # SMT_STATUS_TOKEN: opens serve's /status page (unset: no page)
    status_signin_attempts: int  # SMT_STATUS_SIGNIN_ATTEMPTS: wrong status tokens per address per minute
    status_signin_attempts_total: int  # SMT_STATUS_SIGNIN_ATTEMPTS_TOTAL: wrong status tokens in all per minute
    bridge_max_body_bytes: int  # SMT_BRIDGE_MAX_BODY_BYTES: one pass-through body; beyond, 413
    bridge_buffer_bytes: int  # SMT_BRIDGE_BUFFER_BYTES: all pass-through bodies being read at once
    linger_seconds: float  # SMT_LINGER_SECONDS: a refused connection's lingering close, in all
    linger_idle_seconds: float  # SMT_LINGER_IDLE_SECONDS: ... without a byte (at most SMT_UPLOAD_IDLE_SECONDS)
    linger_max_bytes: int  # SMT_LINGER_MAX_BYTES: what a refused client may make us read and discard
    settle_seconds: float  # SMT_SETTLE_SECONDS
    rescan_seconds: float  # SMT_RESCAN_SECONDS
    workers: int  # SMT_WORKERS
    worker_mode: WorkerMode  # SMT_WORKER_MODE (not in the bash script it replaces)
    one_cpu: bool  # SMT_ONE_CPU: watch's threads on one CPU in thread mode (smt_watch/cpus.py)
    patterns: tuple[str, ...]  # SMT_PATTERNS
    after_send: AfterSend  # SMT_AFTER_SEND
    archive_dir: Path | None  # SMT_ARCHIVE_DIR (None: state_dir/archive)
    validate: bool  # SMT_VALIDATE
    max_zip_entries: int  # SMT_MAX_ZIP_ENTRIES: a ZIP with more entries fails as a whole
    max_unpacked_bytes: int  # SMT_MAX_UNPACKED_BYTES
    plot_max_days: int  # SMT_PLOT_MAX_DAYS: rows of `inspect --plot`'s grid (the file's latest days)
    # Ours (the bash script it replaces had none of these); see docs/settings.md.
    ledger_url: str | None  # SMT_LEDGER_URL: a PostgreSQL ledger shared by several droplets (holds a password)
    node_name: str  # SMT_NODE_NAME: this droplet, in shared claims
    ledger_lease_seconds: float  # SMT_LEDGER_LEASE_SECONDS: a claim another node may take over after
    ledger_reconnect_seconds: float  # SMT_LEDGER_RECONNECT_SECONDS: one operation's retries on a lost PostgreSQL
    retry_attempts: int  # SMT_RETRY_ATTEMPTS: HTTP attempts within one delivery call
    retry_backoff: float  # SMT_RETRY_BACKOFF_SECONDS: first backoff step, doubled per attempt (delivery, sync)
    http_timeout: float  # SMT_HTTP_TIMEOUT: connect/read/write timeout in seconds
    max_requests_per_second: float  # SMT_MAX_REQUESTS_PER_SECOND: toward the app, per node/fleet (0: off)
    max_in_flight: int  # SMT_MAX_IN_FLIGHT: requests out at once toward the app, per node/fleet (0: off)
    ca_bundle: Path | None  # SMT_CA_BUNDLE: the CAs an https target's certificate must chain to
    client_cert: Path | None  # SMT_CLIENT_CERT: a client certificate (PEM) for an https target
    client_key: Path | None  # SMT_CLIENT_KEY: its private key, when not in SMT_CLIENT_CERT
    sftp_timeout: float  # SMT_SFTP_TIMEOUT: connect, handshake and per-read timeout for sync
    metrics_port: int | None  # SMT_METRICS_PORT: Prometheus metrics for `watch` on 127.0.0.1
    grace_seconds: float  # SMT_STOP_GRACE_SECONDS: how long in-flight deliveries may finish on stop
    create_inbox: bool  # SMT_CREATE_INBOX: `watch` creates a missing inbox instead of exiting 2
    sync_stale_seconds: float  # SMT_SYNC_STALE_SECONDS: `status` alerts past this (0: never)
    verify_delay_seconds: float  # SMT_VERIFY_DELAY_SECONDS: after a delivery, wait before verifying
    verify_requests_per_second: float  # SMT_VERIFY_REQUESTS_PER_SECOND: verify's reads from the app
    verify_timeout: float  # SMT_VERIFY_TIMEOUT_SECONDS: deadline of one read request
    verify_file_seconds: float  # SMT_VERIFY_FILE_SECONDS: deadline of one file's verification
    sync_verify: bool  # SMT_SYNC_VERIFY: sync's pass also runs the day's due checks and re-sends
    # Set by systemd for Type=notify units.
    notify_socket: str | None  # NOTIFY_SOCKET
    watchdog_usec: int | None  # WATCHDOG_USEC
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
    """Reads one merged mapping; each method validates and names the variable on error.

    A name's default comes from its row in ``SETTINGS`` and goes through the same conversion as an operator's
    value; a name without a row is a programming error, said with what to do."""

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

    @staticmethod
    def spec(name: str) -> Setting:
        try:
            return SETTINGS[name]
        except KeyError:
            raise LookupError(f"{name} has no row in smt_watch/config.py SETTINGS: add one (name, default, "
                              "meaning), then run `python scripts/docs.py --write`") from None

    def given(self, name: str) -> tuple[str, str | None]:
        """The variable that holds a value (``name``, else one of its aliases) and that value, else ``name``
        and the default from ``SETTINGS`` (None: unset)."""
        spec = self.spec(name)
        for each in (name, *spec.aliases):
            value = self.raw(each)
            if value is not None:
                return each, value
        return name, spec.default

    def _convert(self, name: str, conv: Callable[[str], T], what: str, show: bool = True) -> T | None:
        source, value = self.given(name)
        if value is None:
            return None
        try:
            return conv(value)
        except (ValueError, TypeError, KeyError):
            shown = f": {value!r}" if show else ""
            # from None: the cause's text quotes the value, which may be a token (show=False)
            raise ConfigError(f"{source} must be {what}{shown}") from None

    @staticmethod
    def _set(name: str, value: T | None) -> T:
        """``value`` of a setting whose row has a default (so it is never None)."""
        if value is None:
            raise LookupError(f"{name} has no default in smt_watch/config.py SETTINGS")
        return value

    def text(self, name: str) -> str | None:
        return self.given(name)[1]

    def text_set(self, name: str) -> str:
        return self._set(name, self.text(name))

    def secret(self, *names: str, header: bool = True, min_length: int = 0,
               strong: Callable[[str], str | None] | None = None) -> Secret | None:
        """``header``: the value travels in (or is compared with) an HTTP header, so it must be visible
        ASCII with no spaces; a passphrase may hold spaces but no control characters. A value that breaks
        the rule is refused now, naming the variable and the rule and never the value: sent later it would
        fail every attempt, and the library's error would quote it."""
        self.asked.update(names)
        for name in names:
            name, value = self.given(name)
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

    def path(self, name: str) -> Path | None:
        value = self.given(name)[1]
        return Path(value).expanduser() if value is not None else None

    def path_set(self, name: str) -> Path:
        return self._set(name, self.path(name))

    def maybe_integer(self, name: str, *, minimum: int = 0, maximum: int | None = None) -> int | None:
        def conv(v: str) -> int:
            n = int(v)
            if n < minimum or (maximum is not None and n > maximum):
                raise ValueError
            return n

        bounds = f"an integer ≥ {minimum}" + (f" and ≤ {maximum}" if maximum is not None else "")
        return self._convert(name, conv, bounds)

    def integer(self, name: str, *, minimum: int = 0, maximum: int | None = None) -> int:
        return self._set(name, self.maybe_integer(name, minimum=minimum, maximum=maximum))

    def number(self, name: str, *, minimum: float = 0.0, maximum: float | None = None) -> float:
        def conv(v: str) -> float:
            n = float(v)
            if not n >= minimum or n == float("inf") or (maximum is not None and not n <= maximum):
                raise ValueError
            return n

        bounds = f"a number ≥ {minimum:g}" + (f" and ≤ {maximum:g}" if maximum is not None else "")
        return self._set(name, self._convert(name, conv, bounds))

    def choice(self, name: str, choices: tuple[str, ...]) -> str:
        def conv(v: str) -> str:
            if v.lower() not in choices:
                raise ValueError
            return v.lower()

        return self._set(name, self._convert(name, conv, "one of " + ", ".join(choices)))

    def boolean(self, name: str) -> bool:
        table = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False}
        table["off"] = False
        return self._set(name, self._convert(name, lambda v: table[v.lower()], "1 or 0", show=True))

    def url(self, name: str, schemes: tuple[str, ...] = ("http", "https")) -> str | None:
        name, value = self.given(name)
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

    def items(self, name: str) -> tuple[str, ...]:
        source, value = self.given(name)
        if value is None:
            return ()
        parts = tuple(p.strip() for p in value.split(",") if p.strip())
        if not parts:
            raise ConfigError(f"{source} must list at least one item")
        return parts


def default_state_dir(service_dir: Path) -> Path:
    """``SMT_STATE_DIR`` when it is not set: the service's directory (``SMT_SERVICE_STATE_DIR``,
    ``/var/lib/smt-watch``, which the units' ``StateDirectory=`` creates) when it exists, so the CLI and the
    service share one ledger whoever runs it; else ``~/.local/state/smt-watch`` (a laptop, a test box
    without the units)."""
    return service_dir if service_dir.is_dir() else Path(HOME_STATE_DIR).expanduser()


def load_settings(
    environ: Mapping[str, str],
    *,
    env_file: Path | None = None,
    overrides: Mapping[str, str | None] | None = None,
) -> Settings:
    """Build settings from the env file, then the process environment, then CLI overrides.

    ``overrides`` uses environment-variable names (a flag ``--upload-url`` passes ``SMT_UPLOAD_URL``), so
    a flag and its variable share one validation path; ``None`` values are ignored. Defaults come from
    ``SETTINGS``; a setting's default is not written here.
    """
    merged: dict[str, str] = {}
    if env_file is not None:
        merged.update(parse_env_file(env_file))
    # An empty environment variable counts as unset, so it does not blank a value from the file.
    merged.update({k: v for k, v in environ.items() if v.strip()})
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
    r = _Reader(merged)
    bridge_buffer = r.integer("SMT_BRIDGE_BUFFER_BYTES", minimum=BRIDGE_CLIENT_SHARE, maximum=MAX_BRIDGE_BUFFER_BYTES)
    bridge_body = r.integer("SMT_BRIDGE_MAX_BODY_BYTES", minimum=1, maximum=bridge_buffer // BRIDGE_CLIENT_SHARE)
    settings = Settings(
        local_dir=r.path_set("SMT_LOCAL_DIR"),
        state_dir=r.path("SMT_STATE_DIR") or default_state_dir(r.path_set("SMT_SERVICE_STATE_DIR")),
        state_file=r.path("STATE_FILE"),
        delivery=r.choice("SMT_DELIVERY", DELIVERY_MODES),
        upload_url=r.url("SMT_UPLOAD_URL"),
        upload_token=r.secret("SMT_UPLOAD_TOKEN"),
        base_url=r.url("INTELLIWATT_BASE_URL"),
        admin_token=r.secret("ADMIN_TOKEN"),
        inline_encoding=r.choice("SMT_INLINE_ENCODING", INLINE_ENCODINGS),
        inline_max_bytes=r.integer("SMT_INLINE_MAX_BYTES", minimum=1),
        raw_lines_per_chunk=r.integer("SMT_RAW_LINES_PER_CHUNK", minimum=1),
        source_tag=r.text_set("SOURCE_TAG"),
        meter_default=r.text_set("METER_DEFAULT"),
        esiid_default=r.text("ESIID_DEFAULT"),
        smt_host=r.text("SMT_HOST"),
        smt_port=r.integer("SMT_PORT", minimum=1, maximum=65535),
        smt_user=r.text("SMT_USER"),
        smt_key=r.path("SMT_KEY"),
        smt_key_passphrase=r.secret("SMT_KEY_PASSPHRASE", header=False),
        smt_remote_dirs=r.items("SMT_REMOTE_DIR"),
        known_hosts=r.path_set("SMT_KNOWN_HOSTS"),
        gnupghome=r.path("GNUPGHOME"),
        gpg_passphrase=r.secret("SMT_GPG_PASSPHRASE", header=False),
        upload_host=r.text_set("SMT_UPLOAD_HOST"),
        upload_port=r.integer("SMT_UPLOAD_PORT", minimum=0, maximum=65535),
        webhook_host=r.text_set("SMT_WEBHOOK_HOST"),
        webhook_port=r.integer("SMT_WEBHOOK_PORT", minimum=0, maximum=65535) or None,
        upload_max_bytes=r.integer("SMT_UPLOAD_MAX_BYTES", minimum=1),
        # Ours win; else the Node upload server's names (the rows' aliases), so its env file keeps its meaning.
        upload_admin_limit=r.integer("SMT_UPLOAD_ADMIN_LIMIT"),
        upload_customer_limit=r.integer("SMT_UPLOAD_CUSTOMER_LIMIT"),
        upload_admin_window=r.integer("SMT_ADMIN_UPLOAD_WINDOW_MS", minimum=1000, maximum=MAX_UPLOAD_WINDOW_MS) / 1000,
        upload_customer_window=r.integer("SMT_CUSTOMER_UPLOAD_WINDOW_MS", minimum=1000,
                                         maximum=MAX_UPLOAD_WINDOW_MS) / 1000,
        cors_origins=r.items("SMT_UPLOAD_CORS_ORIGINS"),
        upload_ticket_secret=r.secret("SMT_UPLOAD_TICKET_SECRET", strong=secret_weakness),
        upload_idle_seconds=r.number("SMT_UPLOAD_IDLE_SECONDS", minimum=0.1),
        upload_max_concurrent=r.integer("SMT_UPLOAD_MAX_CONCURRENT", minimum=1),
        trusted_proxies=r.items("SMT_TRUSTED_PROXIES"),
        webhook_secrets=tuple(x for x in (r.secret("INTELLIWATT_WEBHOOK_SECRET"), r.secret("DROPLET_WEBHOOK_SECRET"))
                              if x is not None),
        webhook_forward_url=r.url("SMT_WEBHOOK_FORWARD_URL"),
        status_token=r.secret("SMT_STATUS_TOKEN", min_length=STATUS_TOKEN_MIN),
        status_signin_attempts=r.integer("SMT_STATUS_SIGNIN_ATTEMPTS", minimum=1, maximum=10_000),
        status_signin_attempts_total=r.integer("SMT_STATUS_SIGNIN_ATTEMPTS_TOTAL", minimum=1, maximum=1_000_000),
        bridge_max_body_bytes=bridge_body,
        bridge_buffer_bytes=bridge_buffer,
        linger_seconds=r.number("SMT_LINGER_SECONDS", minimum=0.1, maximum=3600.0),
        linger_idle_seconds=r.number("SMT_LINGER_IDLE_SECONDS", minimum=0.1, maximum=3600.0),
        linger_max_bytes=r.integer("SMT_LINGER_MAX_BYTES", minimum=0, maximum=MAX_LINGER_BYTES),
        settle_seconds=r.number("SMT_SETTLE_SECONDS"),
        rescan_seconds=r.number("SMT_RESCAN_SECONDS", minimum=1.0),
        workers=r.integer("SMT_WORKERS", minimum=1, maximum=64),
        worker_mode=WorkerMode(r.choice("SMT_WORKER_MODE", tuple(WorkerMode))),
        one_cpu=r.boolean("SMT_ONE_CPU"),
        patterns=tuple(p.lower() for p in r.items("SMT_PATTERNS")),
        after_send=AfterSend(r.choice("SMT_AFTER_SEND", tuple(AfterSend))),
        archive_dir=r.path("SMT_ARCHIVE_DIR"),
        validate=r.boolean("SMT_VALIDATE"),
        max_unpacked_bytes=r.integer("SMT_MAX_UNPACKED_BYTES", minimum=1),
        max_zip_entries=r.integer("SMT_MAX_ZIP_ENTRIES", minimum=1),
        plot_max_days=r.integer("SMT_PLOT_MAX_DAYS", minimum=1, maximum=36_600),
        ledger_url=r.url("SMT_LEDGER_URL", schemes=("postgresql", "postgres")),
        node_name=r.text("SMT_NODE_NAME") or socket.gethostname(),
        ledger_lease_seconds=r.number("SMT_LEDGER_LEASE_SECONDS", minimum=1.0),
        ledger_reconnect_seconds=r.number("SMT_LEDGER_RECONNECT_SECONDS", minimum=0.5, maximum=3600.0),
        retry_attempts=r.integer("SMT_RETRY_ATTEMPTS", minimum=1, maximum=100),
        retry_backoff=r.number("SMT_RETRY_BACKOFF_SECONDS"),
        http_timeout=r.number("SMT_HTTP_TIMEOUT", minimum=0.1),
        max_requests_per_second=r.number("SMT_MAX_REQUESTS_PER_SECOND", minimum=0.0, maximum=100_000.0),
        max_in_flight=r.integer("SMT_MAX_IN_FLIGHT", minimum=0, maximum=1024),
        ca_bundle=r.path("SMT_CA_BUNDLE"),
        client_cert=r.path("SMT_CLIENT_CERT"),
        client_key=r.path("SMT_CLIENT_KEY"),
        sftp_timeout=r.number("SMT_SFTP_TIMEOUT", minimum=0.1),
        metrics_port=r.maybe_integer("SMT_METRICS_PORT", minimum=0, maximum=65535) or None,
        grace_seconds=r.number("SMT_STOP_GRACE_SECONDS"),
        create_inbox=r.boolean("SMT_CREATE_INBOX"),
        sync_stale_seconds=r.number("SMT_SYNC_STALE_SECONDS"),
        verify_delay_seconds=r.number("SMT_VERIFY_DELAY_SECONDS"),
        verify_requests_per_second=r.number("SMT_VERIFY_REQUESTS_PER_SECOND", minimum=0.01),
        verify_timeout=r.number("SMT_VERIFY_TIMEOUT_SECONDS", minimum=0.1),
        verify_file_seconds=r.number("SMT_VERIFY_FILE_SECONDS", minimum=1.0),
        sync_verify=r.boolean("SMT_SYNC_VERIFY"),
        notify_socket=r.text("NOTIFY_SOCKET"),
        watchdog_usec=r.maybe_integer("WATCHDOG_USEC") or None,
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

