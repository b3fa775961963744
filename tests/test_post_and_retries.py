"""README promises about retries, refusals, `post` and `ledger forget` that no other test pinned down
(found by the mutants in tests/mutants/watch.toml; each test names the mutants it was checked against).

Against the real receiver on loopback (scripted faults), the real CLI in subprocesses, and a real ledger:
every test runs twice, on SQLite and on PostgreSQL (``both_ledgers``, tests/conftest.py).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import UPLOAD_TOKEN, write_csv
from smt_watch.config import Settings
from smt_watch.pipeline import post_files
from smt_watch.reference.receiver import Fault
from smt_watch.statedir import open_ledger

Make = Callable[..., Settings]
Run = Callable[..., subprocess.CompletedProcess[str]]

pytestmark = pytest.mark.both_ledgers

RETRYABLE = (408, 425, 429, 500, 502, 503, 504)  # README "Retries", in that order
BACKOFF_BASE = 0.4  # SMT_RETRY_BACKOFF_SECONDS for the in-call backoff test


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def multipart(make: Make, receiver: Any, **env: str) -> Settings:
    return make(SMT_UPLOAD_URL=f"{receiver.url}/upload", SMT_UPLOAD_TOKEN=UPLOAD_TOKEN, **env)


def upload_env(receiver: Any) -> dict[str, str]:
    return {"SMT_UPLOAD_URL": f"{receiver.url}/upload", "SMT_UPLOAD_TOKEN": UPLOAD_TOKEN}


# --- retries and refusals (in-process, against the real receiver) --------------------------------------


def test_every_listed_status_is_retried_within_the_call(make_settings: Make, receiver: Any, tmp_path: Path) -> None:
    """Each status the README lists as retryable is tried again in the same call: one call per status, each
    with a file of its own, against one receiver and ledger. Checked against retry-status-408, -425, -500,
    -502 and -504 (and -429, -503): each makes its status a refusal."""
    settings = multipart(make_settings, receiver)
    for status in RETRYABLE:
        receiver.state.faults.append(Fault(status=status))
        before = len(receiver.state.requests)
        [o] = post_files(settings, [write_csv(tmp_path / f"{status}.csv", seed=status)])
        assert (o.result, o.attempts) == ("sent", 2), (status, o)
        assert [r.status for r in receiver.state.requests[before:]] == [status, 200]


def test_other_statuses_are_refused_at_once_and_never_sent(make_settings: Make, receiver: Any,
                                                           tmp_path: Path) -> None:
    """A row is ``sent`` only after a 2xx: a redirect is not a delivery (none is followed), and a 4xx other
    than 408/425/429 is ``failed`` with its status after one request (302, 404, 409, 413: one call each, a
    file of its own, against one receiver and ledger). Checked against retry-sent-only-2xx (the 302, whose
    body has no ``ok: false``, would be recorded as sent)."""
    settings = multipart(make_settings, receiver)
    for status in (302, 404, 409, 413):
        receiver.state.faults.append(Fault(status=status, body={"error": "not here"}))
        before = len(receiver.state.requests)
        f = write_csv(tmp_path / f"{status}.csv", seed=status)
        [o] = post_files(settings, [f])
        assert (o.result, o.status, o.attempts) == ("failed", status, 1), (status, o)
        assert len(receiver.state.requests) == before + 1, status
        with open_ledger(settings) as ledger:
            row = ledger.get(sha(f))
        assert row is not None and (row.state, row.http_status, row.sent_at) == ("failed", status, None), status
    assert receiver.stored() == []


def test_a_timeout_is_retried_within_the_call(make_settings: Make, receiver: Any, tmp_path: Path) -> None:
    """Timeouts are retried like connection errors: the first request is held past SMT_HTTP_TIMEOUT, the
    second lands. Checked against retry-timeouts (only network errors retried): the ReadTimeout escapes."""
    held = threading.Event()  # the first request is held until the call is over (not a fixed 3 s delay
    receiver.state.faults.append(Fault(release=held))  # that the receiver's shutdown would wait out)
    settings = multipart(make_settings, receiver, SMT_HTTP_TIMEOUT="1")
    f = write_csv(tmp_path / "a.csv")
    try:
        [o] = post_files(settings, [f])
    finally:
        held.set()
    assert (o.result, o.attempts) == ("sent", 2), o
    assert receiver.read(sha(f)) == f.read_bytes()


def test_in_call_backoff_starts_at_the_setting_and_doubles(make_settings: Make, receiver: Any,
                                                           tmp_path: Path) -> None:
    """Three 503s then success: the k-th wait within the call is at least half its step (jitter is on the
    upper half), step = SMT_RETRY_BACKOFF_SECONDS * 2**(k-1). Only lower bounds are checked: a loaded machine
    can only make the gaps longer. Checked against retry-in-call-no-wait (the first gap is ~0) and
    retry-in-call-no-doubling (the third gap stays under 2 * BACKOFF_BASE)."""
    receiver.state.faults.extend([Fault(status=503)] * 3)
    settings = multipart(make_settings, receiver, SMT_RETRY_BACKOFF_SECONDS=str(BACKOFF_BASE))
    [o] = post_files(settings, [write_csv(tmp_path / "a.csv")])
    assert (o.result, o.attempts) == ("sent", 4), o
    arrived = [r.arrived for r in receiver.state.requests]
    gaps = [b - a for a, b in itertools.pairwise(arrived)]
    for k, gap in enumerate(gaps, start=1):
        step = BACKOFF_BASE * 2 ** (k - 1)
        assert gap >= step / 2, (k, gaps)


def test_a_refusal_keeps_the_first_500_bytes_of_the_body(make_settings: Make, receiver: Any,
                                                         tmp_path: Path) -> None:
    """``failed`` with the status and the first 500 bytes of the body: no fewer, no more. Checked against
    retry-error-body-500-bytes (100 bytes kept) and retry-error-body-bounded (the whole body kept)."""
    body = {"error": "0123456789" * 100}
    text = json.dumps(body, ensure_ascii=False, separators=(",", ":"))  # as the receiver renders it
    assert len(text) > 600
    receiver.state.faults.append(Fault(status=400, body=body))
    settings = multipart(make_settings, receiver)
    f = write_csv(tmp_path / "a.csv")
    [o] = post_files(settings, [f])
    assert o.result == "failed"
    with open_ledger(settings) as ledger:
        row = ledger.get(sha(f))
    assert row is not None and row.http_status == 400 and row.last_error is not None
    assert row.last_error.endswith(text[:500]), row.last_error
    assert text[:501] not in row.last_error


# --- post and ledger forget through the real CLI ---------------------------------------------------------


def test_post_force_sends_again(run_cli: Run, receiver: Any, tmp_path: Path) -> None:
    """``post --force`` re-sends content the ledger says was sent. Checked against post-force."""
    f = write_csv(tmp_path / "a.csv")
    assert run_cli("post", str(f), env=upload_env(receiver)).stdout.startswith("sent")
    again = run_cli("post", "--force", str(f), env=upload_env(receiver))
    assert again.returncode == 0 and again.stdout.startswith("sent"), again.stdout + again.stderr
    assert len(receiver.state.requests) == 2 and receiver.state.requests[1].duplicate is True


def test_post_exits_1_when_a_file_will_be_retried(run_cli: Run, tmp_path: Path, unused_port: int) -> None:
    """Exit 1 when any file "will be retried", not only when one failed. Checked against
    post-exit-1-on-retrying."""
    env = {"SMT_UPLOAD_URL": f"http://127.0.0.1:{unused_port}/upload", "SMT_RETRY_ATTEMPTS": "1"}
    proc = run_cli("post", str(write_csv(tmp_path / "a.csv")), env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.startswith("retrying")


def test_post_delivers_failed_and_retrying_rows_now(run_cli: Run, receiver: Any, tmp_path: Path) -> None:
    """``post FILE`` delivers now whatever the row says (``failed``: no ``ledger forget`` needed;
    ``retrying``: the 120 s Retry-After is the watcher's business, not post's). Checked against
    post-takes-failed-and-retrying."""
    env = upload_env(receiver)
    receiver.state.faults.extend([Fault(status=422, body={"ok": False, "error": "bad csv"}),
                                  Fault(status=503, retry_after="120")])
    refused, later = write_csv(tmp_path / "refused.csv", seed=1), write_csv(tmp_path / "later.csv", seed=2)
    first = run_cli("post", str(refused), str(later), env=env)
    assert first.returncode == 1 and [line.split()[0] for line in first.stdout.splitlines()] == [
        "failed", "retrying"], first.stdout
    second = run_cli("post", str(refused), str(later), env=env)
    assert second.returncode == 0, second.stdout + second.stderr
    assert [line.split()[0] for line in second.stdout.splitlines()] == ["sent", "sent"]
    assert [r.status for r in receiver.state.requests] == [422, 503, 200, 200]


def test_forget_refuses_an_ambiguous_prefix(run_cli: Run, tmp_path: Path) -> None:
    """``ledger forget`` takes a *unique* hash prefix: one that matches two rows forgets nothing and says
    so. Checked against ledger-forget-ambiguous-prefix (both rows dropped)."""
    one, two = "abcdef01" + "0" * 56, "abcdef01" + "1" * 56
    legacy = tmp_path / "posted"
    legacy.write_text(f"{one}\n{two}\n")
    assert run_cli("ledger", "import", str(legacy)).returncode == 0
    proc = run_cli("ledger", "forget", "abcdef01")
    assert proc.returncode == 1 and "prefix matches 2 rows" in proc.stderr, proc.stdout + proc.stderr
    rows = json.loads(run_cli("ledger", "list", "--json").stdout)
    assert sorted(r["sha256"] for r in rows) == [one, two]
    assert run_cli("ledger", "forget", "abcdef011").returncode == 0  # unique: forgets that one
    assert [r["sha256"] for r in json.loads(run_cli("ledger", "list", "--json").stdout)] == [one]
