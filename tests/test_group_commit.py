"""Group commit (issue 27): a group of claims in one transaction, a group of outcomes in another, on both
databases (``where``). Each answer must be what one-at-a-time claims would have said, and an outcome is
only in the ledger once ``finish_many`` returned."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from test_ledger import open_at

from smt_watch.errors import LedgerError
from smt_watch.hashing import Signature
from smt_watch.ledger import Claim
from smt_watch.ledger.common import ClaimRequest
from smt_watch.ledger.store import failed_mark, released_mark, retrying_mark, sent_mark


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
