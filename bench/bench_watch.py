"""Benchmark ``smt-watch watch`` against its issue-3 targets, all in one run, to the bench sink on loopback.

What is measured (each part starts its own ``smt-watch watch`` process with a fresh inbox and state dir):

1. **land → 2xx latency**: files landed one at a time by atomic rename (written as ``.NAME.part`` inside the
   inbox, then ``os.rename`` to ``NAME.csv``), with ``SMT_SETTLE_SECONDS=0`` and with the default ``1.0``.
   Latency is (the sink's ``time.time()`` when the request body was complete) − (our ``time.time()`` just
   before the rename): one wall clock, two processes. The sink logs each request with its
   ``Idempotency-Key`` (smt-watch sends the file's SHA-256 there), which is how a request is matched to
   its file.
2. **drain rate**: distinct CSV-like files of 1–50 KB are written to a staging directory on the same
   filesystem, then renamed into the inbox of a running watcher as fast as Python can; the time from the
   first rename to the last request complete at the sink gives files/s. Anchor, same run, same files,
   same sink: a bash loop doing what the bash script smt-watch replaces did per file (``sha256sum``,
   ``grep -q`` the hash in a state file, ``curl -sS -F file=@F``, append the hash).
3. **restart over already-sent files**: an inbox of tiny files is delivered by ``watch`` (the start-up scan
   finds them all), stopped with SIGTERM, and started again with ``NOTIFY_SOCKET`` bound here; time from
   spawn to ``READY=1``, the ``N file(s) to look at`` figure of its log line, and the requests that reach
   the sink afterwards (both must be 0). If the first delivery does not finish within the deadline, the
   undelivered files are deleted and the restart is measured with what was delivered (and the report
   says so). Then the same restarts at the full size over a ledger written directly through smt_watch's
   ``Ledger`` API (``remember``, ``claim``, ``mark_sent``, as ``watch`` records a delivery), so the restart
   target is measured at 100,000 files even while the first delivery is too slow to get there.
4. **idle RSS** (``VmRSS``/``VmHWM`` from ``/proc/PID/status``) after start-up on an empty inbox and after
   the restart over the sent files.

    .venv/bin/python bench/bench_watch.py [--out bench/RESULTS.md] [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_post import ROOT, SMT_WATCH, clean_env, csv_block, machine, update_markdown  # bench/ is not a package
from sink import start_sink_process

SECTION = "## watch (issue 3)"
KIB = 1024

# Targets (issue 3).
LATENCY_P50_OVER_SETTLE = 0.050
LATENCY_P99_OVER_SETTLE = 0.250
MIN_DRAIN_VS_BASH = 10.0
MIN_DRAIN_RATE = 1000.0  # issue 17: files/s on 2 cores, default settings
MAX_DRAIN_CPU_MS = 1.5  # issue 17: watch CPU per file
MAX_READY_S = 5.0
MAX_IDLE_RSS_MB = 60.0

LAND_GAP_S = 0.05  # pause between two landed files in the latency part
SETTLES = (0.0, 1.0)
DRAIN_CASES = ((2, "thread"), (4, "thread"), (2, "process"))  # (SMT_WORKERS, SMT_WORKER_MODE)
RESTARTS = 3  # restarts over the sent inbox; the verdict takes the slowest
WATCHING_RE = re.compile(r"Watching .*: (\d+) file\(s\) to look at, (\d+) already handled")

# The bash script's per-file work, as a loop over a list of paths (one per line).
SEED_LOOP = r"""
set -u
list=$1 state=$2 url=$3
: > "$state"
while IFS= read -r f; do
  sha=$(sha256sum "$f" | cut -d' ' -f1)
  if grep -q "$sha" "$state"; then continue; fi
  curl -sS -o /dev/null -F "file=@$f" "$url" || exit 1
  printf '%s\n' "$sha" >> "$state"
done < "$list"
"""


@dataclass(frozen=True)
class Sizes:
    latency_files: int  # per settle value
    drain_files: int
    anchor_files: int  # files the bash loop sends (a subset of the drain files when smaller)
    restart_files: int
    deliver_deadline_s: float  # for the first delivery of the restart inbox
    quiet_s: float  # how long to watch for stray requests after a restart
    synthetic_files: int = 0  # restart over a ledger written directly (0: as many as restart_files)


FULL = Sizes(200, 10_000, 10_000, 100_000, 240.0, 5.0)
QUICK = Sizes(20, 300, 100, 2_000, 60.0, 2.0)


class BenchError(Exception):
    """Something went wrong with the benchmark itself (not a missed target)."""


# --- processes --------------------------------------------------------------------------------------


class Procs:
    """Every child this script starts, so each one is stopped, whatever happens."""

    def __init__(self) -> None:
        self.live: list[subprocess.Popen[bytes]] = []

    def spawn(self, argv: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        self.live.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> int:
        """SIGTERM, wait up to ``timeout``, then SIGKILL; return the exit status."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                print(f"  pid {proc.pid} ignored SIGTERM for {timeout:.0f} s: killing it", file=sys.stderr)
                proc.kill()
                proc.wait(timeout=10)
        if proc in self.live:
            self.live.remove(proc)
        return proc.returncode

    def stop_all(self) -> None:
        for proc in list(self.live):
            self.stop(proc, timeout=10)


def memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in KiB from ``/proc/PID/status``."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values["VmRSS"], values["VmHWM"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (watch's worker processes under SMT_WORKER_MODE=process)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process and its live children (worker processes are not reaped until watch stops)."""
    return cpu_seconds(pid) + sum(cpu_seconds(c) for c in children(pid))


def tree_hwm_kib(pid: int) -> int:
    """VmHWM of a process plus its live children: the memory a watch with worker processes holds."""
    return memory_kib(pid)[1] + sum(memory_kib(c)[1] for c in children(pid))


def mb(kib: int) -> float:
    """KiB (what /proc reports) to MB (10^6 bytes, the unit of the target)."""
    return kib * KIB / 1e6


# --- the sink's request log -------------------------------------------------------------------------


@dataclass(frozen=True)
class Hit:
    at: float  # time.time() in the sink when the body was complete
    key: str  # Idempotency-Key, "-" when absent
    size: int


class SinkLog:
    """Follows the file the sink appends to (``sink.py --log``)."""

    def __init__(self, path: Path) -> None:
        self._fh = open(path, "rb")  # noqa: SIM115 (kept open for the whole run, closed by close())
        self._partial = b""
        self.hits: list[Hit] = []

    def close(self) -> None:
        self._fh.close()

    def poll(self) -> int:
        """Read what the sink wrote since the last call; return the number of requests so far."""
        data = self._fh.read()
        if data:
            lines = (self._partial + data).split(b"\n")
            self._partial = lines.pop()
            for line in lines:
                at, key, size, _path = line.decode().split("\t", 3)
                self.hits.append(Hit(float(at), key, int(size)))
        return len(self.hits)

    def wait_for(
        self,
        keys: set[str],
        start: int,
        timeout: float,
        interval: float,
        progress: Callable[[int], None] | None = None,
    ) -> dict[str, float]:
        """Wait until every key has a request at index ≥ ``start``; return key → first arrival time.

        Returns early with what arrived when ``timeout`` runs out; ``progress`` is called every ~10 s.
        """
        found: dict[str, float] = {}
        scanned = start
        deadline = time.monotonic() + timeout
        next_report = time.monotonic() + 10
        while True:
            self.poll()
            for hit in self.hits[scanned:]:
                if hit.key in keys and hit.key not in found:
                    found[hit.key] = hit.at
            scanned = len(self.hits)
            now = time.monotonic()
            if len(found) == len(keys) or now >= deadline:
                return found
            if progress and now >= next_report:
                progress(len(found))
                next_report = now + 10
            time.sleep(interval)

    def repeats(self, keys: set[str], start: int) -> int:
        """Requests at index ≥ ``start`` for a key of ``keys`` beyond the first: the same file sent again."""
        seen: set[str] = set()
        extra = 0
        for hit in self.hits[start:]:
            if hit.key in keys:
                if hit.key in seen:
                    extra += 1
                seen.add(hit.key)
        return extra


# --- test files -------------------------------------------------------------------------------------


class CsvMaker:
    """Distinct SMT interval CSVs of a given size, one meter (ESIID) per file as real SMT files have.

    Header, one row unique to the file (its kWh value is the file's serial number), then rows cut from a
    block of random readings; every row carries the file's own 17-digit ESIID, so smt-watch's content
    check finds exactly one ESIID, as in production.
    """

    ESIID_SLOT = b"10443720000000000"  # 17 digits, replaced by each file's ESIID

    def __init__(self, seed: int = 3) -> None:
        block = csv_block(1024 * KIB, seed)
        cut = block.index(b"\n") + 1
        self.header = block[:cut]
        self.rows = re.sub(rb"(?m)^\d{17},", self.ESIID_SLOT + b",", block[cut:])
        self.rng = random.Random(seed)
        self._serial = 0

    def make(self, size: int) -> bytes:
        self._serial += 1
        n = self._serial
        esiid = f"1044372{n % 10**10:010d}".encode()
        unique = esiid + f",01/01/2024,01/02/2024 00:00:00,00:00,00:15,{n / 1000:.3f},A\n".encode()
        need = size - len(self.header) - len(unique)
        if need <= 0:
            return self.header + unique
        offset = self.rng.randrange(len(self.rows) - need - 256)
        start = self.rows.index(b"\n", offset) + 1
        chunk = self.rows[start : start + need]
        return self.header + unique + chunk[: chunk.rfind(b"\n") + 1].replace(self.ESIID_SLOT, esiid)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- watch processes --------------------------------------------------------------------------------


@dataclass
class Watch:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    sock: socket.socket
    sock_path: Path
    ready_s: float = 0.0  # spawn → READY=1 datagram

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def watching_counts(self) -> tuple[int, int]:
        """(files to look at, already handled) from the start-up log line."""
        m = WATCHING_RE.search(self.log_text())
        if not m:
            raise BenchError(f"{self.name}: no 'Watching …' line in its log:\n{self.tail()}")
        return int(m.group(1)), int(m.group(2))


