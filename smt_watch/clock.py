"""One UTC timestamp format for everything smt-watch writes: ISO-8601 in UTC with a ``Z``.

``2026-01-02T03:04:05Z`` in payloads, replies and ``inspect``; ``…05.123456Z`` where events of the same
second must keep their order (ledger rows, JSON logs); ``…05.123Z`` where the reference receiver answers
as JavaScript's ``toISOString()`` does. All three sort as text in time order.
"""

from __future__ import annotations

import re
import threading
import time
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


_AGO = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|min|h|d|w)\s*$", re.IGNORECASE)
_AGO_SECONDS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
WHEN_HELP = "ISO date or time (2026-12-01, 2026-12-01T08:00, UTC unless it has an offset) or an age (30m, 2h, 3d)"


def parse_when(text: str, now: float | None = None) -> float:
    """``--since WHEN``: an ISO date or date-time (UTC unless it carries an offset) or an age before ``now``
    (``45s``, ``30m``, ``2h``, ``3d``, ``1w``), as seconds since the epoch. ValueError says what is accepted."""
    m = _AGO.match(text)
    if m:
        return (time.time() if now is None else now) - float(m[1]) * _AGO_SECONDS[m[2].lower()]
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"not a time: {text!r} ({WHEN_HELP})") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def pause(seconds: float) -> None:
    """Wait ``seconds`` (a pace, a backoff, a poll period), as ``time.sleep`` but with a relative timeout.

    Python 3.11's ``time.sleep`` sleeps to an absolute ``CLOCK_MONOTONIC`` deadline (``clock_nanosleep``
    with ``TIMER_ABSTIME``), which libfaketime with ``FAKETIME_DONT_FAKE_MONOTONIC=1`` (how the demo and the
    tests move ``watch``'s calendar days ahead) refuses with ``EINVAL`` every time; a wait with a relative
    timeout works under both."""
    if seconds > 0:
        threading.Event().wait(seconds)
