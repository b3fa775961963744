"""``smt-watch doctor``: one line per check, so an operator sees at a glance what is wrong and what to do.

Each check is a small function returning :class:`Check` lines; none raises for a problem it can name.
Secrets are never printed: checks report whether a token is set, never its value.
"""

from __future__ import annotations

import os
import shutil
import stat as stat_mod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from smt_watch.config import Settings, redact_url
from smt_watch.delivery.registry import MODES, auto_targets, delivery_mode
from smt_watch.errors import SmtWatchError
from smt_watch.names import shown

OK, WARN, FAIL = "ok", "warn", "FAIL"


@dataclass(frozen=True)
class Check:
    status: str  # ok | warn | FAIL
    name: str
    detail: str
    hint: str = ""

    def line(self) -> str:
        """One line whatever a path or a server's answer holds (names are bytes)."""
        text = f"{self.status:<4}  {self.name}: {self.detail}" + (f"  -> {self.hint}" if self.hint else "")
        return shown(text)


def check_delivery(s: Settings) -> Iterator[Check]:
    """The mode the settings pick, the URL its sink posts to and whether its token is set (the registry's
    entry for the mode says which)."""
    try:
        mode = MODES[delivery_mode(s)]
    except SmtWatchError as exc:
        yield Check(FAIL, "delivery", str(exc), f"set {auto_targets()}")
        return
    token = f"{mode.token.env} {'set' if mode.secret(s) else 'not set'}"
    yield Check(OK, "delivery", f"{mode.name} to {redact_url(mode.url(s))} ({token})")


def check_settings(s: Settings) -> Iterator[Check]:
    """A variable no setting reads is most often a typo of one that would have changed the mode."""
    for warning in s.warnings:
        yield Check(WARN, "settings", warning)


