"""Days newer than the app's window are re-sent once inside it: both processes' clocks moved by libfaketime.

The reference receiver (with the app's routes) and smt-watch each run as their own process with libfaketime
preloaded (monotonic time left real: FAKETIME_DONT_FAKE_MONOTONIC=1), first on day T0, then on T0 + 1 day,
with the ledger and the app's data on disk in between, so this is also the restart the re-send must survive.

Never the ``faketime`` wrapper: it makes a POSIX semaphore and shared memory named after its own PID
(``/dev/shm/sem.faketime_sem_<pid>``, ``O_EXCL``) and removes them only when it exits normally. A wrapper
stopped by a signal (an interrupted test run, a killed worker) leaves them behind, and a later wrapper that
happens to get that PID exits 1 at once with nothing on stdout ("faketime: sem_open: File exists"): the
flaky failure CI saw. A preloaded library with ``FAKETIME="@..."`` uses no shared objects at all.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from conftest import ADMIN_TOKEN, SMT_WATCH
from smt_watch.reference.sample import interval_csv

T0 = "2026-06-10 18:00:00"  # Chicago 13:00 on 06-10: the window ends 06-08
T1 = "2026-06-11 18:00:00"  # the window ends 06-09
TICK = """
import sys, time
from smt_watch.autoverify import AutoVerify
from smt_watch.config import load_settings
from smt_watch.delivery import delivery_mode, make_sink
from smt_watch.pipeline import deliver_file
from smt_watch.statedir import open_ledger
import os
settings = load_settings(os.environ)
with open_ledger(settings) as ledger:
    sink = make_sink(settings, delivery_mode(settings), chunks=ledger)
    auto = AutoVerify(settings, ledger, lambda p: deliver_file(settings, ledger, sink, p))
    resent, reports = auto.tick(time.time())
    print([r.state.value if r.state else None for r in resent], [r.verdict.value for r in reports])
    sink.close()
"""


def _faked(when: str) -> dict[str, str]:
    """The environment that starts a process's wall clock at ``when`` and lets it run ("@"), monotonic time
    real. libfaketime preloaded, not the ``faketime`` wrapper: the wrapper forks (terminating it would leave the
    receiver running) and can fail on a PID whose shared objects an earlier, killed wrapper left (see above)."""
    return {"LD_PRELOAD": _preload(), "FAKETIME": f"@{when}", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


def _preload() -> str:
    """libfaketime itself (the test is skipped without it)."""
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1") + glob.glob("/usr/lib*/faketime/libfaketime.so.1")
                   + glob.glob("/usr/local/lib/faketime/libfaketime.so.1"))
    if not found:
        pytest.skip("libfaketime.so.1 is not installed (Debian: apt-get install libfaketime)")
    return found[0]


@contextmanager
def app_at(when: str, data: Path, token_file: Path) -> Iterator[str]:
    env = {"PATH": os.environ["PATH"], **_faked(when)}
    proc = subprocess.Popen([sys.executable, "-m", "smt_watch.reference.app_server", "--data",
                             str(data), "--admin-token-file", str(token_file)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until the server is bound (or the process died)
        assert line.startswith("listening on "), (line, proc.stderr.read() if proc.stderr else "")
        yield line.split()[-1]
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.fixture
def run_at(base_env: dict[str, str], tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    def run(when: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        full = {"PATH": os.environ["PATH"], "HOME": str(tmp_path / "home"), **base_env, **env, **_faked(when)}
        return subprocess.run(list(args), env=full, capture_output=True, text=True, timeout=120, cwd=tmp_path)

    return run


def _json(done: subprocess.CompletedProcess[str], code: int) -> Any:
    """``done``'s exit code checked and its stdout parsed; either failing shows both streams."""
    said = f"exit {done.returncode}\nstdout: {done.stdout[-2000:]!r}\nstderr: {done.stderr[-4000:]}"
    assert done.returncode == code, said
    try:
        return json.loads(done.stdout)
    except ValueError:
        pytest.fail(f"stdout is not JSON; {said}")


def test_a_file_reaching_into_yesterday_is_completed_a_day_later(
        tmp_path: Path, run_at: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(ADMIN_TOKEN)
    data = tmp_path / "app"
    path = tmp_path / "inbox" / "daily_M1.csv"
    path.write_bytes(interval_csv(5, start=date(2026, 6, 5)))  # 06-05 .. 06-09
    with app_at(T0, data, token_file) as url:
        env = {"INTELLIWATT_BASE_URL": url, "ADMIN_TOKEN": ADMIN_TOKEN, "SMT_DELIVERY": "raw-upload",
               "SMT_VERIFY_REQUESTS_PER_SECOND": "1000", "SMT_VERIFY_DELAY_SECONDS": "0"}
        posted = run_at(T0, *SMT_WATCH, "post", str(path), env=env)
        assert posted.returncode == 0, posted.stdout + posted.stderr
        [obj] = _json(run_at(T0, *SMT_WATCH, "verify", "--json", env=env), 1)
        assert obj["verdict"] == "outside window"
        assert obj["days_stored"] == 4 and [d[2] for d in obj["newer_days"]] == ["2026-06-09"]
        assert obj["resend_due_at"] == "2026-06-11T05:00:00Z"  # Chicago midnight, two days after 06-09
        early = run_at(T0, sys.executable, "-c", TICK, env=env)  # not due yet: nothing happens
        assert early.stdout.strip() == "[] []", early.stdout + early.stderr
    with app_at(T1, data, token_file) as url:
        env.update(INTELLIWATT_BASE_URL=url)
        tick = run_at(T1, sys.executable, "-c", TICK, env=env)
        assert tick.stdout.strip() == "['sent'] ['stored']", tick.stdout + tick.stderr
        derived = list((tmp_path / "state" / "resend").glob("*.csv"))
        assert [p.name for p in derived] == ["daily_M1.resend-20260609-20260609.csv"]
        assert derived[0].read_text().count("\n") == 1 + 96  # the header and the one day's rows
        [obj] = _json(run_at(T1, *SMT_WATCH, "verify", str(path), "--json", env=env), 0)
        assert obj["verdict"] == "stored" and obj["days_stored"] == 5 and obj["newer_days"] == []
