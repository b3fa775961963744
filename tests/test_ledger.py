"""The ledger on both backends: state machine, claims across processes, migrations, legacy import.

Every test taking ``where`` runs twice: on a real SQLite file and on a real PostgreSQL database (a throwaway
cluster on loopback, ``tests/pgcluster.py``). ``where`` is a path or a URL; :func:`open_at` opens either, in
this process or a child."""

from __future__ import annotations

import inspect
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from pgcluster import PASSWORD

from smt_watch.errors import LedgerError
from smt_watch.hashing import Signature
from smt_watch.ledger import Claim, Labels, Ledger, Remember, Seen, SqliteLedger
from smt_watch.ledger.port import Tx
from smt_watch.ledger.sqlite import SCHEMA_VERSION
from smt_watch.legacy import import_file, import_state_file, parse_hash_lines

A = "a" * 64
B = "b" * 64


def claim(ledger: Ledger, sha: str = A, force: bool = False) -> Claim:
    return ledger.claim(sha, filename="f.csv", path="/in/f.csv", size=3, mode="multipart", force=force)


def open_at(where: str, node: str | None = None, lease: float = 60.0) -> Ledger:
    """The ledger at a path (SQLite) or a ``postgresql://`` URL."""
    if where.startswith("postgresql://"):
        from smt_watch.ledger.postgres import PostgresLedger

        return PostgresLedger(where, shown_as="test ledger", node=node, lease_seconds=lease)
    return SqliteLedger(Path(where), node=node)


def ledger_process(where: str, body: str) -> subprocess.Popen[str]:
    """Another process with the ledger at ``where`` open as ``ledger`` (by :func:`open_at`'s own source), then
    running ``body``, then gone without closing it; stdin and stdout piped, the test's way to talk to it. Only
    the ledger's imports: a spawned multiprocessing child imported this file (pytest included) first."""
    code = ("from __future__ import annotations\nimport sys\nfrom pathlib import Path\n"
            "from smt_watch.ledger import Ledger, SqliteLedger\n" + inspect.getsource(open_at)
            + "ledger = open_at(sys.argv[1])\n" + body
            + "sys.stdout.flush()\nimport os\nos._exit(0)\n")  # gone, as a multiprocessing child goes: no close
    return subprocess.Popen([sys.executable, "-c", code, where], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)


CLAIM_A = f"print(ledger.claim({A!r}, filename='f', path=None, size=1, mode='m').value, flush=True)\n"


def test_wal_and_schema(tmp_path: Path) -> None:
    with SqliteLedger(tmp_path / "l.sqlite3") as ledger:
        assert ledger.schema_version == SCHEMA_VERSION
    db = sqlite3.connect(tmp_path / "l.sqlite3")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_newer_schema_is_refused(where: str) -> None:
    """A ledger from a newer smt-watch is refused rather than damaged; the message never holds the password."""
    open_at(where).close()
    if where.startswith("postgresql://"):
        import psycopg

        from smt_watch.ledger.postgres import SCHEMA_VERSION as PG_SCHEMA_VERSION

        with psycopg.connect(where, autocommit=True) as conn:
            conn.execute("INSERT INTO smt_watch.schema_version (version) VALUES (%s)", (PG_SCHEMA_VERSION + 1,))
    else:
        db = sqlite3.connect(where)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        db.close()
    with pytest.raises(LedgerError, match="newer than this smt-watch") as refused:
        open_at(where)
    assert PASSWORD not in str(refused.value)


def test_state_machine(where: str) -> None:
    with open_at(where) as ledger:
        assert claim(ledger) is Claim.CLAIMED
        assert ledger.get(A).state == "sending"  # type: ignore[union-attr]
        assert claim(ledger) is Claim.BUSY  # same process, e.g. another worker thread
        ledger.mark_retrying(A, status=503, error="HTTP 503", attempts=3, next_attempt_at=1.0)
        row = ledger.get(A)
        assert row is not None and (row.state, row.attempts, row.http_status) == ("retrying", 3, 503)
        assert claim(ledger) is Claim.CLAIMED
        ledger.mark_sent(A, status=200, destination="http://x/upload", attempts=1)
        row = ledger.get(A)
        assert row is not None and (row.state, row.attempts, row.last_error) == ("sent", 4, None)
        assert row.sent_at and row.destination == "http://x/upload"
        assert claim(ledger) is Claim.DUPLICATE
        assert claim(ledger, force=True) is Claim.CLAIMED
        ledger.mark_failed(A, status=400, error="bad", attempts=1)
        assert ledger.counts() == {"pending": 0, "sending": 0, "sent": 0, "retrying": 0, "failed": 1}
        assert [r.sha256 for r in ledger.rows("failed")] == [A]
        assert ledger.forget([A]) == 1 and ledger.get(A) is None