@dataclass
class Bench:
    work: Path
    port: int
    log: SinkLog
    procs: Procs
    dirs: int = 0
    loads: dict[str, float] = field(default_factory=dict)  # part -> 1-min load average at its end
    src: Path | None = None  # run ``python -m smt_watch`` from this source tree instead of the installed one

    def part_done(self, name: str) -> None:
        self.loads[name] = os.getloadavg()[0]

    @property
    def upload_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/upload"

    def fresh_dir(self, name: str) -> Path:
        self.dirs += 1
        path = self.work / f"{self.dirs:02d}-{name}"
        path.mkdir()
        return path

    def start_watch(
        self, name: str, inbox: Path, state: Path, *, settle: float, workers: int, ready_timeout: float = 120.0,
        mode: str = "thread", extra_env: dict[str, str] | None = None,
    ) -> Watch:
        """Spawn ``smt-watch watch`` the way systemd would (``NOTIFY_SOCKET``) and wait for ``READY=1``.

        ``extra_env``: settings added on top (``bench_ledger.py`` passes ``SMT_LEDGER_URL``)."""
        sock_path = self.work / f"{name}.notify"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(sock_path))
        env = clean_env()
        env.update(
            SMT_LOCAL_DIR=str(inbox), SMT_STATE_DIR=str(state), SMT_DELIVERY="multipart",
            SMT_UPLOAD_URL=self.upload_url, SMT_SETTLE_SECONDS=f"{settle:g}", SMT_WORKERS=str(workers),
            SMT_WORKER_MODE=mode,
            NOTIFY_SOCKET=str(sock_path),
            # what watch itself can do: the outbound limit (on by default) is bench_limits.py's subject
            SMT_MAX_REQUESTS_PER_SECOND="0", SMT_MAX_IN_FLIGHT="0",
        )
        env.update(extra_env or {})
        argv = [str(SMT_WATCH), "watch"]
        if self.src is not None:  # --src: the same venv, another checkout's code first on the path
            env["PYTHONPATH"] = str(self.src)
            argv = [sys.executable, "-P", "-m", "smt_watch", "watch"]  # -P: not the cwd first on sys.path
        log_path = self.work / f"{name}.log"
        spawned = time.monotonic()
        proc = self.procs.spawn(argv, env, log_path)
        w = Watch(name, proc, log_path, sock, sock_path)
        deadline = spawned + ready_timeout
        while True:
            remaining = deadline - time.monotonic()
            if proc.poll() is not None:
                raise BenchError(f"{name}: watch exited {proc.returncode} before READY=1:\n{w.tail()}")
            if remaining <= 0:
                raise BenchError(f"{name}: no READY=1 within {ready_timeout:.0f} s:\n{w.tail()}")
            sock.settimeout(min(0.2, remaining))  # only bounds the wait: a datagram ends recv() at once
            try:
                data = sock.recv(4096)
            except TimeoutError:
                continue
            if b"READY=1" in data.split(b"\n"):
                w.ready_s = time.monotonic() - spawned
                return w

    def stop_watch(self, w: Watch) -> None:
        rc = self.procs.stop(w.proc)
        w.sock.close()
        w.sock_path.unlink(missing_ok=True)
        if rc != 0:
            raise BenchError(f"{w.name}: watch exited {rc} on SIGTERM:\n{w.tail()}")


def note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- 1. latency -------------------------------------------------------------------------------------


@dataclass
class Latency:
    settle: float
    seconds: list[float]
    ready_s: float
    idle_kib: tuple[int, int] | None = None  # (VmRSS, VmHWM) 2 s after READY, empty inbox

    def pct(self, p: int) -> float:
        return statistics.quantiles(self.seconds, n=100, method="inclusive")[p - 1]


def measure_latency(b: Bench, maker: CsvMaker, settle: float, n: int, measure_idle: bool) -> Latency:
    tag = f"settle{settle:g}"
    inbox, state = b.fresh_dir(f"lat-{tag}-inbox"), b.fresh_dir(f"lat-{tag}-state")
    w = b.start_watch(f"latency-{tag}", inbox, state, settle=settle, workers=2)
    result = Latency(settle, [], w.ready_s)
    try:
        if measure_idle:
            time.sleep(2.0)
            result.idle_kib = memory_kib(w.proc.pid)
        for i in range(n):
            data = maker.make(maker.rng.randint(KIB, 50 * KIB))
            key = sha256(data)
            name = f"SMT_M1_lat{tag}_{i:04d}.csv"
            part = inbox / f".{name}.part"
            part.write_bytes(data)
            start = b.log.poll()
            landed = time.time()
            os.rename(part, inbox / name)
            got = b.log.wait_for({key}, start, timeout=settle + 30, interval=0.005)
            if key not in got:
                raise BenchError(f"{name} not delivered within {settle + 30:.0f} s:\n{w.tail()}")
            result.seconds.append(got[key] - landed)
            time.sleep(LAND_GAP_S)
    finally:
        b.stop_watch(w)
    b.part_done(f"latency {settle:g} s")
    note(f"  latency, settle {settle:g} s: p50 {result.pct(50) * 1000:.1f} ms, "
         f"p99 {result.pct(99) * 1000:.1f} ms over {n} files")
    return result


# --- 2. drain ---------------------------------------------------------------------------------------


@dataclass
class Pool:
    path: Path
    names: list[str]
    keys: dict[str, str]  # name -> sha256
    total_bytes: int


