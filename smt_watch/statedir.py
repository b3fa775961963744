"""Open the ledger the way every command does: PostgreSQL when ``SMT_LEDGER_URL`` is set, else SQLite in
``SMT_STATE_DIR``; either way with the old script's state imported.

The ledger backends are databases and know nothing of settings; :mod:`smt_watch.legacy`
reads the bash script's ``.posted_sha256`` through it. This module joins the two for the commands
(``post``, ``watch``, ``sync``, ``serve``, ``ledger …``), so none of them opens the ledger by another path.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from smt_watch.config import Settings, redact_url
from smt_watch.errors import ConfigError, LedgerError, NoLedger
from smt_watch.ledger import Ledger, SqliteLedger
from smt_watch.ledger.sqlite import SCHEMA_VERSION
from smt_watch.legacy import import_state_file

log = logging.getLogger("smt_watch.statedir")


def open_ledger(settings: Settings, *, max_connections: int | None = None,
                reconnect_seconds: float | None = None) -> Ledger:
    """Open the ledger and pick up the old script's ``STATE_FILE`` if present.

    ``SMT_STATE_DIR`` is created either way: it also holds per-node things (temp files, the archive).
    ``max_connections`` (PostgreSQL): how many operations of this process may run at once; by default one
    per ``watch`` worker and a few for the loop and ``serve``. ``reconnect_seconds``: how long one operation
    waits for a lost connection before it raises ``LedgerUnavailable`` (``serve`` answers 503 sooner).
    """
    try:
        settings.state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"SMT_STATE_DIR {settings.state_dir} cannot be created: {exc.strerror}") from exc
    if not os.access(settings.state_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"SMT_STATE_DIR {settings.state_dir} is not writable by {whoami()} "
                          f"({owned_by(settings.state_dir)}): {chown_command(settings.state_dir)}")
    if not settings.ledger_url:
        refuse_foreign_files(settings)
        _warn_root(settings.state_dir)
    ledger = connect(settings, max_connections, reconnect_seconds) if settings.ledger_url else SqliteLedger(
        settings.ledger_path, node=settings.node_name)
    try:
        import_state_file(ledger, settings.state_file)
    except BaseException:
        ledger.close()
        raise
    return ledger


def whoami() -> str:
    """The user this process runs as, by name when it has one."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


def owner_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def owned_by(path: Path) -> str:
    """``owned by root, mode 644``: what an operator needs to see to understand a permission problem."""
    try:
        st = path.stat()
    except OSError as exc:
        return exc.strerror or "cannot stat it"
    return f"owned by {owner_name(st.st_uid)}, mode {st.st_mode & 0o7777:o}"


def chown_command(path: Path) -> str:
    """The command that gives ``path`` (and what is in it) back to the user this process runs as."""
    try:
        group = grp.getgrgid(os.getegid()).gr_name
    except KeyError:
        group = str(os.getegid())
    return f"sudo chown -R {whoami()}:{group} {path}"


def refuse_foreign_files(settings: Settings) -> None:
    """The ledger and its companions (``-wal``, ``-shm``, locks) must be writable by whoever writes them: a
    command run once as root leaves them root's, and SQLite then fails every write of ``watch`` with
    "attempt to write a readonly database". Refused at start, with the command that fixes it."""
    ledger = settings.ledger_path
    for path in (ledger, ledger.with_name(ledger.name + "-wal"), ledger.with_name(ledger.name + "-shm"),
                 ledger.with_name(ledger.name + ".lock"), settings.state_dir / "sync.lock"):
        if path.exists() and not os.access(path, os.R_OK | os.W_OK):
            raise ConfigError(f"ledger file {path} is {owned_by(path)} and not writable by {whoami()} (was a "
                              f"command run as another user, e.g. root?): {chown_command(settings.state_dir)}")


