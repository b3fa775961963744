"""The ledger's verdicts (issue 26) on both backends: kept, scheduled, due, copied."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from test_ledger import open_at

from smt_watch.config import load_settings
from smt_watch.ledger import SqliteLedger
from smt_watch.ledger.verdicts import Resend, Verdict, VerdictRow
from smt_watch.statedir import open_ledger

A = "a" * 64
B = "b" * 64


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


@pytest.mark.both_ledgers
def test_status_and_ledger_list_show_the_verdict_and_status_alerts_on_partial_and_missing(
        run_cli: Callable[..., subprocess.CompletedProcess[str]], base_env: dict[str, str]) -> None:
    """`status`, `/status` (the same Status object) and `ledger list` show verify's verdict beside `sent`;
    `status` is non-zero for `partial` and `missing`, not for `stored` or `outside window` (watch re-sends)."""
    settings = load_settings(base_env)
    with open_ledger(settings) as ledger:
        for sha, name in ((A, "year_M1.csv"), (B, "gap_M1.csv")):
            ledger.claim(sha, filename=name, path=None, size=1, mode="raw-upload")
            ledger.mark_sent(sha, status=200, destination="x", attempts=1)
        ledger.save_verdict(VerdictRow(A, Verdict.STORED.value))
        ledger.save_verdict(VerdictRow(B, Verdict.OUTSIDE_WINDOW.value))
    ok = run_cli("status", "--json")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert json.loads(ok.stdout)["verdicts"] == {"stored": 1, "outside window": 1}
    with open_ledger(settings) as ledger:
        ledger.save_verdict(VerdictRow(B, Verdict.PARTIAL.value, '{"days": 2}'))
    bad = run_cli("status", "--json")
    assert bad.returncode == 1, bad.stdout
    shown = json.loads(bad.stdout)
    assert shown["not_stored"] == ["gap_M1.csv (partial)"]
    assert any("not held in full by the app: gap_M1.csv (partial)" in a for a in shown["alerts"]), shown["alerts"]
    text = run_cli("status")
    assert text.returncode == 1 and "in the app (verify): partial 1, stored 1" in text.stdout, text.stdout
    listed = {r["filename"]: r["verdict"] for r in json.loads(run_cli("ledger", "list", "--json").stdout)}
    assert listed == {"year_M1.csv": "stored", "gap_M1.csv": "partial"}
    table = run_cli("ledger", "list").stdout
    assert "sent/partial" in table and "sent/stored" in table, table
    with open_ledger(settings) as ledger:  # the widest verdict still leaves every column where its header is
        ledger.save_verdict(VerdictRow(A, Verdict.OUTSIDE_WINDOW.value))
    lines = run_cli("ledger", "list").stdout.splitlines()
    assert any(line.startswith("sent/outside window ") for line in lines), lines
    header, rows = lines[0], lines[1:]
    assert {row.index(A[:12]) if A[:12] in row else row.index(B[:12]) for row in rows} == {header.index("SHA256")}
    assert {row.rindex(" ") + 1 for row in rows} == {header.index("FILE")}, lines