def make_pool(b: Bench, maker: CsvMaker, n: int) -> Pool:
    pool = b.fresh_dir("pool")
    names, keys, total = [], {}, 0
    for i in range(n):
        data = maker.make(maker.rng.randint(KIB, 50 * KIB))
        name = f"SMT_M1_drain_{i:05d}.csv"
        (pool / name).write_bytes(data)
        names.append(name)
        keys[name] = sha256(data)
        total += len(data)
    if len(set(keys.values())) != n:
        raise BenchError("pool files are not distinct")
    return Pool(pool, names, keys, total)


@dataclass
class Drain:
    workers: int
    mode: str  # SMT_WORKER_MODE
    files: int
    rename_s: float  # time to rename all files into the inbox
    seconds: float  # first rename → last request complete
    cpu_s: float  # watch process (and worker processes) CPU time over the whole run
    hwm_kib: int  # VmHWM, summed over the worker processes too
    repeats: int

    @property
    def rate(self) -> float:
        return self.files / self.seconds

    @property
    def label(self) -> str:
        return f"{self.workers} workers" + (" in processes" if self.mode == "process" else "")


def measure_drain(
    b: Bench, pool: Pool, workers: int, mode: str, *, extra_env: dict[str, str] | None = None, suffix: str = ""
) -> Drain:
    """Rename every pool file into the inbox of a fresh watcher; ``extra_env`` goes to the watcher, ``suffix``
    tells this drain's directories and logs apart from another with the same workers and mode."""
    tag = f"w{workers}" + ("p" if mode == "process" else "") + suffix
    staging = b.fresh_dir(f"drain-{tag}-staging")
    for name in pool.names:  # hard links: same bytes, no copying; fresh names for the rename into the inbox
        os.link(pool.path / name, staging / name)
    inbox, state = b.fresh_dir(f"drain-{tag}-inbox"), b.fresh_dir(f"drain-{tag}-state")
    w = b.start_watch(f"drain-{tag}", inbox, state, settle=0.0, workers=workers, mode=mode, extra_env=extra_env)
    keys = set(pool.keys.values())
    n = len(keys)
    try:
        start = b.log.poll()
        first = time.time()
        for name in pool.names:
            os.rename(staging / name, inbox / name)
        rename_s = time.time() - first
        timeout = max(300.0, n / 10)
        got = b.log.wait_for(keys, start, timeout=timeout, interval=0.05,
                             progress=lambda k: note(f"    drain {tag}: {k}/{n} at the sink"))
        if len(got) != n:
            raise BenchError(f"drain {tag}: only {len(got)}/{n} delivered in {timeout:.0f} s:\n{w.tail()}")
        time.sleep(0.5)  # let any duplicate request show up before counting repeats
        b.log.poll()
        result = Drain(workers, mode, n, rename_s, max(got.values()) - first, tree_cpu_seconds(w.proc.pid),
                       tree_hwm_kib(w.proc.pid), b.log.repeats(keys, start))
    finally:
        b.stop_watch(w)
    b.part_done(f"drain {result.label}")
    shutil.rmtree(inbox)
    shutil.rmtree(staging)
    note(f"  drain, {result.label}: {n} files in {result.seconds:.2f} s = {result.rate:.0f} files/s "
         f"(watch CPU {result.cpu_s:.1f} s)")
    return result


@dataclass
class Anchor:
    files: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.files / self.seconds


def measure_bash_loop(b: Bench, pool: Pool, n: int) -> Anchor:
    work = b.fresh_dir("bash-loop")
    listing = work / "files.txt"
    listing.write_text("".join(f"{pool.path / name}\n" for name in pool.names[:n]))
    start = b.log.poll()
    began = time.perf_counter()
    timeout = max(120.0, n / 5)
    try:
        proc = subprocess.run(
            ["bash", "-c", SEED_LOOP, "seed-loop", str(listing), str(work / "posted_sha256"), b.upload_url],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"bash loop did not finish {n} files in {timeout:.0f} s") from None
    seconds = time.perf_counter() - began
    if proc.returncode != 0:
        raise BenchError(f"bash loop exited {proc.returncode}: {proc.stderr[-2000:]}")
    b.part_done("bash loop")
    time.sleep(0.2)
    sent = b.log.poll() - start
    if sent != n:
        raise BenchError(f"bash loop: the sink saw {sent} requests, not {n}")
    note(f"  bash-script loop: {n} files in {seconds:.2f} s = {n / seconds:.0f} files/s")
    return Anchor(n, seconds)


# --- 3. restart -------------------------------------------------------------------------------------


@dataclass
class RestartRun:
    ready_s: float
    to_look_at: int
    handled: int
    new_requests: int
    rss_kib: tuple[int, int]


@dataclass
class Restart:
    populated: int
    first_ready_s: float
    deliver_s: float  # first start's READY → last request complete (or the deadline)
    delivered: int  # files delivered by the first run, and so kept for the restarts
    complete: bool
    progress: list[tuple[float, int]] = field(default_factory=list)  # (s since READY, delivered)
    runs: list[RestartRun] = field(default_factory=list)

    @property
    def worst_ready_s(self) -> float:
        return max(r.ready_s for r in self.runs)


