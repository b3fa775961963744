"""``smt-watch doctor``: one line per check, so an operator sees at a glance what is wrong and what to do.

Each check is a small function returning :class:`Check` lines; none raises for a problem it can name.
Secrets are never printed: checks report whether a token is set, never its value.
"""

from __future__ import annotations

import os
import re
import shutil
import stat as stat_mod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from smt_watch import host, limits
from smt_watch.config import Settings, redact_url
from smt_watch.delivery.registry import MODES, OwnServeTarget, auto_targets, delivery_mode
from smt_watch.errors import ConfigError, SmtWatchError
from smt_watch.names import shown
from smt_watch.tls import context as tls_context
from smt_watch.tls import plain_reason, verify_for

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
    entry for the mode says which); a target that is smt-watch's own ``serve`` is a FAIL with the fix."""
    try:
        mode = MODES[delivery_mode(s)]
    except OwnServeTarget as exc:
        yield Check(FAIL, "delivery", exc.detail, exc.fix)
        return
    except SmtWatchError as exc:
        yield Check(FAIL, "delivery", str(exc), f"set {auto_targets()}")
        return
    secret = mode.secret(s)
    if secret is not None and is_placeholder(secret.reveal()):
        target = "web app" if mode.token.env == "ADMIN_TOKEN" else "upload server"
        yield Check(FAIL, "delivery", f"{mode.token.env} is still the example's placeholder, not a token",
                    f"set {mode.token.env} to the token the {target} uses, in the env file")
        return
    token = f"{mode.token.env} {'set' if secret else 'not set'}"
    yield Check(OK, "delivery", f"{mode.name} to {redact_url(mode.url(s))} ({token})")
    yield Check(OK, "outbound limit", limits.describe(s))  # smt_watch/limits.py; docs/how-it-works.md "Outbound limits"


_PLACEHOLDER = re.compile(r"REPLACE|REDACTED|CHANGE_?ME|YOUR_|<|>|^x+$|^\.+$|TOKEN_HERE|64_CHAR", re.IGNORECASE)


def is_placeholder(token: str) -> bool:
    """A value copied from an example (``REPLACE_WITH_64_CHAR_TOKEN``, ``<64-char-token>``, ``REDACTED_64_CHAR``):
    "set", but every delivery would get a 401."""
    return bool(_PLACEHOLDER.search(token)) or len(set(token)) == 1


def check_settings(s: Settings) -> Iterator[Check]:
    """A variable no setting reads is most often a typo of one that would have changed the mode."""
    for warning in s.warnings:
        yield Check(WARN, "settings", warning)