def _writable_dir(name: str, path: Path) -> Check:
    if not path.exists():
        return Check(FAIL, name, f"{path} does not exist", f"mkdir -p {path} (owned by the service user)")
    if not path.is_dir():
        return Check(FAIL, name, f"{path} is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        return Check(FAIL, name, f"{path} is not writable by this user", f"chown the service user {path}")
    return Check(OK, name, f"{path} is writable")


def check_dirs(s: Settings) -> Iterator[Check]:
    yield _writable_dir("inbox", s.local_dir)
    yield _writable_dir("state dir", s.state_dir)


def check_env_file(env_file: Path | None) -> Iterator[Check]:
    if env_file is None:
        return
    try:
        mode = env_file.stat().st_mode
    except OSError as exc:
        yield Check(FAIL, "env file", f"{env_file}: {exc.strerror}")
        return
    if mode & stat_mod.S_IROTH:
        yield Check(FAIL, "env file", f"{env_file} is world-readable (mode {mode & 0o777:o}); it holds tokens",
                    f"chmod 640 {env_file}")
    else:
        yield Check(OK, "env file", f"{env_file} mode {mode & 0o777:o}")


def check_sftp_files(s: Settings) -> Iterator[Check]:
    if not s.smt_host:
        yield Check(WARN, "sftp", "SMT_HOST not set: sync is not configured")
        return
    if s.smt_key is None:
        yield Check(FAIL, "ssh key", "SMT_KEY is not set", "point SMT_KEY at the private key for SMT")
    else:
        try:
            mode = s.smt_key.stat().st_mode & 0o777
            if mode & 0o077:
                yield Check(FAIL, "ssh key", f"{s.smt_key} mode {mode:o} is readable by others",
                            f"chmod 600 {s.smt_key}")
            else:
                yield Check(OK, "ssh key", f"{s.smt_key} mode {mode:o}")
        except OSError as exc:
            yield Check(FAIL, "ssh key", f"{s.smt_key}: {exc.strerror}")
    from smt_watch.sftp import host_entry, known_host_keys

    entry = host_entry(s.smt_host, s.smt_port)
    try:
        # sync's own reader: a line it skips (with a warning) is skipped here too, so doctor and sync agree.
        found = known_host_keys(s.known_hosts).lookup(entry) is not None
    except SmtWatchError as exc:
        yield Check(FAIL, "known_hosts", str(exc))
        return
    if found:
        yield Check(OK, "known_hosts", f"{entry} is in {s.known_hosts}")
    else:
        port = f"-p {s.smt_port} " if s.smt_port != 22 else ""
        yield Check(FAIL, "known_hosts", f"{entry} is not in {s.known_hosts}",
                    f"ssh-keyscan {port}{s.smt_host} >> {s.known_hosts} (verify the fingerprint with SMT)")


def check_gpg(s: Settings) -> Iterator[Check]:
    if not any(p.endswith(".asc") for p in s.patterns):
        return
    gpg = shutil.which("gpg")
    if gpg is None:
        yield Check(FAIL, "gpg", "gpg is not installed but SMT_PATTERNS takes .asc files", "apt-get install gnupg")
        return
    try:
        import gnupg

        keys = gnupg.GPG(gnupghome=str(s.gnupghome) if s.gnupghome else None).list_keys(secret=True)
    except Exception as exc:
        yield Check(FAIL, "gpg", f"cannot list keys: {exc}")
        return
    home = s.gnupghome or "gpg's default home"
    if keys:
        yield Check(OK, "gpg", f"{len(keys)} secret key(s) in {home}")
    else:
        yield Check(FAIL, "gpg", f"no secret key in {home}: SMT's .asc files cannot be decrypted",
                    "gpg --import the IntelliWatt private key (GNUPGHOME)")


def _check_shared_ledger(s: Settings) -> Iterator[Check]:
    """Connection, schema version and clock of the PostgreSQL ledger. The URL is shown without its password."""
    from smt_watch.ledger.postgres import SCHEMA_VERSION
    from smt_watch.statedir import connect

    shown_url = redact_url(s.ledger_url or "")
    try:
        with connect(s, max_connections=2) as ledger:
            version = ledger.schema_version
            offset = ledger.clock_offset()
            counts = ledger.counts()
    except SmtWatchError as exc:
        yield Check(FAIL, "ledger", str(exc), "check SMT_LEDGER_URL, the network and the role's password")
        return
    summary = ", ".join(f"{k} {v}" for k, v in counts.items())
    yield Check(OK, "ledger", f"PostgreSQL {shown_url} (node {s.node_name}): schema {version} "
                f"(this smt-watch: {SCHEMA_VERSION}); {summary}")
    if abs(offset) > s.ledger_lease_seconds / 2:
        yield Check(FAIL, "clock", f"this node's clock is {offset:+.1f}s from the database's",
                    "run chrony or systemd-timesyncd on every node")
    elif abs(offset) > CLOCK_WARN_SECONDS:
        yield Check(WARN, "clock", f"this node's clock is {offset:+.1f}s from the database's",
                    "run chrony or systemd-timesyncd on every node")
    else:
        yield Check(OK, "clock", f"within {CLOCK_WARN_SECONDS:g}s of the database's ({offset:+.3f}s)")


def check_inotify(s: Settings) -> Iterator[Check]:
    try:
        limit = int(Path("/proc/sys/fs/inotify/max_user_watches").read_text())
    except (OSError, ValueError):
        return
    dirs = sum(1 for _ in os.walk(s.local_dir)) if s.local_dir.is_dir() else 0
    if dirs * 2 > limit:
        yield Check(WARN, "inotify", f"{dirs} directories in the inbox, fs.inotify.max_user_watches={limit}",
                    "sysctl fs.inotify.max_user_watches=524288 (and persist it in /etc/sysctl.d)")
    else:
        yield Check(OK, "inotify", f"{dirs} directories to watch, limit {limit}")


CLOCK_WARN_SECONDS = 2.0  # rate-limit windows and retry times come from each node's clock


def check_ledger(s: Settings) -> Iterator[Check]:
    from smt_watch.ledger import SqliteLedger

    if s.ledger_url:
        yield from _check_shared_ledger(s)
        return
    if not s.ledger_path.exists():
        yield Check(WARN, "ledger", f"{s.ledger_path} does not exist yet (created on first run)")
        return
    try:
        with SqliteLedger(s.ledger_path) as ledger:
            result = ledger.quick_check()
            counts = ledger.counts()
            imported = ledger.meta("state_file_imported")
    except SmtWatchError as exc:
        yield Check(FAIL, "ledger", str(exc))
        return
    summary = ", ".join(f"{k} {v}" for k, v in counts.items())
    if result != "ok":
        yield Check(FAIL, "ledger", f"integrity check: {result[:200]}", "restore from backup or move it aside")
    else:
        status = WARN if counts["failed"] else OK
        yield Check(status, "ledger", f"integrity ok; {summary}",
                    "see `smt-watch ledger list --state failed`" if counts["failed"] else "")
    if s.state_file is not None:
        if imported:
            yield Check(OK, "STATE_FILE", f"imported {imported}")
        elif s.state_file.exists():
            yield Check(WARN, "STATE_FILE", f"{s.state_file} not imported yet (the next command imports it)")
        else:
            yield Check(WARN, "STATE_FILE", f"{s.state_file} does not exist")


def check_endpoint(s: Settings) -> Iterator[Check]:
    """A HEAD request to the URL the mode's sink posts to: any HTTP answer means it is reachable."""
    try:
        url = MODES[delivery_mode(s)].url(s)
    except SmtWatchError:
        return
    import httpx

    try:
        response = httpx.head(url, timeout=10)
    except httpx.ConnectError as exc:
        yield Check(FAIL, "endpoint", f"{redact_url(url)}: cannot connect ({_reason(exc)})",
                    "is the upload server / web app running and reachable?")
        return
    except httpx.HTTPError as exc:
        yield Check(FAIL, "endpoint", f"{redact_url(url)}: {type(exc).__name__}: {_reason(exc)}")
        return
    yield Check(OK, "endpoint", f"{redact_url(url)} answers HTTP {response.status_code}")


def _reason(exc: BaseException) -> str:
    text = str(exc)
    if "Name or service not known" in text or "nodename nor servname" in text:
        return "DNS lookup failed"
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return "TLS certificate not trusted"
    if "Connection refused" in text:
        return "connection refused"
    return text or type(exc).__name__


def check_sftp_login(s: Settings) -> Iterator[Check]:
    if not (s.smt_host and s.smt_user and s.smt_key):
        return
    from smt_watch.sftp import Connection

    try:
        with Connection(s) as conn:
            for top in s.smt_remote_dirs:
                entries = conn.sftp.listdir(top)
                yield Check(OK, "sftp", f"logged in to {s.smt_user}@{s.smt_host}; {top} lists {len(entries)} entries")
    except (SmtWatchError, OSError) as exc:
        yield Check(FAIL, "sftp", str(exc))


OFFLINE_CHECKS: tuple[Callable[[Settings], Iterator[Check]], ...] = (
    check_settings, check_delivery, check_dirs, check_sftp_files, check_gpg, check_inotify, check_ledger,
)
NETWORK_CHECKS: tuple[Callable[[Settings], Iterator[Check]], ...] = (check_endpoint, check_sftp_login)


def run_checks(settings: Settings, *, env_file: Path | None, offline: bool) -> list[Check]:
    checks: list[Check] = list(check_env_file(env_file))
    for fn in OFFLINE_CHECKS + (() if offline else NETWORK_CHECKS):
        try:
            checks.extend(fn(settings))
        except Exception as exc:  # a broken check is itself a finding, never a traceback
            checks.append(Check(FAIL, fn.__name__.removeprefix("check_"), f"{type(exc).__name__}: {exc}"))
    return checks