def measure_restart(b: Bench, maker: CsvMaker, sizes: Sizes) -> Restart:
    m = sizes.restart_files
    inbox, state = b.fresh_dir("restart-inbox"), b.fresh_dir("restart-state")
    keys: dict[str, str] = {}  # sha256 -> name
    note(f"  writing {m} tiny files ...")
    for i in range(m):
        data = maker.make(maker.rng.randint(150, 400))
        name = f"SMT_M1_r{i:06d}.csv"
        (inbox / name).write_bytes(data)
        keys[sha256(data)] = name
    if len(keys) != m:
        raise BenchError("restart files are not distinct")
    want = set(keys)
    start = b.log.poll()
    w = b.start_watch("restart-0", inbox, state, settle=0.0, workers=2, ready_timeout=300)
    result = Restart(m, w.ready_s, 0.0, 0, False)
    ready_at = time.time()
    try:
        def progress(k: int) -> None:
            result.progress.append((time.time() - ready_at, k))
            note(f"    restart inbox: {k}/{m} delivered {time.time() - ready_at:.0f} s after READY")

        got = b.log.wait_for(want, start, timeout=sizes.deliver_deadline_s, interval=0.1, progress=progress)
        result.complete = len(got) == m
        result.deliver_s = (max(got.values()) if result.complete else time.time()) - ready_at
    finally:
        b.stop_watch(w)  # in-flight deliveries finish within the stop grace
    b.part_done("restart: first delivery")
    time.sleep(0.2)
    b.log.poll()
    delivered = {h.key for h in b.log.hits[start:] if h.key in want}
    result.delivered = len(delivered)
    if not result.complete:
        note(f"  only {len(delivered)}/{m} delivered within {sizes.deliver_deadline_s:.0f} s: deleting the rest, "
             "the restart is measured over the delivered ones")
        for key in want - delivered:
            (inbox / keys[key]).unlink()
    result.runs = restart_runs(b, "restart", inbox, state, sizes, result.delivered)
    shutil.rmtree(inbox)
    return result


def restart_runs(b: Bench, name: str, inbox: Path, state: Path, sizes: Sizes, n: int) -> list[RestartRun]:
    """Start watch over an inbox whose files are all handled, RESTARTS times; check nothing is re-read or sent."""
    runs = []
    for k in range(1, RESTARTS + 1):
        mark = b.log.poll()
        w = b.start_watch(f"{name}-{k}", inbox, state, settle=0.0, workers=2, ready_timeout=300)
        try:
            to_look_at, handled = w.watching_counts()
            time.sleep(sizes.quiet_s)
            rss = memory_kib(w.proc.pid)
            new = b.log.poll() - mark
        finally:
            b.stop_watch(w)
        b.part_done(f"{name} {k}")
        runs.append(RestartRun(w.ready_s, to_look_at, handled, new, rss))
        note(f"  {name} {k} over {n} sent files: READY after {w.ready_s:.2f} s, "
             f"{to_look_at} to look at, {handled} handled, {new} new requests, VmRSS {mb(rss[0]):.1f} MB")
    return runs


@dataclass
class Synthetic:
    files: int
    build_s: float
    runs: list[RestartRun]

    @property
    def worst_ready_s(self) -> float:
        return max(r.ready_s for r in self.runs)


def measure_synthetic_restart(b: Bench, maker: CsvMaker, sizes: Sizes) -> Synthetic:
    """The full-size restart without the full-size first delivery: each file is written to the inbox and
    recorded in the ledger as watch records a delivery (``remember`` its stat signature and hash, ``claim``,
    ``mark_sent``), through smt_watch's own Ledger API; then the same restarts as above."""
    from smt_watch.hashing import Signature  # the package is installed in the venv this runs with
    from smt_watch.ledger import Remember, SqliteLedger

    n = sizes.synthetic_files or sizes.restart_files
    inbox, state = b.fresh_dir("synthetic-inbox"), b.fresh_dir("synthetic-state")
    began = time.monotonic()
    ledger = SqliteLedger(state / "ledger.sqlite3")
    try:
        for i in range(n):
            data = maker.make(maker.rng.randint(150, 400))
            path = inbox / f"SMT_M1_s{i:06d}.csv"
            path.write_bytes(data)
            st = path.stat()
            key = sha256(data)
            ledger.remember(Remember(str(path), Signature.of(st), key))
            ledger.claim(key, filename=path.name, path=str(path), size=st.st_size, mode="multipart")
            ledger.mark_sent(key, status=200, destination=b.upload_url, attempts=1)
    finally:
        ledger.close()
    build_s = time.monotonic() - began
    note(f"  ledger of {n} sent files written in {build_s:.0f} s")
    return Synthetic(n, build_s, restart_runs(b, "synthetic", inbox, state, sizes, n))


# --- report -----------------------------------------------------------------------------------------


@dataclass
class Verdict:
    what: str
    measured: str
    anchor: str
    ratio: str
    limit: str
    ok: bool


def restart_verdicts(label: str, runs: list[RestartRun]) -> list[Verdict]:
    ready = max(r.ready_s for r in runs)
    look = max(r.to_look_at for r in runs)
    new = max(r.new_requests for r in runs)
    rss = max(r.rss_kib[0] for r in runs)
    hwm = max(r.rss_kib[1] for r in runs)
    return [
        Verdict(f"restart over {label}: spawn → READY=1, slowest of {len(runs)}", f"{ready:.2f} s", "", "",
                f"≤ {MAX_READY_S:g} s", ready <= MAX_READY_S),
        Verdict(f"restart over {label}: files to look at (re-read)", str(look), "", "", "0", look == 0),
        Verdict(f"restart over {label}: new requests at the sink", str(new), "", "", "0", new == 0),
        Verdict(f"idle RSS after restart over {label}", f"{mb(rss):.1f} MB (VmHWM {mb(hwm):.1f})", "", "",
                f"≤ {MAX_IDLE_RSS_MB:g} MB", mb(rss) <= MAX_IDLE_RSS_MB),
    ]


