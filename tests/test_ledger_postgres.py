"""What only the PostgreSQL ledger does: leases across nodes, migrations under a lock, a lost server, ``serve``
and ``doctor`` with ``SMT_LEDGER_URL``, ``ledger copy`` both ways, sync's cluster-wide lock, per-node ``due``.

Every test runs against a real PostgreSQL (the session's throwaway cluster, ``tests/pgcluster.py``), a
database of its own, and real processes where the behaviour is between processes. Tests that stop the
cluster start it again in a ``finally``: it is shared by the whole session.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pgcluster import ADMIN, ADMIN_PASSWORD, PASSWORD, PgCluster, wait_until_ready

from conftest import UPLOAD_TOKEN, wait_for, watching, write_csv
from smt_watch.config import Settings, redact_url
from smt_watch.delivery import make_sink
from smt_watch.errors import LedgerUnavailable
from smt_watch.hashing import Signature
from smt_watch.ledger import Claim, SqliteLedger
from smt_watch.ledger.common import Remember
from smt_watch.ledger.postgres import LOCK_MIGRATE, SCHEMA_VERSION, PostgresDb, PostgresLedger
from smt_watch.pipeline import deliver_file

Make = Callable[..., Settings]
Run = Callable[..., subprocess.CompletedProcess[str]]

A, B, C, D, E, F = (c * 64 for c in "abcdef")
LEASE = 2.0  # seconds: short, so that an expired lease is seen within a test; renewed every 0.67 s
OUTLIVED_LEASES = 2  # how many lease lengths node A's claim must outlive through its renewer alone
RECONNECT = 1.5  # reconnect_seconds for the tests that stop the server
SLACK = 5.0  # a loaded 2-core machine: what a deadline allows beyond the time the code promises


def open_pg(url: str, node: str, **kw: Any) -> PostgresLedger:
    return PostgresLedger(url, shown_as=redact_url(url), node=node, **kw)


def claim(ledger: PostgresLedger | SqliteLedger, sha: str, path: str | None = "/in/f.csv", **kw: Any) -> Claim:
    return ledger.claim(sha, filename=Path(path or "f.csv").name, path=path, size=3, mode="multipart", **kw)


def database(url: str) -> str:
    return url.rsplit("/", 1)[1]


def waiting_on_locks(cluster: PgCluster, url: str) -> int:
    """How many sessions of ``url``'s database wait for an advisory lock right now."""
    return int(cluster.admin_sql(
        "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database"
        f" WHERE l.locktype = 'advisory' AND NOT l.granted AND d.datname = '{database(url)}'"))


# --- leases ------------------------------------------------------------------------------------------------


def test_a_foreign_claim_is_busy_while_renewed_and_taken_over_once_its_lease_expires(pg_url: str) -> None:
    """Node A's claim carries a 2 s lease that its renewer extends: node B is told BUSY for two lease lengths
    (without the renewal the lease would run out after one: outliving a second proves the renewal). Once A
    is closed without finishing, nothing renews it, and B takes the row over when the lease has expired."""
    a = open_pg(pg_url, "node-a", lease_seconds=LEASE)
    with open_pg(pg_url, "node-b", lease_seconds=LEASE) as b:
        try:
            assert claim(a, A) is Claim.CLAIMED
            row = b.get(A)
            assert row is not None and row.state == "sending" and row.claimed_by == f"node-a:{os.getpid()}"
            end = time.monotonic() + OUTLIVED_LEASES * LEASE
            tries = 0
            while time.monotonic() < end:  # the passing of time is what is tested: the renewer must keep up
                assert claim(b, A) is Claim.BUSY, f"taken over after {tries} tries while A renews its lease"
                tries += 1
                time.sleep(LEASE / 10)  # the behaviour under test: time passing while A renews its lease
            assert tries >= OUTLIVED_LEASES
        finally:
            a.close()  # stops the renewer; the row stays 'sending', claimed by node-a
        row = b.get(A)
        assert row is not None and row.state == "sending" and row.claimed_by == f"node-a:{os.getpid()}"
        wait_for(lambda: claim(b, A) is Claim.CLAIMED, 10 * LEASE + SLACK, "B to take over A's expired claim")
        row = b.get(A)
        assert row is not None and row.state == "sending" and row.claimed_by == f"node-b:{os.getpid()}"
        b.mark_sent(A, status=200, destination="http://x/upload", attempts=1)
        assert b.get(A).state == "sent"  # type: ignore[union-attr]


