"""Outbound limits toward the web app (issue 23 item 13): ``SMT_MAX_REQUESTS_PER_SECOND`` and
``SMT_MAX_IN_FLIGHT``, per node and per fleet (smt_watch/limits.py, smt_watch/ledger/fleet.py).

The proofs run real ``watch`` processes draining a backlog of real files by raw-upload (two chunks a file,
so chunks are seen to count) into :class:`CountingApp`, a real HTTP server on 127.0.0.1 that holds each
request a moment and records, by its own clock, when each arrived and how many were in progress at once.
Rate assertions count arrivals over windows with generous margins (a token bucket of ``burst`` tokens
refilled at ``rate`` lets at most ``burst + rate * window`` requests start in any window). The token bucket
itself is unit-tested with an injected clock.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from faults.support import WatchProc, ledger_rows_cli
from pgcluster import PgCluster
from test_multinode import restarted_at_the_end, smt_csv

from conftest import ADMIN_TOKEN, SUBPROCESS_PYTHONPATH, wait_for
from smt_watch.config import load_settings
from smt_watch.errors import LedgerUnavailable
from smt_watch.ledger.fleet import FleetBudget
from smt_watch.limits import (
    FLEET_RETRY_SECONDS,
    Limiter,
    LocalBudget,
    NodeBudget,
    Rate,
    TokenBucket,
    describe,
    read_node_stats,
)

HOLD_SECONDS = 0.15  # how long the app takes per request: long enough for requests to overlap


# --- the token bucket, with an injected clock ---------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_lets_a_burst_through_then_one_token_per_interval() -> None:
    clock = FakeClock()
    bucket = TokenBucket(Rate(5.0), clock)
    assert [bucket.reserve() for _ in range(5)] == [0.0] * 5  # a full bucket: one second's worth
    assert bucket.reserve() == pytest.approx(0.2)  # the 6th waits for the next token
    assert bucket.reserve() == pytest.approx(0.4)  # reservations queue up behind each other
    clock.now += 0.4
    assert bucket.reserve() == pytest.approx(0.2)
    clock.now += 60  # idle: the bucket refills, but never beyond its burst
    assert [bucket.reserve() for _ in range(5)] == [0.0] * 5
    assert bucket.reserve() == pytest.approx(0.2)


def test_bucket_below_one_per_second_holds_one_token() -> None:
    clock = FakeClock()
    bucket = TokenBucket(Rate(0.5), clock)
    assert bucket.reserve() == 0.0
    assert bucket.reserve() == pytest.approx(2.0)
    clock.now += 10
    assert bucket.reserve() == 0.0


def test_a_bucket_from_another_boot_is_started_afresh() -> None:
    """The node's bucket file keeps CLOCK_MONOTONIC times; after a reboot they lie in the future."""
    rate = Rate(5.0)
    tat, wait = rate.reserve(tat=1e9, now=10.0)
    assert wait == 0.0 and tat == pytest.approx(10.2)


def test_node_budget_is_shared_by_two_budgets_on_the_same_files(tmp_path: Path) -> None:
    """Two budgets on one directory stand for two processes (separate descriptors, so separate flocks)."""
    a = NodeBudget(tmp_path, Rate(5.0), 2)
    b = NodeBudget(tmp_path, Rate(5.0), 2)
    try:
        slots = [a.try_slot(), b.try_slot()]
        assert sorted(s for s in slots if s is not None) == [0, 1]
        assert a.try_slot() is None and b.try_slot() is None
        assert read_node_stats(tmp_path, 2).in_flight == 2
        a.release(slots[0] or 0)
        assert b.try_slot() == slots[0]
        waits = [a.reserve(), b.reserve(), a.reserve(), b.reserve(), a.reserve(), b.reserve()]
        assert waits[:5] == [0.0] * 5 and waits[5] > 0.1  # one bucket between them
    finally:
        a.close()
        b.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: it is about what root leaves behind")
def test_root_leaves_the_lock_files_to_the_state_dirs_owner(tmp_path: Path) -> None:
    """`sudo smt-watch post` in the service's state dir: the limit's files it creates are the service
    user's, so the service can still lock them (it would otherwise limit each process alone, and warn)."""
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, 65534, 65534)
    NodeBudget(state / "limits", Rate(5.0), 2)
    owners = {(p.stat().st_uid, p.stat().st_gid) for p in [state / "limits", *(state / "limits").iterdir()]}
    assert owners == {(65534, 65534)}, owners