def _warn_root(state_dir: Path) -> None:
    """Root writing into the service user's state dir leaves files the service cannot write (its next start
    refuses them): said before it happens."""
    try:
        owner = state_dir.stat().st_uid
    except OSError:
        return
    if os.geteuid() == 0 and owner != 0:
        log.warning("Running as root in %s, which %s owns: files created now will be root's and `watch` as %s "
                    "will refuse them; run it as that user (sudo -u %s smt-watch …)", state_dir,
                    owner_name(owner), owner_name(owner), owner_name(owner))


def open_reader(settings: Settings) -> Ledger:
    """The ledger for a command that only reads (``status``, ``ledger list``): never created (:class:`NoLedger`
    names where it looked), opened read-only (``mode=ro``) so a user who may read but not write it (a
    monitoring user in the service's group) can run ``status``. An SQLite ledger older than this smt-watch is
    migrated first when this user may write it; else the command says who can."""
    if settings.ledger_url:
        return connect(settings, max_connections=2)
    path = settings.ledger_path
    if not path.is_file():
        raise NoLedger(f"no ledger at {path} (SMT_STATE_DIR={settings.state_dir}; `watch` creates it on "
                       "its first start; another state dir: --state-dir or --env-file)")
    ledger = SqliteLedger(path, node=settings.node_name, readonly=True)
    version = ledger.schema_version
    if version > SCHEMA_VERSION:
        ledger.close()
        raise LedgerError(f"ledger {path} has schema {version}, newer than this smt-watch ({SCHEMA_VERSION})")
    if version < SCHEMA_VERSION:
        ledger.close()
        if not os.access(path, os.W_OK) or not os.access(settings.state_dir, os.W_OK):
            raise NoLedger(f"ledger {path} has schema {version}, older than this smt-watch ({SCHEMA_VERSION}): "
                           "restart smt-watch (the service user migrates it), then run this again")
        SqliteLedger(path, node=settings.node_name).close()  # migrates
        ledger = SqliteLedger(path, node=settings.node_name, readonly=True)
    return ledger


def connect(settings: Settings, max_connections: int | None = None, reconnect_seconds: float | None = None,
            *, url: str | None = None) -> Ledger:
    """The PostgreSQL ledger of ``SMT_LEDGER_URL`` (or ``url``), migrated on open, without the state-file
    import."""
    from smt_watch.ledger.postgres import PostgresLedger  # psycopg loads only when used

    url = url or settings.ledger_url
    assert url is not None
    return PostgresLedger(
        url,
        shown_as=redact_url(url),
        node=settings.node_name,
        lease_seconds=settings.ledger_lease_seconds,
        max_connections=max_connections or settings.workers + 4,
        reconnect_seconds=settings.ledger_reconnect_seconds if reconnect_seconds is None else reconnect_seconds,
    )


def copy_ledger(settings: Settings, target: str) -> tuple[str, dict[str, int]]:
    """``ledger copy --to TARGET``: every row of this node's ledger into ``TARGET`` (a ``postgresql://`` URL
    or an SQLite file), replacing rows with the same key there. Running it again changes nothing more.
    Returns the target as it may be shown and the rows copied per table."""
    if target.startswith(("postgresql://", "postgres://")):
        shown_target = redact_url(target)
        same = settings.ledger_url is not None and redact_url(settings.ledger_url) == shown_target
    else:
        path = Path(target).expanduser()
        shown_target = str(path)
        same = settings.ledger_url is None and path.absolute() == settings.ledger_path.absolute()
    if same:
        raise ConfigError(f"ledger copy: {shown_target} is the ledger being copied")
    counts: dict[str, int] = {}

    def counted(rows: Iterator[tuple[str, dict[str, Any]]]) -> Iterator[tuple[str, dict[str, Any]]]:
        for table, row in rows:
            counts[table] = counts.get(table, 0) + 1
            yield table, row

    with open_ledger(settings) as source:
        if target.startswith(("postgresql://", "postgres://")):
            destination = connect(settings, max_connections=2, url=target)
        else:
            destination = SqliteLedger(Path(target).expanduser(), node=settings.node_name)
        with destination:
            destination.import_rows(counted(source.export_rows()))
    return shown_target, counts
