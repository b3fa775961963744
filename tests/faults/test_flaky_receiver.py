"""A flaky receiver, then a full outage: every file is delivered, none ``failed``, and retries back off.

Phase 1: the reference receiver answers a seeded shuffle of 36 faults, one per request: half ``503``
(some with ``Retry-After: 1``), some held 1.5 s past ``SMT_HTTP_TIMEOUT=1``, some dropped mid-response, the
rest handled normally, while 12 files are delivered (there are fewer normal answers than files, so every
fault is used). Phase 2: the receiver is stopped (connection refused) while more files land, and
restarted on the same port once a file has made ``OUTAGE_CALLS`` (4) failed calls, each waiting out its
doubled backoff (the issue's 30 s outage, scaled down to what proves the doubling: four backoff steps from
0.05 s). The outage ends on that condition, not after a fixed time: a fixed 6 s was chosen to make sure four
calls fit on a loaded machine (4 s once saw just 4), and was waited out in full on a quiet one, plus the
longer backoff it left the backlog with. The request bound is computed from the outage's measured length,
so it is the same bound for the time the outage took. Requests made during the outage are counted from the
ledger's ``attempts`` (a refused connection never reaches a server to be counted there): a hot loop would
make thousands; exponential backoff allows at most a few calls per file.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest

from conftest import UPLOAD_TOKEN, wait_for, write_csv
from faults.support import (
    assert_clean,
    ledger_rows_cli,
    read_ledger,
    sha,
    states,
    subprocess_env,
    watch_process,
)
from smt_watch.reference.receiver import Fault, running_receiver

pytestmark = pytest.mark.faults

SEED = 8_503
HTTP_TIMEOUT = 1.0
ATTEMPTS = 3  # SMT_RETRY_ATTEMPTS: HTTP requests per delivery call
BACKOFF = 0.05  # SMT_RETRY_BACKOFF_SECONDS: first backoff step
OUTAGE_CALLS = 4  # failed calls a file makes before the outage ends (see the module docstring)
OUTAGE_LIMIT = 60.0  # seconds: an outage that has not seen OUTAGE_CALLS by then fails the test
FLAKY_FILES, OUTAGE_FILES = 12, 10

SAMPLE_SECONDS = 0.05  # how often the ledger is sampled during the outage (the poll of its end condition)
CLOCK_SLACK = 0.05  # seconds between computing next_attempt_at and stamping updated_at


def fault_sequence(rng: random.Random) -> list[Fault]:
    """36 faults in a seeded random order: 18 x 503 (4 of them with Retry-After: 1), 4 held past the
    client's timeout, 4 dropped mid-response, 10 handled normally."""
    out = [Fault(status=503)] * 14 + [Fault(status=503, retry_after="1")] * 4
    out += [Fault(delay=HTTP_TIMEOUT + 0.5)] * 4  # the client gives up first
    out += [Fault(drop=True)] * 4 + [Fault()] * 10
    rng.shuffle(out)
    return out


def attempts_total(state_dir: Path) -> int:
    rows = read_ledger(state_dir, "SELECT COALESCE(SUM(attempts), 0) FROM files")
    return int(rows[0][0]) if rows else 0