def test_limiter_off_waits_for_nothing(tmp_path: Path) -> None:
    settings = load_settings({"SMT_LOCAL_DIR": str(tmp_path), "SMT_STATE_DIR": str(tmp_path / "s"),
                              "SMT_MAX_REQUESTS_PER_SECOND": "0", "SMT_MAX_IN_FLIGHT": "0"})
    limiter = Limiter(settings, None)
    assert limiter.off
    with limiter.request() as waited:
        assert waited == 0.0
    assert not (tmp_path / "s" / "limits").exists()
    assert describe(settings).startswith("off")


def test_defaults_are_on() -> None:
    settings = load_settings({"SMT_LOCAL_DIR": "/tmp", "SMT_STATE_DIR": "/tmp/x"})
    assert settings.max_requests_per_second == 10.0 and settings.max_in_flight == 2
    assert describe(settings) == "10 request(s)/s, 2 in flight, per node"


def test_doctor_prints_the_effective_limits(run_cli: object) -> None:
    env = {"SMT_MAX_REQUESTS_PER_SECOND": "10", "SMT_MAX_IN_FLIGHT": "2", "INTELLIWATT_BASE_URL": "http://x.test",
           "ADMIN_TOKEN": ADMIN_TOKEN}
    done = run_cli("doctor", "--offline", env=env)  # type: ignore[operator]
    assert "ok    outbound limit: 10 request(s)/s, 2 in flight, per node" in done.stdout, done.stdout
    done = run_cli("doctor", "--offline", env={**env, "SMT_MAX_REQUESTS_PER_SECOND": "0", "SMT_MAX_IN_FLIGHT": "0"})  # type: ignore[operator]
    assert "outbound limit: off" in done.stdout, done.stdout


def test_a_bad_limit_is_one_line_and_exit_2(run_cli: object) -> None:
    done = run_cli("watch", env={"SMT_MAX_IN_FLIGHT": "-1"})  # type: ignore[operator]
    assert done.returncode == 2, done.stderr
    assert "SMT_MAX_IN_FLIGHT must be an integer" in done.stderr and "Traceback" not in done.stderr


# --- a real app on loopback that counts -------------------------------------------------------------------


