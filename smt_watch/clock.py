"""One UTC timestamp format for everything smt-watch writes: ISO-8601 in UTC with a ``Z``.

``2026-01-02T03:04:05Z`` in payloads, replies and ``inspect``; ``…05.123456Z`` where events of the same
second must keep their order (ledger rows, JSON logs); ``…05.123Z`` where the reference receiver answers
as JavaScript's ``toISOString()`` does. All three sort as text in time order.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal


def utc_stamp(ts: float | None = None, *, digits: Literal[0, 3, 6] = 0) -> str:
    """``ts`` (seconds since the epoch; now when None) as ``YYYY-MM-DDTHH:MM:SS[.fff[fff]]Z``.

    ``digits`` of the fraction are kept (truncated, never rounded up into the next second).
    """
    moment = datetime.now(UTC) if ts is None else datetime.fromtimestamp(ts, UTC)
    if not digits:
        return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[: 20 + digits] + "Z"
