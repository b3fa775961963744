"""Open the ledger the way every command does: in ``SMT_STATE_DIR``, with the old script's state imported.

:class:`~smt_watch.ledger.Ledger` is the database and knows nothing of settings; :mod:`smt_watch.legacy`
reads the bash script's ``.posted_sha256`` through it. This module joins the two for the commands
(``post``, ``watch``, ``sync``, ``serve``, ``ledger …``), so none of them opens the ledger by another path.
"""

from __future__ import annotations

import os

from smt_watch.config import Settings
from smt_watch.errors import ConfigError
from smt_watch.ledger import Ledger
from smt_watch.legacy import import_state_file


def open_ledger(settings: Settings) -> Ledger:
    """Open the ledger in ``SMT_STATE_DIR`` and pick up the old script's ``STATE_FILE`` if present."""
    try:
        settings.state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"SMT_STATE_DIR {settings.state_dir} cannot be created: {exc.strerror}") from exc
    if not os.access(settings.state_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"SMT_STATE_DIR {settings.state_dir} is not writable")
    ledger = Ledger(settings.ledger_path)
    try:
        import_state_file(ledger, settings.state_file)
    except BaseException:
        ledger.close()
        raise
    return ledger
