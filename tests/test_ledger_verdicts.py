"""The ledger's verdicts (issue 26) on both backends: kept, scheduled, due, copied."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_ledger import open_at

from smt_watch.ledger import SqliteLedger
from smt_watch.ledger.verdicts import Resend, Verdict, VerdictRow

A = "a" * 64
B = "b" * 64


@pytest.fixture(params=["sqlite", "postgres"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres":
        return str(request.getfixturevalue("pg_url"))
    return str(tmp_path / "l.sqlite3")


def test_a_verdict_is_kept_and_replaced(where: str) -> None:
    with open_at(where) as ledger:
        assert ledger.verdict(A) is None
        ledger.save_verdict(VerdictRow(A, Verdict.OUTSIDE_WINDOW.value, '{"n": 1}', resend_due_at=100.0,
                                       resend_state=Resend.WAITING.value, resend_days='[["e", "M1", "2026-01-01"]]'))
        ledger.save_verdict(VerdictRow(B, Verdict.STORED.value))
    with open_at(where) as ledger:  # survives a restart
        kept = ledger.verdict(A)
        assert kept is not None and kept.verdict == "outside window" and kept.detail == '{"n": 1}'
        assert [v.sha256 for v in ledger.resends_due(99.0)] == []
        assert [v.sha256 for v in ledger.resends_due(100.0)] == [A]
        ledger.save_verdict(VerdictRow(A, Verdict.STORED.value, resend_state=Resend.SENT.value))
        assert ledger.resends_due(1e12) == []
        assert set(ledger.verdicts()) == {A, B}


def test_a_check_is_scheduled_once_at_the_earliest_time(where: str) -> None:
    with open_at(where) as ledger:
        ledger.schedule_check(A, 50.0)
        ledger.schedule_check(A, 80.0)
        ledger.schedule_check(B, 60.0)
        assert [v.sha256 for v in ledger.checks_due(55.0)] == [A]
        assert [(v.sha256, v.verdict) for v in ledger.checks_due(70.0)] == [(A, "unchecked"), (B, "unchecked")]
        ledger.save_verdict(VerdictRow(A, Verdict.STORED.value))  # a check done clears its due time
        assert [v.sha256 for v in ledger.checks_due(1e12)] == [B]


def test_ledger_copy_carries_verdicts(where: str, tmp_path: Path) -> None:
    with open_at(where) as ledger:
        ledger.save_verdict(VerdictRow(A, Verdict.PARTIAL.value, "{}", older_said=1))
        rows = list(ledger.export_rows())
    with SqliteLedger(tmp_path / "copy.sqlite3") as copy:
        copy.import_rows(rows)
        kept = copy.verdict(A)
    assert kept is not None and kept.verdict == "partial" and kept.older_said == 1
