"""The one UTC timestamp format (``smt_watch.clock``): what payloads, replies, the ledger and logs carry."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from smt_watch.clock import utc_stamp

TS = datetime(2026, 3, 8, 7, 59, 59, 987654, tzinfo=UTC).timestamp()


def test_seconds_micro_and_milli_forms() -> None:
    assert utc_stamp(TS) == "2026-03-08T07:59:59Z"
    assert utc_stamp(TS, digits=6) == "2026-03-08T07:59:59.987654Z"
    assert utc_stamp(TS, digits=3) == "2026-03-08T07:59:59.987Z"  # truncated, as toISOString does


def test_now_is_utc_and_sorts_as_text() -> None:
    before = utc_stamp(digits=6)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", before)
    assert before <= utc_stamp(digits=6)
    assert datetime.fromisoformat(utc_stamp()).tzinfo is not None
