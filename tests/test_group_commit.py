"""Group commit (issue 27): a group of claims in one transaction, a group of outcomes in another, on both
databases (``where``). Each answer must be what one-at-a-time claims would have said, and an outcome is
only in the ledger once ``finish_many`` returned."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from test_ledger import open_at

from conftest import UPLOAD_TOKEN, wait_for, watching, write_csv
from smt_watch.config import Settings
from smt_watch.delivery import make_sink
from smt_watch.errors import LedgerError
from smt_watch.hashing import Signature
from smt_watch.jobs import Job, JobKind, commit, deliver_jobs, handle_jobs
from smt_watch.ledger import Claim, Labels
from smt_watch.ledger.common import ClaimRequest
from smt_watch.ledger.store import SqlLedger, failed_mark, released_mark, retrying_mark, sent_mark
from smt_watch.reference.receiver import running_receiver
from smt_watch.statedir import open_ledger
from smt_watch.watch import WatchService

Make = Callable[..., Settings]


def _sha(n: int) -> str:
    return f"{n:064x}"


def _request(n: int, *, remember: bool = True) -> ClaimRequest:
    from smt_watch.ledger import Remember

    sig = Signature(device=1, inode=n, size=10 + n, mtime_ns=n)
    return ClaimRequest(_sha(n), f"f{n}.csv", f"/in/f{n}.csv", 10 + n, "multipart", respect_backoff=True,
                        remember=Remember(f"/in/f{n}.csv", sig, _sha(n)) if remember else None)


def test_claim_many_answers_as_single_claims_would(where: str) -> None:
    with open_at(where) as ledger:
        ledger.claim(_sha(1), filename="f1.csv", path="/in/f1.csv", size=11, mode="multipart")
        ledger.mark_sent(_sha(1), status=200, destination="x", attempts=1)  # sent before: a duplicate
        ledger.claim(_sha(2), filename="f2.csv", path="/in/f2.csv", size=12, mode="multipart")
        ledger.mark_failed(_sha(2), status=400, error="no", attempts=1)  # failed: left alone by watch
        held = ledger.claim(_sha(3), filename="f3.csv", path="/in/f3.csv", size=13, mode="multipart")
        assert held is Claim.CLAIMED  # in flight in this process: BUSY for the group
        answers = ledger.claim_many([_request(n) for n in (1, 2, 3, 4, 5)] + [_request(5)])
        assert answers == [Claim.DUPLICATE, Claim.LATER, Claim.BUSY, Claim.CLAIMED, Claim.CLAIMED, Claim.BUSY]
        assert ledger.get(_sha(4)) is not None and ledger.get(_sha(4)).state == "sending"  # type: ignore[union-attr]
        # every stat-cache row was written with the group, whatever its claim said
        seen = ledger.seen_many([f"/in/f{n}.csv" for n in (1, 2, 3, 4, 5)])
        assert {p: s.sha256 for p, s in seen.items()} == {f"/in/f{n}.csv": _sha(n) for n in (1, 2, 3, 4, 5)}
        # a claim this process holds from the group is BUSY to another claim until it is finished
        assert ledger.claim(_sha(4), filename="f4.csv", path=None, size=14, mode="multipart") is Claim.BUSY
        ledger.finish_many([
            sent_mark(_sha(4), status=200, destination="d", attempts=1),
            retrying_mark(_sha(5), status=503, error="later", attempts=2, next_attempt_at=4e9),
            released_mark(_sha(3), error="interrupted", attempts=0),
        ])
        rows = {n: ledger.get(_sha(n)) for n in (3, 4, 5)}
        assert {n: r.state for n, r in rows.items() if r} == {3: "pending", 4: "sent", 5: "retrying"}
        assert rows[4] and rows[4].http_status == 200 and rows[4].attempts == 1 and rows[4].sent_at
        assert rows[5] and rows[5].attempts == 2 and rows[5].last_error == "later"
        # finished: the bytes can be claimed again (4 is sent: a duplicate now)
        assert ledger.claim_many([_request(4), _request(3)]) == [Claim.DUPLICATE, Claim.CLAIMED]
        ledger.finish_many([failed_mark(_sha(3), status=None, error="bad", attempts=0)])
        assert ledger.get(_sha(3)).state == "failed"  # type: ignore[union-attr]


def test_labels_read_with_a_groups_claims_are_what_the_ledger_holds(where: str) -> None:
    """PostgreSQL reads the labels of the rows a group claim took in its statement, and answers the delivery's
    look-up from them: the answers must be what the labels table says, before and after the outcome."""
    with open_at(where) as ledger:
        ledger.declare_labels(_sha(1), "10443720000000001", "M1")
        assert ledger.claim_many([_request(1), _request(2)]) == [Claim.CLAIMED, Claim.CLAIMED]
        assert ledger.labels([_sha(1), _sha(2)]) == {_sha(1): Labels("10443720000000001", "M1", None)}
        assert ledger.labels([_sha(2)]) == {}
        ledger.declare_labels(_sha(2), None, "M2")  # declared while the claim is in flight: seen at once
        assert ledger.labels([_sha(2)]) == {_sha(2): Labels(None, "M2", None)}
        ledger.note_esiid(_sha(1), "10443720000000009")
        ledger.finish_many([sent_mark(_sha(n), status=200, destination="d", attempts=1) for n in (1, 2)])
        assert ledger.labels([_sha(1)]) == {_sha(1): Labels("10443720000000001", "M1", "10443720000000009")}
        assert ledger.with_esiid("10443720000000009", 5) == [_sha(1)]


def test_a_group_is_one_transaction(tmp_path: Path) -> None:
    """SQLite: the group's second claim fails (a trigger refuses it): the first is not written either, and
    both are handed back, claimable once the database takes them."""
    where = str(tmp_path / "l.sqlite3")
    with open_at(where) as ledger:
        other = sqlite3.connect(where, isolation_level=None)
        other.execute(f"CREATE TRIGGER refuse BEFORE INSERT ON files WHEN NEW.sha256 = '{_sha(8)}'"
                      " BEGIN SELECT RAISE(ABORT, 'refused'); END")
        with pytest.raises(LedgerError):
            ledger.claim_many([_request(7), _request(8)])
        assert ledger.get(_sha(7)) is None and ledger.get(_sha(8)) is None
        assert ledger.seen(f"/in/f{7}.csv") is None
        other.execute("DROP TRIGGER refuse")
        other.close()
        assert ledger.claim_many([_request(7), _request(8)]) == [Claim.CLAIMED, Claim.CLAIMED]
        with pytest.raises(LedgerError):  # outcomes likewise: all of them or none
            other = sqlite3.connect(where, isolation_level=None)
            other.execute(f"CREATE TRIGGER refuse BEFORE UPDATE ON files WHEN NEW.sha256 = '{_sha(8)}'"
                          " BEGIN SELECT RAISE(ABORT, 'refused'); END")
            other.close()
            ledger.finish_many([sent_mark(_sha(7), status=200, destination="d", attempts=1),
                                sent_mark(_sha(8), status=200, destination="d", attempts=1)])
        assert ledger.get(_sha(7)).state == "sending"  # type: ignore[union-attr]


def test_a_groups_claims_and_outcomes_are_all_or_none_on_postgres(pg_url: str) -> None:
    """PostgreSQL: a group's claims (with their stat-cache rows) are one statement and its outcomes another;
    the database refusing one row (a trigger) writes none of the group, and the claims are handed back."""
    import psycopg

    refuse = ("CREATE TRIGGER refuse BEFORE {} ON smt_watch.files FOR EACH ROW WHEN (NEW.sha256 = '" + _sha(8)
              + "') EXECUTE FUNCTION smt_watch.refuse()")
    with open_at(pg_url) as ledger, psycopg.connect(pg_url, autocommit=True) as other:
        other.execute("CREATE FUNCTION smt_watch.refuse() RETURNS trigger LANGUAGE plpgsql"
                      " AS $$ BEGIN RAISE EXCEPTION 'refused'; END $$")
        other.execute(refuse.format("INSERT"))
        with pytest.raises(LedgerError, match="refused"):
            ledger.claim_many([_request(7), _request(8)])
        assert ledger.get(_sha(7)) is None and ledger.get(_sha(8)) is None
        assert ledger.seen("/in/f7.csv") is None
        other.execute("DROP TRIGGER refuse ON smt_watch.files")
        assert ledger.claim_many([_request(7), _request(8)]) == [Claim.CLAIMED, Claim.CLAIMED]
        other.execute(refuse.format("UPDATE"))
        with pytest.raises(LedgerError, match="refused"):
            ledger.finish_many([sent_mark(_sha(7), status=200, destination="d", attempts=1),
                                sent_mark(_sha(8), status=200, destination="d", attempts=1)])
        assert [ledger.get(_sha(n)).state for n in (7, 8)] == ["sending"] * 2  # type: ignore[union-attr]


# --- a worker's group, end to end: real files, the reference receiver on loopback, a real ledger ------------


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Any]:
    with running_receiver(tmp_path / "received", upload_token=UPLOAD_TOKEN) as r:
        yield r


def _jobs(paths: list[Path]) -> list[Job]:
    return [(p, Signature.of(p.lstat()), None) for p in paths]


@pytest.mark.both_ledgers
def test_a_group_is_claimed_sent_and_committed_together(make_settings: Make, receiver: Any) -> None:
    settings = make_settings(SMT_UPLOAD_URL=f"{receiver.url}/upload", SMT_UPLOAD_TOKEN=UPLOAD_TOKEN)
    inbox = settings.local_dir
    files = [write_csv(inbox / f"g{n}.csv", rows=20, seed=n) for n in range(5)]
    twin = inbox / "g0-again.csv"
    twin.write_bytes(files[0].read_bytes())  # the same bytes under another name, in the same group
    with open_ledger(settings) as ledger, closing(make_sink(settings, "multipart", chunks=ledger)) as sink:
        results = handle_jobs(settings, ledger, sink, _jobs([*files, twin]))
        assert [r.kind for r in results] == [JobKind.DONE] * 6
        assert [r.outcome.result for r in results if r.outcome] == ["sent"] * 5 + ["busy"]
        assert all(r.hashed for r in results)
        rows = [ledger.get(r.ident.sha256) for r in results[:5] if r.ident]
        assert [row.state for row in rows if row] == ["sent"] * 5
        seen = ledger.seen_many([str(p) for p in [*files, twin]])
        assert len(seen) == 6  # every stat-cache row went in with the group's claims
        # the twin, looked at again (as the watcher does after BUSY): a duplicate, nothing sent
        again = handle_jobs(settings, ledger, sink, _jobs([twin]))
        assert again[0].outcome is not None and again[0].outcome.result == "duplicate"
    assert sorted(r.sha256 for r in receiver.state.requests) == sorted(
        hashlib.sha256(f.read_bytes()).hexdigest() for f in files)


def test_a_group_whose_outcomes_cannot_be_committed_is_not_acknowledged(make_settings: Make, receiver: Any
                                                                         ) -> None:
    """The group was sent, but its outcome commit failed: no file of it is DONE (the watcher neither counts,
    logs nor moves them), the rows stay ``sending``, and the next attempt delivers them (same
    Idempotency-Key) and acknowledges them."""
    settings = make_settings(SMT_UPLOAD_URL=f"{receiver.url}/upload", SMT_UPLOAD_TOKEN=UPLOAD_TOKEN)
    files = [write_csv(settings.local_dir / f"n{n}.csv", rows=20, seed=n) for n in range(3)]
    with open_ledger(settings) as ledger, closing(make_sink(settings, "multipart", chunks=ledger)) as sink:
        other = sqlite3.connect(ledger.path, isolation_level=None)
        other.execute("CREATE TRIGGER refuse BEFORE UPDATE OF state ON files WHEN NEW.state = 'sent'"
                      " BEGIN SELECT RAISE(ABORT, 'disk full'); END")
        results = handle_jobs(settings, ledger, sink, _jobs(files))
        assert [r.kind for r in results] == [JobKind.ERROR] * 3, results
        assert all("disk full" in r.message for r in results)
        shas = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
        assert [row.state for s in shas if (row := ledger.get(s))] == ["sending"] * 3
        assert len(receiver.state.requests) == 3
        other.execute("DROP TRIGGER refuse")
        other.close()
        results = handle_jobs(settings, ledger, sink, _jobs(files))
        assert [r.outcome.result for r in results if r.outcome] == ["sent"] * 3
        assert [row.state for s in shas if (row := ledger.get(s))] == ["sent"] * 3
    assert [r.sha256 for r in receiver.state.requests] == shas * 2


def test_a_claim_whose_delivery_stopped_mid_group_is_handed_back(make_settings: Make, receiver: Any) -> None:
    """The ledger fails after the group's claims (here: its labels table is gone, as a PostgreSQL outage
    fails every read): each file's result says so, nothing was sent, and its claim is handed back
    (``pending``), not held by this process for ever; once the ledger answers, the same files go out."""
    settings = make_settings(SMT_UPLOAD_URL=f"{receiver.url}/upload", SMT_UPLOAD_TOKEN=UPLOAD_TOKEN)
    files = [write_csv(settings.local_dir / f"h{n}.csv", rows=20, seed=n) for n in range(3)]
    shas = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    with open_ledger(settings) as ledger, closing(make_sink(settings, "multipart", chunks=ledger)) as sink:
        other = sqlite3.connect(ledger.path, isolation_level=None)
        other.execute("ALTER TABLE labels RENAME TO labels_away")
        results = handle_jobs(settings, ledger, sink, _jobs(files))
        assert [r.kind for r in results] == [JobKind.ERROR] * 3, results
        assert [row.state for s in shas if (row := ledger.get(s))] == ["pending"] * 3
        assert receiver.state.requests == []
        other.execute("ALTER TABLE labels_away RENAME TO labels")
        other.close()
        results = handle_jobs(settings, ledger, sink, _jobs(files))
        assert [r.outcome.result for r in results if r.outcome] == ["sent"] * 3
    assert [r.sha256 for r in receiver.state.requests] == shas


# --- the committer: several workers' groups in one commit, a worker not waiting for it (issue 27) ------------


@pytest.mark.both_ledgers
def test_groups_delivered_apart_are_committed_in_one_transaction(make_settings: Make, receiver: Any,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Two groups delivered one after the other are committed by ONE ``finish_many`` (on PostgreSQL, one
    statement); until then their rows are ``sending``."""
    settings = make_settings(SMT_UPLOAD_URL=f"{receiver.url}/upload", SMT_UPLOAD_TOKEN=UPLOAD_TOKEN)
    files = [write_csv(settings.local_dir / f"c{n}.csv", rows=20, seed=n) for n in range(4)]
    shas = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    with open_ledger(settings) as ledger, closing(make_sink(settings, "multipart", chunks=ledger)) as sink:
        calls: list[int] = []
        finish = ledger.finish_many

        def counted(marks: Any) -> None:  # the real commit, counted
            calls.append(len(marks))
            finish(marks)

        monkeypatch.setattr(ledger, "finish_many", counted)
        first, second = (deliver_jobs(settings, ledger, sink, _jobs(files[:2])),
                         deliver_jobs(settings, ledger, sink, _jobs(files[2:])))
        assert [row.state for s in shas if (row := ledger.get(s))] == ["sending"] * 4  # sent, not committed
        assert len(receiver.state.requests) == 4 and calls == []
        results = commit(ledger, [first, second])
        assert calls == [4]
        assert [[r.outcome.result for r in rs if r.outcome] for rs in results] == [["sent"] * 2] * 2
        assert [row.state for s in shas if (row := ledger.get(s))] == ["sent"] * 4


