"""IntelliWatt's SMT coverage window, computed as the app computes it, so smt-watch knows what it keeps.

The app's raw-upload route keeps only intervals whose America/Chicago calendar day lies in its canonical
coverage window and drops the rest while still answering ``ok`` (IntelliWatt
``lib/usage/canonicalMetadataWindow.ts`` ``resolveCanonicalUsage365CoverageWindow`` →
``lib/time/chicago.ts`` ``canonicalUsageWindowForTimezone``, constants in
``lib/usage/canonicalCoverageConfig.ts``): the window ends ``CANONICAL_COVERAGE_LAG_DAYS`` (2) days before
today in Chicago and starts ``CANONICAL_COVERAGE_TOTAL_DAYS - 1`` (364) days before its end, both ends
inclusive. A day is judged by the Chicago date of an interval's start instant (``smtCoverageDateKey``).

Everything here is a pure function of ``now`` (an aware datetime): callers pass the wall clock, tests pass a
fixed instant; nothing reads the clock itself.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Final
from zoneinfo import ZoneInfo

CHICAGO: Final = ZoneInfo("America/Chicago")
LAG_DAYS: Final = 2  # CANONICAL_COVERAGE_LAG_DAYS
TOTAL_DAYS: Final = 365  # CANONICAL_COVERAGE_TOTAL_DAYS


class Place(enum.Enum):
    """Where a day lies relative to the window."""

    OLDER = "older"  # before the window's start: the app never stores it again
    INSIDE = "inside"  # stored when sent
    NEWER = "newer"  # after the window's end: dropped now, kept if sent again once it has entered


@dataclass(frozen=True)
class Window:
    """The inclusive range of Chicago days the app keeps."""

    start: date
    end: date

    def place(self, day: date) -> Place:
        if day < self.start:
            return Place.OLDER
        if day > self.end:
            return Place.NEWER
        return Place.INSIDE

    def __contains__(self, day: object) -> bool:
        return isinstance(day, date) and self.start <= day <= self.end


def chicago_day(instant: datetime) -> date:
    """The Chicago calendar date of an aware instant (``chicagoDateKey``)."""
    return instant.astimezone(CHICAGO).date()


def coverage_window(now: datetime, *, lag_days: int = LAG_DAYS, total_days: int = TOTAL_DAYS) -> Window:
    """The window the app applies at ``now``: from ``total_days - 1`` days before its end through
    Chicago today minus ``lag_days`` (``canonicalUsageWindowForTimezone``, with its clamps)."""
    lag = max(0, int(lag_days))
    total = max(1, int(total_days))
    end = chicago_day(now) - timedelta(days=lag)
    return Window(start=end - timedelta(days=total - 1), end=end)


def enters_at(day: date, *, lag_days: int = LAG_DAYS) -> datetime:
    """The UTC instant from which ``day`` is inside the window: Chicago midnight, ``lag_days`` after it."""
    local = datetime.combine(day + timedelta(days=max(0, int(lag_days))), time(0), tzinfo=CHICAGO)
    return local.astimezone(UTC)


def leaves_at(day: date, *, lag_days: int = LAG_DAYS, total_days: int = TOTAL_DAYS) -> datetime:
    """The UTC instant from which ``day`` is older than the window (it was the start the day before)."""
    return enters_at(day + timedelta(days=max(1, int(total_days))), lag_days=lag_days)