def verdicts(
    lat: list[Latency], drains: list[Drain], anchor: Anchor, restart: Restart, synthetic: Synthetic
) -> list[Verdict]:
    out: list[Verdict] = []
    for r in lat:
        for p, over in ((50, LATENCY_P50_OVER_SETTLE), (99, LATENCY_P99_OVER_SETTLE)):
            v = r.pct(p)
            out.append(Verdict(
                f"land → 2xx p{p}, settle {r.settle:g} s ({len(r.seconds)} files)", f"{v * 1000:.0f} ms",
                f"settle {r.settle * 1000:.0f} ms", f"+{(v - r.settle) * 1000:.0f} ms over settle",
                f"≤ {(r.settle + over) * 1000:.0f} ms", v <= r.settle + over,
            ))
    for d in drains:
        ratio = d.rate / anchor.rate
        out.append(Verdict(
            f"drain rate, {d.files:,} files, {d.label}", f"{d.rate:.0f} files/s",
            f"bash-script loop {anchor.rate:.0f} files/s", f"{ratio:.1f}×", f"≥ {MIN_DRAIN_VS_BASH:g}×",
            ratio >= MIN_DRAIN_VS_BASH,
        ))
        out.append(Verdict(
            f"drain rate, {d.files:,} files, {d.label} (issue 17)", f"{d.rate:.0f} files/s", "", "",
            f"≥ {MIN_DRAIN_RATE:g} files/s", d.rate >= MIN_DRAIN_RATE,
        ))
        cpu_ms = d.cpu_s / d.files * 1000
        out.append(Verdict(
            f"watch CPU per file, {d.label} (issue 17)", f"{cpu_ms:.2f} ms", "", "",
            f"≤ {MAX_DRAIN_CPU_MS:g} ms", cpu_ms <= MAX_DRAIN_CPU_MS,
        ))
    n = f"{restart.delivered:,} files delivered by watch" + (
        "" if restart.complete else f" (of {restart.populated:,}: the rest did not fit the deadline)"
    )
    idle = lat[0].idle_kib
    assert idle is not None
    out.append(Verdict(
        "idle RSS after start-up, empty inbox", f"{mb(idle[0]):.1f} MB (VmHWM {mb(idle[1]):.1f})", "", "",
        f"≤ {MAX_IDLE_RSS_MB:g} MB", mb(idle[0]) <= MAX_IDLE_RSS_MB,
    ))
    out += restart_verdicts(n, restart.runs)
    out += restart_verdicts(f"{synthetic.files:,} files recorded as sent", synthetic.runs)
    return out


