"""Benchmark the content path (issue 7): ``smt-watch inspect`` on a ~100 MB interval CSV, and an SMT-style
``.asc`` (PGP-encrypted ZIP of that CSV) posted end to end with ``--delivery raw-upload``.

Why this shape: SMT sends big interval files as encrypted ZIPs, and the web app takes them as raw-upload
chunks; the Node server this replaces needed 8.1 s and 636 MB for a 100 MB CSV (measured before). What smt-watch
adds on top of the unavoidable work is what matters, so every figure sits beside a same-run anchor:

- ``inspect --json`` (one streaming pass: kinds, intervals, gaps, kWh, UTC span) against a bare
  ``csv.reader`` pass over the same file in the same interpreter: the floor for any Python CSV reader.
  Peak RSS at ~100 MB against the same command on a 1-year (~2.5 MB) file: memory must be flat in file size
  (smtcsv.py: "memory bounded by the number of series, not by rows").
- ``post --delivery raw-upload FILE.asc`` to the reference receiver (``smt-watch receive``, fresh data dir
  per run, ``ADMIN_TOKEN`` set on both sides) against ``gpg -d FILE.asc | funzip > /dev/null`` alone (the
  decrypt + unzip any consumer must do), and against the same post of the plain CSV (so the decrypt + unzip
  overhead inside ``post`` is the difference of the two; it is read from the sink runs below, because the
  receiver's run-to-run spread is larger than that difference). Raw-upload chunks/s is counted for all.
- The receiver stores each chunk, parses its intervals into SQLite and reassembles the file: it is a
  stand-in for the web app, not what is measured, yet it shares the 2 cores. So both posts also run against
  ``bench/sink.py`` (answers ``{"ok":true}`` to every chunk), which shows what ``post`` itself costs, and the
  receiver's CPU seconds per run (``/proc/PID/stat``) are reported.

Every run is checked: ``post`` exits 0 with ``sent`` and the expected chunk count; the receiver's stored,
reassembled file has the SHA-256 of the CSV's lines as the Node server joins them, and its intervals table one
row per CSV row; or the sink counted exactly that many requests; ``inspect`` reports
every row and no gap.

    .venv/bin/python bench/bench_content.py [--quick] [--rounds 3] [--out bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_post import MAX_RSS_GROWTH_MIB, ROOT, SMT_WATCH, clean_env, sink_stats, update_markdown
from bench_watch import cpu_seconds, mb, memory_kib
from benchlib import (
    MB,
    BenchError,
    CpuRun,
    Figure,
    Procs,
    Start,
    Timed,
    begin,
    cell,
    figures_table,
    header_lines,
    install_sigterm,
    note,
    spawn_server,
    timed,
)
from sink import start_sink_process

SECTION = "## content: inspect and .asc raw-upload (issue 7)"
ADMIN_TOKEN = "bench-admin-token-0123456789abcdef"
MIN_INSPECT_VS_CSV = 0.5  # issue 17: inspect at half a bare csv.reader pass or better
LINES_PER_CHUNK = 5000  # SMT_RAW_LINES_PER_CHUNK default
SEGMENT_DAYS = 3660  # `smt-watch sample --days` maximum: ~25 MB
# The outbound limit (issue 23, 10 requests/s by default) would pace every chunk; off, the figures are what
# post itself costs (the limit's own bench is bench_limits.py).
NO_OUTBOUND_LIMIT = {"SMT_MAX_REQUESTS_PER_SECOND": "0", "SMT_MAX_IN_FLIGHT": "0"}
CSV_NAME = "SMT_M1_IntervalMeterUsage.csv"
ASC_NAME = "SMT_M1_IntervalMeterUsage.CSV.1.asc"
RECEIVER_PORT_RE = r"Uvicorn running on http://127\.0\.0\.1:(\d+)"
CHUNKS_RE = re.compile(r"in (\d+) chunk\(s\)")
PYTHON = ROOT / ".venv" / "bin" / "python"
CSV_PASS = "import csv, sys\nn = 0\nfor _ in csv.reader(open(sys.argv[1], newline='')):\n    n += 1\nprint(n)\n"
NODE = "Node upload server, 100 MB CSV: 8.1 s, 280 chunks, 636 MB peak RSS (measured before, not this run)"


@dataclass(frozen=True)
class Sizes:
    segments: int  # SEGMENT_DAYS-day samples of one ESIID, back to back
    segment_days: int
    small_days: int
    rounds: int


FULL = Sizes(4, SEGMENT_DAYS, 365, 3)
QUICK = Sizes(1, 730, 365, 1)


# --- data -------------------------------------------------------------------------------------------


@dataclass
class Data:
    csv: Path
    small: Path
    asc: Path
    rows: int  # data rows of the big CSV
    sha256: str  # of the CSV as the receiver reassembles it from raw-upload chunks (node_whole_sha256)
    intervals: int  # what `inspect` counts in it: rows less blank reads (the spring-forward hour)
    gnupghome: Path
    zip_bytes: int

    @property
    def size(self) -> int:
        return self.csv.stat().st_size

    @property
    def chunks(self) -> int:
        return math.ceil(self.rows / LINES_PER_CHUNK)


def sample(out: Path, days: int, start: date) -> None:
    timed([str(SMT_WATCH), "sample", "-o", str(out), "--days", str(days), "--start", start.isoformat()], clean_env(),
          "smt-watch sample")


def make_csv(work: Path, sizes: Sizes) -> tuple[Path, int]:
    """One ESIID's reads, ``segments`` samples back to back (one header): a continuous series, no gap."""
    path = work / CSV_NAME
    start = date(1980, 1, 1)
    rows = 0
    with path.open("wb") as out:
        for i in range(sizes.segments):
            seg = work / f"segment-{i}.csv"
            sample(seg, sizes.segment_days, start + timedelta(days=i * sizes.segment_days))
            with seg.open("rb") as fh:
                header = fh.readline()
                if i == 0:
                    out.write(header)
                for line in fh:
                    out.write(line)
                    rows += 1
            seg.unlink()
    return path, rows


