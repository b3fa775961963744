"""The app's coverage window (IntelliWatt lib/time/chicago.ts canonicalUsageWindowForTimezone)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from smt_watch.window import LAG_DAYS, TOTAL_DAYS, Place, Window, coverage_window, enters_at, leaves_at


def test_the_constants_are_the_apps() -> None:
    assert (LAG_DAYS, TOTAL_DAYS) == (2, 365)  # lib/usage/canonicalCoverageConfig.ts


def test_today_is_chicagos_not_utcs() -> None:
    """04:00 UTC on Dec 7 is still Dec 6 in Chicago; 07:00 UTC is Dec 7."""
    assert coverage_window(datetime(2026, 12, 7, 4, 0, tzinfo=UTC)) == Window(date(2025, 12, 5), date(2026, 12, 4))
    assert coverage_window(datetime(2026, 12, 7, 7, 0, tzinfo=UTC)) == Window(date(2025, 12, 6), date(2026, 12, 5))


def test_365_inclusive_days_across_a_leap_day() -> None:
    w = coverage_window(datetime(2028, 3, 3, 18, 0, tzinfo=UTC))
    assert w.end == date(2028, 3, 1) and w.start == date(2027, 3, 3)
    assert (w.end - w.start).days == 364


def test_places_and_policy_clamps() -> None:
    w = Window(date(2026, 1, 1), date(2026, 12, 31))
    assert [w.place(d) for d in (date(2025, 12, 31), date(2026, 6, 1), date(2027, 1, 1))] == \
        [Place.OLDER, Place.INSIDE, Place.NEWER]
    now = datetime(2026, 7, 1, 18, tzinfo=UTC)
    assert coverage_window(now, lag_days=-3) == coverage_window(now, lag_days=0)
    assert coverage_window(now, total_days=0).start == coverage_window(now, total_days=1).end


def test_a_day_enters_at_chicago_midnight_two_days_later_and_leaves_a_year_after() -> None:
    assert enters_at(date(2026, 6, 9)) == datetime(2026, 6, 11, 5, 0, tzinfo=UTC)  # CDT
    assert enters_at(date(2026, 12, 1)) == datetime(2026, 12, 3, 6, 0, tzinfo=UTC)  # CST
    day = date(2026, 6, 9)
    assert day in coverage_window(enters_at(day))
    assert day not in coverage_window(enters_at(day) - timedelta(seconds=1))
    assert day not in coverage_window(leaves_at(day)) and day in coverage_window(leaves_at(day).replace(hour=4))