class CountingApp:
    """A stand-in for IntelliWatt's raw-upload route: answers ``{"ok": true}`` after :data:`HOLD_SECONDS`,
    and records each request's arrival time, its (sha256, part) and the most requests in progress at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.arrivals: list[float] = []
        self.parts: list[tuple[str, str]] = []  # (Idempotency-Key, the chunk's name: <file>.partN-of-M)
        self.current = 0
        self.most = 0
        app = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                with app.lock:
                    app.arrivals.append(time.monotonic())
                    app.current += 1
                    app.most = max(app.most, app.current)
                try:
                    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                    time.sleep(HOLD_SECONDS)  # the app's work (the server's side, not a test synchronisation)
                    with app.lock:
                        app.parts.append((self.headers["Idempotency-Key"], body["filename"]))
                finally:
                    with app.lock:
                        app.current -= 1
                out = b'{"ok": true}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def count(self) -> int:
        with self.lock:
            return len(self.parts)

    def most_in_window(self, window: float) -> int:
        """The most arrivals in any ``window`` seconds (each window starting at an arrival)."""
        with self.lock:
            times = sorted(self.arrivals)
        best = 0
        j = 0
        for i, t in enumerate(times):
            while j < len(times) and times[j] < t + window:
                j += 1
            best = max(best, j - i)
        return best


@pytest.fixture
def app() -> Iterator[CountingApp]:
    a = CountingApp()
    thread = threading.Thread(target=a.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield a
    finally:
        a.server.shutdown()
        a.server.server_close()



def node_env(tmp_path: Path, name: str, app: CountingApp, **extra: str) -> dict[str, str]:
    root = tmp_path / name
    (root / "inbox").mkdir(parents=True, exist_ok=True)
    return {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": SUBPROCESS_PYTHONPATH,
        "HOME": str(root / "home"),
        "SMT_LOCAL_DIR": str(root / "inbox"),
        "SMT_STATE_DIR": str(root / "state"),
        "SMT_NODE_NAME": name,
        "INTELLIWATT_BASE_URL": app.url,
        "ADMIN_TOKEN": ADMIN_TOKEN,
        "SMT_DELIVERY": "raw-upload",
        "SMT_RAW_LINES_PER_CHUNK": "4",
        "SMT_SETTLE_SECONDS": "0.1",
        "SMT_RETRY_BACKOFF_SECONDS": "0.05",
        "SMT_HTTP_TIMEOUT": "10",
        "SMT_WORKERS": "4",
        **extra,
    }


def backlog(env: dict[str, str], count: int, start: int = 0) -> None:
    for i in range(start, start + count):  # 8 rows: with SMT_RAW_LINES_PER_CHUNK=4, two chunks
        (Path(env["SMT_LOCAL_DIR"]) / f"f{i:04d}.csv").write_bytes(smt_csv(i, rows=8))


@contextmanager
def watching(env: dict[str, str]) -> Iterator[WatchProc]:
    proc = WatchProc(env, Path(env["SMT_STATE_DIR"]).parent / "watch.log")
    try:
        proc.wait_ready(60)
        yield proc
    finally:
        proc.ensure_dead()


def stop(proc: WatchProc, within: float = 30) -> None:
    """SIGTERM, and the exit code 0 within ``within`` seconds (the limiter's waits must not hold it up)."""
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.proc.wait(within) == 0, proc.text()


# --- per node ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_backlog_stays_within_rate_and_in_flight(tmp_path: Path, app: CountingApp, mode: str,
                                                 unused_port: int) -> None:
    """5 requests/s and 2 in flight hold for the node: 4 worker threads, or 4 worker processes sharing
    the files under the state dir. Fails without the limiter: 4 workers put 4 requests in flight and
    ~25 a second."""
    files = 12
    env = node_env(tmp_path, "n1", app, SMT_MAX_REQUESTS_PER_SECOND="5", SMT_MAX_IN_FLIGHT="2",
                   SMT_WORKER_MODE=mode, SMT_METRICS_PORT=str(unused_port))
    backlog(env, files)
    with watching(env) as proc:
        wait_for(lambda: app.count() >= 2 * files, 60, "every chunk delivered")
        metrics = httpx.get(f"http://127.0.0.1:{unused_port}/metrics", timeout=10).text
        stop(proc)
    throttled = re.search(r"^smt_watch_outbound_throttled_requests_total (\S+)$", metrics, re.M)
    assert throttled and float(throttled.group(1)) >= 5, metrics  # node-wide: worker processes count too
    assert re.search(r"^smt_watch_outbound_in_flight [0-2]\.0$", metrics, re.M), metrics
    log = proc.text()
    assert app.most <= 2, f"{app.most} requests in flight at once"
    # burst 5 + 5/s: at most 5 + 10 = 15 arrivals in any 2 s; +2 for arrival jitter on a loaded machine
    assert app.most_in_window(2.0) <= 17, app.most_in_window(2.0)
    span = max(app.arrivals) - min(app.arrivals)
    assert span >= (2 * files - 5) / 5 * 0.75, f"{2 * files} requests in {span:.1f} s"
    assert log.count("Outbound limit: 5 request(s)/s, 2 in flight, per node; backlog of") == 1, log  # per node
    rows = ledger_rows_cli(env)
    assert len(rows) == files and all(r["state"] == "sent" for r in rows)
    assert all(r["attempts"] == 2 for r in rows), "a wait for the limit counted as an attempt (2 chunks: 2)"
    assert len(set(app.parts)) == 2 * files  # every chunk, each once


def test_zero_turns_the_limits_off(tmp_path: Path, app: CountingApp) -> None:
    files = 12
    env = node_env(tmp_path, "n1", app, SMT_MAX_REQUESTS_PER_SECOND="0", SMT_MAX_IN_FLIGHT="0")
    backlog(env, files)
    with watching(env) as proc:
        wait_for(lambda: app.count() >= 2 * files, 60, "every chunk delivered")
        stop(proc)
    assert app.most > 2, "4 workers with no in-flight limit never overlapped"
    assert "Outbound limit" not in proc.text()
    assert not (Path(env["SMT_STATE_DIR"]) / "limits").exists()


