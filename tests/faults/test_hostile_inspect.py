"""``inspect`` and ``inspect --plot`` are bounded by the file, not by the dates it names.

The real CLI on real files, a FIFO and ``/dev/zero``: as a subprocess where its CPU time, memory or a hang
is what is measured, in this process (conftest's ``cli_in_process``) where only its output, exit status and
files are. A date the calendar arithmetic cannot
handle is a row whose date cannot be read; the plot's grid holds at most ``SMT_PLOT_MAX_DAYS`` rows (the
file's latest days) and says what it left out; ``--plot`` refuses what is not a regular file, as ``inspect``
does; the image is written to a temporary file and renamed into place.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
from pathlib import Path

import pytest

from conftest import SMT_WATCH, cli_in_process
from faults.support import assert_clean
from smt_watch.plot import heatmap

pytestmark = [pytest.mark.faults, pytest.mark.timeout(600)]  # CLI starts on a shared, loaded machine

HEADER = ("ESIID,USAGE_DATE,REVISION_DATE,USAGE_START_TIME,USAGE_END_TIME,USAGE_KWH,ESTIMATED_ACTUAL,"
          "CONSUMPTION_SURPLUSGENERATION\n")
ESIID = "10443720000000001"


def row(day: str, start: str = "00:00", kwh: str = "0.5") -> str:
    return f"'{ESIID},{day},01/01/2026,{start},00:15,{kwh},A,Consumption\n"


def cpu_seconds() -> float:
    """CPU time of the finished child processes: unlike wall time, not stretched by a loaded machine."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _env(tmp_path: Path, env: dict[str, str]) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "SMT_STATE_DIR": str(tmp_path / "state"),
            "SMT_LOCAL_DIR": str(tmp_path / "inbox"), **env}


def cli(tmp_path: Path, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    """A subprocess: for the runs whose CPU time and memory (RUSAGE_CHILDREN) or hang is measured."""
    return subprocess.run([*SMT_WATCH, *args], env=_env(tmp_path, env), capture_output=True, text=True,
                          timeout=timeout, cwd=tmp_path)


def cli_here(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """In this process: for the runs where only the output, exit status and files written are checked."""
    return cli_in_process(args, _env(tmp_path, env), tmp_path)


@pytest.mark.parametrize("day", ["12/31/9999", "01/01/0001", "02/29/1900", "12/31/1969"])
def test_a_date_the_calendar_cannot_place_is_a_row_without_a_date(tmp_path: Path, day: str) -> None:
    csv = tmp_path / "odd.csv"
    csv.write_text(HEADER + row("01/05/2026") + row(day, "23:45"))
    proc = cli_here(tmp_path, "inspect", str(csv), "--json")
    assert_clean(proc.stdout + proc.stderr, "inspect")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["rows"] == 2 and summary["first_date"] == summary["last_date"] == "2026-01-05", summary


def test_a_plot_over_ten_thousand_years_is_refused_in_one_line(tmp_path: Path) -> None:
    """The issue's 262-byte CSV dated 0001 to 9999 ran out of memory: none of its dates can be placed."""
    csv = tmp_path / "span.csv"
    csv.write_text(HEADER + row("01/01/0001") + row("12/31/9999", "23:45"))
    started = cpu_seconds()
    proc = cli(tmp_path, "inspect", str(csv), "--plot", str(tmp_path / "out.png"))
    assert cpu_seconds() - started < 30
    assert proc.returncode == 1 and "no readable dated rows to plot" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert_clean(proc.stdout + proc.stderr, "inspect --plot")
    assert not (tmp_path / "out.png").exists()


def test_the_plot_is_bounded_by_the_file_and_says_what_it_left_out(tmp_path: Path) -> None:
    """Three rows spanning 1970 to 2026: the grid holds the last SMT_PLOT_MAX_DAYS days, not 20,000 rows,
    and the time and memory of the run do not grow with the span."""
    csv = tmp_path / "span.csv"
    csv.write_text(HEADER + row("01/01/1970") + row("06/01/2000") + row("12/31/2026", "23:45"))
    out = tmp_path / "out.png"
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = cpu_seconds()
    proc = cli(tmp_path, "inspect", str(csv), "--plot", str(out), SMT_PLOT_MAX_DAYS="60")
    elapsed = cpu_seconds() - started
    assert proc.returncode == 0, proc.stderr
    assert_clean(proc.stdout + proc.stderr, "inspect --plot")
    assert "plotted 60 day(s)" in proc.stderr + proc.stdout
    assert "2 row(s) on 2 earlier day(s) left out: SMT_PLOT_MAX_DAYS=60" in proc.stderr + proc.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert elapsed < 60, f"{elapsed:.0f} s of CPU"
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert peak_kib < 600 * 1024 or peak_kib == before, f"{peak_kib // 1024} MiB"
    data = heatmap(csv, max_days=800)  # the default: the days from 2024-10-23 to 2026-12-31
    assert len(data.days) == 800 and data.left_out == 2 and data.count("read") == 1


def test_plot_refuses_what_is_not_a_regular_file_at_once(tmp_path: Path) -> None:
    """A FIFO blocked for ever and /dev/zero was read until memory ran out: refused like `inspect` does."""
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    for source in (fifo, Path("/dev/zero")):  # a hang is TimeoutExpired, a failure
        proc = cli(tmp_path, "inspect", str(source), "--plot", str(tmp_path / "out.png"), timeout=90)
        assert proc.returncode == 1 and "not a regular file" in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        assert_clean(proc.stdout + proc.stderr, "inspect --plot")
    assert not (tmp_path / "out.png").exists()


def test_the_image_is_written_to_a_temporary_file_then_renamed(tmp_path: Path) -> None:
    """OUT is never a half-written picture: the new image is a new file renamed over the old one, and no
    temporary file is left beside it, on success or failure."""
    csv = tmp_path / "a.csv"
    csv.write_text(HEADER + row("01/05/2026") + row("01/06/2026", "12:00"))
    out = tmp_path / "plots" / "out.png"
    out.parent.mkdir()
    out.write_bytes(b"the previous picture")
    inode = out.stat().st_ino
    proc = cli_here(tmp_path, "inspect", str(csv), "--plot", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_ino != inode
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.png"]
    svg = out.with_suffix(".svg")
    assert cli_here(tmp_path, "inspect", str(csv), "--plot", str(svg)).returncode == 0
    assert svg.read_text().lstrip().startswith("<?xml")
    missing = tmp_path / "no-such-dir" / "out.png"
    failed = cli_here(tmp_path, "inspect", str(csv), "--plot", str(missing))
    assert failed.returncode == 1 and "cannot write" in failed.stderr, failed.stderr
    assert_clean(failed.stdout + failed.stderr, "inspect --plot")
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.png", "out.svg"]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