def _writable_dir(name: str, path: Path) -> Check:
    from smt_watch.statedir import chown_command, owned_by, whoami

    if not path.exists():
        return Check(FAIL, name, f"{path} does not exist", f"sudo install -d -o {whoami()} -m 750 {path}")
    if not path.is_dir():
        return Check(FAIL, name, f"{path} is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        return Check(FAIL, name, f"{path} is {owned_by(path)}: not writable by {whoami()}", chown_command(path))
    return Check(OK, name, f"{path} is writable")


UNREADABLE_SHOWN = 5  # files named in the line; the rest are counted


def check_unreadable(s: Settings) -> Iterator[Check]:
    """Files in the inbox that ``watch`` would take but this user cannot read: never delivered until fixed."""
    from smt_watch.inbox import scan
    from smt_watch.statedir import owner_name, whoami

    if not s.local_dir.is_dir():
        return
    bad: list[str] = []
    for found in scan(s.local_dir.absolute(), s.patterns):
        if not os.access(found.path, os.R_OK):
            bad.append(found.path)
    if not bad:
        yield Check(OK, "inbox files", f"every file watch would take in {s.local_dir} is readable by {whoami()}")
        return
    described = []
    for path in bad[:UNREADABLE_SHOWN]:
        try:
            st = os.lstat(path)
            described.append(f"{path} (owner {owner_name(st.st_uid)}, mode {st.st_mode & 0o7777:o})")
        except OSError:
            described.append(path)
    more = f" and {len(bad) - UNREADABLE_SHOWN} more" if len(bad) > UNREADABLE_SHOWN else ""
    yield Check(FAIL, "inbox files", f"{len(bad)} file(s) {whoami()} cannot read, never delivered until it can: "
                f"{'; '.join(described)}{more}", f"sudo chown -R {whoami()} {s.local_dir} (or chmod g+r the files)")


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
        except FileNotFoundError:
            yield Check(FAIL, "ssh key", f"{s.smt_key} does not exist",
                        "copy SMT's private key there (chmod 600, owned by the service user), or point SMT_KEY at "
                        "it; the old script used /home/deploy/.ssh/intelliwatt_smt_rsa4096")
        except OSError as exc:
            yield Check(FAIL, "ssh key", f"{s.smt_key}: {exc.strerror}",
                        f"the service user must be able to read it: ls -l {s.smt_key}")
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


# Names SMT gives its encrypted files (at the inbox's top and under a remote dir): SMT_PATTERNS takes `.asc`
# files when it matches one of them.
ASC_SAMPLES = ("IntervalMeterUsage.CSV.1.asc", "adhocusage/IntervalMeterUsage.CSV.1.asc", "usage.asc")


def _takes_asc(s: Settings) -> bool:
    from pathlib import PurePosixPath

    from smt_watch.inbox import matches

    return any(matches(PurePosixPath(name), s.patterns) for name in ASC_SAMPLES)


def check_gpg(s: Settings) -> Iterator[Check]:
    """Decryption proved, not assumed: a few bytes encrypted to each secret key of the keyring come back
    through :func:`smt_watch.gpg.decrypt`, the path the service takes (a private copy of the keyring, its
    own agent, SMT_GPG_PASSPHRASE). Nothing to check when SMT_PATTERNS takes no ``.asc``."""
    if not _takes_asc(s):
        return
    if shutil.which("gpg") is None:
        yield Check(FAIL, "gpg", "gpg is not installed but SMT_PATTERNS takes .asc files", "apt-get install gnupg")
        return
    from smt_watch import gpg

    home = gpg.keyring(s)
    fix = f"import IntelliWatt's SMT private key: gpg --homedir {home} --import KEY.asc (as the service user)"
    try:
        trials = gpg.round_trip(s)
    except SmtWatchError as exc:
        yield Check(FAIL, "gpg", f"{exc}: SMT's .asc files cannot be decrypted", fix)
        return
    if not trials:
        yield Check(FAIL, "gpg", f"no secret key that can decrypt in {home}: SMT's .asc files cannot be decrypted",
                    fix)
        return
    good = [t.key for t in trials if t.error is None]
    for t in trials:
        if t.error is not None:
            hint = "" if good else "check SMT_GPG_PASSPHRASE and the key's files in the keyring"
            yield Check(WARN if good else FAIL, "gpg", f"key {t.key.fingerprint} ({t.key.uid}) in {home} "
                        f"cannot decrypt: {t.error}", hint)
    if good:
        names = ", ".join(f"{k.fingerprint} ({k.uid})" for k in good)
        yield Check(OK, "gpg", f"decryption works (round trip through a private copy of {home}): {names}")


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
        yield Check(WARN, "ledger", f"{s.ledger_path} does not exist yet (watch creates it on its first start)")
        return
    try:
        with SqliteLedger(s.ledger_path, readonly=True) as ledger:
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
    """A HEAD request to the URL the mode's sink posts to: any HTTP answer means it is reachable. Nothing when
    there is no target, or it is smt-watch's own ``serve`` (``check_delivery`` FAILs that already)."""
    try:
        url = MODES[delivery_mode(s)].url(s)
    except SmtWatchError:
        return
    import httpx

    try:
        response = httpx.head(url, timeout=10, verify=verify_for(s, url))
    except httpx.ConnectError as exc:
        yield Check(FAIL, "endpoint", f"{redact_url(url)}: cannot connect ({_network_reason(exc)})",
                    "is the upload server / web app running and reachable?")
        return
    except httpx.HTTPError as exc:
        yield Check(FAIL, "endpoint", f"{redact_url(url)}: {type(exc).__name__}: {_network_reason(exc)}")
        return
    yield Check(OK, "endpoint", f"{redact_url(url)} answers HTTP {response.status_code}")


# A request each target refuses differently with a right and a wrong token, and never stores: raw-upload
# checks the token, then answers 400 VALIDATION to a body without filename/sizeBytes/sha256; the inline route
# checks the token, then answers 400 EXPECTED_JSON to a body that is not JSON; an upload server checks its
# token, then finds no file part. A wrong token is 401 before any of that.
_TOKEN_PROBES: dict[str, tuple[str, bytes]] = {
    "raw-upload": ("application/json", b"{}"),
    "inline": ("text/plain", b"smt-watch doctor: token check"),
    "multipart": ("multipart/form-data; boundary=smt-watch-doctor", b"--smt-watch-doctor--\r\n"),
}


def check_token(s: Settings) -> Iterator[Check]:
    """Proves the token with the target itself: a request it refuses as incomplete (400) when the token is
    right and as unauthorized (401/403) when it is wrong. A 404 means the URL is wrong (a base URL that already
    holds the route path, for one)."""
    try:
        mode = MODES[delivery_mode(s)]
    except SmtWatchError:
        return
    probe = _TOKEN_PROBES.get(mode.name)
    secret = mode.secret(s)
    if probe is None or secret is None or is_placeholder(secret.reveal()):
        return
    import httpx

    url = mode.url(s)
    header = "x-admin-token" if mode.token.env == "ADMIN_TOKEN" else "x-smt-upload-token"
    try:
        response = httpx.post(url, content=probe[1], timeout=10, verify=verify_for(s, url),
                              headers={"content-type": probe[0], header: secret.reveal()})
    except httpx.HTTPError as exc:
        yield Check(FAIL, "token", f"{redact_url(url)}: {_network_reason(exc)}")
        return
    code = response.status_code
    if code in (400, 413, 415, 422):
        yield Check(OK, "token", f"{mode.token.env} accepted by {redact_url(url)} (a deliberately incomplete request "
                                 f"was refused as incomplete, HTTP {code}; nothing stored)")
    elif code in (401, 403):
        yield Check(FAIL, "token", f"{redact_url(url)} refuses {mode.token.env} (HTTP {code}): every delivery would "
                                   "be refused", f"set {mode.token.env} to the token the target uses")
    elif code == 404:
        hint = ("INTELLIWATT_BASE_URL is the site's root (https://intelliwatt.com), without /api/...: smt-watch adds "
                "the route" if mode.token.env == "ADMIN_TOKEN" else "check SMT_UPLOAD_URL's path (/upload)")
        yield Check(FAIL, "token", f"{redact_url(url)} answers 404: there is no such route", hint)
    elif code == 503:
        yield Check(FAIL, "token", f"{redact_url(url)} answers 503: {shown(response.text[:120])}",
                    "the target has no token configured or is down")
    else:
        yield Check(WARN, "token", f"{redact_url(url)} answers HTTP {code} to the token check: cannot tell whether "
                                   f"{mode.token.env} is right")


def check_tls(s: Settings) -> Iterator[Check]:
    """SMT_CA_BUNDLE and SMT_CLIENT_CERT/KEY load as the deliveries will load them (a TLS failure later reads
    like a network one)."""
    if s.ca_bundle is None and s.client_cert is None and s.client_key is None:
        return
    try:
        tls_context(s)
    except ConfigError as exc:
        yield Check(FAIL, "tls", str(exc))
        return
    parts = [f"CA bundle {s.ca_bundle}" if s.ca_bundle else "", f"client certificate {s.client_cert}"
             if s.client_cert else ""]
    yield Check(OK, "tls", f"{' and '.join(p for p in parts if p)} load (used for https targets)")


def _network_reason(exc: BaseException) -> str:
    """A failed connection in words (DNS, TLS trust, refused); otherwise the error's own text."""
    text = str(exc)
    if (plain := plain_reason(text)) is not None:
        return plain
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
    check_settings, check_tls, check_delivery, check_dirs, check_unreadable, check_sftp_files, check_gpg, check_inotify,
    check_ledger,
)
NETWORK_CHECKS: tuple[Callable[[Settings], Iterator[Check]], ...] = (check_endpoint, check_token,
                                                                     check_sftp_login)


def run_checks(settings: Settings, *, env_file: Path | None, offline: bool) -> list[Check]:
    checks: list[Check] = list(check_env_file(env_file))
    for fn in OFFLINE_CHECKS + (() if offline else NETWORK_CHECKS):
        try:
            checks.extend(fn(settings))
        except Exception as exc:  # a broken check is itself a finding, never a traceback
            checks.append(Check(FAIL, fn.__name__.removeprefix("check_"), f"{type(exc).__name__}: {exc}"))
    try:  # units and ports on this host (smt_watch.host: the only code that asks systemctl and reads /proc/net)
        checks.extend(Check(*finding) for finding in host.checks(settings))
    except Exception as exc:
        checks.append(Check(FAIL, "host", f"{type(exc).__name__}: {exc}"))
    return checks