def test_sigterm_while_throttled_exits_promptly_and_loses_nothing(tmp_path: Path, app: CountingApp) -> None:
    """One request every 2 s: workers wait on the limiter when SIGTERM comes. Their waits end at once
    (nothing sent, the row back to ``pending``, no attempt counted), the stop does not wait out the backlog
    (20 s of grace would allow it to), and the next start delivers the rest."""
    files = 8
    env = node_env(tmp_path, "n1", app, SMT_MAX_REQUESTS_PER_SECOND="0.5", SMT_MAX_IN_FLIGHT="1",
                   SMT_STOP_GRACE_SECONDS="20")
    backlog(env, files)
    with watching(env) as proc:
        wait_for(lambda: app.count() >= 2, 30, "the first requests")
        started = time.monotonic()
        stop(proc, within=25)
        took = time.monotonic() - started
    assert took < 10, f"stop took {took:.1f} s: it waited out the backlog"
    assert app.count() < 2 * files
    assert "waited for the outbound limit and was not sent" in proc.text()
    rows = ledger_rows_cli(env)
    assert all(r["state"] in ("sent", "pending") for r in rows), rows
    env["SMT_MAX_REQUESTS_PER_SECOND"] = "0"
    with watching(env) as proc:
        wait_for(lambda: [r["state"] for r in ledger_rows_cli(env)] == ["sent"] * files, 60, "the rest delivered")
        stop(proc)
    assert len(set(app.parts)) == 2 * files  # every chunk of every file


# --- per fleet (PostgreSQL) -------------------------------------------------------------------------------


def test_two_nodes_on_one_postgres_ledger_share_the_budget(tmp_path: Path, app: CountingApp, pg_url: str) -> None:
    """Two ``watch`` processes, 4 workers each, SMT_MAX_IN_FLIGHT=2: at most 2 requests out across both
    (per node it would be 4)."""
    limits = {"SMT_MAX_REQUESTS_PER_SECOND": "50", "SMT_MAX_IN_FLIGHT": "2", "SMT_LEDGER_URL": pg_url}
    a = node_env(tmp_path, "a", app, **limits)
    b = node_env(tmp_path, "b", app, **limits)
    backlog(a, 10, start=0)
    backlog(b, 10, start=100)
    with watching(a) as pa, watching(b) as pb:
        wait_for(lambda: app.count() >= 40, 90, "every chunk from both nodes")
        stop(pa)
        stop(pb)
    assert app.most <= 2, f"{app.most} requests in flight across the fleet"
    assert "unreachable" not in pa.text() + pb.text()  # the fleet budget held throughout, no fallback
    # the throttling line, when a node waited a whole second (not guaranteed on a fast run), names the fleet
    throttled = [x for x in (pa.text() + pb.text()).splitlines() if "Outbound limit:" in x and "backlog" in x]
    assert all("per fleet" in x for x in throttled), throttled
    assert len(set(app.parts)) == 40


def test_postgres_stopped_mid_drain_falls_back_and_loses_nothing(
    tmp_path: Path, app: CountingApp, pg_url: str, pg_cluster: PgCluster
) -> None:
    """PostgreSQL stops while a file of many chunks is being sent, and starts again. The limit's session
    died with the server: the first request that asks it falls back to the node's budget (said once; the
    delivery does not wait), the fleet budget is asked again 5 s later and used (said once), and every
    chunk of every file is delivered.

    Requests must still be going out when the fleet is asked again: files keep arriving (two chunks each,
    one more whenever no more than two files' chunks are left to send) until the log says it is reachable
    again. The drain lasts as long as the outage and the retry need, however slow PostgreSQL is to start,
    and not ~10 s beyond (a fixed 75-chunk file did, to leave room for a slow start)."""
    env = node_env(tmp_path, "a", app, SMT_MAX_REQUESTS_PER_SECOND="5", SMT_MAX_IN_FLIGHT="2",
                   SMT_LEDGER_URL=pg_url, SMT_WORKERS="2")
    chunks = 20  # ~4 s of requests at 5/s: still being sent when PostgreSQL stops (after 8 requests)
    (Path(env["SMT_LOCAL_DIR"]) / "big.csv").write_bytes(smt_csv(1, rows=4 * chunks))
    backlog(env, 4, start=10)
    small = 4  # two-chunk files written so far

    def keep_busy() -> None:
        """One more two-chunk file when at most two files' chunks are left (a wait condition's side effect:
        the drain must outlast the fleet's retry, which is what the waits below are for)."""
        nonlocal small
        if len(set(app.parts)) >= chunks + 2 * small - 4:
            backlog(env, 1, start=10 + small)
            small += 1

    with restarted_at_the_end(pg_cluster), watching(env) as proc:
        wait_for(lambda: app.count() >= 8, 60, "the drain under way")
        pg_cluster.stop()
        # the ledger's or the limit's "unreachable" line: PostgreSQL is down for watch too
        wait_for(lambda: keep_busy() or "unreachable" in proc.text(), 60, "watch to notice the outage")
        pg_cluster.start()
        wait_for(lambda: keep_busy() or "fleet budget in PostgreSQL is reachable again" in proc.text(), 120,
                 "the fleet budget again")
        wait_for(lambda: len(set(app.parts)) == chunks + 2 * small, 120, "every chunk of every file")
        wait_for(lambda: [r["state"] for r in ledger_rows_cli(env)] == ["sent"] * (1 + small), 120, "every row sent")
        stop(proc)
    log = proc.text()
    assert log.count("Outbound limit: the fleet budget in PostgreSQL is unreachable") == 1, log
    assert log.count("Outbound limit: the fleet budget in PostgreSQL is reachable again") == 1, log
    assert log.index("is unreachable") < log.index("is reachable again")
    assert len({name.partition(".part")[0] for _, name in app.parts}) == 1 + small