def revision() -> str:
    """The commit measured, and whether smt_watch/ had uncommitted changes (read-only git commands)."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "smt_watch"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no git)"
    return f"`{head or '?'}`" + (" with uncommitted changes in smt_watch/" if dirty else "")


def render(
    sizes: Sizes, quick: bool, lat: list[Latency], pool: Pool, drains: list[Drain], anchor: Anchor,
    restart: Restart, synthetic: Synthetic, checks: list[Verdict], wall_s: float, loads: dict[str, float], rev: str,
) -> str:
    lines = [
        SECTION,
        "",
        f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}"
        + (" — **`--quick` smoke run, reduced sizes**" if quick else ""),
        f"- machine: {machine()}",
        f"- command: `{shlex.join(sys.orig_argv)}` (cwd `{Path.cwd()}`), {wall_s / 60:.1f} min in all;"
        f" smt-watch at {rev}",
        "- 1-min load average at the end of each part (2 cores; above ~2 means other processes competed for CPU): "
        + ", ".join(f"{k} {v:.1f}" for k, v in loads.items()),
        "- every part runs `smt-watch watch` (multipart) as its own process with `NOTIFY_SOCKET` bound by the bench,"
        " a fresh inbox and state dir under /tmp (a disk, not tmpfs), against `bench/sink.py` in its own process"
        " on loopback; the sink logs `time.time()` when each request body is complete, with its"
        " `Idempotency-Key` (the file's SHA-256)",
        "",
        "| target | measured | anchor (same run) | ratio | limit | result |",
        "|---|---:|---|---:|---:|---|",
    ]
    lines += [f"| {v.what} | {v.measured} | {v.anchor} | {v.ratio} | {v.limit} | {'PASS' if v.ok else '**FAIL**'} |"
              for v in checks]
    lines += [
        "",
        f"**Latency** — {sizes.latency_files} distinct CSVs of 1–50 KB per settle value, each written as"
        f" `.NAME.part` in the inbox and renamed to `NAME.csv`, one at a time: the next lands"
        f" {LAND_GAP_S * 1000:.0f} ms after the previous one reached the sink. Latency = sink's body-complete"
        " time − our time just before `os.rename`.",
        "",
        "| settle | spawn → READY | min | p50 | p90 | p99 | max |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in lat:
        ms = [f"{x * 1000:.0f} ms" for x in (min(r.seconds), r.pct(50), r.pct(90), r.pct(99), max(r.seconds))]
        lines.append(f"| {r.settle:g} s | {r.ready_s:.2f} s | {' | '.join(ms)} |")
    scaled = "" if anchor.files == len(pool.names) else f" (the first {anchor.files:,} of them)"
    lines += [
        "",
        f"**Drain** — {len(pool.names):,} distinct CSVs, 1–50 KB each ({pool.total_bytes / 1e6:.0f} MB), hard-linked"
        " into a staging dir on the same filesystem and renamed into the inbox of a running watcher"
        " (`SMT_SETTLE_SECONDS=0`); time = first rename → last request complete at the sink. Anchor: the bash script's"
        f" per-file work as a bash loop over the same files{scaled} to the same sink:"
        " `sha256sum`, `grep -q` the hash in a state file, `curl -sS -F file=@F`, append the hash."
        " \"in processes\" is `SMT_WORKER_MODE=process`; its CPU and VmHWM include the worker processes.",
        "",
        "| sender | files | renames took | wall (s) | files/s | watch CPU (s) | CPU ms/file | watch VmHWM (MB) "
        "| sent twice |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for d in drains:
        lines.append(
            f"| smt-watch watch, {d.label} | {d.files:,} | {d.rename_s:.2f} s | {d.seconds:.2f} "
            f"| {d.rate:.0f} | {d.cpu_s:.1f} | {d.cpu_s / d.files * 1000:.1f} | {mb(d.hwm_kib):.1f} | {d.repeats} |"
        )
    lines.append(f"| bash-script loop | {anchor.files:,} | | {anchor.seconds:.2f} | {anchor.rate:.0f} | | | | |")
    first = (f"all {restart.populated:,} delivered {restart.deliver_s:.1f} s after READY" if restart.complete else
             f"**only {restart.delivered:,} of {restart.populated:,} delivered within {restart.deliver_s:.0f} s**"
             " (deadline): the undelivered files were deleted and the restarts run over the delivered ones")
    trend = ", ".join(f"{k:,} at {t:.0f} s" for t, k in restart.progress)
    lines += [
        "",
        f"**Restart** — {restart.populated:,} distinct tiny CSVs (150–400 B) written straight into one inbox"
        f" directory, then `watch` started (`SMT_SETTLE_SECONDS=0`, 2 workers): READY after"
        f" {restart.first_ready_s:.2f} s, {first}." + (f" Progress: {trend}." if trend else "")
        + f" Then SIGTERM and {len(restart.runs)} restarts, each: spawn → `READY=1` on the bench's notify socket, the"
        f" `N file(s) to look at` of the start-up log line, requests reaching the sink in the {sizes.quiet_s:g} s"
        " after READY, then `/proc/PID/status`.",
        "",
        "| restart | spawn → READY (s) | to look at | already handled | new requests | VmRSS (MB) | VmHWM (MB) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, run in enumerate(restart.runs, 1):
        lines.append(f"| {i} | {run.ready_s:.2f} | {run.to_look_at} | {run.handled:,} | {run.new_requests} "
                     f"| {mb(run.rss_kib[0]):.1f} | {mb(run.rss_kib[1]):.1f} |")
    lines += [
        "",
        f"**Restart at full size, ledger written directly** — so that the restart target is measured at"
        f" {synthetic.files:,} files whatever the delivery rate: {synthetic.files:,} tiny CSVs written to a fresh"
        " inbox, each recorded in the ledger through smt_watch's `Ledger` API exactly as `watch` records a"
        f" delivery (`remember` its stat signature and hash, `claim`, `mark_sent`; {synthetic.build_s:.0f} s),"
        " then the same restarts.",
        "",
        "| restart | spawn → READY (s) | to look at | already handled | new requests | VmRSS (MB) | VmHWM (MB) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, run in enumerate(synthetic.runs, 1):
        lines.append(f"| {i} | {run.ready_s:.2f} | {run.to_look_at} | {run.handled:,} | {run.new_requests} "
                     f"| {mb(run.rss_kib[0]):.1f} | {mb(run.rss_kib[1]):.1f} |")
    idle = lat[0].idle_kib
    assert idle is not None
    lines += [
        "",
        f"**Idle RSS** — `/proc/PID/status` of the watch process 2 s after READY on an empty inbox"
        f" (VmRSS {mb(idle[0]):.1f} MB, VmHWM {mb(idle[1]):.1f} MB) and {sizes.quiet_s:g} s after each restart"
        " above. MB = 10^6 bytes.",
    ]
    return "\n".join(lines) + "\n"


# --- main -------------------------------------------------------------------------------------------


def drain_only(n: int, sources: list[Path | None], rounds: int, workers: int = 2) -> int:
    """``--drain-only``: the drain part alone, for before/after comparisons of the code in one run."""
    procs = Procs()
    results: dict[str, list[Drain]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-watch-", dir="/tmp") as tmp:
        work = Path(tmp)
        sink_log = work / "sink-requests.tsv"
        try:
            with start_sink_process(log_path=str(sink_log)) as port:
                log = SinkLog(sink_log)
                b = Bench(work, port, log, procs)
                try:
                    pool = make_pool(b, CsvMaker(), n)
                    for r in range(rounds):
                        for src in sources:
                            b.src = src
                            label = str(src or ROOT)
                            note(f"round {r + 1}: {label}")
                            results.setdefault(label, []).append(
                                measure_drain(b, pool, workers, "thread", suffix=f"-{r}-{b.dirs}"))
                finally:
                    procs.stop_all()
                    log.close()
        except BenchError as exc:
            print(f"bench_watch: {exc}", file=sys.stderr)
            return 2
    print(f"drain of {n} files, {workers} worker thread(s), {rounds} round(s); load {os.getloadavg()[0]:.1f}")
    print("| code | files/s per round | watch CPU ms/file per round | sent twice |")
    print("|---|---|---|---:|")
    for label, runs in results.items():
        print(f"| {label} | {', '.join(f'{d.rate:.0f}' for d in runs)} | "
              f"{', '.join(f'{1000 * d.cpu_s / d.files:.2f}' for d in runs)} | {sum(d.repeats for d in runs)} |")
    return 0


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop children and clean up


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, help=f"Markdown file whose {SECTION!r} section to write")
    parser.add_argument("--quick", action="store_true", help="reduced sizes, for a smoke test")
    parser.add_argument("--latency-files", type=int, help="files per settle value for the latency part (default 200)")
    parser.add_argument("--anchor-files", type=int, help="files for the bash loop (default: all drain files)")
    parser.add_argument("--restart-files", type=int, help="files in the restart inbox (default 100,000)")
    parser.add_argument("--synthetic-files", type=int,
                        help="files for the restart over a directly written ledger (default: --restart-files)")
    parser.add_argument("--samples", type=Path, help="write the latency samples (JSON) here, for bench/plot.py")
    parser.add_argument("--strict", action="store_true", help="exit 1 when any target fails")
    parser.add_argument("--drain-only", type=int, metavar="N",
                        help="only the drain of N files with 2 worker threads, once per --src (and once for this "
                             "checkout), round-robin --rounds times; prints files/s and watch CPU ms a file "
                             "(CPU barely moves on a loaded machine, wall time does); writes nothing")
    parser.add_argument("--src", type=Path, action="append", default=[],
                        help="with --drain-only: another checkout's source tree to compare (run with this venv)")
    parser.add_argument("--rounds", type=int, default=2, help="with --drain-only: rounds (default 2)")
    parser.add_argument("--workers", type=int, default=2, help="with --drain-only: SMT_WORKERS (default 2)")
    args = parser.parse_args(argv)
    if args.drain_only:
        return drain_only(args.drain_only, [None, *args.src], args.rounds, args.workers)
    if not SMT_WATCH.exists():
        raise SystemExit(f"{SMT_WATCH} not found: run `make` (pip install -e .) first")
    for tool in ("bash", "curl", "sha256sum", "grep"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is needed")
    sizes = QUICK if args.quick else FULL
    if args.latency_files:
        sizes = replace(sizes, latency_files=args.latency_files)
    if args.anchor_files:
        sizes = replace(sizes, anchor_files=min(args.anchor_files, sizes.drain_files))
    if args.restart_files:
        sizes = replace(sizes, restart_files=args.restart_files)
    if args.synthetic_files:
        sizes = replace(sizes, synthetic_files=args.synthetic_files)
    signal.signal(signal.SIGTERM, _terminate)
    rev = revision()
    began = time.monotonic()
    procs = Procs()
    with tempfile.TemporaryDirectory(prefix="bench-watch-", dir="/tmp") as tmp:
        work = Path(tmp)
        sink_log = work / "sink-requests.tsv"
        try:
            with start_sink_process(log_path=str(sink_log)) as port:
                log = SinkLog(sink_log)
                b = Bench(work, port, log, procs)
                maker = CsvMaker()
                try:
                    note("1. land → 2xx latency")
                    lat = [measure_latency(b, maker, s, sizes.latency_files, measure_idle=i == 0)
                           for i, s in enumerate(SETTLES)]
                    note(f"2. drain: writing {sizes.drain_files} files ...")
                    pool = make_pool(b, maker, sizes.drain_files)
                    drains = [measure_drain(b, pool, w, mode) for w, mode in DRAIN_CASES]
                    anchor = measure_bash_loop(b, pool, sizes.anchor_files)
                    note("3. restart")
                    restart = measure_restart(b, maker, sizes)
                    note("3b. restart over a ledger written directly")
                    synthetic = measure_synthetic_restart(b, maker, sizes)
                finally:
                    procs.stop_all()
                    log.close()
        except BenchError as exc:
            print(f"bench_watch: {exc}", file=sys.stderr)
            return 2
    if args.samples:
        args.samples.write_text(json.dumps({f"{x.settle:g}": x.seconds for x in lat}))
    checks = verdicts(lat, drains, anchor, restart, synthetic)
    section = render(sizes, args.quick, lat, pool, drains, anchor, restart, synthetic, checks,
                     time.monotonic() - began, b.loads, rev)
    print(section)
    if args.out:
        update_markdown(args.out, section, title=SECTION)
        note(f"wrote section {SECTION!r} of {args.out}")
    return 1 if args.strict and not all(v.ok for v in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
