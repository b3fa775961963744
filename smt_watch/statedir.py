"""Open the ledger the way every command does: PostgreSQL when ``SMT_LEDGER_URL`` is set, else SQLite in
``SMT_STATE_DIR``; either way with the old script's state imported.

The ledger backends are databases and know nothing of settings; :mod:`smt_watch.legacy`
reads the bash script's ``.posted_sha256`` through it. This module joins the two for the commands
(``post``, ``watch``, ``sync``, ``serve``, ``ledger …``), so none of them opens the ledger by another path.
"""

from __future__ import annotations

import os

from smt_watch.config import Settings, redact_url
from smt_watch.errors import ConfigError
from smt_watch.ledger import Ledger, SqliteLedger
from smt_watch.legacy import import_state_file


def open_ledger(settings: Settings, *, max_connections: int | None = None) -> Ledger:
    """Open the ledger and pick up the old script's ``STATE_FILE`` if present.

    ``SMT_STATE_DIR`` is created either way: it also holds per-node things (temp files, the archive).
    ``max_connections`` (PostgreSQL): how many operations of this process may run at once; by default one
    per ``watch`` worker and a few for the loop and ``serve``.
    """
    try:
        settings.state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"SMT_STATE_DIR {settings.state_dir} cannot be created: {exc.strerror}") from exc
    if not os.access(settings.state_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"SMT_STATE_DIR {settings.state_dir} is not writable")
    ledger = connect(settings, max_connections) if settings.ledger_url else SqliteLedger(
        settings.ledger_path, node=settings.node_name)
    try:
        import_state_file(ledger, settings.state_file)
    except BaseException:
        ledger.close()
        raise
    return ledger


def connect(settings: Settings, max_connections: int | None = None) -> Ledger:
    """The PostgreSQL ledger of ``SMT_LEDGER_URL`` (migrated on open), without the state-file import."""
    from smt_watch.ledger.postgres import PostgresLedger  # psycopg loads only for a PostgreSQL ledger

    assert settings.ledger_url is not None
    return PostgresLedger(
        settings.ledger_url,
        shown_as=redact_url(settings.ledger_url),
        node=settings.node_name,
        lease_seconds=settings.ledger_lease_seconds,
        max_connections=max_connections or settings.workers + 4,
    )
