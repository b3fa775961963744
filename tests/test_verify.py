"""``smt-watch verify`` against the reference receiver with the app's routes, over real HTTP (issue 26).

The receiver's "today" is the wall clock here, so the files are dated relative to today; the re-send
across days moves the clock of both processes with libfaketime (tests/test_verify_faketime.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sqlite3
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from conftest import ADMIN_TOKEN, wait_for
from smt_watch.autoverify import AutoVerify
from smt_watch.config import Settings
from smt_watch.ledger.verdicts import Resend, Verdict
from smt_watch.metrics import Metrics
from smt_watch.pipeline import Outcome, post_files
from smt_watch.reference.app_routes import AppRoutes, wrap
from smt_watch.reference.receiver import app_in_thread, create_app
from smt_watch.reference.sample import billing_csv, interval_csv, smt_zip
from smt_watch.resend import resend_due, write_derived
from smt_watch.statedir import open_ledger
from smt_watch.verify import Report, select, verify_rows
from smt_watch.window import coverage_window


@dataclass
class App:
    url: str
    routes: AppRoutes

    def faults(self, **fault: object) -> None:
        httpx.post(f"{self.url}/_app/faults", json=fault).raise_for_status()


@contextmanager
def serving(data: Path, token: str | None) -> Iterator[App]:
    routes = wrap(create_app(data, admin_token=token), data, token)
    try:
        with app_in_thread(routes) as port:
            yield App(f"http://127.0.0.1:{port}", routes)
    finally:
        routes.store.close()


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    with serving(tmp_path / "app", ADMIN_TOKEN) as served:
        yield served


@pytest.fixture
def settings_for(make_settings: Callable[..., Settings]) -> Callable[..., Settings]:
    def make(app: App, **env: str) -> Settings:
        base = {"INTELLIWATT_BASE_URL": app.url, "ADMIN_TOKEN": ADMIN_TOKEN, "SMT_DELIVERY": "raw-upload",
                "SMT_VERIFY_REQUESTS_PER_SECOND": "1000", "SMT_VERIFY_TIMEOUT_SECONDS": "5"}
        return make_settings(**{**base, **env})

    return make


def today() -> date:
    return coverage_window(datetime.now(UTC)).end + timedelta(days=2)


def write(path: Path, days: int, start: date, esiid: str = "10443720000000001") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(interval_csv(days, esiid=esiid, start=start))
    return path


def deliver_and_verify(settings: Settings, *paths: Path) -> list[Report]:
    outcomes = post_files(settings, list(paths))
    assert all(o.ok for o in outcomes), outcomes
    with open_ledger(settings) as ledger:
        shas = [o.sha256 for o in outcomes if o.sha256]
        return verify_rows(settings, ledger, select(ledger, shas, None))


def test_a_year_file_is_stored(app: App, settings_for: Callable[..., Settings], tmp_path: Path) -> None:
    """A year ending inside the window, in 8 chunks of 5,000 lines: every day is there with its kWh."""
    settings = settings_for(app)
    path = write(tmp_path / "inbox" / "year_M1.csv", 364, today() - timedelta(days=366))
    [report] = deliver_and_verify(settings, path)
    assert report.verdict is Verdict.STORED, report.reason
    assert report.days_checked == report.days_stored == 364
    assert not report.differing and not report.newer_days
    with open_ledger(settings) as ledger:
        kept = ledger.verdict(report.sha256)
    assert kept is not None and kept.verdict == "stored"
    assert json.loads(kept.detail)["days_stored"] == 364


def test_partial_names_the_days_that_differ(app: App, settings_for: Callable[..., Settings],
                                            tmp_path: Path) -> None:
    """Intervals the app lost (deleted behind smt-watch's back) make the file partial, day by day."""
    settings = settings_for(app)
    path = write(tmp_path / "inbox" / "week_M1.csv", 7, today() - timedelta(days=20))
    [first] = deliver_and_verify(settings, path)
    assert first.verdict is Verdict.STORED
    lost = today() - timedelta(days=17)
    with sqlite3.connect(tmp_path / "app" / "app.sqlite3") as db:
        start = int(datetime(lost.year, lost.month, lost.day, 12, tzinfo=UTC).timestamp() * 1000)
        db.execute("DELETE FROM SmtInterval WHERE ts >= ? AND ts < ?", (start, start + 4 * 900_000))
    with open_ledger(settings) as ledger:
        [report] = verify_rows(settings, ledger, select(ledger, [first.sha256], None))
    assert report.verdict is Verdict.PARTIAL
    assert [(d.day, d.expected, d.actual) for d in report.differing] == [(lost, 96, 92)]
    assert report.days_stored == 6


def test_nothing_sent_to_this_app_is_missing(app: App, tmp_path: Path, settings_for: Callable[..., Settings]) -> None:
    """Delivered to one app, verified against another that never saw it: no trace, so ``missing``."""
    settings = settings_for(app)
    path = write(tmp_path / "inbox" / "w_M1.csv", 3, today() - timedelta(days=10))
    [sent] = deliver_and_verify(settings, path)
    assert sent.verdict is Verdict.STORED
    with serving(tmp_path / "other", ADMIN_TOKEN) as other:
        elsewhere = settings_for(other)
        with open_ledger(elsewhere) as ledger:
            [report] = verify_rows(elsewhere, ledger, select(ledger, [sent.sha256], None))
        assert report.verdict is Verdict.MISSING, report.reason


def test_a_duplicate_is_stored_once_and_verifies(app: App, settings_for: Callable[..., Settings],
                                                 tmp_path: Path) -> None:
    """The same bytes under another name: a duplicate for smt-watch; re-sent with --force the app
    re-normalizes it (as the real route does) and the verdict stays ``stored``."""
    settings = settings_for(app)
    a = write(tmp_path / "inbox" / "a_M1.csv", 5, today() - timedelta(days=12))
    b = tmp_path / "inbox" / "b_M1.csv"
    b.write_bytes(a.read_bytes())
    [report] = deliver_and_verify(settings, a)
    [dup] = post_files(settings, [b])
    assert dup.result == "duplicate"
    [again] = post_files(settings, [a], force=True)
    assert again.ok
    with open_ledger(settings) as ledger:
        [checked] = verify_rows(settings, ledger, select(ledger, [report.sha256], None))
    assert checked.verdict is Verdict.STORED and checked.days_stored == 5
    counts = app.routes.store.coverage("10443720000000001")
    assert counts[0] == 5 * 96


def _dst_day(year: int, month: int) -> date:
    """The second Sunday of March (month 3) or the first of November (month 11)."""
    first = date(year, month, 1)
    sunday = first + timedelta(days=(6 - first.weekday()) % 7)
    return sunday + timedelta(days=7) if month == 3 else sunday


def _last_dst_day_in_window(month: int) -> date:
    window = coverage_window(datetime.now(UTC))
    for year in (window.end.year, window.end.year - 1):
        d = _dst_day(year, month)
        if d in window and d - timedelta(days=1) in window and d + timedelta(days=1) in window:
            return d
    raise AssertionError("no DST day inside the window")


@pytest.mark.parametrize(("month", "kept"), [(11, 96), (3, 92)], ids=["fall-back", "spring-forward"])
def test_dst_days_are_judged_by_what_the_app_keeps(app: App, settings_for: Callable[..., Settings],
                                                   tmp_path: Path, month: int, kept: int) -> None:
    """A fall-back day's 100 rows keep 96 intervals in the app (the repeated 1:00-1:45 collide), a
    spring-forward day's 96 rows keep 92 (4 blank): both are ``stored``, though the intervals route says
    100 and 92 expected."""
    settings = settings_for(app)
    day = _last_dst_day_in_window(month)
    path = write(tmp_path / "inbox" / f"dst{month}_M1.csv", 3, day - timedelta(days=1))
    [report] = deliver_and_verify(settings, path)
    assert report.verdict is Verdict.STORED, report.reason
    got = httpx.get(f"{app.url}/api/admin/analysis/intervals", headers={"x-admin-token": ADMIN_TOKEN},
                    params={"esiid": "10443720000000001", "meter": "M1", "date": day.isoformat(),
                            "tz": "America/Chicago"}).json()
    assert got["actual"] == kept
    assert got["expected"] == (100 if month == 11 else 92)


def test_days_newer_than_the_window_are_outside_and_scheduled(app: App, settings_for: Callable[..., Settings],
                                                              tmp_path: Path) -> None:
    """A file reaching into yesterday: its last two days are dropped by the app; the verdict says so and
    the re-send waits until the last of them has entered the window."""
    settings = settings_for(app)
    path = write(tmp_path / "inbox" / "recent_M1.csv", 5, today() - timedelta(days=5))
    [report] = deliver_and_verify(settings, path)
    assert report.verdict is Verdict.OUTSIDE_WINDOW, report.reason
    # the file's days run to yesterday; the window ends the day before yesterday
    assert [k[2] for k in report.newer_days] == [today() - timedelta(days=1)]
    assert report.days_stored == 5 - len(report.newer_days)
    with open_ledger(settings) as ledger:
        kept = ledger.verdict(report.sha256)
    assert kept is not None and kept.resend_state == Resend.WAITING.value
    assert kept.resend_due_at is not None and kept.resend_due_at > datetime.now(UTC).timestamp()


def test_days_older_than_the_window_are_said_once(app: App, settings_for: Callable[..., Settings], tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    settings = settings_for(app)
    window = coverage_window(datetime.now(UTC))
    path = write(tmp_path / "inbox" / "old_M1.csv", 4, window.start - timedelta(days=2))
    [report] = deliver_and_verify(settings, path)
    assert report.verdict is Verdict.STORED, report.reason  # two days kept; two never will be
    assert len(report.older_days) == 2 and report.days_stored == 2
    with open_ledger(settings) as ledger:
        verify_rows(settings, ledger, select(ledger, [report.sha256], None))
    # said once as a warning (each verify's summary line at INFO repeats it as part of the verdict)
    said = [r for r in caplog.records
            if r.levelno >= logging.WARNING and "older than the app's window" in r.getMessage()]
    assert len(said) == 1


@pytest.mark.parametrize(("token", "fault", "words"), [
    ("wrong-token", {}, "answered 401: ADMIN_TOKEN is not the app's admin token"),
    (ADMIN_TOKEN, {"route": "intervals", "absent": True}, "answered 404"),
    (None, {}, "answered 503: ADMIN_TOKEN not configured"),
], ids=["401", "404", "503"])
def test_read_routes_that_refuse_make_it_unverifiable(tmp_path: Path, settings_for: Callable[..., Settings],
                                                      token: str | None, fault: dict[str, object],
                                                      words: str) -> None:
    path = write(tmp_path / "inbox" / "r_M1.csv", 2, today() - timedelta(days=9))
    with serving(tmp_path / "good", ADMIN_TOKEN) as good:
        [sent] = post_files(settings_for(good), [path])
    assert sent.ok
    with serving(tmp_path / "good", None if token is None else ADMIN_TOKEN) as app:
        if fault:
            app.faults(**fault)
        probe = settings_for(app) if token != "wrong-token" else settings_for(app, ADMIN_TOKEN="wrong-token")
        with open_ledger(probe) as ledger:
            [report] = verify_rows(probe, ledger, select(ledger, [sent.sha256], None))
        assert report.verdict is Verdict.UNVERIFIABLE
        assert words in report.reason


def test_a_slow_app_is_unverifiable_within_the_deadline(app: App, settings_for: Callable[..., Settings],
                                                        tmp_path: Path) -> None:
    """Every read answered 1.5 s late, five times the 0.3 s deadline: unverifiable, at once. (A longer delay
    proves no more, and the app's shutdown at teardown waits for the late answer still in flight.)"""
    settings = settings_for(app, SMT_VERIFY_TIMEOUT_SECONDS="0.3")
    path = write(tmp_path / "inbox" / "s_M1.csv", 2, today() - timedelta(days=9))
    [sent] = post_files(settings, [path])
    app.faults(route="all", delaySeconds=1.5)
    started = datetime.now(UTC)
    with open_ledger(settings) as ledger:
        [report] = verify_rows(settings, ledger, select(ledger, [sent.sha256], None))
    assert report.verdict is Verdict.UNVERIFIABLE and "did not answer in time" in report.reason
    assert (datetime.now(UTC) - started).total_seconds() < 2.5


def test_requests_are_paced(app: App, settings_for: Callable[..., Settings], tmp_path: Path) -> None:
    """SMT_VERIFY_REQUESTS_PER_SECOND bounds the load: 8 reads at 20/s take at least 0.35 s."""
    settings = settings_for(app, SMT_VERIFY_REQUESTS_PER_SECOND="20")
    path = write(tmp_path / "inbox" / "p_M1.csv", 7, today() - timedelta(days=12))
    [sent] = post_files(settings, [path])
    before = app.routes.reads
    started = datetime.now(UTC)
    with open_ledger(settings) as ledger:
        [report] = verify_rows(settings, ledger, select(ledger, [sent.sha256], None))
    elapsed = (datetime.now(UTC) - started).total_seconds()
    assert report.verdict is Verdict.STORED
    assert report.requests == app.routes.reads - before == 8  # one coverage + seven days
    assert elapsed >= 7 / 20


def test_cli_verify_exit_codes_and_json(app: App, run_cli: Callable[..., subprocess.CompletedProcess[str]],
                                        tmp_path: Path) -> None:
    env = {"INTELLIWATT_BASE_URL": app.url, "ADMIN_TOKEN": ADMIN_TOKEN, "SMT_DELIVERY": "raw-upload",
           "SMT_VERIFY_REQUESTS_PER_SECOND": "1000"}
    path = write(tmp_path / "inbox" / "c_M1.csv", 3, today() - timedelta(days=9))
    assert run_cli("post", str(path), env=env).returncode == 0
    done = run_cli("verify", "--json", env=env)
    assert done.returncode == 0, done.stderr
    [obj] = json.loads(done.stdout)
    assert obj["verdict"] == "stored" and obj["days_stored"] == 3
    one = run_cli("verify", str(path), env=env)
    assert one.returncode == 0 and one.stdout.startswith("stored")
    recent = write(tmp_path / "inbox" / "n_M1.csv", 3, today() - timedelta(days=2))
    assert run_cli("post", str(recent), env=env).returncode == 0
    some = run_cli("verify", "--since", "1h", env=env)
    assert some.returncode == 1 and "outside window" in some.stdout
    stranger = write(tmp_path / "elsewhere" / "x_M1.csv", 1, today() - timedelta(days=9))
    unknown = run_cli("verify", str(stranger), env=env)
    assert unknown.returncode == 1 and "not in the ledger" in unknown.stderr and not unknown.stdout
    config = run_cli("verify", env={"SMT_DELIVERY": "raw-upload"})
    assert config.returncode == 2 and "INTELLIWATT_BASE_URL" in config.stderr
    assert "Traceback" not in config.stderr and ADMIN_TOKEN not in some.stdout + some.stderr


def test_a_file_that_left_the_inbox_is_unresendable_once(app: App, settings_for: Callable[..., Settings],
                                                         tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = settings_for(app)
    path = write(tmp_path / "inbox" / "gone_M1.csv", 3, today() - timedelta(days=3))
    [report] = deliver_and_verify(settings, path)
    assert report.verdict is Verdict.OUTSIDE_WINDOW and report.resend_due_at is not None
    path.unlink()
    sent: list[Path] = []
    with open_ledger(settings) as ledger:
        def deliver(p: Path) -> Outcome:
            sent.append(p)
            raise AssertionError("nothing to deliver")

        [result] = resend_due(settings, ledger, deliver, report.resend_due_at + 1)
        assert result.state is Resend.UNRESENDABLE and "left the inbox" in result.note
        assert resend_due(settings, ledger, deliver, report.resend_due_at + 10) == []  # said once
        kept = ledger.verdict(report.sha256)
    assert kept is not None and kept.resend_state == "unresendable" and not sent
    assert len([r for r in caplog.records if "unresendable" in r.getMessage()]) == 1


def test_the_derived_file_holds_only_the_dropped_days_rows(tmp_path: Path) -> None:
    """The fall-back day's 100 rows all go (the repeated hour included, in file order), nothing else."""
    src = tmp_path / "f_M1.csv"
    src.write_bytes(interval_csv(3, start=date(2025, 11, 1)))
    dest = tmp_path / "out" / "d.csv"
    kept = write_derived(src, {("10443720000000001", "M1", date(2025, 11, 2))}, dest, esiid=None, meter="M1")
    lines = dest.read_text().splitlines()
    assert kept == 100 and len(lines) == 101
    assert lines[0].startswith("ESIID,USAGE_DATE") and all(",11/02/2025," in line for line in lines[1:])
    assert [line.split(",")[3] for line in lines[1:]].count("1:15") == 2


def test_automatic_checks_wait_for_the_delay_and_count_verdicts(app: App, settings_for: Callable[..., Settings],
                                                                tmp_path: Path) -> None:
    settings = settings_for(app, SMT_VERIFY_DELAY_SECONDS="120")
    path = write(tmp_path / "inbox" / "auto_M1.csv", 2, today() - timedelta(days=8))
    [sent] = post_files(settings, [path])
    metrics = Metrics()
    with open_ledger(settings) as ledger:
        auto = AutoVerify(settings, ledger, lambda p: post_files(settings, [p])[0], metrics)
        delivered_at = 1_000_000.0
        auto.after_delivery(str(sent.sha256), delivered_at)
        assert auto.next_due() == delivered_at + 120
        assert auto.tick(delivered_at + 119) == ([], [])
        _, [report] = auto.tick(delivered_at + 120)
        assert report.verdict is Verdict.STORED
        assert auto.tick(delivered_at + 500) == ([], [])  # checked: not due again
        auto.close()
    assert metrics.registry.get_sample_value("smt_watch_verdicts_total", {"verdict": "stored"}) == 1.0


def test_the_watch_thread_resends_and_verifies_until_stopped(app: App, settings_for: Callable[..., Settings],
                                                             tmp_path: Path) -> None:
    """``AutoVerify.run`` in a thread of its own, as ``watch`` runs it: a scheduled check is done without
    anyone calling tick, and the thread ends promptly on stop."""
    settings = settings_for(app, SMT_VERIFY_DELAY_SECONDS="0")
    path = write(tmp_path / "inbox" / "t_M1.csv", 2, today() - timedelta(days=8))
    [sent] = post_files(settings, [path])
    with open_ledger(settings) as ledger:
        auto = AutoVerify.for_watch(settings, ledger)
        auto.after_delivery(str(sent.sha256), datetime.now(UTC).timestamp())
        with running_in_a_thread(auto):
            wait_for(lambda: (v := ledger.verdict(str(sent.sha256))) is not None and v.verdict == "stored",
                     what="the automatic check")


def test_a_check_scheduled_while_the_thread_waits_is_done_at_its_time(app: App, settings_for: Callable[..., Settings],
                                                                      tmp_path: Path) -> None:
    """The thread is already waiting (nothing due, a 600 s idle look) when a delivery schedules its check:
    the check is done SMT_VERIFY_DELAY_SECONDS after it, not at the thread's next idle look (the demo's
    checks came a minute late that way)."""
    settings = settings_for(app, SMT_VERIFY_DELAY_SECONDS="0")
    path = write(tmp_path / "inbox" / "t_M1.csv", 2, today() - timedelta(days=8))
    [sent] = post_files(settings, [path])
    with open_ledger(settings) as ledger:
        auto = AutoVerify.for_watch(settings, ledger)
        looked, next_due = threading.Event(), auto.next_due

        def observed() -> float | None:  # only observed (not replaced): when the thread has decided to wait
            due = next_due()
            looked.set()
            return due

        auto.next_due = observed  # type: ignore[method-assign]
        with running_in_a_thread(auto, idle=600.0):
            wait_for(looked.is_set, what="the thread to find nothing due")
            auto.after_delivery(str(sent.sha256), datetime.now(UTC).timestamp())
            wait_for(lambda: (v := ledger.verdict(str(sent.sha256))) is not None and v.verdict == "stored", 60,
                     what="the check, well before the 600 s idle look")


@contextmanager
def running_in_a_thread(auto: AutoVerify, idle: float | None = None) -> Iterator[None]:
    """``auto.run`` in a thread of its own, as ``watch`` runs it; on leaving, stopped, and it must end promptly."""
    stop = threading.Event()
    thread = threading.Thread(target=auto.run, args=(stop,) if idle is None else (stop, idle), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)
        auto.close()
    assert not thread.is_alive()


def test_a_csv_from_a_zip_is_verified_from_its_container(app: App, settings_for: Callable[..., Settings],
                                                         tmp_path: Path) -> None:
    """The CSVs inside a .zip are rows of their own (the container row is not verified); their bytes are
    unpacked again from the container, which must still hold them."""
    settings = settings_for(app)
    start = today() - timedelta(days=10)
    path = tmp_path / "inbox" / "pull_M1.zip"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(smt_zip("pull_M1.csv", interval_csv(3, start=start), billing_csv("10443720000000001", start, 3)))
    [outcome] = post_files(settings, [path])
    assert outcome.ok and len(outcome.children) == 2
    with open_ledger(settings) as ledger:
        rows = select(ledger, None, None)
        # the container itself is left out, and so is the billing CSV: raw-upload never sent it (the app's
        # route reads interval CSVs only), so there is nothing of it to verify
        assert {r.parent for r in rows} == {outcome.sha256}
        reports = verify_rows(settings, ledger, rows)
    assert [r.verdict for r in reports] == [Verdict.STORED], [r.reason for r in reports]
    assert [r.days_stored for r in reports] == [3]


def test_a_moved_file_is_found_in_the_archive_and_a_changed_one_is_not_used(
        app: App, settings_for: Callable[..., Settings], tmp_path: Path) -> None:
    settings = settings_for(app)
    path = write(tmp_path / "inbox" / "sub" / "m_M1.csv", 2, today() - timedelta(days=9))
    [report] = deliver_and_verify(settings, path)
    archived = settings.archive_path / "sub" / "m_M1.csv"
    archived.parent.mkdir(parents=True)
    path.rename(archived)  # what SMT_AFTER_SEND=move does
    with open_ledger(settings) as ledger:
        [moved] = verify_rows(settings, ledger, select(ledger, [report.sha256], None))
        assert moved.verdict is Verdict.STORED, moved.reason
        archived.write_bytes(interval_csv(2, start=today() - timedelta(days=30)))  # other bytes, same name
        [changed] = verify_rows(settings, ledger, select(ledger, [report.sha256], None))
    assert changed.verdict is Verdict.UNVERIFIABLE and "changed since it was sent" in changed.reason


def test_a_day_the_app_already_holds_from_a_later_file_is_not_resent(
        app: App, settings_for: Callable[..., Settings], tmp_path: Path) -> None:
    """SMT sends recent days again: when the re-send is due, a day the app already holds intervals of (from
    that later delivery; written into the app's table here) is left out, so the older copy never overwrites it."""
    settings = settings_for(app)
    path = write(tmp_path / "inbox" / "late_M1.csv", 4, today() - timedelta(days=4))
    [report] = deliver_and_verify(settings, path)
    [(esiid, meter, newer)] = report.newer_days
    noon = int(datetime(newer.year, newer.month, newer.day, 18, tzinfo=UTC).timestamp() * 1000)
    with sqlite3.connect(tmp_path / "app" / "app.sqlite3") as db:
        db.execute("INSERT INTO SmtInterval VALUES (?, ?, ?, '0.5', 'later')", (esiid, meter, noon))
    delivered: list[Path] = []
    with open_ledger(settings) as ledger:
        auto = AutoVerify(settings, ledger, lambda p: delivered.append(p) or post_files(settings, [p])[0])
        assert report.resend_due_at is not None
        [result], _ = auto.tick(report.resend_due_at + 1)
        auto.close()
        kept = ledger.verdict(report.sha256)
    assert result.state is Resend.SENT and "already held" in result.note and delivered == []
    assert kept is not None and kept.resend_state == "sent"


def test_an_inline_delivery_is_replayed_as_the_inline_route_stores_it(
        tmp_path: Path, settings_for: Callable[..., Settings]) -> None:
    """The inline route (the app in development) parses the whole file once and applies no window: a file
    reaching into yesterday is stored whole, and verify expects exactly that (not raw-upload's dropped days)."""
    data = tmp_path / "app"
    routes = wrap(create_app(data, admin_token=ADMIN_TOKEN, inline=True), data, ADMIN_TOKEN)
    try:
        with app_in_thread(routes) as port:
            app = App(f"http://127.0.0.1:{port}", routes)
            settings = settings_for(app, SMT_DELIVERY="inline", ESIID_DEFAULT="10443720000000001")
            path = write(tmp_path / "inbox" / "inl_M7.csv", 4, today() - timedelta(days=4))
            [report] = deliver_and_verify(settings, path)
            assert report.verdict is Verdict.STORED, report.reason
            assert report.days_checked == report.days_stored == 4 and not report.newer_days
            assert routes.store.coverage("10443720000000001")[0] == 4 * 96
    finally:
        routes.store.close()


def test_the_esiid_and_meter_an_uploader_declared_are_the_ones_verified(
        app: App, settings_for: Callable[..., Settings], tmp_path: Path) -> None:
    """Rows without an ESIID take the one the delivery carried: the uploader's declared ESIID and meter (the
    ledger's labels), not ESIID_DEFAULT; verify and the re-send replay with the same ones."""
    settings = settings_for(app, ESIID_DEFAULT="10443720000000001")
    path = tmp_path / "inbox" / "anon_M1.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = interval_csv(4, esiid="10443720000000001", start=today() - timedelta(days=4)).decode()
    path.write_text(text.replace("'10443720000000001,", ","))  # no ESIID in the rows
    declared = "10443720000000099"
    with open_ledger(settings) as ledger:
        ledger.declare_labels(hashlib.sha256(path.read_bytes()).hexdigest(), declared, "MX")
    [report] = deliver_and_verify(settings, path)
    assert report.verdict is Verdict.OUTSIDE_WINDOW, report.reason
    assert report.days_stored == 3 and {k[:2] for k in report.newer_days} == {(declared, "MX")}
    assert app.routes.store.coverage(declared)[0] == 3 * 96
    assert app.routes.store.coverage("10443720000000001")[0] == 0
    # the re-send, once due, carries the same labels: the app files the day under the declared ESIID
    with open_ledger(settings) as ledger:
        auto = AutoVerify(settings, ledger, lambda p: post_files(settings, [p])[0])
        assert report.resend_due_at is not None
        [result], _ = auto.tick(report.resend_due_at + 1)
        auto.close()
    assert result.state is Resend.SENT and result.derived is not None
    assert result.derived.read_text().count("\n") == 1 + 96


def test_the_sync_timer_pass_verifies_the_days_deliveries(
        app: App, run_cli: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path) -> None:
    """``post`` schedules no check (only ``watch`` does); with SMT_SYNC_VERIFY=1 the next ``sync`` pass
    checks what was sent in the last day, once; without it, sync leaves verification alone."""
    from sftp_server import running_sftp_server, sftp_env

    env = {"INTELLIWATT_BASE_URL": app.url, "ADMIN_TOKEN": ADMIN_TOKEN, "SMT_DELIVERY": "raw-upload",
           "SMT_VERIFY_REQUESTS_PER_SECOND": "1000", "SMT_VERIFY_DELAY_SECONDS": "0"}
    path = write(tmp_path / "inbox" / "synced_M1.csv", 3, today() - timedelta(days=9))
    assert run_cli("post", str(path), env=env).returncode == 0
    with running_sftp_server(tmp_path / "smt" / "root", tmp_path / "smt" / "keys") as sftp:
        sync_env = {**env, **sftp_env(sftp, tmp_path / "known_hosts")}
        off = run_cli("sync", env=sync_env)
        assert off.returncode == 0, off.stderr
        assert "unchecked" not in run_cli("ledger", "list", env=env).stdout
        assert app.routes.reads == 0
        on = run_cli("sync", env={**sync_env, "SMT_SYNC_VERIFY": "1"})
        assert on.returncode == 0, on.stderr
        assert "Sync verify: 0 re-send(s), 1 check(s): synced_M1.csv stored" in on.stderr
        reads = app.routes.reads
        assert reads == 1 + 3  # one coverage read, one per day
        again = run_cli("sync", env={**sync_env, "SMT_SYNC_VERIFY": "1"})
        assert again.returncode == 0 and "Sync verify" not in again.stderr
        assert app.routes.reads == reads  # a verdict is kept: not checked twice
    listed = run_cli("ledger", "list", env=env).stdout
    assert re.search(r"^sent/stored\s.*synced_M1\.csv", listed, re.M), listed


def test_a_file_whose_last_chunk_holds_only_newer_days_still_queues_post_ingest(
        app: App, settings_for: Callable[..., Settings], tmp_path: Path) -> None:
    """End to end through the raw-upload sink: one day a chunk, the last chunk only yesterday (dropped by the
    app); postIngest rides on the chunk of the window's last day, so the app queues the ESIID's work, and
    verify reads the file as stored up to the window plus the day to re-send."""
    settings = settings_for(app, SMT_RAW_LINES_PER_CHUNK="96")
    path = write(tmp_path / "inbox" / "tail_M1.csv", 4, today() - timedelta(days=4))
    [report] = deliver_and_verify(settings, path)
    requests = [r for r in app.routes.state.receiver.requests if r.path.endswith("/raw-upload")]
    assert [r.fields.get("postIngest") for r in requests] == [False, False, True, False]
    assert app.routes.store.post_ingest_tasks() == ["10443720000000001"]
    assert report.verdict is Verdict.OUTSIDE_WINDOW and report.days_stored == 3


@pytest.mark.parametrize(("status", "text"), [(200, "[" * 100_000), (500, "[" * 100_000)], ids=["ok", "error"])
def test_an_answer_nested_deeper_than_python_follows_is_unverifiable_not_an_internal_error(
        status: int, text: str) -> None:
    """A hostile app's body of 100,000 ``[``: json raises RecursionError (no ValueError); verify says the
    route answered without usable JSON, one line, as for any body that is no JSON."""
    from smt_watch.verify import Unverifiable, _answer

    response = httpx.Response(status, text=text, request=httpx.Request("GET", "http://app.invalid/x"))
    with pytest.raises(Unverifiable, match=f"answered {status}"):
        _answer("/x", response)
