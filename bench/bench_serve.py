"""Benchmark ``smt-watch serve`` uploads against the same curl to the bench sink, in one run (issue 5).

Why this shape: ``serve`` replaces a Node upload server that read whole files into memory (measured on the droplet: 636
MB peak RSS for a 100 MB CSV). The promise is that an upload streams to disk: a 1 GiB upload must leave the
server's peak RSS (``VmHWM`` from ``/proc/PID/status``, read after the upload) at or under 100 MB, and
throughput and request rate are judged against the fastest thing the same client can talk to: the same
curl command to ``bench/sink.py`` (which reads and discards the body), measured round-robin in the same run.

- **big upload**: ``curl -sS -F file=@F -H 'x-smt-upload-token: …' URL`` of a 1 GiB CSV, to serve and to
  the sink, alternately; MB/s from spawn to reap. Each serve reply must be ``202`` with the source's size and
  SHA-256, the stored file is checked (size every time, SHA-256 recomputed from disk once) and then deleted;
  ``sync(2)`` is called after each upload, untimed (serve fsyncs what it stores; the sink stores nothing).
- **parallel small uploads**: batches of 50 concurrent curl processes, each a distinct ~20 KB CSV under a
  distinct account (``x-smt-upload-role: admin``, ``x-smt-upload-account-key: bench-N``; limits set high),
  alternately to serve and to the sink; requests/s = 50 / (first spawn → last reap). Every reply must be
  ``202`` (serve) / ``200`` (sink), and every upload must be in the inbox with its size, no temp file left.

serve runs as its own process (``SMT_UPLOAD_PORT=0``; the bound port is read from its log) with a fresh
inbox and state dir, ``SMT_UPLOAD_TOKEN`` set and ``SMT_UPLOAD_MAX_BYTES`` of 4 GiB.

    .venv/bin/python bench/bench_serve.py [--quick] [--rounds 3] [--out bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_post import SMT_WATCH, clean_env, update_markdown
from bench_watch import CsvMaker, cpu_seconds, mb, memory_kib, sha256
from benchlib import (
    MB,
    MIB,
    BenchError,
    Figure,
    Procs,
    Start,
    Timed,
    begin,
    figures_table,
    header_lines,
    install_sigterm,
    note,
    sha256_file,
    spawn_server,
    timed,
    write_repeated,
)
from sink import start_sink_process

SECTION = "## serve (issue 5)"
MAX_SERVE_HWM_MB = 100.0
TOKEN = "bench-upload-token-0123456789abcdef"
PARALLEL = 50
SMALL_BYTES = 20_000
PORT_RE = r"Serving uploads on http://127\.0\.0\.1:(\d+)/upload"
CURL_TIMEOUT_S = 600


@dataclass(frozen=True)
class Sizes:
    big_bytes: int
    rounds: int  # big uploads per target
    batches: int  # batches of small uploads per target
    batch: int  # uploads per batch, PARALLEL at a time


FULL = Sizes(1024 * MIB, 3, 3, 250)
QUICK = Sizes(64 * MIB, 1, 1, PARALLEL)


@dataclass
class Batch:
    uploads: int
    seconds: float
    server_cpu_s: float | None = None  # serve's CPU over the batch (/proc/PID/stat); None for the sink

    @property
    def rate(self) -> float:
        return self.uploads / self.seconds


@dataclass
class Target:
    """Where uploads go: serve or the sink, with what was measured against it."""

    name: str
    url: str
    status: int  # the HTTP status every upload must get
    big: Timed = field(default_factory=lambda: Timed("curl -F 1 GiB"))
    big_server_cpu: list[float] = field(default_factory=list)  # serve's CPU per big upload
    batches: list[Batch] = field(default_factory=list)

    @property
    def median_rate(self) -> float:
        return sorted(b.rate for b in self.batches)[len(self.batches) // 2]


def curl_argv(path: Path, url: str, out: Path, extra: list[str] | None = None) -> list[str]:
    return ["curl", "-sS", "-o", str(out), "-w", "%{http_code}", "-F", f"file=@{path}",
            "-H", f"x-smt-upload-token: {TOKEN}", *(extra or []), url]


# --- big upload -------------------------------------------------------------------------------------


@dataclass
class ServeBench:
    work: Path
    inbox: Path
    serve_pid: int
    big: Path
    big_sha: str
    hashed: bool = False
    hwm_kib: list[int] = field(default_factory=list)  # serve VmHWM after each big upload

    def upload_big(self, t: Target, is_serve: bool) -> None:
        resp = self.work / "resp.json"
        cpu_before = cpu_seconds(self.serve_pid)
        run = timed(curl_argv(self.big, t.url, resp), clean_env(), f"curl to {t.name}")
        if is_serve:
            t.big_server_cpu.append(cpu_seconds(self.serve_pid) - cpu_before)
        size = self.big.stat().st_size
        if run.stdout.strip() != str(t.status):
            raise BenchError(f"{t.name}: HTTP {run.stdout.strip()} for the big upload: {resp.read_text()[:500]}")
        if is_serve:
            self.hwm_kib.append(memory_kib(self.serve_pid)[1])
            reply = json.loads(resp.read_text())
            f = reply.get("file", {})
            if not reply.get("ok") or f.get("size") != size or f.get("sha256") != self.big_sha:
                raise BenchError(f"serve: reply does not describe the file sent: {reply}")
            stored = self.inbox / f["name"]
            if stored.stat().st_size != size:
                raise BenchError(f"serve: stored {stored.stat().st_size} bytes, sent {size}")
            if not self.hashed:
                if sha256_file(stored) != self.big_sha:
                    raise BenchError("serve: the stored file's SHA-256 differs from the source")
                self.hashed = True
            stored.unlink()
        os.sync()  # untimed: serve's fsync'd file leaves no dirty pages for the next run
        t.big.runs.append(run)
        note(f"  big upload to {t.name}: {run.seconds:.2f} s = {size / run.seconds / MB:.0f} MB/s"
             + (f", serve VmHWM {mb(self.hwm_kib[-1]):.1f} MB" if is_serve else ""))


# --- parallel small uploads -------------------------------------------------------------------------


def make_small(work: Path, n: int) -> list[Path]:
    """``n`` distinct SMT-style CSVs of ~20 KB (one ESIID each)."""
    maker = CsvMaker()
    folder = work / "small"
    folder.mkdir()
    paths = []
    for i in range(n):
        path = folder / f"SMT_M1_small_{i:05d}.csv"
        path.write_bytes(maker.make(SMALL_BYTES))
        paths.append(path)
    return paths


def upload_batch(t: Target, files: list[Path], first_account: int, server_pid: int | None = None) -> Batch:
    """One ``curl --parallel`` process: every file its own transfer, PARALLEL connections in flight at once.

    One client process, not one per upload, so the client costs little and the server's rate shows; the
    wall time runs from spawn to reap.
    """
    args = ["curl", "--parallel", "--parallel-immediate", "--parallel-max", str(PARALLEL)]
    for i, path in enumerate(files):
        if i:
            args.append("--next")
        args += ["-sS", "-o", "/dev/null", "-w", "%{http_code}\\n", "-F", f"file=@{path}",
                 "-H", f"x-smt-upload-token: {TOKEN}", "-H", "x-smt-upload-role: admin",
                 "-H", f"x-smt-upload-account-key: bench-{first_account + i}", t.url]
    cpu_before = cpu_seconds(server_pid) if server_pid else 0.0
    began = time.perf_counter()
    try:
        proc = subprocess.run(args, env=clean_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=CURL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{t.name}: {len(files)} parallel uploads did not finish in {CURL_TIMEOUT_S} s") from None
    seconds = time.perf_counter() - began
    server_cpu = cpu_seconds(server_pid) - cpu_before if server_pid else None
    codes = proc.stdout.split()
    bad = [c for c in codes if c != str(t.status)]
    if proc.returncode != 0 or len(codes) != len(files) or bad:
        raise BenchError(f"{t.name}: parallel uploads: curl exit {proc.returncode}, {len(codes)} replies for"
                         f" {len(files)} files, unexpected statuses {sorted(set(bad))}: {proc.stderr[-1000:]}")
    note(f"  {len(files)} uploads, {PARALLEL} at a time, to {t.name}: {seconds:.2f} s"
         f" = {len(files) / seconds:.0f} req/s")
    return Batch(len(files), seconds, server_cpu)


def check_inbox(inbox: Path, files: list[Path]) -> None:
    """Every small upload is in the inbox with its bytes (matched by SHA-256); no temp file is left."""
    stored = [p for p in inbox.iterdir() if p.is_file()]
    hidden = [p.name for p in stored if p.name.startswith(".")]
    if hidden:
        raise BenchError(f"serve left temp files in the inbox: {hidden[:5]}")
    want = sorted(sha256(p.read_bytes()) for p in files)
    got = sorted(sha256(p.read_bytes()) for p in stored)
    if got != want:
        raise BenchError(f"serve inbox holds {len(got)} files, {len(want)} were uploaded, or their bytes differ")


# --- report -----------------------------------------------------------------------------------------


def figures(serve: Target, sink: Target, size: int, idle_kib: int, hwm_big_kib: int, hwm_end_kib: int) -> list[Figure]:
    rate, anchor = size / serve.big.median / MB, size / sink.big.median / MB
    out = [
        Figure(f"upload of {size / MIB:,.0f} MiB, curl -F → serve", f"{rate:.0f} MB/s",
               f"curl → sink {anchor:.0f} MB/s", f"{rate / anchor:.2f}×"),
        Figure(f"serve peak RSS (VmHWM) after the {size / MIB:,.0f} MiB uploads", f"{mb(hwm_big_kib):.1f} MB",
               f"after start-up {mb(idle_kib):.1f} MB", f"{mb(hwm_big_kib - idle_kib):+.1f} MB",
               f"≤ {MAX_SERVE_HWM_MB:g} MB", mb(hwm_big_kib) <= MAX_SERVE_HWM_MB),
        Figure(f"small uploads (~{SMALL_BYTES / 1000:.0f} KB), {PARALLEL} in parallel, median of"
               f" {len(serve.batches)} batch(es)", f"{serve.median_rate:.0f} req/s",
               f"curl → sink {sink.median_rate:.0f} req/s", f"{serve.median_rate / sink.median_rate:.2f}×"),
        Figure("serve peak RSS (VmHWM) at the end of the run", f"{mb(hwm_end_kib):.1f} MB",
               f"after start-up {mb(idle_kib):.1f} MB", f"{mb(hwm_end_kib - idle_kib):+.1f} MB"),
    ]
    return out


def render(sizes: Sizes, quick: bool, start: Start, serve: Target, sink: Target, idle: tuple[int, int],
           hwm_after: list[int], checks: list[Figure], stop_rc: int) -> str:
    size = sizes.big_bytes
    lines = [
        *header_lines(SECTION, start, quick),
        "- `smt-watch serve` in its own process: fresh inbox and state dir under /tmp (disk), `SMT_UPLOAD_TOKEN`"
        " set, `SMT_UPLOAD_ADMIN_LIMIT`/`CUSTOMER_LIMIT` 1,000,000, `SMT_UPLOAD_MAX_BYTES` 4 GiB,"
        " `SMT_UPLOAD_MAX_CONCURRENT` 64; anchor:"
        " `bench/sink.py` (reads and discards each body) in its own process; both on loopback, the same curl"
        f" command; exit status of serve on SIGTERM at the end: {stop_rc}",
        f"- big upload: one {size / MIB:,.0f} MiB CSV (warm in the page cache), {sizes.rounds} round(s) alternating"
        " sink/serve; each reply checked (202, size, SHA-256), the stored file's size checked and its SHA-256"
        " recomputed from disk once, then deleted; `sync(2)` after each upload, untimed. serve fsyncs what it"
        " stores, the sink stores nothing",
        f"- small uploads: {sizes.batches} batch(es) per target, alternating sink/serve, each one `curl --parallel"
        f" --parallel-max {PARALLEL}` process with {sizes.batch} transfers ({PARALLEL} connections in flight), each"
        f" a distinct ~{SMALL_BYTES / 1000:.0f} KB CSV under its own account (`x-smt-upload-role: admin`,"
        " `x-smt-upload-account-key: bench-N`); req/s = transfers / (spawn → reap); every status checked, and"
        " every upload found in the inbox by SHA-256 with no temp file left",
        "",
        "| target | big upload runs (s) | median (s) | MB/s | server CPU per big upload (s) | VmHWM after each (MB)"
        " | small-upload batches (req/s) | server CPU per small upload (ms) |",
        "|---|---|---:|---:|---|---|---|---|",
    ]
    for t in (sink, serve):
        hwm = ", ".join(f"{mb(k):.1f}" for k in hwm_after) if t is serve else ""
        rates = ", ".join(f"{b.rate:.0f}" for b in t.batches)
        big_cpu = ", ".join(f"{c:.1f}" for c in t.big_server_cpu)
        small_cpu = ", ".join(f"{b.server_cpu_s / b.uploads * 1000:.1f}" for b in t.batches
                              if b.server_cpu_s is not None)
        lines.append(f"| {t.name} | {t.big.times()} | {t.big.median:.2f} | {size / t.big.median / MB:.0f} | {big_cpu}"
                     f" | {hwm} | {rates} | {small_cpu} |")
    lines += [
        "",
        f"serve after start-up: VmRSS {mb(idle[0]):.1f} MB, VmHWM {mb(idle[1]):.1f} MB. MB = 10^6 bytes.",
        "",
        *figures_table(checks),
    ]
    return "\n".join(lines) + "\n"


# --- main -------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, help=f"Markdown file whose {SECTION!r} section to write")
    parser.add_argument("--quick", action="store_true", help="reduced sizes (64 MiB, 1 round, 1 batch)")
    parser.add_argument("--rounds", type=int, help="big uploads per target (default 3, --quick 1)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when any target fails")
    args = parser.parse_args(argv)
    if not SMT_WATCH.exists():
        raise SystemExit(f"{SMT_WATCH} not found: run `make` (pip install -e .) first")
    if shutil.which("curl") is None:
        raise SystemExit("curl is needed")
    sizes = QUICK if args.quick else FULL
    if args.rounds:
        sizes = Sizes(sizes.big_bytes, args.rounds, sizes.batches, sizes.batch)
    install_sigterm()
    start = begin()
    procs = Procs()
    with tempfile.TemporaryDirectory(prefix="bench-serve-", dir="/tmp") as tmp:
        work = Path(tmp)
        try:
            big = work / "SMT_M1_big.csv"
            note(f"writing {sizes.big_bytes / MIB:,.0f} MiB ...")
            big_sha = write_repeated(big, sizes.big_bytes)
            small = make_small(work, sizes.batch * sizes.batches)
            inbox, state = work / "inbox", work / "state"
            env = clean_env()
            env.update(SMT_LOCAL_DIR=str(inbox), SMT_STATE_DIR=str(state), SMT_UPLOAD_HOST="127.0.0.1",
                       SMT_UPLOAD_PORT="0", SMT_WEBHOOK_PORT="0",  # no trigger listener on 0.0.0.0:8787
                       SMT_UPLOAD_TOKEN=TOKEN, SMT_UPLOAD_ADMIN_LIMIT="1000000",
                       SMT_UPLOAD_CUSTOMER_LIMIT="1000000", SMT_UPLOAD_MAX_BYTES=str(4 * 1024 * MIB),
                       # the small-upload part sends 50 at a time; at the default 16 the rest are 503 by design
                       SMT_UPLOAD_MAX_CONCURRENT="64")
            pid, port = spawn_server(procs, [str(SMT_WATCH), "serve"], env, work / "serve.log", PORT_RE)
            time.sleep(1.0)  # let start-up settle before the idle reading
            idle = memory_kib(pid)
            with start_sink_process() as sink_port:
                serve = Target("smt-watch serve", f"http://127.0.0.1:{port}/upload", 202)
                sink = Target("bench/sink.py (anchor)", f"http://127.0.0.1:{sink_port}/upload", 200)
                b = ServeBench(work, inbox, pid, big, big_sha)
                note("big uploads:")
                for _ in range(sizes.rounds):
                    b.upload_big(sink, is_serve=False)
                    b.upload_big(serve, is_serve=True)
                hwm_big = memory_kib(pid)[1]
                note(f"small uploads, {PARALLEL} at a time:")
                for i in range(sizes.batches):
                    chunk = small[i * sizes.batch:(i + 1) * sizes.batch]
                    sink.batches.append(upload_batch(sink, chunk, i * sizes.batch))
                    serve.batches.append(upload_batch(serve, chunk, i * sizes.batch, pid))
                hwm_end = memory_kib(pid)[1]
                check_inbox(inbox, small)
            serve_proc = procs.live[0]
            stop_rc = procs.stop(serve_proc, timeout=30)
        except BenchError as exc:
            print(f"bench_serve: {exc}", file=sys.stderr)
            return 2
        finally:
            procs.stop_all()
    checks = figures(serve, sink, sizes.big_bytes, idle[1], hwm_big, hwm_end)
    section = render(sizes, args.quick, start, serve, sink, idle, b.hwm_kib, checks, stop_rc)
    print(section)
    if args.out:
        update_markdown(args.out, section, title=SECTION)
        note(f"wrote section {SECTION!r} of {args.out}")
    return 1 if args.strict and not all(f.ok is not False for f in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