def test_flaky_receiver_then_outage(tmp_path: Path, base_env: dict[str, str], unused_port: int,
                                    fault_report: Callable[[str], None]) -> None:
    port = unused_port
    data_dir = tmp_path / "received"
    env = subprocess_env(
        base_env, tmp_path / "home", SMT_UPLOAD_URL=f"http://127.0.0.1:{port}/upload", SMT_UPLOAD_TOKEN=UPLOAD_TOKEN,
        SMT_SETTLE_SECONDS="0.1", SMT_HTTP_TIMEOUT=str(HTTP_TIMEOUT), SMT_RETRY_ATTEMPTS=str(ATTEMPTS),
        SMT_RETRY_BACKOFF_SECONDS=str(BACKOFF), SMT_WORKERS="2",
    )
    inbox, state_dir = Path(env["SMT_LOCAL_DIR"]), Path(env["SMT_STATE_DIR"])
    faults = fault_sequence(random.Random(SEED))
    kinds = {"503": sum(f.status == 503 for f in faults), "hang": sum(f.delay > 0 for f in faults),
             "drop": sum(f.drop for f in faults)}
    expected: set[str] = set()

    with watch_process(env, tmp_path / "watch.log") as w:
        # --- phase 1: a flaky receiver -----------------------------------------------------------------
        with running_receiver(data_dir, upload_token=UPLOAD_TOKEN, port=port) as flaky:
            flaky.state.faults.extend(faults)
            for i in range(FLAKY_FILES):
                expected.add(_sha_of(write_csv(inbox / "flaky" / f"f{i:02d}.csv", seed=i)))
            wait_for(lambda: set(states(state_dir)) == expected and set(states(state_dir).values()) == {"sent"},
                     90, "every file delivered through the flaky receiver")
            assert not flaky.state.faults, "the receiver did not get to answer every fault"
            phase1_requests = len(flaky.state.requests)
            phase1_dups = sum(1 for r in flaky.state.requests if r.duplicate)
        fault_report(f"phase 1: {FLAKY_FILES} files through {kinds['503']}x503, {kinds['hang']} hangs, "
                     f"{kinds['drop']} drops: {phase1_requests} requests answered, {phase1_dups} duplicate(s)")

        # --- phase 2: a full outage (connection refused) -----------------------------------------------
        before = attempts_total(state_dir)
        started = time.monotonic()
        outage_files = set()
        for i in range(OUTAGE_FILES):  # write_csv's content repeats every 100 seeds: 50+ is new content
            outage_files.add(_sha_of(write_csv(inbox / "outage" / f"o{i:02d}.csv", seed=50 + i)))
        expected |= outage_files
        scheduled: dict[tuple[str, int], float] = {}  # (sha256, attempts so far) -> delay it was given

        def doubling_seen() -> bool:
            """Sample the retrying rows' scheduled delays; true once a file has made OUTAGE_CALLS failed calls."""
            for sha256, attempts, next_at, updated in read_ledger(
                    state_dir, "SELECT sha256, attempts, next_attempt_at, updated_at FROM files"
                               " WHERE state = 'retrying'"):
                if sha256 in outage_files:
                    scheduled[(sha256, attempts)] = next_at - datetime.fromisoformat(updated).timestamp()
            return max((a for _, a in scheduled), default=0) // ATTEMPTS >= OUTAGE_CALLS

        while not doubling_seen():  # the outage lasts until the backoff has doubled OUTAGE_CALLS times
            assert time.monotonic() - started < OUTAGE_LIMIT, (
                f"no file made {OUTAGE_CALLS} failed calls in a {OUTAGE_LIMIT:.0f} s outage: {scheduled}")
            time.sleep(SAMPLE_SECONDS)  # the poll interval of this condition's deadline loop
        outage = time.monotonic() - started
        during = attempts_total(state_dir) - before
        row_states = states(state_dir)
        assert all(row_states.get(s) in ("retrying", "sending", "pending") for s in outage_files), row_states
        assert "failed" not in row_states.values()
        # Backoff doubles from BACKOFF per call (at least half a step each), so in an outage of T seconds a file
        # gets at most ~log2(2 * T / BACKOFF) + 2 calls of ATTEMPTS requests each.
        bound = OUTAGE_FILES * ATTEMPTS * (math.ceil(math.log2(2 * outage / BACKOFF)) + 2)
        calls = max(a for _, a in scheduled) // ATTEMPTS if scheduled else 0
        fault_report(f"phase 2: {during} requests for {OUTAGE_FILES} files in the {outage:.1f} s outage "
                     f"(bound {bound}); up to {calls} failed calls a file, longest scheduled backoff "
                     f"{max(scheduled.values(), default=0):.1f} s")
        assert 0 < during <= bound, f"{during} requests in a {outage:.1f} s outage: no backoff (hot loop?)"
        # Every delay the ledger recorded fits its place in the doubling (a refused connection is a whole call
        # of ATTEMPTS requests): the k-th failed call waits step/2 .. step, step = BACKOFF * 2**k. Checked
        # against the mutants backoff-zero and backoff-constant (tests/mutants/headline.toml).
        for (_, attempts), delay in scheduled.items():
            step = BACKOFF * 2 ** (attempts // ATTEMPTS)
            assert step / 2 - CLOCK_SLACK <= delay <= step + CLOCK_SLACK, (attempts, delay, step)
        assert calls >= OUTAGE_CALLS, f"the outage saw only {calls} failed calls a file: the doubling was not exercised"

        # --- phase 3: the receiver is back on the same port --------------------------------------------
        with running_receiver(data_dir, upload_token=UPLOAD_TOKEN, port=port) as back:
            wait_for(lambda: set(states(state_dir)) == expected and set(states(state_dir).values()) == {"sent"},
                     60, "the backlog drained after the outage")
            stored = {r["sha256"] for r in back.stored()}
            drained = time.monotonic() - started - outage
            fault_report(f"phase 3: backlog of {OUTAGE_FILES} drained {drained:.1f} s after the receiver came "
                         f"back, {len(back.state.requests)} requests")
        assert w.stop() == 0
    assert stored == expected  # the same data dir: everything from both receivers
    rows = ledger_rows_cli(env)
    assert len(rows) == FLAKY_FILES + OUTAGE_FILES and {r["state"] for r in rows} == {"sent"}
    assert_clean(w.text(), "watch log")
    assert "Failed " not in w.text()


def _sha_of(path: Path) -> str:
    return sha(path.read_bytes())