def gpg(home: Path, *args: str, stdout: int | None = None) -> str:
    proc = subprocess.run(["gpg", "--batch", "--quiet", *args], env={**clean_env(), "GNUPGHOME": str(home)},
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise BenchError(f"gpg {shlex.join(args)} exited {proc.returncode}: {proc.stderr[-1500:]}")
    return proc.stdout


def make_asc(work: Path, csv: Path) -> tuple[Path, Path, int]:
    """A throw-away keyring (ed25519 sign + cv25519 encrypt, no passphrase) and ``csv`` as an SMT-style .asc:
    a ZIP holding the CSV, PGP-encrypted and armoured. Returns (GNUPGHOME, .asc, ZIP size)."""
    home = work / "g"  # short: gpg-agent's socket path must fit in sun_path
    home.mkdir(mode=0o700)
    gpg(home, "--passphrase", "", "--quick-gen-key", "smt-watch bench <bench@example.invalid>", "ed25519", "sign",
        "never")
    fpr = next(line.split(":")[9] for line in gpg(home, "--with-colons", "--list-keys").splitlines()
               if line.startswith("fpr:"))
    gpg(home, "--passphrase", "", "--quick-add-key", fpr, "cv25519", "encr", "never")
    archive = work / "SMT_M1_IntervalMeterUsage.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        zf.write(csv, CSV_NAME)
    asc = work / ASC_NAME
    gpg(home, "--yes", "--trust-model", "always", "--armor", "-r", fpr, "-o", str(asc), "-e", str(archive))
    size = archive.stat().st_size
    archive.unlink()
    return home, asc, size


def stop_gpg_agent(home: Path) -> None:
    if shutil.which("gpgconf"):
        subprocess.run(["gpgconf", "--kill", "all"], env={**clean_env(), "GNUPGHOME": str(home)},
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=30)


# --- cases ------------------------------------------------------------------------------------------


@dataclass
class Case(Timed):
    """One command, run every round; ``run_once`` returns the run and any extra figures for it."""

    run_once: Callable[[], tuple[CpuRun, dict[str, float]]] | None = None
    extra: list[dict[str, float]] = field(default_factory=list)

    def median_extra(self, key: str) -> float:
        values = sorted(e[key] for e in self.extra)
        return values[len(values) // 2]


@dataclass
class ContentBench:
    work: Path
    data: Data
    procs: Procs
    sink_port: int
    counter: int = 0

    def fresh(self, name: str) -> Path:
        self.counter += 1
        return self.work / f"{name}-{self.counter}"

    def inspect(self, path: Path, rows: int) -> tuple[CpuRun, dict[str, float]]:
        run = timed([str(SMT_WATCH), "inspect", "--json", str(path)], clean_env(), f"inspect {path.name}")
        summary = json.loads(run.stdout)
        if summary.get("rows") != rows or summary.get("gaps") != 0 or len(summary.get("esiids", [])) != 1:
            raise BenchError(f"inspect {path.name}: expected {rows} rows, 0 gaps, 1 ESIID: "
                             f"{ {k: summary.get(k) for k in ('rows', 'gaps', 'esiids')} }")
        return run, {}

    def csv_pass(self) -> tuple[CpuRun, dict[str, float]]:
        run = timed([str(PYTHON), "-c", CSV_PASS, str(self.data.csv)], clean_env(), "csv.reader pass")
        if int(run.stdout.strip()) != self.data.rows + 1:
            raise BenchError(f"csv.reader pass counted {run.stdout.strip()} records, not {self.data.rows + 1}")
        return run, {}

    def decrypt_unzip(self) -> tuple[CpuRun, dict[str, float]]:
        asc = shlex.quote(str(self.data.asc))
        if shutil.which("funzip"):
            script = f"set -o pipefail; gpg --batch -q -d {asc} | funzip > /dev/null"
        else:
            tmp = shlex.quote(str(self.work / "x.zip"))
            script = f"gpg --batch -q -d {asc} > {tmp} && unzip -p {tmp} > /dev/null; rc=$?; rm -f {tmp}; exit $rc"
        env = {**clean_env(), "GNUPGHOME": str(self.data.gnupghome)}
        return timed(["bash", "-c", script], env, "gpg -d | funzip"), {}

    def post(self, path: Path, to_receiver: bool, rows: int, whole_sha256: str) -> tuple[CpuRun, dict[str, float]]:
        """``post --delivery raw-upload`` with a fresh state dir; to a fresh receiver or to the sink.
        ``whole_sha256``: what the receiver must have reassembled (:func:`node_whole_sha256`)."""
        state = self.fresh("state")
        receiver_data = self.fresh("receiver")
        pid = 0
        extra: dict[str, float] = {}
        try:
            if to_receiver:
                env = {**clean_env(), "ADMIN_TOKEN": ADMIN_TOKEN}
                pid, port = spawn_server(self.procs, [str(SMT_WATCH), "receive", "--port", "0", "--data",
                                                      str(receiver_data)], env, self.fresh("receiver.log"),
                                         RECEIVER_PORT_RE)
                cpu_before = cpu_seconds(pid)
            else:
                port = self.sink_port
                requests_before = sink_stats(port)["requests"]
            env = {**clean_env(), "ADMIN_TOKEN": ADMIN_TOKEN, "INTELLIWATT_BASE_URL": f"http://127.0.0.1:{port}",
                   "SMT_STATE_DIR": str(state), "SMT_LOCAL_DIR": str(self.work / "inbox"),
                   "GNUPGHOME": str(self.data.gnupghome), "SMT_HTTP_TIMEOUT": "600", **NO_OUTBOUND_LIMIT}
            what = f"post {path.name} to the {'receiver' if to_receiver else 'sink'}"
            run = timed([str(SMT_WATCH), "post", "--delivery", "raw-upload", str(path)], env, what)
            want = math.ceil(rows / LINES_PER_CHUNK)
            said = [int(n) for n in CHUNKS_RE.findall(run.stdout + run.stderr)]
            if "sent " not in run.stdout or said != [want]:
                raise BenchError(f"{what}: expected 'sent' in {want} chunks, got {said}:\n{run.stdout[-1500:]}"
                                 f"{run.stderr[-1500:]}")
            extra["chunks"] = want
            if to_receiver:
                extra["receiver_cpu_s"] = cpu_seconds(pid) - cpu_before
                extra["receiver_hwm_mb"] = mb(memory_kib(pid)[1])
                check_stored(port, what, self.data.intervals, whole_sha256)
            elif sink_stats(port)["requests"] - requests_before != want:
                raise BenchError(f"{what}: the sink saw {sink_stats(port)['requests'] - requests_before} requests,"
                                 f" not {want}")
            return run, extra
        finally:
            if pid:
                self.procs.stop(next(p for p in self.procs.live if p.pid == pid), timeout=30)
            shutil.rmtree(state, ignore_errors=True)
            shutil.rmtree(receiver_data, ignore_errors=True)


def check_stored(port: int, what: str, intervals: int, whole_sha256: str) -> None:
    """What the receiver really stores from raw-upload chunks, as IntelliWatt's route does: the intervals
    (``SmtInterval`` rows of one ESIID, as many as ``inspect`` counts) and the file reassembled from its chunks
    the way the Node server joins them (tests/test_rawupload.py's ``whole_file``), not the CSV's own bytes."""
    def get(route: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_receiver/{route}", timeout=120) as resp:
            return json.load(resp)

    stored_intervals = get("intervals")
    if list(stored_intervals.values()) != [intervals]:
        raise BenchError(f"{what}: the receiver stored intervals {stored_intervals}, not {intervals} of one ESIID")
    stored = [r["sha256"] for r in get("files")]
    if stored != [whole_sha256]:
        raise BenchError(f"{what}: the receiver reassembled {[s[:12] for s in stored]}, not the CSV's lines"
                         f" {whole_sha256[:12]}")


def node_whole_sha256(path: Path) -> str:
    """SHA-256 of the file the receiver reassembles from raw-upload chunks (tests/node_server.py's
    ``node_whole``): the header, then every non-blank data line, joined by ``\\n``, no newline at the end."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        digest.update(fh.readline().rstrip(b"\r\n"))
        for line in fh:
            line = line.rstrip(b"\r\n")
            if line.strip():
                digest.update(b"\n" + line)
    return digest.hexdigest()


def build_cases(b: ContentBench, small_rows: int) -> tuple[list[Case], list[Case]]:
    d = b.data
    inspect_cases = [
        Case("smt-watch inspect --json, big CSV", run_once=lambda: b.inspect(d.csv, d.rows)),
        Case("python csv.reader pass, big CSV (anchor)", run_once=b.csv_pass),
        Case("smt-watch inspect --json, 1-year CSV", run_once=lambda: b.inspect(d.small, small_rows)),
    ]
    small_sha = node_whole_sha256(d.small)
    post_cases = [
        Case("gpg -d .asc | funzip > /dev/null (anchor)", run_once=b.decrypt_unzip),
        Case("post raw-upload .asc → receiver", run_once=lambda: b.post(d.asc, True, d.rows, d.sha256)),
        Case("post raw-upload CSV → receiver (anchor)", run_once=lambda: b.post(d.csv, True, d.rows, d.sha256)),
        Case("post raw-upload .asc → sink", run_once=lambda: b.post(d.asc, False, d.rows, d.sha256)),
        Case("post raw-upload CSV → sink", run_once=lambda: b.post(d.csv, False, d.rows, d.sha256)),
        Case("post raw-upload 1-year CSV → sink", run_once=lambda: b.post(d.small, False, small_rows, small_sha)),
    ]
    return inspect_cases, post_cases


def measure(todo: list[Case], rounds: int, label: str) -> None:
    for r in range(rounds):
        for case in todo:
            assert case.run_once is not None
            run, extra = case.run_once()
            case.runs.append(run)
            case.extra.append(extra)
            more = ", ".join(f"{k} {v:.1f}" for k, v in extra.items())
            note(f"  [{label} round {r + 1}/{rounds}] {case.name}: {run.seconds:.2f} s, CPU {run.cpu_s:.1f} s, "
                 f"{run.maxrss_kib / 1024:.1f} MiB" + (f", {more}" if more else ""))


# --- report -----------------------------------------------------------------------------------------


def figures(d: Data, ins: dict[str, Case], post: dict[str, Case]) -> list[Figure]:
    big_mb = d.size / MB
    inspect_big, anchor, inspect_small = (ins[n] for n in ins)
    ratio = big_mb / inspect_big.median / (big_mb / anchor.median)
    growth = inspect_big.peak_rss_mib - inspect_small.peak_rss_mib
    out = [
        Figure(f"inspect throughput, {big_mb:.0f} MB CSV", f"{big_mb / inspect_big.median:.1f} MB/s",
               f"csv.reader pass {big_mb / anchor.median:.1f} MB/s", f"{ratio:.2f}×",
               f"≥ {MIN_INSPECT_VS_CSV:g}×", ratio >= MIN_INSPECT_VS_CSV),
        Figure(f"inspect peak RSS, {big_mb:.0f} MB CSV", f"{inspect_big.peak_rss_mib:.1f} MiB",
               f"1-year CSV ({d.small.stat().st_size / MB:.1f} MB): {inspect_small.peak_rss_mib:.1f} MiB",
               f"{growth:+.1f} MiB", f"flat: ≤ +{MAX_RSS_GROWTH_MIB:g} MiB", growth <= MAX_RSS_GROWTH_MIB),
    ]
    names = list(post)
    gpg_c, asc_r, csv_r, asc_s, csv_s, small_s = (post[n] for n in names)
    gpg_anchor = f"gpg -d | funzip alone {gpg_c.median:.2f} s"
    out.append(Figure(f"post raw-upload .asc → receiver, end to end ({big_mb:.0f} MB CSV inside)",
                      f"{asc_r.median:.2f} s (receiver CPU {asc_r.median_extra('receiver_cpu_s'):.0f} s)", gpg_anchor,
                      f"{asc_r.median / gpg_c.median:.1f}×"))
    out.append(Figure("post raw-upload .asc → sink: what post itself costs, end to end", f"{asc_s.median:.2f} s",
                      gpg_anchor, f"{asc_s.median / gpg_c.median:.1f}×"))
    # Only the sink runs show the decrypt + unzip overhead: the receiver runs differ by more than it from run
    # to run (its cost grows with every chunk it already holds).
    out.append(Figure("decrypt + unzip inside post (.asc − CSV, both to the sink)",
                      f"{asc_s.median - csv_s.median:.2f} s", gpg_anchor,
                      f"{(asc_s.median - csv_s.median) / gpg_c.median:.1f}×"))
    for c, anchor_c in ((asc_r, csv_r), (csv_r, None), (asc_s, csv_s), (csv_s, None)):
        rate = d.chunks / c.median
        short = c.name.removesuffix(" (anchor)").removeprefix("post raw-upload ")
        out.append(Figure(f"raw-upload chunks/s, {short}", f"{rate:.1f} chunks/s"
                          f" ({big_mb / c.median:.1f} MB/s)",
                          f"CSV post {d.chunks / anchor_c.median:.1f} chunks/s" if anchor_c else "",
                          f"{anchor_c.median / c.median:.2f}×" if anchor_c else ""))
    for c in (asc_r, csv_r, asc_s, csv_s):
        growth = c.peak_rss_mib - small_s.peak_rss_mib
        out.append(Figure(f"peak RSS of {c.name.removesuffix(' (anchor)')}", f"{c.peak_rss_mib:.1f} MiB",
                          f"1-year CSV → sink: {small_s.peak_rss_mib:.1f} MiB", f"{growth:+.1f} MiB",
                          f"flat: ≤ +{MAX_RSS_GROWTH_MIB:g} MiB", growth <= MAX_RSS_GROWTH_MIB))
    return out


def render(sizes: Sizes, quick: bool, start: Start, d: Data, ins: list[Case], post: list[Case],
           checks: list[Figure]) -> str:
    lines = [
        *header_lines(SECTION, start, quick),
        f"- data: one ESIID, {sizes.segments} × `smt-watch sample --days {sizes.segment_days}` back to back (one"
        f" header): {d.size / MB:.1f} MB, {d.rows:,} rows, {d.chunks} raw-upload chunks of {LINES_PER_CHUNK} lines;"
        f" 1-year CSV: `sample --days {sizes.small_days}` ({d.small.stat().st_size / MB:.1f} MB). `.asc`: a ZIP"
        f" (deflate 6, {d.zip_bytes / MB:.1f} MB) holding the CSV, encrypted and armoured"
        f" ({d.asc.stat().st_size / MB:.1f} MB) to a throw-away ed25519/cv25519 key in a temp GNUPGHOME",
        f"- {sizes.rounds} round(s), cases round-robin, median kept. Each post: fresh `SMT_STATE_DIR`, the outbound"
        " limit off (`SMT_MAX_REQUESTS_PER_SECOND=0`, `SMT_MAX_IN_FLIGHT=0`: it paces chunks at 10/s); to the"
        " receiver, a fresh `smt-watch receive --port 0 --data DIR` (ADMIN_TOKEN set on both), started before"
        " and stopped after the timed run; checked: exit 0, `sent`, the chunk count in post's log, and the"
        " receiver stored one interval per CSV row and reassembled the CSV's lines (Node's join: SHA-256 of header +"
        " data lines, no final newline); or the sink saw exactly that many requests",
        "- CPU: user + system seconds of the command and what it reaped (gpg and funzip under bash; gpg under"
        " post), median; the receiver's own CPU is read from `/proc/PID/stat` around the timed run",
        f"- context: {NODE}",
        "",
        "| command | runs (s) | median (s) | MB/s of CSV | CPU (s) | peak RSS (MiB) | receiver CPU (s) "
        "| receiver VmHWM (MB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in [*ins, *post]:
        size = (d.small if "1-year" in c.name else d.csv).stat().st_size
        has_receiver = bool(c.extra and "receiver_cpu_s" in c.extra[0])
        cpu = f"{c.median_extra('receiver_cpu_s'):.1f}" if has_receiver else ""
        hwm = f"{max(e['receiver_hwm_mb'] for e in c.extra):.0f}" if has_receiver else ""
        lines.append(f"| {cell(c.name)} | {c.times()} | {c.median:.2f} | {size / c.median / MB:.1f}"
                     f" | {c.median_cpu:.1f} | {c.peak_rss_mib:.1f} | {cpu} | {hwm} |")
    lines += ["", *figures_table(checks)]
    return "\n".join(lines) + "\n"


# --- main -------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, help=f"Markdown file whose {SECTION!r} section to write")
    parser.add_argument("--quick", action="store_true", help="reduced sizes (a 2-year CSV, 1 round)")
    parser.add_argument("--rounds", type=int, help="rounds per case (default 3, --quick 1)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when any target fails")
    args = parser.parse_args(argv)
    if not SMT_WATCH.exists():
        raise SystemExit(f"{SMT_WATCH} not found: run `make` (pip install -e .) first")
    for tool in ("gpg", "bash"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is needed")
    if shutil.which("funzip") is None and shutil.which("unzip") is None:
        raise SystemExit("funzip or unzip is needed")
    sizes = QUICK if args.quick else FULL
    if args.rounds:
        sizes = Sizes(sizes.segments, sizes.segment_days, sizes.small_days, args.rounds)
    install_sigterm()
    start = begin()
    procs = Procs()
    with tempfile.TemporaryDirectory(prefix="bench-content-", dir="/tmp") as tmp:
        work = Path(tmp)
        home: Path | None = None
        try:
            note(f"writing {sizes.segments} × {sizes.segment_days} days of interval reads ...")
            csv, rows = make_csv(work, sizes)
            small = work / "SMT_M1_OneYear.csv"
            sample(small, sizes.small_days, date(2024, 1, 1))
            small_rows = sum(1 for _ in small.open("rb")) - 1
            note("making a key and the .asc ...")
            home = work / "g"
            home, asc, zip_bytes = make_asc(work, csv)
            counted = json.loads(timed([str(SMT_WATCH), "inspect", "--json", str(csv)], clean_env(), "inspect").stdout)
            data = Data(csv, small, asc, rows, node_whole_sha256(csv), int(counted["intervals"]), home, zip_bytes)
            (work / "inbox").mkdir()
            with start_sink_process() as sink_port:
                b = ContentBench(work, data, procs, sink_port)
                ins, post = build_cases(b, small_rows)
                note("inspect:")
                measure(ins, sizes.rounds, "inspect")
                note("post raw-upload:")
                measure(post, sizes.rounds, "post")
            checks = figures(data, {c.name: c for c in ins}, {c.name: c for c in post})
            section = render(sizes, args.quick, start, data, ins, post, checks)
        except BenchError as exc:
            print(f"bench_content: {exc}", file=sys.stderr)
            return 2
        finally:
            procs.stop_all()
            if home is not None:
                stop_gpg_agent(home)
    print(section)
    if args.out:
        update_markdown(args.out, section, title=SECTION)
        note(f"wrote section {SECTION!r} of {args.out}")
    return 1 if args.strict and not all(f.ok is not False for f in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