def test_a_group_whose_outcomes_are_refused_does_not_hold_back_the_others(make_settings: Make, receiver: Any
                                                                           ) -> None:
    """One commit for two groups, refused because of one group's outcome: that group is not acknowledged
    (it says why, its row stays ``sending``: delivered again, same Idempotency-Key); the other, committed on
    its own, is."""
    settings = make_settings(SMT_UPLOAD_URL=f"{receiver.url}/upload", SMT_UPLOAD_TOKEN=UPLOAD_TOKEN)
    files = [write_csv(settings.local_dir / f"d{n}.csv", rows=20, seed=10 + n) for n in range(2)]
    shas = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    with open_ledger(settings) as ledger, closing(make_sink(settings, "multipart", chunks=ledger)) as sink:
        groups = [deliver_jobs(settings, ledger, sink, _jobs([f])) for f in files]
        other = sqlite3.connect(ledger.path, isolation_level=None)
        other.execute(f"CREATE TRIGGER refuse BEFORE UPDATE OF state ON files WHEN NEW.sha256 = '{shas[0]}'"
                      " AND NEW.state = 'sent' BEGIN SELECT RAISE(ABORT, 'disk full'); END")
        [[refused], [kept]] = commit(ledger, groups)
        other.close()
        assert refused.kind is JobKind.ERROR and "disk full" in refused.message
        assert kept.kind is JobKind.DONE and kept.outcome is not None and kept.outcome.result == "sent"
        assert [row.state for s in shas if (row := ledger.get(s))] == ["sending", "sent"]