def test_a_claim_writes_its_stat_cache_row_whatever_it_answers(where: str) -> None:
    """``remember=`` is written with the claim (one statement on PostgreSQL) when the claim is taken, when the
    bytes are in flight, and when they were sent already."""
    sigs = {p: Signature(2049, inode, 3, 1_700_000_000 + inode) for inode, p in enumerate(("/in/a", "/in/b", "/in/c"))}
    with open_at(where) as ledger:

        def claim_at(path: str) -> Claim:
            return ledger.claim(A, filename=Path(path).name, path=path, size=3, mode="multipart",
                                respect_backoff=True, remember=Remember(path, sigs[path], A))

        assert claim_at("/in/a") is Claim.CLAIMED
        assert ledger.seen("/in/a") == Seen(sigs["/in/a"], A, "sending")
        assert claim_at("/in/b") is Claim.BUSY
        assert ledger.seen("/in/b") == Seen(sigs["/in/b"], A, "sending")
        ledger.mark_sent(A, status=200, destination="http://x/upload", attempts=1)
        assert claim_at("/in/c") is Claim.DUPLICATE
        assert ledger.seen_many(list(sigs)) == {p: Seen(sig, A, "sent") for p, sig in sigs.items()}
        row = ledger.get(A)
        assert row is not None and (row.path, row.state, row.attempts) == ("/in/a", "sent", 1)


def test_claim_of_a_dead_process_is_taken_over(where: str) -> None:
    """On the claimer's own node a dead process's claim is taken over at once, lease or not."""
    claimer = ledger_process(where, CLAIM_A)
    out, _ = claimer.communicate(timeout=60)
    assert claimer.returncode == 0
    assert out.strip() == "claimed"
    with open_at(where) as ledger:
        assert ledger.get(A).state == "sending"  # type: ignore[union-attr]
        assert claim(ledger) is Claim.CLAIMED  # the claimer exited without finishing


def test_two_processes_claim_once(where: str) -> None:
    """Two processes, each with the ledger open, claim the same bytes at the same moment: one has it, the other
    is told busy (both kept alive, holding what they got, until both have answered)."""
    wait_then_claim = "print('ready', flush=True)\nsys.stdin.readline()\n" + CLAIM_A + "sys.stdin.readline()\n"
    procs = [ledger_process(where, wait_then_claim) for _ in range(2)]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        for p in procs:  # both opened: go
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        results = sorted(p.stdout.readline().strip() for p in procs if p.stdout is not None)
    finally:
        for p in procs:
            p.communicate(timeout=30)  # stdin closed: each exits
    assert results == ["busy", "claimed"]
    assert [p.returncode for p in procs] == [0, 0]


def test_a_sqlite_error_inside_a_transaction_is_a_ledger_error(tmp_path: Path) -> None:
    with SqliteLedger(tmp_path / "l.sqlite3") as ledger:
        assert claim(ledger) is Claim.CLAIMED
        def work(tx: Tx) -> None:
            tx.execute("INSERT INTO meta (key, value) VALUES ('k', 'first')")
            tx.execute("INSERT INTO files (sha256, filename, state, first_seen, updated_at)"
                       " VALUES (?, 'again.csv', 'pending', 'x', 'x')", (A,))

        with pytest.raises(LedgerError, match="UNIQUE constraint failed") as caught:
            ledger.port.transaction(work)
        assert isinstance(caught.value.__cause__, sqlite3.IntegrityError)
        assert ledger.meta("k") is None  # rolled back as a whole
        ledger.set_meta("k", "second")  # and the ledger is usable afterwards
        assert ledger.meta("k") == "second"
        assert claim(ledger) is Claim.BUSY  # a claim in flight still answers as before


@pytest.mark.parametrize("missing", ["", None])
def test_a_fetch_without_its_hash_is_refused(where: str, missing: str | None) -> None:
    with open_at(where) as ledger:
        with pytest.raises(LedgerError, match="without its SHA-256"):
            ledger.record_fetch("/adhocusage/a.CSV", 10, 1_700_000_000, missing, "/in/a.CSV")  # type: ignore[arg-type]
        assert ledger.remote_files() == {}
        ledger.record_fetch("/adhocusage/a.CSV", 10, 1_700_000_000, A, "/in/a.CSV")
        assert ledger.remote_files() == {"/adhocusage/a.CSV": (10, 1_700_000_000)}


