"""`make demo` must keep working: run the demo script exactly as the Makefile does and check its story."""

from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHICAGO = ZoneInfo("America/Chicago")


def kept_by_the_app(first: date, days: int) -> int:
    """Intervals the app keeps of `smt-watch sample`'s days: 96 a day, 92 on a spring-forward day (its 2:00-2:45
    do not exist), 96 on a fall-back day (the repeated 1:00-1:45 land on the same instants)."""
    total = 0
    for n in range(days):
        day = first + timedelta(days=n)
        start = datetime(day.year, day.month, day.day, tzinfo=CHICAGO)
        following = day + timedelta(days=1)
        # timestamps: subtracting two datetimes of one ZoneInfo compares wall clocks (always 24 h)
        seconds = datetime(following.year, following.month, following.day, tzinfo=CHICAGO).timestamp() - \
            start.timestamp()
        total += 92 if seconds < 86400 else 96
    return total


def has_libfaketime() -> bool:
    """What the demo looks for to move its clocks (scripts/demo.py ``libfaketime``)."""
    return any(glob.glob(p) for p in ("/usr/lib/*/faketime/libfaketime.so.1", "/usr/lib*/faketime/libfaketime.so.1",
                                      "/usr/local/lib/faketime/libfaketime.so.1"))


def left_running(run_dir: Path) -> list[str]:
    """Processes whose command line or environment names ``run_dir``: the demo's, if it left any."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            text = (proc / "cmdline").read_bytes() + b"\0" + (proc / "environ").read_bytes()
        except OSError:
            continue
        if str(run_dir).encode() in text and int(proc.name) != os.getpid():
            found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
    return found


def gpg_agents_of(home: Path) -> list[str]:
    """Command lines of running gpg-agents serving ``home`` (read from /proc; nothing is signalled)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if args and args[0].endswith(b"gpg-agent") and str(home).encode() in b" ".join(args):
            found.append(b" ".join(args).decode(errors="replace"))
    return found


@pytest.mark.timeout(420)
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    run_dir = tmp_path / "demo"  # not ./demo-run: a test never writes into the checkout
    end = datetime.now(UTC).astimezone(CHICAGO).date() - timedelta(days=2)  # the app's window ends here
    # a session of its own: if the demo overruns, it and everything it started are stopped together
    with subprocess.Popen([sys.executable, "scripts/demo.py"], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True,
                          env={**os.environ, "SMT_DEMO_DIR": str(run_dir), "PYTHONWARNINGS": "default"}) as running:
        try:
            stdout, stderr = running.communicate(timeout=360)  # ~45 s alone; a bound, not a benchmark (a loaded
            # machine stretched it past 100 s, and the demo's own waits allow 150 s for a stuck step)
        except subprocess.TimeoutExpired:
            os.killpg(running.pid, signal.SIGKILL)  # our own process group only
            stdout, stderr = running.communicate()
            raise AssertionError("the demo overran 360 s:\n" + stdout[-3000:] + stderr[-3000:]) from None
    proc = subprocess.CompletedProcess(running.args, running.returncode, stdout, stderr)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    table = {m.group(1): m for m in re.finditer(r"^  (\S+)\s+(cp|curl /upload|sftp → sync)\s+([0-9a-f]{12})\s+"
                                                 r"([\d,]+)\s+([\d.]+)s$", out, re.M)}
    assert {m.group(2) for m in table.values()} == {"cp", "curl /upload"} | (
        {"sftp → sync"} if shutil.which("gpg") else set())
    # what the app keeps, read back through its own read route: a year inside its window, every interval
    year = table["IntervalMeterUsage_M1001_year.csv"]
    assert int(year.group(4).replace(",", "")) == kept_by_the_app(end - timedelta(days=364), 365)
    [quarter] = [m for name, m in table.items() if name.endswith("_IntervalMeterUsage_M2002_q.csv")]
    assert int(quarter.group(4).replace(",", "")) == kept_by_the_app(end - timedelta(days=89), 90)
    # a file reaching into yesterday: the app keeps its first two days only (two days behind today)
    assert int(table["IntervalMeterUsage_M5005_daily.csv"].group(4)) == 2 * 96
    assert "Skipping copy_of_year.csv: already sent" in out
    # watch's automatic verify agrees with the app: the year stored, the daily file outside the window
    assert "watch: [INFO] Verify IntervalMeterUsage_M1001_year.csv: stored (365 day(s) stored)" in out
    assert "watch: [INFO] Verify IntervalMeterUsage_M5005_daily.csv: outside window (2 day(s) stored; 1 day" in out
    assert "INLINE_DISABLED" in out and "use raw-upload" in out  # production refuses inline
    assert "is smt-watch's own serve" in proc.stderr  # SMT_UPLOAD_URL at serve: exit 2
    assert re.search(r"^sent\s+\S+adhoc\.csv\s+sha256:", out, re.M)  # then raw-upload takes it
    if has_libfaketime():  # two days later: just the dropped day re-sent, then stored, verify agreeing
        assert re.search(r"Resend IntervalMeterUsage_M5005_daily\.csv: 96 line\(s\) of 1 day\(s\) sent again as "
                         r"IntervalMeterUsage_M5005_daily\.resend-\d{8}-\d{8}\.csv", out)
        assert re.search(r"^stored\s+[0-9a-f]{12} IntervalMeterUsage_M5005_daily\.csv\s+\(3 day\(s\) stored\)", out,
                         re.M)
        assert re.search(r"^sent/stored\s+[0-9a-f]{12}.*IntervalMeterUsage_M5005_daily\.csv$", out, re.M)
    assert re.search(r"^sent/stored\s+[0-9a-f]{12}.*IntervalMeterUsage_M1001_year\.csv$", out, re.M)
    assert "Traceback" not in proc.stderr
    # issue 23 item 16: no deprecation (or any other) warning from the demo or the processes it ran, no agent left
    logs = "".join(p.read_text() for p in (run_dir / "logs").glob("*.log"))
    for text in (proc.stderr, logs):
        assert not re.search(r"\w+Warning\b", text), re.findall(r".*\w+Warning\b.*", text)[:5]
    assert "faketime:" not in proc.stderr
    assert gpg_agents_of(run_dir / "gnupg") == []
    assert left_running(run_dir) == []  # receiver, watch (both of them), serve: all stopped
    assert (run_dir / "state" / "ledger.sqlite3").is_file() and f"demo files and logs are in {run_dir}" in out