def test_fleet_budget_shares_slots_and_tokens_between_sessions(pg_url: str) -> None:
    """Two budgets = two nodes' sessions on one database: slots are advisory locks, the bucket one row."""
    a = FleetBudget(pg_url, Rate(5.0), 2)
    b = FleetBudget(pg_url, Rate(5.0), 2)
    try:
        slots = [a.try_slot(), b.try_slot()]
        assert sorted(s for s in slots if s is not None) == [0, 1]
        assert a.try_slot() is None and b.try_slot() is None
        a.close()  # a node that goes away (or loses its session) frees its slot
        freed: list[int | None] = []  # the server ends the session a moment after the client closed it
        wait_for(lambda: freed.append(b.try_slot()) or freed[-1] is not None, 10, "the closed session's slot")
        assert freed[-1] == slots[0]
        a = FleetBudget(pg_url, Rate(5.0), 2)
        started = time.monotonic()
        waits = [a.reserve(), b.reserve(), a.reserve(), b.reserve(), a.reserve(), b.reserve(), a.reserve()]
        took = time.monotonic() - started  # tokens come back meanwhile (5 a second): a loaded machine took 0.1 s
        assert waits[:5] == [0.0] * 5, waits
        # by the server's clock, one bucket: the 6th and 7th wait for the tokens not yet back
        assert 0.2 - took - 0.005 <= waits[5] <= 0.3 and 0.4 - took - 0.005 <= waits[6] <= 0.5, (waits, took)
    finally:
        a.close()
        b.close()


class FlakyFleet(LocalBudget):
    """A fleet budget whose database is down while ``down`` is set. A fake on purpose: it pins the order of
    fallback and recovery (and their log lines) with an injected clock; the real PostgreSQL outage is
    test_postgres_stopped_mid_drain_falls_back_and_loses_nothing."""

    where = "fleet"

    def __init__(self) -> None:
        super().__init__(None, 1)
        self.down = False
        self.asked = 0

    def try_slot(self) -> int | None:
        self.asked += 1
        if self.down:
            raise LedgerUnavailable("PostgreSQL: connection refused")
        return super().try_slot()


def test_fleet_outage_falls_back_to_the_node_once_and_comes_back_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = load_settings({"SMT_LOCAL_DIR": str(tmp_path), "SMT_STATE_DIR": str(tmp_path),
                              "SMT_MAX_REQUESTS_PER_SECOND": "0", "SMT_MAX_IN_FLIGHT": "1"})
    clock = FakeClock()
    fleet, node = FlakyFleet(), LocalBudget(None, 1)
    limiter = Limiter(settings, node, fleet, clock=clock)
    caplog.set_level(logging.WARNING, "smt_watch.limits")
    fleet.down = True
    for _ in range(3):
        with limiter.request():  # never waits on the unreachable fleet: the node's slot is taken
            assert node.try_slot() is None
    assert fleet.asked == 1  # not asked again before FLEET_RETRY_SECONDS
    clock.now += FLEET_RETRY_SECONDS
    with limiter.request():
        assert node.try_slot() is None
    assert fleet.asked == 2  # asked again, still down: no second line
    fleet.down = False
    clock.now += FLEET_RETRY_SECONDS
    with limiter.request():
        assert node.try_slot() is not None  # the fleet's slot now, not the node's
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "unreachable" in lines[0] and "reachable again" in lines[1], lines
