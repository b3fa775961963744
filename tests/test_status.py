"""``smt-watch status``: the ledger reads it is made of (on both backends), ``ledger retry``, and
``status --json`` against a ledger in a known state, with a real ``watch``'s heartbeat and a real ``sync``
pass's record.

Ledger tests take ``where`` (test_ledger.py's fixture): each runs on a real SQLite file and on a real
PostgreSQL database."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sftp_server import running_sftp_server, sftp_env
from test_ledger import open_at

from conftest import UPLOAD_TOKEN, wait_for, watching, write_csv
from smt_watch.clock import utc_stamp
from smt_watch.ledger import Ledger
from smt_watch.reference.receiver import Fault
from smt_watch.status import HEARTBEAT_PREFIX, STALE_SECONDS, Beat, beat, gather

A, B, C, D, P = ("a" * 64, "b" * 64, "c" * 64, "d" * 64, "e" * 64)
NOW = time.time()
# B is delivered "a minute ago", in this clock hour (test_gather_reads_a_known_state's last hourly bucket): in
# a run that imported this module less than a minute after an hour began, a minute ago was the hour before.
B_AGO = 60.0 if NOW % 3600 >= 60 else NOW % 3600


@pytest.fixture(params=["sqlite", "postgres"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """As in test_ledger.py: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "postgres":
        return str(request.getfixturevalue("pg_url"))
    return str(tmp_path / "l.sqlite3")


def row(sha: str, state: str, *, first: float, sent: float | None = None, origin: str = "smt-watch",
        attempts: int = 1, error: str | None = None, status: int | None = 200, parent: str | None = None,
        path: str | None = "/in/f.csv") -> tuple[str, dict[str, Any]]:
    """A files row as ``ledger copy`` carries it: times chosen by the test."""
    return ("files", {"sha256": sha, "filename": f"{sha[:4]}.csv", "path": path, "size": 1000 + attempts,
                      "state": state, "attempts": attempts, "http_status": status, "last_error": error,
                      "first_seen": utc_stamp(first, digits=6), "updated_at": utc_stamp(sent or first, digits=6),
                      "sent_at": utc_stamp(sent, digits=6) if sent else None, "destination": "http://x/upload",
                      "mode": "multipart", "next_attempt_at": None, "claimed_by": None, "claimed_at": None,
                      "origin": origin, "parent": parent})


def known_state(ledger: Ledger) -> None:
    ledger.import_rows([
        row(A, "sent", first=NOW - 7200, sent=NOW - 7200 + 3.5),  # two hours ago, 3.5 s
        row(B, "sent", first=NOW - B_AGO, sent=NOW - B_AGO + 1),  # a minute ago (B_AGO), 1 s
        row(C, "sent", first=NOW - 40 * 3600, sent=NOW - 40 * 3600 + 2),  # older than a day
        row(D, "sent", first=NOW - 30, sent=NOW - 30, origin="import", status=None),  # not a delivery
        row(P, "failed", first=NOW - 600, attempts=3, status=400, error="HTTP 400: bad ESIID"),
        row("f" * 64, "failed", first=NOW - 500, attempts=1, status=422, error="child refused", parent=P,
            path=None),
        row("1" * 64, "pending", first=NOW - 10, status=None),
    ])
    for account, n in (("HOME-1", 3), ("HOME-2", 1)):
        for k in range(n):
            assert ledger.take_upload_slot("customer", account, NOW - 30 * 86400, 5, NOW - 100 + k)
    assert ledger.take_upload_slot("admin", "ops", NOW - 86400, 1, NOW - 50)
    assert ledger.take_upload_slot("admin", "old", NOW - 86400, 1, NOW - 2 * 86400)  # outside the window


