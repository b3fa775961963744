"""What ``bench_sync.py``, ``bench_serve.py`` and ``bench_content.py`` share, on top of the older benches.

Why a module: the three scripts report the same way (every figure beside its same-run anchor, the ratio,
the target and PASS/FAIL, in a section of ``bench/RESULTS.md`` that only its script rewrites), start
long-running smt-watch servers the same way (spawn, read the bound port from the log, stop by PID), and
time one-shot commands the same way. The lower-level pieces are imported from ``bench_post.py`` and
``bench_watch.py`` (``run_child``, ``clean_env``, ``machine``, ``update_markdown``, ``Procs``,
``memory_kib``, ...), never copied.

A figure without a target in the issue is reported as ``reported``, not judged: a PASS that nobody asked
for would only add noise.
"""

from __future__ import annotations

import hashlib
import os
import re
import resource
import shlex
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_post import Run, csv_block, machine, rss_method, run_child  # bench/ is not a package: run as scripts
from bench_watch import BenchError, Procs, _terminate, note, revision

MIB = 1024 * 1024
MB = 1_000_000  # throughput and the RSS targets are in MB (10^6 bytes), as in bench_watch.py

__all__ = [
    "MB",
    "MIB",
    "BenchError",
    "CpuRun",
    "Figure",
    "Procs",
    "Run",
    "Start",
    "Timed",
    "begin",
    "cell",
    "figures_table",
    "header_lines",
    "install_sigterm",
    "note",
    "revision",
    "sha256_file",
    "spawn_server",
    "timed",
    "write_repeated",
]


@dataclass
class Figure:
    """One row of the verdict table. ``ok`` is None for a figure reported without a target."""

    what: str
    measured: str
    anchor: str = ""
    ratio: str = ""
    target: str = "none set"
    ok: bool | None = None

    @property
    def result(self) -> str:
        return "reported" if self.ok is None else "PASS" if self.ok else "**FAIL**"


def cell(text: str) -> str:
    """Text for a Markdown table cell: a ``|`` (as in ``gpg -d | funzip``) would split the cell."""
    return text.replace("|", "\\|")


def figures_table(figures: Sequence[Figure]) -> list[str]:
    lines = ["| figure | measured | anchor (same run) | ratio | target | result |", "|---|---:|---|---:|---:|---|"]
    lines += [f"| {cell(f.what)} | {cell(f.measured)} | {cell(f.anchor)} | {f.ratio} | {f.target} | {f.result} |"
              for f in figures]
    return lines


@dataclass(frozen=True)
class Start:
    """Taken when a run begins: smt_watch/ may change, and the load may move, while a long run goes on."""

    monotonic: float
    rev: str
    load: float


def begin() -> Start:
    return Start(time.monotonic(), revision(), os.getloadavg()[0])


def header_lines(section: str, start: Start, quick: bool) -> list[str]:
    """Section title, date, machine, load, exact command, commit, duration, and how time and RSS are taken."""
    return [
        section,
        "",
        f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {machine()}; 1-min load average at the start {start.load:.1f}, at the end"
        f" {os.getloadavg()[0]:.1f} (2 cores: above ~2, other processes competed for CPU)",
        f"- command: `{shlex.join(sys.orig_argv)}` (cwd `{Path.cwd()}`),"
        f" {(time.monotonic() - start.monotonic) / 60:.1f} min in all; smt-watch at {start.rev} (at the start)"
        + (" — **--quick: reduced sizes, a smoke test**" * quick),
        f"- one-shot commands: wall time from spawn to reap; peak RSS: {rss_method()}",
    ]


@dataclass
class CpuRun(Run):
    """A :class:`Run` plus the CPU time (user + system) of the command and every descendant it reaped.

    CPU seconds barely move when other processes compete for the cores, while wall time does: on a busy
    shared machine they tell whether a slower run did more work or only waited for a core.
    """

    cpu_s: float = 0.0


@dataclass
class Timed:
    """Every run of one command, for medians and maxima."""

    name: str
    runs: list[CpuRun] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(r.seconds for r in self.runs)

    @property
    def median_cpu(self) -> float:
        return statistics.median(r.cpu_s for r in self.runs)

    @property
    def peak_rss_mib(self) -> float:
        return max(r.maxrss_kib for r in self.runs) / 1024

    def times(self) -> str:
        return ", ".join(f"{r.seconds:.2f}" for r in self.runs)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(argv: Sequence[str], env: dict[str, str] | None, what: str) -> CpuRun:
    """``run_child`` that turns a non-zero exit into a :class:`BenchError` with the command's output, and
    adds the command's CPU time (``RUSAGE_CHILDREN`` before and after: the children reaped meanwhile are
    this command, its ``/usr/bin/time`` wrapper and what they reaped, e.g. ``ssh`` under ``sftp``)."""
    before = _children_cpu()
    run = run_child(argv, env)
    cpu = _children_cpu() - before
    if run.returncode != 0:
        raise BenchError(f"{what} exited {run.returncode}:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}")
    return CpuRun(run.seconds, run.maxrss_kib, run.returncode, run.stdout, run.stderr, cpu)


def spawn_server(
    procs: Procs, argv: list[str], env: dict[str, str], log_path: Path, port_re: str, timeout: float = 60.0
) -> tuple[int, int]:
    """Start a server with ``procs`` and wait for ``port_re`` (one group: the port) in its log.

    Returns (pid, port). Servers are asked for port 0 and report the one they bound, so two runs never
    race for a port.
    """
    proc = procs.spawn(argv, env, log_path)
    pattern = re.compile(port_re)
    deadline = time.monotonic() + timeout
    while True:
        text = log_path.read_text(encoding="utf-8", errors="replace") if log_path.exists() else ""
        m = pattern.search(text)
        if m:
            return proc.pid, int(m.group(1))
        if proc.poll() is not None:
            raise BenchError(f"{argv[1]} exited {proc.returncode} before listening:\n{text[-3000:]}")
        if time.monotonic() > deadline:
            raise BenchError(f"{argv[1]}: no port in its log within {timeout:.0f} s:\n{text[-3000:]}")
        time.sleep(0.05)


def install_sigterm() -> None:
    """SIGTERM behaves like Ctrl-C: ``finally`` blocks stop every child and remove every temp file."""
    signal.signal(signal.SIGTERM, _terminate)


def write_repeated(path: Path, size: int) -> str:
    """``size`` bytes of CSV rows (one 1 MiB block repeated, the last cut short); return the SHA-256."""
    block = csv_block(MIB)
    digest = hashlib.sha256()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        left = size
        while left > 0:
            piece = block[: min(left, len(block))]
            fh.write(piece)
            digest.update(piece)
            left -= len(piece)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(MIB):
            digest.update(chunk)
    return digest.hexdigest()