def test_parse_hash_lines() -> None:
    entries, bad = parse_hash_lines(
        [A, f"{B.upper()}  dir/file one.csv", f"{'c' * 64} *bin.csv", "", "# note", "not-a-hash", "abc"]
    )
    assert entries == [(A, None), (B, "file one.csv"), ("c" * 64, "bin.csv")]
    assert bad == 2


def test_import_is_idempotent_and_keeps_existing_rows(tmp_path: Path, where: str) -> None:
    legacy = tmp_path / ".posted_sha256"
    legacy.write_text(f"{A}\n{B}  x.csv\n")
    with open_at(where) as ledger:
        claim(ledger, B)
        ledger.mark_failed(B, status=400, error="bad", attempts=1)
        first = import_file(ledger, legacy)
        assert (first.read, first.added) == (2, 1)
        assert ledger.get(B).state == "failed"  # type: ignore[union-attr]
        assert ledger.get(A).state == "sent"  # type: ignore[union-attr]
        assert ledger.get(A).origin == "import"  # type: ignore[union-attr]
        again = import_file(ledger, legacy)
        assert (again.read, again.added) == (2, 0)
        assert claim(ledger, A) is Claim.DUPLICATE


def test_state_file_is_imported_once_per_change(tmp_path: Path, where: str) -> None:
    legacy = tmp_path / ".posted_sha256"
    with open_at(where) as ledger:
        assert import_state_file(ledger, legacy) is None  # absent: nothing to do
        legacy.write_text(A + "\n")
        report = import_state_file(ledger, legacy)
        assert report is not None and report.added == 1
        assert import_state_file(ledger, legacy) is None  # unchanged: not re-read
        with legacy.open("a") as fh:
            fh.write(B + "\n")
        os.utime(legacy, ns=(1, 1))
        report = import_state_file(ledger, legacy)
        assert report is not None and report.added == 1
        assert ledger.meta("state_file_imported") == f"2 hashes from {legacy}"


def test_start_up_recovery_leaves_a_live_claim_alone(where: str) -> None:
    """``watch`` starting beside a live ``post`` must not take back the row ``post`` is sending (that would
    send it twice); once the claimer is dead the row is recovered as ``pending``. Checked against
    ledger-recover-live-claim (every foreign claim recovered)."""
    holder = ledger_process(where, CLAIM_A + "sys.stdin.readline()\n")  # alive, holding its claim, until told
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "claimed", "the child did not claim"
        with open_at(where) as ledger:
            assert ledger.recover_stale() == []
            assert ledger.get(A).state == "sending"  # type: ignore[union-attr]
    finally:
        holder.communicate(timeout=30)  # stdin closed: it exits
    with open_at(where) as ledger:
        assert [r.sha256 for r in ledger.recover_stale()] == [A]
        assert ledger.get(A).state == "pending"  # type: ignore[union-attr]


def test_rows_are_listed_oldest_first(where: str) -> None:
    """``ledger list`` (and ``--state``) shows rows oldest first, not in hash order: B is seen before A.
    Checked against ledger-list-oldest-first and ledger-list-state-oldest-first."""
    with open_at(where) as ledger:
        claim(ledger, B)
        claim(ledger, A)
        first_seen = {r.sha256: r.first_seen for r in ledger.rows()}
        assert first_seen[B] < first_seen[A]
        assert [r.sha256 for r in ledger.rows()] == [B, A]
        assert [r.sha256 for r in ledger.rows("sending")] == [B, A]


@pytest.mark.parametrize("account", ["HOME-42", "a\x00b\u202e"], ids=["plain", "nul-and-control"])
def test_upload_slots_are_counted_per_account(where: str, account: str) -> None:
    """Slots up to the limit, then refused; another account or role has its own count. An account from a
    form field may hold a NUL, which no PostgreSQL TEXT value can: it is counted all the same (the quota's
    lock key once held one, and every upload on PostgreSQL failed)."""
    with open_at(where) as ledger:
        taken = [ledger.take_upload_slot("customer", account, 0.0, 2, 100.0 + i) for i in range(3)]
        assert taken == [True, True, False]
        assert ledger.uploads_since("customer", account, 0.0) == [100.0, 101.0]
        assert ledger.uploads_since("customer", account, 100.5) == [101.0]
        assert ledger.take_upload_slot("customer", account + "x", 0.0, 2, 100.0)
        assert ledger.take_upload_slot("admin", account, 0.0, 2, 100.0)


