"""Several droplets on one PostgreSQL ledger: real ``watch``, ``serve`` and ``sync`` processes, one per node.

Each "node" is a set of smt-watch processes with an ``SMT_NODE_NAME``, ``SMT_LOCAL_DIR`` and ``SMT_STATE_DIR``
of its own, all pointed (``SMT_LEDGER_URL``) at one fresh database of the session's throwaway cluster
(``pg_url``). The receiver is the reference receiver on loopback (it records every request with its
``Idempotency-Key`` and status), the SFTP server is tests/sftp_server.py's asyncssh server (it counts every
byte it serves). What is proven here is what the README's "More than one droplet" promises:

- the same bytes in two nodes' inboxes are delivered once (one claim across nodes);
- one upload quota per account across two ``serve`` nodes;
- one ``sync`` pass at a time across nodes, and no remote file fetched twice;
- a node killed mid-delivery: another node holding the bytes takes the row over once the lease expired,
  and not before;
- PostgreSQL stopped and restarted under a running ``watch``: everything delivered, nothing marked sent
  without a 2xx, duplicates bounded by the workers in flight, "unreachable" logged once;
- ``serve`` while PostgreSQL is down: 503 with ``Retry-After`` and nothing kept; accepting again after.

Every wait is a condition with a deadline; the one fixed pause (the outage's length) is named and explained.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from faults.support import WatchProc, assert_clean, ledger_rows_cli, sha
from pgcluster import ADMIN, ADMIN_PASSWORD, PgCluster
from sftp_server import SftpTestServer, sftp_env
from test_server_process import Serve, free_ports

from conftest import SMT_WATCH, SUBPROCESS_PYTHONPATH, UPLOAD_TOKEN, wait_for
from smt_watch.cli import SERVE_LEDGER_WAIT
from smt_watch.reference.receiver import Fault, ReceiverHandle, running_receiver

LEASE = 3.0  # SMT_LEDGER_LEASE_SECONDS: short, so a take-over after a kill -9 comes quickly
PG_PASSWORD_MARK = "pg-pw-"  # part of the password in pg_url: no output may show it

CUSTOMER = {"x-smt-upload-role": "customer"}


# --- nodes -----------------------------------------------------------------------------------------------


def node_env(tmp_path: Path, name: str, pg_url: str, **extra: str) -> dict[str, str]:
    """The environment of every process of node ``name``: its own inbox and state directory, the shared
    ledger."""
    root = tmp_path / name
    inbox = root / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    return {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": SUBPROCESS_PYTHONPATH,
        "HOME": str(root / "home"),
        "SMT_LOCAL_DIR": str(inbox),
        "SMT_STATE_DIR": str(root / "state"),
        "SMT_LEDGER_URL": pg_url,
        "SMT_NODE_NAME": name,
        "SMT_LEDGER_LEASE_SECONDS": str(LEASE),
        "SMT_RETRY_BACKOFF_SECONDS": "0.05",
        "SMT_SETTLE_SECONDS": "0.1",
        "SMT_HTTP_TIMEOUT": "10",
        "SMT_MAX_REQUESTS_PER_SECOND": "0",  # the outbound limit is tests/test_limits.py's subject
        "SMT_MAX_IN_FLIGHT": "0",
        **extra,
    }


def delivering_to(receiver: ReceiverHandle) -> dict[str, str]:
    return {"SMT_UPLOAD_URL": f"{receiver.url}/upload", "SMT_UPLOAD_TOKEN": UPLOAD_TOKEN}


@contextmanager
def watch_nodes(*envs: dict[str, str]) -> Iterator[list[WatchProc]]:
    """One ``watch`` process per environment, all started before any is waited on; killed on exit."""
    procs: list[WatchProc] = []
    try:
        for env in envs:
            procs.append(WatchProc(env, Path(env["SMT_STATE_DIR"]).parent / "watch.log"))
        for p in procs:
            p.wait_ready(60)
        yield procs
    finally:
        for p in procs:
            p.ensure_dead()


def inbox(env: dict[str, str]) -> Path:
    return Path(env["SMT_LOCAL_DIR"])


def visible_files(env: dict[str, str]) -> list[Path]:
    """Regular files in the node's inbox with no hidden path part: what ``watch`` would pick up."""
    root = inbox(env)
    return sorted(p for p in root.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def smt_csv(i: int, rows: int = 4) -> bytes:
    """A small SMT interval CSV whose bytes are distinct for every ``i`` (the ESIID carries it)."""
    lines = ["ESIID,USAGE_DATE,REVISION_DATE,USAGE_START_TIME,USAGE_END_TIME,USAGE_KWH,ESTIMATED_ACTUAL,"
             "CONSUMPTION_SURPLUSGENERATION"]
    for r in range(rows):
        h, m = divmod(r * 15, 60)
        h2, m2 = divmod(r * 15 + 15, 60)
        lines.append(f"'1044372{i:010d},01/01/2026,01/02/2026,{h:02d}:{m:02d},{h2:02d}:{m2:02d},"
                     f"{r / 100:.3f},A,Consumption")
    return ("\n".join(lines) + "\n").encode()


def drop_in(env: dict[str, str], name: str, data: bytes) -> Path:
    """Write ``data`` beside the inbox and rename it in: the watcher sees a whole file at once."""
    staging = Path(env["SMT_STATE_DIR"]).parent / "staging"
    staging.mkdir(exist_ok=True)
    tmp = staging / name
    tmp.write_bytes(data)
    dest = inbox(env) / name
    os.replace(tmp, dest)
    return dest


# --- the ledger, read straight from PostgreSQL ----------------------------------------------------------


def pg_rows(pg_url: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(pg_url, connect_timeout=5, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def pg_answer(conn: psycopg.Connection[Any], sql: str, params: Any = None) -> Any:
    """The first column of the first row of ``sql`` on an open connection (a poll that reuses one)."""
    row = conn.execute(sql, params).fetchone()
    assert row is not None
    return row[0]


def pg_states(pg_url: str) -> dict[str, str]:
    """sha256 -> state of every row (empty until a node has created the schema's tables)."""
    try:
        return {str(s): str(st) for s, st in pg_rows(pg_url, "SELECT sha256, state FROM smt_watch.files")}
    except psycopg.errors.UndefinedTable:
        return {}


def all_sent(pg_url: str, count: int) -> bool:
    """The ledger holds ``count`` rows and every one is ``sent`` (one query, one connection)."""
    states = pg_states(pg_url)
    return len(states) == count and set(states.values()) == {"sent"}


def pg_running(cluster: PgCluster) -> bool:
    try:
        pg_rows(cluster.url("postgres", ADMIN, ADMIN_PASSWORD), "SELECT 1")
    except psycopg.OperationalError:
        return False
    return True


# --- the receiver's view --------------------------------------------------------------------------------


def ok_keys(receiver: ReceiverHandle) -> Counter[str]:
    """Idempotency-Key -> how many upload requests with it were answered 2xx."""
    return Counter(r.headers.get("idempotency-key", "") for r in list(receiver.state.requests)
                   if r.path == "/upload" and r.status is not None and 200 <= r.status < 300)


# --- 1. the same bytes on two nodes ----------------------------------------------------------------------


def looked_at_all(proc: WatchProc, count: int) -> bool:
    """Every file of the node's inbox delivered by it or skipped as already sent (one line each)."""
    text = proc.text()
    return text.count("Delivered ") + text.count("Skipping ") >= count


def test_same_bytes_in_two_inboxes_are_delivered_once(tmp_path: Path, pg_url: str) -> None:
    """Two ``watch`` nodes, the same eight files dropped into both inboxes at once: the receiver is asked
    for each content exactly once, and both nodes' ``ledger list`` say every one is sent."""
    files = {f"m{i}.csv": smt_csv(i) for i in range(8)}
    expected = {sha(d) for d in files.values()}
    with running_receiver(tmp_path / "received", upload_token=UPLOAD_TOKEN) as receiver:
        a = node_env(tmp_path, "node-a", pg_url, **delivering_to(receiver))
        b = node_env(tmp_path, "node-b", pg_url, **delivering_to(receiver))
        with watch_nodes(a, b) as procs:
            for name, data in files.items():
                drop_in(a, name, data)
                drop_in(b, name, data)
            # PostgreSQL is asked once the receiver has every content (a new connection per poll took CPU
            # from the two nodes it waits for).
            wait_for(lambda: expected <= set(ok_keys(receiver))
                     and set(pg_states(pg_url).items()) == {(s, "sent") for s in expected}, 60,
                     "every content to be sent")
            # Let the other node finish looking at its copies (each gives a 'duplicate'), then no more requests.
            for p in procs:
                wait_for(partial(looked_at_all, p, len(files)), 60, f"{p.env['SMT_NODE_NAME']} to look at its files")
            logs = [p.text() for p in procs]
        assert ok_keys(receiver) == Counter({s: 1 for s in expected}), "some content was sent twice, or never"
        assert len(receiver.state.requests) == len(files)
        assert {r["sha256"] for r in receiver.stored()} == expected
    assert sum(text.count("Delivered ") for text in logs) == len(files)  # one node or the other, once
    for env in (a, b):
        rows = ledger_rows_cli(env)
        assert {(r["sha256"], r["state"]) for r in rows} == {(s, "sent") for s in expected}, env["SMT_NODE_NAME"]
        assert len(visible_files(env)) == len(files)  # SMT_AFTER_SEND=keep: nothing moved or lost
    for text in logs:
        assert_clean(text, "watch log")
        assert PG_PASSWORD_MARK not in text


# --- 2. one quota across two serve nodes ------------------------------------------------------------------


def test_one_customer_quota_across_two_serve_nodes(tmp_path: Path, pg_url: str) -> None:
    """12 uploads at once for one customer account, spread over two ``serve`` nodes, limit 2: exactly two
    are accepted, ten refused with 429, and the two nodes' inboxes hold exactly two files between them."""
    ports = free_ports(2)
    envs = [node_env(tmp_path, f"serve-{i}", pg_url, SMT_UPLOAD_TOKEN=UPLOAD_TOKEN, SMT_UPLOAD_CUSTOMER_LIMIT="2")
            for i in range(2)]
    with ExitStack() as stack:
        servers = []
        for env, port in zip(envs, ports, strict=True):
            s = Serve(env, Path(env["SMT_STATE_DIR"]).parent / "serve.log", port, "--port", str(port))
            stack.callback(s.kill)
            servers.append(s)
        for s in servers:
            s.wait_ready()
        start = threading.Barrier(12)

        def one(i: int) -> httpx.Response:
            url = servers[i % 2].url
            headers = {"x-smt-upload-token": UPLOAD_TOKEN, **CUSTOMER, "x-smt-upload-account-key": "HOME-42"}
            start.wait(30)
            return httpx.post(f"{url}/upload", files={"file": (f"u{i}.csv", smt_csv(100 + i), "text/csv")},
                              headers=headers, timeout=30, trust_env=False)

        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(one, range(12)))
        logs = [s.text() for s in servers]
    statuses = Counter(r.status_code for r in answers)
    assert statuses == Counter({202: 2, 429: 10}), [(r.status_code, r.text[:200]) for r in answers]
    for r in answers:
        if r.status_code == 429:
            body = r.json()
            assert (body["error"], body["accountKey"], body["limit"], body["remaining"]) == (
                "rate_limited", "HOME-42", 2, 0)
            assert int(r.headers["retry-after"]) > 0
    stored = [p for env in envs for p in visible_files(env)]
    assert len(stored) == 2, stored
    accepted = {r.json()["file"]["sha256"] for r in answers if r.status_code == 202}
    assert {sha(p.read_bytes()) for p in stored} == accepted
    assert [p for env in envs for p in inbox(env).rglob(".upload-*")] == []  # no temp left behind
    assert pg_rows(pg_url, "SELECT count(*) FROM smt_watch.uploads WHERE account = 'HOME-42'") == [(2,)]
    for text in logs:
        assert_clean(text, "serve log")
        assert PG_PASSWORD_MARK not in text


# --- 3. one sync pass across nodes -------------------------------------------------------------------------


def start_sync(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*SMT_WATCH, "sync", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=Path(env["SMT_STATE_DIR"]).parent)


def advisory_waiters(cluster: PgCluster, database: str) -> int:
    """Sessions queued on an advisory lock (``sync --wait`` behind a running pass)."""
    out = cluster.admin_sql("SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database"
                            f" WHERE l.locktype = 'advisory' AND NOT l.granted AND d.datname = '{database}'")
    return int(out.strip() or 0)


def test_two_sync_passes_at_once_on_two_nodes_fetch_each_file_once(
    tmp_path: Path, pg_url: str, pg_cluster: PgCluster, sftp: SftpTestServer
) -> None:
    """``sync`` started at the same moment on two nodes: one pass runs, the other exits 0 saying a pass is
    running; a ``sync --wait`` started meanwhile waits for the lock, then finds nothing new. The server served
    every remote file once, in one session, and each file is in exactly one node's inbox."""
    remote = {f"adhoc/f{i}.csv": smt_csv(200 + i, rows=200) for i in range(5)}
    for rel, data in remote.items():
        sftp.put(rel, data)
    envs = [node_env(tmp_path, f"sync-{i}", pg_url, **sftp_env(sftp, tmp_path / f"kh{i}", timeout=60))
            for i in range(2)]
    sftp.stall()  # the pass that gets the lock holds it until release(): the other one surely overlaps it
    procs = [start_sync(env) for env in envs]
    waiter: subprocess.Popen[str] | None = None
    try:
        wait_for(lambda: sftp.read_blocked.is_set() and any(p.poll() is not None for p in procs), 60,
                 "one pass to transfer and the other to give up")
        loser = next(i for i, p in enumerate(procs) if p.poll() is not None)
        winner = 1 - loser
        out, err = procs[loser].communicate(timeout=30)
        assert procs[loser].returncode == 0, err
        assert "another sync is running" in out + err
        assert procs[winner].poll() is None, "the pass holding the lock ended while its reads were stalled"
        waiter = start_sync(envs[loser], "--wait")
        database = pg_url.rsplit("/", 1)[1]
        wait_for(lambda: advisory_waiters(pg_cluster, database) == 1 or waiter.poll() is not None, 60,
                 "sync --wait to queue on the lock")
        assert waiter.poll() is None, "sync --wait did not wait"
        sftp.release()
        won_out, won_err = procs[winner].communicate(timeout=60)
        wait_out, wait_err = waiter.communicate(timeout=60)
    finally:
        sftp.release()
        for p in [*procs, *([waiter] if waiter else [])]:
            if p.poll() is None:
                p.kill()
                p.communicate(timeout=10)
    assert procs[winner].returncode == 0, won_err
    assert re.fullmatch(rf"sync: {len(remote)} new \(.*\), 0 already fetched, 0 failed",
                        won_out.strip().splitlines()[-1]), won_out
    assert waiter.returncode == 0, wait_err
    assert re.fullmatch(rf"sync: 0 new \(.*\), {len(remote)} already fetched, 0 failed",
                        wait_out.strip().splitlines()[-1]), wait_out
    # Each remote file was served once, whole, in one session.
    assert sftp.read_ranges() == {f"/{rel}": [(0, len(data))] for rel, data in remote.items()}
    assert sftp.bytes_served() == {f"/{rel}": len(data) for rel, data in remote.items()}
    for rel in remote:
        assert len({r.session for r in sftp.reads if r.path == f"/{rel}"}) == 1
    won = {p.relative_to(inbox(envs[winner])).as_posix(): p.read_bytes() for p in visible_files(envs[winner])}
    assert won == remote
    assert visible_files(envs[loser]) == []
    for text in (won_err, wait_err, err):
        assert_clean(text, "sync output")
        assert PG_PASSWORD_MARK not in text


# --- 4. a node killed mid-delivery ---------------------------------------------------------------------------


@contextmanager
def _released_at_the_end(event: threading.Event) -> Iterator[None]:
    try:
        yield
    finally:
        event.set()


def test_node_killed_mid_delivery_is_taken_over_after_the_lease(tmp_path: Path, pg_url: str) -> None:
    """Node A is sending a file to a receiver that holds the request; node B holds the same bytes. While A
    lives its lease is renewed and B waits, past the first lease's end; A is killed with SIGKILL; B delivers
    the bytes once the lease expired, not before."""
    data = smt_csv(300)
    key = sha(data)
    # A's request: held open until the end, A never hears back. Released (answered 503, not a 2xx) before the
    # receiver stops, so its shutdown does not wait out its 5 s grace for a request held 120 s.
    held = threading.Event()
    with running_receiver(tmp_path / "received", upload_token=UPLOAD_TOKEN) as receiver, \
            _released_at_the_end(held):
        receiver.state.faults.append(Fault(status=503, release=held))
        a = node_env(tmp_path, "node-a", pg_url, **delivering_to(receiver), SMT_HTTP_TIMEOUT="300",
                     SMT_WORKERS="1")
        b = node_env(tmp_path, "node-b", pg_url, **delivering_to(receiver), SMT_WORKERS="1")
        with watch_nodes(a, b) as (proc_a, proc_b):
            drop_in(a, "x.csv", data)
            wait_for(lambda: not receiver.state.faults, 30, "node A's request to reach the receiver")
            (claimed_by, first_lease), = pg_rows(
                pg_url, "SELECT claimed_by, lease_until FROM smt_watch.files WHERE sha256 = %s", (key,))
            assert claimed_by.startswith("node-a:")
            drop_in(b, "x.csv", data)
            # Past the end of A's first lease, A still holds the row (its lease was renewed) and B sent nothing.
            with psycopg.connect(pg_url, connect_timeout=5, autocommit=True) as conn:  # one, not one per poll
                over = partial(pg_answer, conn, "SELECT now() > %s + interval '1 second'", (first_lease,))
                wait_for(over, 30, "the first lease to be over")
            assert pg_rows(pg_url, "SELECT state, claimed_by, lease_until > now() FROM smt_watch.files"
                           " WHERE sha256 = %s", (key,)) == [("sending", claimed_by, True)]
            assert "x.csv" not in proc_b.text()
            proc_a.kill9()
            killed = time.monotonic()
            (left,) = pg_rows(pg_url, "SELECT extract(epoch FROM lease_until - now())::float FROM smt_watch.files"
                              " WHERE sha256 = %s", (key,))[0]
            assert left <= LEASE + 0.5  # what A's last renewal left (<= 0 only if A's renewer was starved)
            wait_for(lambda: ok_keys(receiver)[key] == 1, 60, "node B to deliver the bytes")
            taken_over = next(r for r in list(receiver.state.requests)
                              if r.status is not None and 200 <= r.status < 300 and r.sha256 == key)
            # The receiver answered before B recorded it: wait for B's own word and its ledger row.
            wait_for(lambda: "Delivered x.csv" in proc_b.text(), 30, "node B to log the delivery")
            log_b = proc_b.text()
    # B's request came after the lease A left behind had expired (the receiver's clock is this process's).
    assert taken_over.arrived >= killed + left - 0.05, (taken_over.arrived - killed, left)
    assert pg_rows(pg_url, "SELECT state, node, claimed_by FROM smt_watch.files WHERE sha256 = %s",
                   (key,)) == [("sent", "node-b", None)]
    assert receiver.read(key) == data
    assert_clean(log_b, "node B's log")


# --- 5. PostgreSQL stopped and restarted under a drain --------------------------------------------------------

# Enough that most are still waiting (queued, settling, or in a worker) when the database goes away after a
# fifth were delivered, and that "once per outage, not once per file" has many files to be said for. 1,000
# proved nothing more and, at the 2-4 files/s of a loaded 2-core machine, outlasted the 240 s deadline.
DRAIN_FILES = 200
DRAIN_WORKERS = 2
# The drain's ledger gives up on a lost server after this long (SMT_LEDGER_RECONNECT_SECONDS; 15 s by default):
# what is proven is what happens past the window, not its length, and the outage below waits it out.
DRAIN_RECONNECT_SECONDS = 3.0
# The outage is the behaviour under test: longer than the ledger's reconnect window, so operations give up
# with LedgerUnavailable (jobs become 'unreachable', the loop waits and rescans), not just a retried query.
OUTAGE_SECONDS = DRAIN_RECONNECT_SECONDS + 3


@contextmanager
def restarted_at_the_end(cluster: PgCluster) -> Iterator[None]:
    """The cluster is shared by the tests of this xdist worker: running again whatever happens here."""
    try:
        yield
    finally:
        if not pg_running(cluster):
            cluster.start()


@pytest.mark.timeout(420)  # its own waits (a fifth drained, the outage, 240 s to finish) exceed the default 120 s
def test_postgres_restart_during_a_watch_drain(tmp_path: Path, pg_url: str, pg_cluster: PgCluster,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Small files draining through ``watch`` when PostgreSQL stops for longer than the reconnect window,
    then starts again: every file delivered, every ``sent`` row backed by a 2xx for its key, duplicates (at
    least once) no more than the workers that were in flight, ``watch`` still running, and "unreachable"
    logged once per outage, not once per file: at most two lines (the stop, and the one short window a
    server that refuses connections while it recovers may open), each closed by "reachable again".

    Until every file has a 2xx the receiver is asked (in-process), not PostgreSQL: a new authenticated
    connection every poll (50 a second) took CPU from the drain it waits for. Its past reds were bugs: a
    claim taken just before the stop stayed held in memory (every later try BUSY, its lease renewed forever:
    test_ledger_postgres's ..._not_held_forever), and a lease renewal on a connection that died with the old
    server opened a second outage (..._is_no_outage_even_without_retry)."""
    files = {f"d{i:04d}.csv": smt_csv(1000 + i, rows=1) for i in range(DRAIN_FILES)}
    expected = {sha(d) for d in files.values()}
    with running_receiver(tmp_path / "received", upload_token=UPLOAD_TOKEN) as receiver, \
            restarted_at_the_end(pg_cluster):
        env = node_env(tmp_path, "drain", pg_url, **delivering_to(receiver), SMT_WORKERS=str(DRAIN_WORKERS),
                       SMT_LEDGER_RECONNECT_SECONDS=str(DRAIN_RECONNECT_SECONDS))
        with watch_nodes(env) as (proc,):
            for name, data in files.items():
                drop_in(env, name, data)
            wait_for(lambda: len(ok_keys(receiver)) >= DRAIN_FILES // 5, 120, "a fifth of the files delivered")
            pg_cluster.stop()
            stopped = time.monotonic()
            wait_for(lambda: "unreachable" in proc.text(), 60, "watch to notice the ledger is gone")
            during = len(ok_keys(receiver))
            time.sleep(max(0.0, stopped + OUTAGE_SECONDS - time.monotonic()))  # the outage (see OUTAGE_SECONDS)
            pg_cluster.start()
            wait_for(lambda: len(ok_keys(receiver)) == DRAIN_FILES and all_sent(pg_url, DRAIN_FILES),
                     240, "every file to be sent after the restart")
            assert proc.proc.poll() is None, "watch exited:\n" + proc.text()[-3000:]
            text = proc.text()
        keys = ok_keys(receiver)
        stored = {r["sha256"] for r in receiver.stored()}
    assert set(keys) == expected
    sent = {s for s, st in pg_states(pg_url).items() if st == "sent"}
    assert sent <= set(keys)  # nothing marked sent without a 2xx for its key
    duplicates = {k: n - 1 for k, n in keys.items() if n > 1}
    with capsys.disabled():
        print(f"\n{DRAIN_FILES} files, PostgreSQL down {OUTAGE_SECONDS:.0f}s after {during} deliveries: "
              f"{sum(duplicates.values())} duplicate deliveries {sorted(k[:12] for k in duplicates)}")
    assert sum(duplicates.values()) <= DRAIN_WORKERS, duplicates
    assert stored == expected
    # Once per outage as the clients see it, each closed by "reachable again", never once per file: the stop
    # is one outage; a server that refuses connections while it recovers may open one more short window.
    unreachable = [line for line in text.splitlines() if "unreachable" in line]
    again = [line for line in text.splitlines() if "reachable again" in line]
    assert 1 <= len(unreachable) <= 2 and len(unreachable) == len(again), (unreachable[:10], again[:10])
    # Nothing else about the outage, once per reconnection attempt or raw on stderr (psycopg_pool's warnings).
    assert not [line for line in text.splitlines() if not line.startswith("[")], text[-3000:]
    assert "reachable again" in text
    assert_clean(text, "watch log")
    assert PG_PASSWORD_MARK not in text


# --- serve while PostgreSQL is down ------------------------------------------------------------------------


def test_serve_answers_503_while_postgres_is_down_and_keeps_nothing(
    tmp_path: Path, pg_url: str, pg_cluster: PgCluster
) -> None:
    """With the ledger gone, an upload that names its account in headers and one that does not (the file is
    read before the ledger is asked) both get 503 with ``Retry-After``, and the inbox holds nothing, not even
    a temp file; after PostgreSQL is back the same upload is accepted. (The one test of serve's 503: its twin
    in test_ledger_postgres.py proved nothing this one does not.)"""
    port = free_ports(1)[0]
    env = node_env(tmp_path, "serve-down", pg_url, SMT_UPLOAD_TOKEN=UPLOAD_TOKEN)
    s = Serve(env, Path(env["SMT_STATE_DIR"]).parent / "serve.log", port, "--port", str(port))
    data = smt_csv(400, rows=2000)
    token = {"x-smt-upload-token": UPLOAD_TOKEN}

    def post(headers: dict[str, str]) -> httpx.Response:
        return httpx.post(f"{s.url}/upload", files={"file": ("late.csv", data, "text/csv")},
                          headers={**token, **headers}, timeout=60, trust_env=False)

    try:
        s.wait_ready()
        with restarted_at_the_end(pg_cluster):
            pg_cluster.stop()
            for headers in ({**CUSTOMER, "x-smt-upload-account-key": "HOME-7"}, {}):
                asked = time.monotonic()
                resp = post(headers)
                # Within serve's ledger wait, not the pool's 10 s connect timeout (as it once was).
                assert time.monotonic() - asked < SERVE_LEDGER_WAIT + 5
                assert resp.status_code == 503, resp.text
                assert resp.headers["retry-after"] == "10"
                assert resp.json()["error"] == "ledger_unavailable"
                assert list(inbox(env).rglob("*")) == []
            assert s.proc.poll() is None
            pg_cluster.start()
        # A client told 503 tries again; the first try after the restart may still find the pool's old
        # connections broken (on a loaded machine the server takes a moment to accept again).
        answers: list[httpx.Response] = []

        def answered() -> bool:
            answers.append(post({}))
            return answers[-1].status_code != 503

        wait_for(answered, timeout=60, what="an upload accepted after PostgreSQL is back")
        again = answers[-1]
        assert again.status_code == 202, again.text
        assert [sha(p.read_bytes()) for p in visible_files(env)] == [sha(data)]
        assert list(inbox(env).rglob(".upload-*")) == []
    finally:
        s.kill()
    text = s.text()
    assert_clean(text, "serve log")
    assert PG_PASSWORD_MARK not in text
    assert "postgresql://***@" in text  # the outage is logged, with the URL as it may be shown