def test_reads_for_status(where: str) -> None:
    with open_at(where) as ledger:
        known_state(ledger)
        recent = ledger.recent_deliveries(10)
        assert [r.sha256 for r in recent] == [B, A, C]  # newest first, the imported hash left out
        assert [r.sha256 for r in ledger.recent_deliveries(2)] == [B, A]
        times = ledger.delivery_times(NOW - 86400)
        assert [round(s, 3) for _, s in times] == [3.5, 1.0]  # oldest first, latency first sight → sent
        assert times[0][0] == pytest.approx(NOW - 7200 + 3.5, abs=1e-3)
        assert ledger.upload_counts("customer", NOW - 30 * 86400) == {"HOME-1": 3, "HOME-2": 1}
        assert ledger.upload_counts("admin", NOW - 86400) == {"ops": 1}
        ledger.set_meta(HEARTBEAT_PREFIX + "n1", "1")
        ledger.set_meta(HEARTBEAT_PREFIX + "n2", "2")
        ledger.set_meta("watch.heartbeatX", "not mine")
        ledger.set_meta("%watch.heartbeat.n3", "not mine either")  # a LIKE wildcard would match this
        assert ledger.meta_prefix(HEARTBEAT_PREFIX) == {HEARTBEAT_PREFIX + "n1": "1", HEARTBEAT_PREFIX + "n2": "2"}


def test_retry_moves_failed_rows_back_to_pending_once(where: str) -> None:
    with open_at(where) as ledger:
        known_state(ledger)
        child = "f" * 64
        assert ledger.retry([child]) == [child, P]  # a CSV from an .asc/.zip takes its parent with it
        for sha in (child, P):
            r = ledger.get(sha)
            assert r is not None and r.state == "pending" and r.next_attempt_at is None and r.claimed_by is None
            assert r.attempts in (1, 3) and r.last_error  # history kept
        assert ledger.retry([child, P]) == []  # again: nothing to move, nothing changed
        assert ledger.retry([A, "9" * 64]) == []  # sent, unknown: left alone
        assert ledger.get(A).state == "sent"  # type: ignore[union-attr]
        ledger.mark_retrying(B, status=503, error="HTTP 503", attempts=1, next_attempt_at=NOW + 3600)
        assert ledger.retry([B]) == [B]
        assert ledger.due(NOW)  # pending rows are due at once
        assert ledger.counts()["pending"] == 4


def test_gather_reads_a_known_state(where: str, make_settings: Callable[..., Any]) -> None:
    settings = make_settings(SMT_UPLOAD_CUSTOMER_LIMIT="3")
    with open_at(where) as ledger:
        known_state(ledger)
        beat(ledger, Beat(node="alive", started_at=NOW - 3600, waiting=2, mode="multipart", workers=2))
        ledger.set_meta(HEARTBEAT_PREFIX + "dead", json.dumps({
            "node": "dead", "pid": 1, "started_at": utc_stamp(NOW - 7200), "beat_at": utc_stamp(NOW - 120),
            "beat_epoch": NOW - 120, "stopped_at": None, "waiting": 0, "mode": "inline", "workers": 1}))
        s = gather(settings, ledger, now=NOW)
    assert [(w.node, w.running) for w in s.watchers] == [("alive", True), ("dead", False)]
    assert s.watchers[1].beat_age_seconds == pytest.approx(120, abs=1) and STALE_SECONDS < 120
    assert s.counts == {"pending": 1, "sending": 0, "sent": 4, "retrying": 0, "failed": 2}
    assert s.queue == 1
    assert [(d.sha256, d.seconds, d.http_status) for d in s.recent] == [(B, 1.0, 200), (A, 3.5, 200), (C, 2.0, 200)]
    assert [(f.sha256, f.error, f.retry_command) for f in s.failures] == [
        (P, "HTTP 400: bad ESIID", f"smt-watch ledger retry {P}"),
        ("f" * 64, "child refused", f"smt-watch ledger retry {'f' * 64}")]
    assert s.last_sync is None
    customer = next(q for q in s.quotas if q.role == "customer")
    assert (customer.limit, customer.accounts, customer.uploads, customer.at_limit) == (3, 2, 4, 1)
    assert customer.busiest == [("HOME-1", 3), ("HOME-2", 1)]
    assert len(s.hours) == 24 and sum(h.deliveries for h in s.hours) == 2
    assert s.hours[-1].deliveries == 1 and s.hours[-1].median_seconds == 1.0
    assert s.hours[-3].deliveries == 1 and s.hours[-3].max_seconds == 3.5


