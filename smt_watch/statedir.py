"""Open the ledger the way every command does: PostgreSQL when ``SMT_LEDGER_URL`` is set, else SQLite in
``SMT_STATE_DIR``; either way with the old script's state imported.

The ledger backends are databases and know nothing of settings; :mod:`smt_watch.legacy`
reads the bash script's ``.posted_sha256`` through it. This module joins the two for the commands
(``post``, ``watch``, ``sync``, ``serve``, ``ledger …``), so none of them opens the ledger by another path.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from smt_watch.config import Settings, redact_url
from smt_watch.errors import ConfigError
from smt_watch.ledger import Ledger, SqliteLedger
from smt_watch.legacy import import_state_file


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
        raise ConfigError(f"SMT_STATE_DIR {settings.state_dir} is not writable")
    ledger = connect(settings, max_connections, reconnect_seconds) if settings.ledger_url else SqliteLedger(
        settings.ledger_path, node=settings.node_name)
    try:
        import_state_file(ledger, settings.state_file)
    except BaseException:
        ledger.close()
        raise
    return ledger


def connect(settings: Settings, max_connections: int | None = None, reconnect_seconds: float | None = None,
            *, url: str | None = None) -> Ledger:
    """The PostgreSQL ledger of ``SMT_LEDGER_URL`` (or ``url``), migrated on open, without the state-file
    import."""
    from smt_watch.ledger.postgres import RECONNECT_SECONDS, PostgresLedger  # psycopg loads only when used

    url = url or settings.ledger_url
    assert url is not None
    return PostgresLedger(
        url,
        shown_as=redact_url(url),
        node=settings.node_name,
        lease_seconds=settings.ledger_lease_seconds,
        max_connections=max_connections or settings.workers + 4,
        reconnect_seconds=RECONNECT_SECONDS if reconnect_seconds is None else reconnect_seconds,
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
