"""What both ledger backends share: the row, the claim answers, the stat-cache entries, the interface.

The ledger's statements live in :mod:`.store` (written once over :mod:`.port`, with one adapter per database:
:mod:`.sqlite`, :mod:`.postgres`); everything else talks to the :class:`~smt_watch.ledger.roles.Ledger`
protocol, or to the role it needs of it (:mod:`.roles`), so ``watch``, ``post``, ``serve`` and ``sync`` do not
know which database they have.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from enum import Enum
from typing import Any, Final

from smt_watch.clock import utc_stamp
from smt_watch.hashing import Signature
from smt_watch.names import shown, unstored

STATES: Final = ("pending", "sending", "sent", "retrying", "failed")
SHA256_RE: Final = re.compile(r"^[0-9a-f]{64}$")
STALE_FOREIGN_CLAIM_SECONDS: Final = 6 * 3600
FILE_COLUMNS: Final = (
    "sha256, filename, path, size, state, attempts, http_status, last_error, first_seen, updated_at, "
    "sent_at, destination, mode, next_attempt_at, claimed_by, origin, parent, started_at"
)

# What ``ledger copy`` carries, table by table: the columns both backends have (PostgreSQL's lease and the
# stat cache's node are its own, and set by the ledger that receives the rows).
COPIED_COLUMNS: Final[dict[str, tuple[str, ...]]] = {
    "files": ("sha256", "filename", "path", "size", "state", "attempts", "http_status", "last_error", "first_seen",
              "updated_at", "sent_at", "destination", "mode", "next_attempt_at", "claimed_by", "claimed_at",
              "origin", "parent", "started_at"),
    "chunks": ("sha256", "part", "parts", "chunk_sha256", "acked_at"),
    "remote_files": ("remote_path", "size", "mtime", "sha256", "local_path", "fetched_at"),
    "uploads": ("role", "account", "at"),
    "seen": ("path", "device", "inode", "size", "mtime_ns", "sha256"),
    "meta": ("key", "value"),
    "labels": ("sha256", "declared_esiid", "declared_meter", "esiid", "at"),
    "verdicts": ("sha256", "verdict", "detail", "checked_at", "check_due_at", "resend_due_at", "resend_days",
                 "resend_state", "resend_sha256", "older_said"),  # verify (smt_watch.ledger.verdicts)
}
COPIED_TABLES: Final = tuple(COPIED_COLUMNS)


RETRY_NOTE: Final = "retry requested by the operator"
REPOST_NOTE: Final = "re-post requested (forceRepost)"


def delivery_seconds(first_seen: str, sent_at: str, started_at: str | None = None) -> float:
    """A delivery's latency as the ledger knows it: from the start of this delivery (``started_at``; first
    sight when it has none) to ``sent``, backoff waits included."""
    return max(0.0, epoch_of(sent_at) - epoch_of(started_at or first_seen))


def now_iso() -> str:
    """Row times to the microsecond, so rows sort in the order things happened."""
    return utc_stamp(digits=6)


def epoch_of(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


def process_id(node: str | None = None) -> str:
    """Who holds a ``sending`` claim (``node:pid``): enough to tell, on its node, whether the claimer lives.

    ``node`` is ``SMT_NODE_NAME`` (default: the host name); it names a droplet sharing a PostgreSQL ledger."""
    return f"{node or socket.gethostname()}:{os.getpid()}"


def claimer_alive(claimed_by: str | None, claimed_at: float | None, node: str | None = None, *,
                  leased: bool | None = None) -> bool:
    """Whether the claim ``claimed_by`` still stands: on this node, whether its process lives; on another,
    whether its lease (``leased``, judged by the shared database's clock) has not expired, or, without a
    lease (a SQLite ledger copied between hosts), whether it is younger than six hours."""
    if not claimed_by:
        return False
    host, _, pid_text = claimed_by.rpartition(":")
    if host != (node or socket.gethostname()):
        if leased is not None:
            return leased
        return (time.time() - (claimed_at or 0.0)) < STALE_FOREIGN_CLAIM_SECONDS
    try:
        pid = int(pid_text)
        os.kill(pid, 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Row:
    """One ledger row as ``ledger list --json`` shows it."""

    sha256: str
    filename: str
    path: str | None
    size: int | None
    state: str
    attempts: int
    http_status: int | None
    last_error: str | None
    first_seen: str
    updated_at: str
    sent_at: str | None
    destination: str | None
    mode: str | None
    next_attempt_at: float | None
    claimed_by: str | None
    origin: str
    parent: str | None = None  # SHA-256 of the .asc/.zip this CSV was unpacked from
    # When this delivery began: first sight, or when `post --force` took a sent row again or an operator's
    # `ledger retry` put it back; latency (status, serve's etaSeconds) counts from here. None: first_seen.
    started_at: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def rows_query(mark: str, state: str | None, since: float | None, http_status: int | None
               ) -> tuple[str, list[Any]]:
    """``rows()``'s one statement for either database (``mark``: its placeholder, ``?`` or ``%s``): rows
    oldest first; ``state``, ``since`` (changed at or after: ``updated_at``) and ``http_status`` narrow them."""
    where: list[str] = []
    params: list[Any] = []
    for column, value in (("state", state), ("updated_at", None if since is None else utc_stamp(since, digits=6)),
                          ("http_status", http_status)):
        if value is not None:
            where.append(f"{column} {'>=' if column == 'updated_at' else '='} {mark}")
            params.append(value)
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    return f"SELECT {FILE_COLUMNS} FROM files{clause} ORDER BY first_seen, sha256", params


def row_from(r: Mapping[str, Any]) -> Row:
    """A row as the program uses it: ``path`` back in Python's form (undecodable bytes as surrogates)."""
    values = dict(r)
    if values.get("path") is not None:
        values["path"] = unstored(values["path"])
    return Row(**values)


def column_text(value: str) -> str:
    """Free text for a TEXT column (names, errors): SQLite and PostgreSQL take only valid UTF-8."""
    return value if value.isprintable() else shown(value)


class Claim(Enum):
    """What :meth:`Ledger.claim` decided."""

    CLAIMED = "claimed"  # this process now owns the row (state ``sending``) and must deliver it
    DUPLICATE = "duplicate"  # already ``sent``; nothing to do
    BUSY = "busy"  # another live process or thread is sending these bytes right now
    LATER = "later"  # (watch) ``failed`` until forgotten, or ``retrying`` and its backoff has not expired



@dataclass(frozen=True)
class Labels:
    """What the ledger knows of the ESIID and meter of some bytes (the ``labels`` table, keyed by SHA-256).

    ``declared_*``: what the uploader said in ``serve``'s ``esiid``/``meter`` form fields (as the bash script
    and IntelliWatt's Node upload server send them), carried through to the delivery of those bytes.
    ``esiid``: what the last delivery of these bytes carried; ``forceRepost`` finds a customer's files by it."""

    declared_esiid: str | None = None
    declared_meter: str | None = None
    esiid: str | None = None


@dataclass(frozen=True)
class Remember:
    """A stat-cache row to write: ``path`` held the bytes ``sha256`` while its stat identity was ``signature``."""

    path: str
    signature: Signature
    sha256: str


@dataclass(frozen=True)
class ClaimRequest:
    """One claim of a group claimed in one transaction (:meth:`SqlLedger.claim_many`): the arguments of
    :meth:`SqlLedger.claim` (``force`` False, no parent: what ``watch`` asks for a ready CSV)."""

    sha256: str
    filename: str
    path: str | None
    size: int
    mode: str
    respect_backoff: bool = False
    remember: Remember | None = None


@dataclass(frozen=True)
class Mark:
    """A claim's outcome held back for a group commit (:meth:`SqlLedger.finish_many`): ``state`` and the
    columns :meth:`SqlLedger.mark_sent` and its siblings would write."""

    sha256: str
    state: str
    attempts: int
    values: tuple[tuple[str, Any], ...]
    decided_at: str  # when the outcome happened: the row's updated_at, however long the group's commit waits


@dataclass(frozen=True, slots=True)  # slots: a restart's scan makes one per file already handled
class Seen:
    """What the stat cache knows of a path: the signature it had when hashed, and what became of those bytes."""

    signature: Signature
    sha256: str
    state: str | None  # the content's ledger state; None when its row was forgotten