def test_labels_find_a_customers_content_by_esiid_and_wait_for_the_claims_outcome(where: str) -> None:
    """``forceRepost`` finds a customer's files by the ESIID their delivery carried or an uploader declared,
    and no one else's; an ESIID noted for a claim in flight is written with its outcome (one commit).
    Checked against droplet-force-repost-every-esiid."""
    c, d = "c" * 64, "d" * 64
    with open_at(where) as ledger:
        ledger.note_esiid(A, "1044")
        ledger.declare_labels(B, "2099", "M1")
        ledger.declare_labels(B, None, "M2")  # a field left out keeps what an earlier upload said
        ledger.declare_labels(c, "1044", None)
        assert set(ledger.with_esiid("1044", 10)) == {A, c}
        assert ledger.with_esiid("2099", 10) == [B]
        assert ledger.labels([A, B, d]) == {A: Labels(None, None, "1044"), B: Labels("2099", "M2", None)}
        assert claim(ledger, d) is Claim.CLAIMED
        ledger.note_esiid(d, "3000")
        assert ledger.with_esiid("3000", 10) == []  # held until the claim's outcome
        ledger.mark_retrying(d, status=503, error="HTTP 503", attempts=1, next_attempt_at=1.0)
        assert ledger.with_esiid("3000", 10) == [d]


def test_due_rows_are_pending_ones_and_retrying_ones_whose_time_came(where: str) -> None:
    """What ``watch`` delivers again by itself. Checked against watch-due-retrying."""
    with open_at(where) as ledger:
        claim(ledger, A)
        ledger.mark_retrying(A, status=503, error="HTTP 503", attempts=1, next_attempt_at=100.0)
        claim(ledger, B)
        ledger.release(B, error="cut off", attempts=0)
        assert [r.sha256 for r in ledger.due(50.0)] == [B]
        assert {r.sha256 for r in ledger.due(100.0)} == {A, B}
        assert ledger.next_due_time() == 100.0


def _older_ledger(where: str) -> int:
    """A ledger as the smt-watch before verify's verdicts left it (every migration but the last), with one row
    delivered, one stat-cache entry and one upload counted. Returns the schema version it should open at."""
    if where.startswith("postgresql://"):
        import psycopg

        from smt_watch.ledger.postgres import _MIGRATIONS, SCHEMA

        with psycopg.connect(where, autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (SCHEMA,)).fetchone() is None:
                conn.execute(f"CREATE SCHEMA {SCHEMA}")  # else the set-up made it for the role (tests/pgcluster.py)
            conn.execute(f"CREATE TABLE {SCHEMA}.schema_version (version INTEGER NOT NULL)")
            for number, statement in enumerate(_MIGRATIONS[:-1], 1):
                conn.execute(statement)
                conn.execute(f"INSERT INTO {SCHEMA}.schema_version (version) VALUES (%s)", (number,))
            conn.execute(f"INSERT INTO {SCHEMA}.files (sha256, filename, state, first_seen, updated_at, sent_at,"
                         " destination) VALUES (%s, 'old.csv', 'sent', 'x', 'x', 'x', 'http://x')", (A,))
            conn.execute(f"INSERT INTO {SCHEMA}.seen VALUES ('old-node', '/in/old.csv', 1, 2, 3, 4, %s)", (A,))
            conn.execute(f"INSERT INTO {SCHEMA}.uploads VALUES ('customer', 'acct', 100.0)")
        return len(_MIGRATIONS)
    from smt_watch.ledger.sqlite import MIGRATIONS

    db = sqlite3.connect(where, isolation_level=None)
    for number, migration in enumerate(MIGRATIONS[:-1], 1):
        migration(db)
        db.execute(f"PRAGMA user_version = {number}")
    db.execute("INSERT INTO files (sha256, filename, state, first_seen, updated_at, sent_at, destination)"
               " VALUES (?, 'old.csv', 'sent', 'x', 'x', 'x', 'http://x')", (A,))
    db.execute("INSERT INTO seen VALUES ('/in/old.csv', 1, 2, 3, 4, ?)", (A,))
    db.execute("INSERT INTO uploads VALUES ('customer', 'acct', 100.0)")
    db.close()
    return len(MIGRATIONS)


def test_a_ledger_of_an_older_schema_opens_migrated_with_its_rows(where: str) -> None:
    """A ledger left by an older smt-watch (before verify's verdicts) is migrated on open, and what it held
    reads and answers as before."""
    current = _older_ledger(where)
    with open_at(where, node="old-node") as ledger:
        assert ledger.schema_version == current
        row = ledger.get(A)
        assert row is not None and (row.filename, row.state, row.started_at) == ("old.csv", "sent", None)
        assert claim(ledger) is Claim.DUPLICATE
        assert ledger.seen("/in/old.csv") == Seen(Signature(1, 2, 3, 4), A, "sent")
        assert ledger.uploads_since("customer", "acct", 0.0) == [100.0]
        ledger.schedule_check(A, 5.0)  # the new table is there
        assert [v.sha256 for v in ledger.checks_due(10.0)] == [A]