# --- schema ------------------------------------------------------------------------------------------------


# A node's process, as small as one can be: this file's imports (conftest's servers, the whole of
# smt_watch) cost a spawned multiprocessing child ~1.5 s of CPU before it did anything.
NODE = """
import os, sys
from smt_watch.config import redact_url
from smt_watch.ledger.postgres import PostgresLedger
url = sys.argv[1]
ledger = PostgresLedger(url, shown_as=redact_url(url), node=f"node-{os.getpid()}")
"""


def node_process(url: str, body: str) -> subprocess.Popen[str]:
    """``python -c NODE + body`` for ``url``, stdin and stdout piped (the test's way to talk to it)."""
    return subprocess.Popen([sys.executable, "-c", NODE + body, url], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)


def test_processes_opening_a_fresh_database_at_once_migrate_it_once(pg_url: str, pg_cluster: PgCluster) -> None:
    """Three processes open an empty database at once. They take turns under the migration's advisory lock:
    while the test holds that lock all three are seen waiting on it (pg_locks), and once it lets go all three
    open the ledger, each migration having run once (versions 1..N, each recorded once)."""
    n = 3
    report = "print('ok', ledger.schema_version, flush=True)\nledger.close()\n"
    with psycopg.connect(pg_cluster.url(database(pg_url), ADMIN, ADMIN_PASSWORD), autocommit=True) as admin:
        admin.execute("SELECT pg_advisory_lock(%s)", (LOCK_MIGRATE,))
        procs = [node_process(pg_url, report) for _ in range(n)]
        try:
            wait_for(lambda: waiting_on_locks(pg_cluster, pg_url) == n, 60, f"{n} processes waiting to migrate")
            assert all(p.poll() is None for p in procs)
            admin.execute("SELECT pg_advisory_unlock(%s)", (LOCK_MIGRATE,))
            results = [tuple(p.communicate(timeout=60)[0].split()) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.communicate(timeout=30)
    assert all(p.returncode == 0 for p in procs)
    assert results == [("ok", str(SCHEMA_VERSION))] * n
    versions = pg_cluster.admin_sql("SELECT version FROM smt_watch.schema_version ORDER BY version", database(pg_url))
    assert versions.split() == [str(v) for v in range(1, SCHEMA_VERSION + 1)]


# --- a lost server -------------------------------------------------------------------------------------------


def test_a_pooled_connection_that_died_with_a_restart_is_no_outage_even_without_retry(
        pg_url: str, pg_cluster: PgCluster, caplog: pytest.LogCaptureFixture) -> None:
    """After a restart the pool still holds the connection that died with the old server. A statement that
    does not wait out the reconnect window (``retry=False``: the lease renewer's) drops it and runs on a fresh
    one, and no outage is logged: once, a renewal that met it opened a second "unreachable" window."""
    db = PostgresDb(pg_url, shown_as=redact_url(pg_url), reconnect_seconds=RECONNECT, max_connections=2)
    try:
        assert db.tuples("SELECT 1") == [(1,)]  # the pool's connection, idle again
        with restarted(pg_cluster), caplog.at_level(logging.WARNING, logger="smt_watch.ledger"):
            pg_cluster.restart()
            assert db.execute("SELECT 1", retry=False) == 1
        assert [r.getMessage() for r in caplog.records if "reachable" in r.getMessage()] == []
    finally:
        db.close()


@contextlib.contextmanager
def restarted(cluster: PgCluster) -> Iterator[None]:
    """Running again at the end whatever happened (the cluster is the worker's, shared by its tests)."""
    try:
        yield
    finally:
        try:
            cluster.admin_sql("SELECT 1")
        except RuntimeError:  # the restart itself failed half-way
            cluster.start()


def test_an_unreachable_server_is_reported_within_the_reconnect_window_and_the_ledger_recovers(
        pg_url: str, pg_cluster: PgCluster, caplog: pytest.LogCaptureFixture) -> None:
    """With the server stopped each operation raises LedgerUnavailable once ``reconnect_seconds`` have passed
    (not the pool's own 10 s connect timeout), the outage is logged once for all of them, and once the server
    is back the same ledger object works again and says so."""
    ledger = open_pg(pg_url, "node-a", reconnect_seconds=RECONNECT)
    try:
        assert claim(ledger, A) is Claim.CLAIMED
        pg_cluster.stop()
        with caplog.at_level(logging.WARNING, logger="smt_watch.ledger"):
            try:
                for operation in (ledger.counts, lambda: ledger.get(A), lambda: claim(ledger, B)):
                    started = time.monotonic()
                    with pytest.raises(LedgerUnavailable, match="unreachable") as lost:
                        operation()
                    took = time.monotonic() - started
                    assert RECONNECT - 0.5 <= took < RECONNECT + SLACK, took
                    assert PASSWORD not in str(lost.value) and "postgresql://***@" in str(lost.value)
                said = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
                assert len(said) == 1, said
                assert PASSWORD not in said[0]
            finally:
                pg_cluster.start()
                wait_until_ready(pg_cluster, time.monotonic() + 30)
            assert ledger.counts()["sending"] == 1
            assert any("reachable again" in r.getMessage() for r in caplog.records), caplog.text
        assert claim(ledger, B) is Claim.CLAIMED
        ledger.mark_sent(A, status=200, destination="d", attempts=1)
        assert ledger.get(A).state == "sent"  # type: ignore[union-attr]
    finally:
        ledger.close()


# --- doctor ----------------------------------------------------------------------------------------------------


def test_doctor_checks_the_shared_ledger_and_never_shows_its_password(run_cli: Run, pg_url: str,
                                                                        pg_cluster: PgCluster) -> None:
    shown_url = f"postgresql://***@127.0.0.1:{pg_cluster.port}/{database(pg_url)}"
    good = run_cli("doctor", "--offline", env={"SMT_LEDGER_URL": pg_url, "SMT_NODE_NAME": "doctor-node"})
    out = good.stdout + good.stderr
    lines = out.splitlines()
    ledger_line = next(line for line in lines if line.split()[1:2] == ["ledger:"])
    assert ledger_line.startswith("ok ") and shown_url in ledger_line, out
    assert f"schema {SCHEMA_VERSION}" in ledger_line and "doctor-node" in ledger_line
    clock_line = next(line for line in lines if line.split()[1:2] == ["clock:"])
    assert clock_line.startswith("ok "), out
    assert PASSWORD not in out and "Traceback" not in out

    wrong_password = "wrong-pw-Zq81-secret"
    bad_url = pg_cluster.url(database(pg_url), password=wrong_password)
    bad = run_cli("doctor", "--offline", env={"SMT_LEDGER_URL": bad_url, "SMT_NODE_NAME": "doctor-node"})
    out = bad.stdout + bad.stderr
    assert bad.returncode != 0, out
    ledger_line = next(line for line in out.splitlines() if line.split()[1:2] == ["ledger:"])
    assert ledger_line.startswith("FAIL") and shown_url in ledger_line, out
    assert "password authentication failed" in ledger_line
    assert wrong_password not in out and PASSWORD not in out and "Traceback" not in out
    assert not any(line.split()[1:2] == ["clock:"] for line in out.splitlines())


# --- ledger copy ------------------------------------------------------------------------------------------------


def fill(ledger: SqliteLedger, inbox: Path) -> None:
    """Rows in every state (one with a path that is not UTF-8, one unpacked from another, one imported), upload
    counts, sync's remote files, acked chunks, meta and this node's stat cache."""
    assert claim(ledger, A, str(inbox / "sent.csv")) is Claim.CLAIMED
    ledger.mark_sent(A, status=200, destination="http://x/upload", attempts=1)
    assert claim(ledger, B, str(inbox / "later.csv")) is Claim.CLAIMED
    ledger.mark_retrying(B, status=503, error="HTTP 503", attempts=2, next_attempt_at=time.time() + 3600)
    assert claim(ledger, C, str(inbox / "bad.csv")) is Claim.CLAIMED
    ledger.mark_failed(C, status=422, error="bad csv", attempts=1)
    assert claim(ledger, D, str(inbox / "caf\udce9.csv")) is Claim.CLAIMED  # a name that is not UTF-8
    ledger.release(D, error="stopped", attempts=1)
    assert claim(ledger, E, str(inbox / "in-flight.csv"), parent=A) is Claim.CLAIMED  # left 'sending'
    assert ledger.import_hashes([(F, "old.csv")], origin="legacy") == 1
    for at in (time.time() - 3000, time.time() - 2000, time.time() - 1000):
        assert ledger.take_upload_slot("customer", "acct-1", 0.0, 10, at)
    ledger.record_fetch("/remote/one.csv", 10, 1_700_000_000, A, str(inbox / "sent.csv"))
    ledger.record_fetch("/remote/two.csv", 20, 1_700_000_100, B, str(inbox / "later.csv"))
    ledger.ack_chunk(B, 0, 3, "1" * 64)
    ledger.ack_chunk(B, 1, 3, "2" * 64)
    ledger.set_meta("copy-test", "kept")
    ledger.remember(Remember(str(inbox / "later.csv"), Signature(1, 2, 3, 4), B))


def contents(ledger: PostgresLedger | SqliteLedger, inbox: Path) -> dict[str, Any]:
    """Everything ``ledger copy`` carries besides the rows ``ledger list`` shows."""
    seen = ledger.seen(str(inbox / "later.csv"))
    return {"uploads": ledger.uploads_since("customer", "acct-1", 0.0), "remote": ledger.remote_files(),
            "chunks": ledger.acked_chunks(B, 3), "meta": ledger.meta("copy-test"),
            "seen": None if seen is None else (seen.signature, seen.sha256, seen.state)}


def test_ledger_copy_to_postgresql_and_back_is_exact_and_idempotent(run_cli: Run, make_settings: Make,
                                                                    pg_url: str, tmp_path: Path) -> None:
    settings = make_settings()
    inbox = settings.local_dir
    settings.state_dir.mkdir(parents=True)
    with SqliteLedger(settings.ledger_path) as source:  # this process holds E's claim, as a live post would
        fill(source, inbox)
        expected = contents(source, inbox)
    assert len(expected["uploads"]) == 3 and len(expected["remote"]) == 2 and len(expected["chunks"]) == 2
    listed = run_cli("ledger", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert {r["state"] for r in rows} == {"pending", "sending", "sent", "retrying", "failed"} and len(rows) == 6
    on_pg = {"SMT_LEDGER_URL": pg_url}

    for _ in range(2):  # the second copy replaces each row by itself: nothing is added twice
        copied = run_cli("ledger", "copy", "--to", pg_url)
        assert copied.returncode == 0, copied.stderr
        assert copied.stdout.startswith("copied to postgresql://***@"), copied.stdout
        assert "files 6" in copied.stdout and "uploads 3" in copied.stdout
        assert PASSWORD not in copied.stdout + copied.stderr
        assert run_cli("ledger", "list", "--json", env=on_pg).stdout == listed.stdout
        with open_pg(pg_url, settings.node_name) as target:
            assert contents(target, inbox) == expected
            assert sum(target.counts().values()) == 6

    back = tmp_path / "back" / "ledger.sqlite3"
    back.parent.mkdir()
    returned = run_cli("ledger", "copy", "--to", str(back), env=on_pg)
    assert returned.returncode == 0, returned.stderr
    assert run_cli("ledger", "list", "--json", env={"SMT_STATE_DIR": str(back.parent)}).stdout == listed.stdout
    with SqliteLedger(back) as fresh:
        assert contents(fresh, inbox) == expected

    onto_itself = run_cli("ledger", "copy", "--to", pg_url, env=on_pg)
    assert onto_itself.returncode == 2 and "is the ledger being copied" in onto_itself.stderr
    assert PASSWORD not in onto_itself.stdout + onto_itself.stderr
    assert run_cli("ledger", "copy", "--to", str(settings.ledger_path)).returncode == 2


# --- sync's lock -------------------------------------------------------------------------------------------------


def test_sync_lock_is_one_pass_across_nodes(pg_url: str, pg_cluster: PgCluster) -> None:
    """While node A's process holds sync's lock, node B's ``sync_lock(False)`` says no at once and
    ``sync_lock(True)`` waits (seen waiting in pg_locks) until A lets go, then has it."""
    holder = node_process(pg_url, "with ledger.sync_lock(False) as locked:\n"
                                  "    print('held' if locked else 'not held', flush=True)\n"
                                  "    sys.stdin.readline()\n"  # holding the lock, as a sync pass would, until told
                                  "ledger.close()\n")
    assert holder.stdin is not None and holder.stdout is not None
    try:
        assert holder.stdout.readline().strip() == "held", "node A did not take the lock"
        with open_pg(pg_url, "node-b") as b:
            with b.sync_lock(False) as locked:
                assert locked is False
            got = threading.Event()

            def wait_for_lock() -> None:
                with b.sync_lock(True) as locked:
                    assert locked
                    got.set()

            waiter = threading.Thread(target=wait_for_lock, daemon=True)
            waiter.start()
            wait_for(lambda: waiting_on_locks(pg_cluster, pg_url) == 1, 30, "B waiting for the lock")
            assert not got.is_set()
            holder.stdin.write("release\n")
            holder.stdin.flush()
            assert got.wait(30), "B did not get the lock once A released it"
            waiter.join(30)
            with b.sync_lock(False) as locked:  # and B released it in its turn
                assert locked is True
    finally:
        holder.communicate(timeout=30)  # stdin closed: A lets go, if it still held the lock
    assert holder.returncode == 0


# --- due rows are per node ---------------------------------------------------------------------------------------


def test_due_returns_only_this_nodes_rows(pg_url: str) -> None:
    with open_pg(pg_url, "node-a") as a, open_pg(pg_url, "node-b") as b:
        assert claim(a, A, "/a/pending.csv") is Claim.CLAIMED
        a.release(A, error="stopped", attempts=1)
        assert claim(a, B, "/a/retrying.csv") is Claim.CLAIMED
        a.mark_retrying(B, status=503, error="HTTP 503", attempts=1, next_attempt_at=time.time() - 1)
        assert claim(b, C, "/b/pending.csv") is Claim.CLAIMED
        b.release(C, error="stopped", attempts=1)
        now = time.time()
        assert sorted(r.sha256 for r in a.due(now)) == [A, B]
        assert [r.sha256 for r in b.due(now)] == [C]
        assert a.next_due_time() is not None and b.next_due_time() is None


class _GoneAfterTheClaim(PostgresLedger):
    """The real ledger, with PostgreSQL stopped at one exact point: after the claim, at the label lookup
    before the send (the only fake here is the timing; a real stop cannot be aimed between two statements)."""

    def __init__(self, *args: Any, cluster: PgCluster, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.cluster = cluster
        self.stopped = False

    def labels(self, sha256s: list[str]) -> Any:
        if not self.stopped:
            self.stopped = True
            self.cluster.stop()
        return super().labels(sha256s)


def test_a_claim_whose_ledger_went_away_before_the_send_is_not_held_forever(
        make_settings: Make, receiver: Any, pg_url: str, pg_cluster: PgCluster) -> None:
    """PostgreSQL stops between the claim and the send: the delivery gives up (LedgerUnavailable, as watch's
    worker sees it) and this process holds no claim on the bytes, so once the ledger is back the next try
    sends them. It once kept the claim in memory: every later try was BUSY and its lease renewed forever (the
    drain test's "not all sent")."""
    settings = make_settings(SMT_UPLOAD_URL=f"{receiver.url}/upload", SMT_UPLOAD_TOKEN=UPLOAD_TOKEN)
    f = write_csv(settings.local_dir / "a.csv")
    ledger = _GoneAfterTheClaim(pg_url, shown_as=redact_url(pg_url), node="node-a", lease_seconds=LEASE,
                                reconnect_seconds=RECONNECT, cluster=pg_cluster)
    try:
        with closing(make_sink(settings, "multipart", chunks=ledger, announce=False)) as sink:
            with restarted(pg_cluster):
                with pytest.raises(LedgerUnavailable):
                    deliver_file(settings, ledger, sink, f)
                pg_cluster.start()
            o = deliver_file(settings, ledger, sink, f)
        assert o.result == "sent", o
        assert ledger.get(o.sha256).state == "sent"  # type: ignore[union-attr]
    finally:
        ledger.close()


def test_watch_on_another_node_leaves_this_nodes_pending_rows_alone(make_settings: Make, receiver: Any,
                                                                     pg_url: str) -> None:
    """Node B's ``watch`` looks at due rows: one of its own whose file is gone is marked failed ("no longer
    in the inbox"), but node A's pending row, whose file is in A's inbox and not B's, is left pending for A."""
    settings = make_settings(SMT_LEDGER_URL=pg_url, SMT_NODE_NAME="node-b", SMT_UPLOAD_URL=f"{receiver.url}/upload",
                             SMT_UPLOAD_TOKEN=UPLOAD_TOKEN, SMT_SETTLE_SECONDS="0.1")
    gone = settings.local_dir / "gone.csv"
    with open_pg(pg_url, "node-a") as a, open_pg(pg_url, "node-b") as b:
        assert claim(a, A, str(settings.local_dir / "on-a.csv")) is Claim.CLAIMED  # the same path, on node A
        a.release(A, error="stopped", attempts=1)
        assert claim(b, B, str(gone)) is Claim.CLAIMED
        b.release(B, error="stopped", attempts=1)
    with watching(settings) as service:
        f = write_csv(settings.local_dir / "new.csv")
        wait_for(lambda: service.counts.sent == 1, 20, "node B's new file delivered")
        with open_pg(pg_url, "node-a") as a:
            wait_for(lambda: a.get(B).state == "failed", 20, "B's own gone file marked failed")  # type: ignore[union-attr]
            row_b = a.get(B)
            assert row_b is not None and "no longer in the inbox" in (row_b.last_error or "")
            row_a = a.get(A)
            assert row_a is not None and row_a.state == "pending", row_a
    assert [r["filename"] for r in receiver.stored()] == [f.name]


@pytest.mark.parametrize(("url", "code", "says"), [
    ("postgresql://u:pw-Secret-9@127.0.0.1:1/db", 1, "cannot connect to ledger postgresql://***@127.0.0.1:1/db"),
    ("postgresql://u:pw-Secret-9@127.0.0.1:1/db?sslmode=bogus", 1, "invalid sslmode value"),
    ("postgresql://u:pw-Secret-9@127.0.0.1:1/db?foo=bar", 2, 'SMT_LEDGER_URL postgresql://***@127.0.0.1:1/db?foo=bar'),
    ("postgresql://u:pw-Secret-9@[bad/db", 2, "SMT_LEDGER_URL is not a valid URL"),
    ("mysql://u:pw-Secret-9@127.0.0.1/db", 2, "SMT_LEDGER_URL must be a postgresql:// or postgres:// URL"),
])
def test_a_ledger_url_that_cannot_work_is_one_line_without_its_password(run_cli: Run, url: str, code: int,
                                                                        says: str) -> None:
    """A wrong URL is a setting (exit 2), an unreachable server a runtime failure (exit 1): either way one
    line naming what is wrong, never the password, never 'internal error' (an unknown query parameter once
    was one)."""
    proc = run_cli("ledger", "list", env={"SMT_LEDGER_URL": url})
    out = proc.stdout + proc.stderr
    assert proc.returncode == code, out
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], out
    assert "pw-Secret-9" not in out and "internal error" not in out and "Traceback" not in out
