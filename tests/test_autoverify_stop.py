"""watch's automatic verify re-sends through a sink of its own; that sink must hear watch's stop.

A re-send waiting for the outbound limit (smt_watch/limits.py) would otherwise hold the verify thread until
the stop grace ran out, and watch would exit by force instead of promptly with the row left ``pending``."""

from __future__ import annotations

import hashlib
import threading

from conftest import wait_for
from smt_watch.autoverify import AutoVerify
from smt_watch.config import load_settings
from smt_watch.ledger import Ledger
from smt_watch.limits import limiter_for
from smt_watch.pipeline import Outcome, Result
from smt_watch.reference.sample import interval_csv
from smt_watch.statedir import open_ledger


def test_a_resend_waiting_for_the_outbound_limit_ends_when_watch_stops(base_env: dict[str, str]) -> None:
    env = {**base_env, "SMT_UPLOAD_URL": "http://127.0.0.1:9/upload", "SMT_MAX_IN_FLIGHT": "1"}
    settings = load_settings(env)
    path = settings.local_dir / "IntervalMeterUsage_M1_resend.csv"
    path.write_bytes(interval_csv(1))
    stop = threading.Event()
    outcomes: list[Outcome] = []
    sha = hashlib.sha256(path.read_bytes()).hexdigest()

    def state(ledger: Ledger) -> str | None:
        row = ledger.get(sha)
        return row.state if row else None

    holder = limiter_for(settings)  # another request of this node holds its only slot
    with open_ledger(settings) as ledger, holder.request():
        auto = AutoVerify.for_watch(settings, ledger, stop=stop)
        resend = threading.Thread(target=lambda: outcomes.append(auto.deliver(path)), daemon=True)
        resend.start()
        wait_for(lambda: state(ledger) == "sending", 30, "the re-send to claim its file and wait")
        assert resend.is_alive()  # waiting for the slot, nothing sent
        stop.set()
        resend.join(10)
        assert not resend.is_alive(), "the re-send kept waiting after watch stopped"
        auto.close()
    holder.close()
    [outcome] = outcomes
    assert outcome.result is Result.CHANGED and outcome.attempts == 0, outcome
    with open_ledger(settings) as ledger:
        assert state(ledger) == "pending"