def test_status_json_with_a_real_watch_and_sync(run_cli: Callable[..., subprocess.CompletedProcess[str]],
                                                make_settings: Callable[..., Any], receiver: Any,
                                                tmp_path: Path, base_env: dict[str, str]) -> None:
    """A real ``watch`` has one file refused (HTTP 400 from the reference receiver) and delivers another (its
    heartbeat says running); a real ``sync`` pass against the in-process SFTP server fetches a file;
    ``status --json`` shows all of it, exit 1 for the failure. ``ledger retry`` puts the refused file back to
    pending and ``watch`` delivers it. Once ``watch`` stops, its heartbeat says stopped."""
    with running_sftp_server(tmp_path / "remote", tmp_path / "keys") as server:
        sftp = sftp_env(server, tmp_path / "ssh" / "known_hosts", remote_dirs=["/adhocusage"])
        settings = make_settings(SMT_UPLOAD_URL=f"{receiver.url}/upload", SMT_UPLOAD_TOKEN=UPLOAD_TOKEN,
                                 SMT_SETTLE_SECONDS="0.1", **sftp)
        inbox = Path(base_env["SMT_LOCAL_DIR"])
        receiver.state.faults.append(Fault(status=400, body={"ok": False, "error": "bad ESIID"}))
        with watching(settings):
            bad = write_csv(inbox / "bad.csv", rows=20, seed=2)
            wait_for(lambda: failed_count(settings) == 1, 30, "the first file refused")
            good = write_csv(inbox / "good.csv", rows=20, seed=1)
            # the receiver stores the file before watch commits its row (group commit): wait for the row
            wait_for(lambda: len(receiver.stored()) == 1 and sent_count(settings) == 1, 30,
                     "the second file delivered and recorded")
            r = run_cli("status", "--json")
            assert r.returncode == 1, r.stderr  # a failure is listed
            s = json.loads(r.stdout)
            assert s["watching"] is True
            (w,) = s["watchers"]
            assert w["running"] is True and w["stopped_at"] is None and w["mode"] == "multipart"
            assert w["node"] == settings.node_name
            assert [d["filename"] for d in s["recent"]] == ["good.csv"]
            assert s["recent"][0]["size"] == good.stat().st_size and 200 <= s["recent"][0]["http_status"] < 300
            (f,) = s["failures"]
            assert (f["filename"], f["state"], f["http_status"]) == ("bad.csv", "failed", 400)
            assert "bad ESIID" in f["error"]
            assert f["retry_command"] == f"smt-watch ledger retry {f['sha256']}"
            assert s["counts"] == {"pending": 0, "sending": 0, "sent": 1, "retrying": 0, "failed": 1}
            assert s["last_sync"] is None

            server.put("adhocusage/remote.csv", write_csv(tmp_path / "remote.csv", rows=5, seed=9).read_bytes())
            r = run_cli("sync", env=sftp)
            assert r.returncode == 0, r.stderr
            sync = json.loads(run_cli("status", "--json").stdout)["last_sync"]
            assert (sync["new"], sync["failed"], sync["error"], sync["node"]) == (1, [], None, settings.node_name)
            wait_for(lambda: len(receiver.stored()) == 2, 30, "the fetched file delivered")

            r = run_cli("ledger", "retry", str(bad))
            assert r.returncode == 0 and r.stdout == f"pending {f['sha256']}\n", r.stderr
            wait_for(lambda: len(receiver.stored()) == 3, 30, "the retried file delivered")
            r = run_cli("status", "--json")
            assert r.returncode == 0, r.stdout
            assert json.loads(r.stdout)["failures"] == []
            r = run_cli("ledger", "retry", str(bad))
            assert r.returncode == 1 and "no failed or retrying ledger row" in r.stderr
        r = run_cli("status", "--json")
        (w,) = json.loads(r.stdout)["watchers"]
        assert w["running"] is False and w["stopped_at"] is not None
        r = run_cli("status")
        assert "stopped" in r.stdout and "good.csv" in r.stdout and "failures: none" in r.stdout


def failed_count(settings: Any) -> int:
    return _count(settings, "failed")


def sent_count(settings: Any) -> int:
    return _count(settings, "sent")


def _count(settings: Any, state: str) -> int:
    from smt_watch.statedir import open_ledger

    with open_ledger(settings) as ledger:
        return ledger.counts()[state]
