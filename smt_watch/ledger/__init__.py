"""The delivery ledger: one row per distinct content, the claims on it, and what each command remembers.

One ledger (:mod:`.store`: every statement, the state machine and the claim decision, written once over the
small port of :mod:`.port`) on two databases, one adapter each: :mod:`.sqlite`, a file in ``SMT_STATE_DIR``
(the embedded default, one droplet), and :mod:`.postgres`, a schema in PostgreSQL shared by several droplets
(``SMT_LEDGER_URL``). Callers hold :class:`Ledger` or the role they use of it (:mod:`.roles`).
:func:`smt_watch.statedir.open_ledger` picks one; nothing else knows which. The PostgreSQL backend is imported
only when used, so commands that never touch it do not load psycopg.
"""

from smt_watch.ledger.common import SHA256_RE, STATES, Claim, Labels, Remember, Row, Seen, now_iso, process_id
from smt_watch.ledger.roles import Ledger
from smt_watch.ledger.sqlite import SqliteLedger

__all__ = [
    "SHA256_RE",
    "STATES",
    "Claim",
    "Labels",
    "Ledger",
    "Remember",
    "Row",
    "Seen",
    "SqliteLedger",
    "now_iso",
    "process_id",
]