def _commits_held(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Every ledger's outcome commits wait for the first event (the gate); the second is set once one waits.
    The commit itself is the real one."""
    gate, waiting = threading.Event(), threading.Event()
    finish = SqlLedger.finish_many

    def held(self: SqlLedger, marks: Any) -> None:
        waiting.set()
        assert gate.wait(60), "the test never let the commit go"
        finish(self, marks)

    monkeypatch.setattr(SqlLedger, "finish_many", held)
    return gate, waiting


def test_a_worker_goes_on_while_its_last_group_is_committed(make_settings: Make, receiver: Any,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """One worker, its group's commit held back: the worker still sends the next file that lands, and the
    first file is neither counted nor moved until its commit is done."""
    settings = make_settings(SMT_UPLOAD_URL=f"{receiver.url}/upload", SMT_UPLOAD_TOKEN=UPLOAD_TOKEN,
                             SMT_SETTLE_SECONDS="0.1", SMT_WORKERS="1", SMT_AFTER_SEND="move")
    gate, waiting = _commits_held(monkeypatch)
    with watching(settings) as service:
        try:
            a = write_csv(settings.local_dir / "a.csv", seed=1)
            wait_for(waiting.is_set, 10, "a.csv's commit to start")
            b = write_csv(settings.local_dir / "b.csv", seed=2)
            wait_for(lambda: len(receiver.state.requests) == 2, 10, "b.csv sent while a.csv's commit waits")
            assert a.exists() and service.counts.sent == 0  # a.csv: not acknowledged before its commit
        finally:
            gate.set()  # (before the watcher stops: it waits for the commit)
        wait_for(lambda: service.counts.sent == 2, 10, "both committed")
        wait_for(lambda: not a.exists() and not b.exists(), 10, "both moved")
    with open_ledger(settings) as ledger:
        assert sorted(r.filename for r in ledger.rows("sent")) == ["a.csv", "b.csv"]


def test_a_second_signal_stops_watch_while_a_commit_hangs(make_settings: Make, receiver: Any,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The committer stuck in a commit (a database that does not answer) with another group waiting for it:
    a second stop request ends ``watch`` at once, not after the grace period, and both groups' files are
    in flight (their rows ``sending``, the files not moved), resumed at the next start."""
    settings = make_settings(SMT_UPLOAD_URL=f"{receiver.url}/upload", SMT_UPLOAD_TOKEN=UPLOAD_TOKEN,
                             SMT_SETTLE_SECONDS="0.1", SMT_WORKERS="1", SMT_AFTER_SEND="move",
                             SMT_STOP_GRACE_SECONDS="600")
    gate, waiting = _commits_held(monkeypatch)
    service = WatchService(settings)
    earlier = set(threading.enumerate())  # another test's threads, if any, are not this watcher's
    returned: list[int] = []
    ran = threading.Thread(target=lambda: returned.append(service.run()), daemon=True)
    ran.start()
    try:
        wait_for(service.ready.is_set, 30, "watch to be ready")
        a = write_csv(settings.local_dir / "a.csv", seed=1)
        wait_for(waiting.is_set, 10, "a.csv's commit to start")
        b = write_csv(settings.local_dir / "b.csv", seed=2)
        wait_for(lambda: len(receiver.state.requests) == 2, 10, "b.csv sent while a.csv's commit hangs")
        service.request_stop()  # the first: the worker ends; the stop sequence waits for the commit
        wait_for(lambda: not any(t.name.startswith("smt-watch-worker") and t not in earlier
                                 for t in threading.enumerate()), 10, "the worker to end")
        service.request_stop()  # the second: quit now
        ran.join(10)
        assert not ran.is_alive(), "watch waited for the hung commit despite the second stop request"
        assert returned == [0]  # it stopped (an exception would have ended the thread too)
        assert a.exists() and b.exists() and service.counts.sent == 0
    finally:
        gate.set()
    with open_ledger(settings) as ledger:
        assert {r.filename for r in ledger.rows("sending")} | {r.filename for r in ledger.rows("sent")} == {
            "a.csv", "b.csv"}
