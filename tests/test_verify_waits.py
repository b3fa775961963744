"""verify's waits (its pace toward the app, a 429's Retry-After, a busy claim) under a moved clock, and the
automatic verify thread outliving a failure.

The demo and tests/test_verify_faketime.py move ``watch``'s calendar days ahead with libfaketime
(``FAKETIME_DONT_FAKE_MONOTONIC=1``); Python 3.11's ``time.sleep`` sleeps to an absolute monotonic deadline,
which libfaketime then refuses with EINVAL every time: the pacer's first wait killed the verify thread and
the demo's "two days later" check never came."""

from __future__ import annotations

import glob
import logging
import os
import subprocess
import sys
import threading
from typing import Any

import pytest

from conftest import wait_for
from smt_watch.autoverify import AutoVerify
from smt_watch.config import load_settings
from smt_watch.statedir import open_ledger

PACED = """
import time
from smt_watch.clock import pause
from smt_watch.verify import Pacer
pause(0.01)
pacer = Pacer(50.0)
start = time.monotonic()
for _ in range(3):
    pacer.wait(float("inf"))
print(round(time.monotonic() - start, 3))
"""


def _libfaketime() -> str:
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1") + glob.glob("/usr/lib*/faketime/libfaketime.so.1"))
    if not found:
        pytest.skip("libfaketime.so.1 is not installed")
    return found[0]


def test_the_pace_toward_the_app_waits_under_a_moved_clock() -> None:
    env = {**os.environ, "LD_PRELOAD": _libfaketime(), "FAKETIME": "+2d", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    done = subprocess.run([sys.executable, "-c", PACED], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout) >= 0.035  # three requests at 50/s: two paced waits of 20 ms really waited


def test_the_verify_thread_outlives_a_failure_and_says_it(base_env: dict[str, str],
                                                         caplog: pytest.LogCaptureFixture) -> None:
    settings = load_settings({**base_env, "SMT_UPLOAD_URL": "http://127.0.0.1:9/upload"})
    stop = threading.Event()
    calls: list[float] = []

    def tick(now: float) -> Any:
        calls.append(now)
        if len(calls) == 1:
            raise OSError(22, "Invalid argument")
        return [], []

    with open_ledger(settings) as ledger, caplog.at_level(logging.ERROR, "smt_watch"):
        auto = AutoVerify.for_watch(settings, ledger, stop=stop)
        auto.tick = tick  # type: ignore[method-assign]
        thread = threading.Thread(target=auto.run, args=(stop, 0.05), daemon=True)
        thread.start()
        try:
            wait_for(lambda: len(calls) >= 2, 30, "a second turn after the failure")
        finally:
            stop.set()
            thread.join(10)
            auto.close()
    assert not thread.is_alive()
    failed = [r.getMessage() for r in caplog.records if "Automatic verify failed" in r.getMessage()]
    assert failed == ["Automatic verify failed: OSError: [Errno 22] Invalid argument (tried again in 0.05 s)"]
