"""Benchmark the PostgreSQL ledger against the SQLite ledger, in one run (issue 16).

Why: with ``SMT_LEDGER_URL`` every claim and every ``sent`` mark is a network round trip to a shared
database instead of a write to a local file. The issue's target is that ``watch`` drains an inbox at least
0.9× as fast with PostgreSQL as with SQLite (issue 27; issue 16 asked 0.8×); the raw claim rate of each backend is

- **claims + mark_sent**: N distinct SHA-256s, each ``claim`` (with the stat-cache row in the same
  transaction, as ``watch`` claims a new file) then ``mark_sent``, through smt_watch's own ``Ledger`` classes,
  on a fresh ledger; once on one thread, once split over 4 threads sharing one ledger object. Every claim
  must answer ``CLAIMED`` and every row must end ``sent``.
- **drain**: ``bench_watch.py``'s drain, imported (10,000 distinct 1–50 KB CSVs renamed from a staging dir
  into the inbox of a running ``smt-watch watch``, ``NOTIFY_SOCKET`` readiness, ``bench/sink.py`` on
  loopback; first rename → last request complete), with the SQLite ledger and with ``SMT_LEDGER_URL`` set
  to a fresh database, alternately, ``--drain-rounds`` times each. Default settings otherwise (2 workers, threads);
  ``SMT_SETTLE_SECONDS=0`` as in bench_watch.py.

PostgreSQL is a throwaway cluster made by the test suite's ``tests/pgcluster.PgCluster`` (initdb + pg_ctl on
a free loopback port, TCP with a password, as a deployment connects), with the test suite's shortcuts
undone: ``fsync``, ``synchronous_commit``, ``full_page_writes`` and ``shared_buffers`` are back at the
server's defaults, so every commit waits for its WAL flush (SQLite's ``synchronous=NORMAL`` in WAL mode
does not). The PostgreSQL server's CPU (postmaster and every backend, reaped or live) is counted beside
the client's: on 2 cores they compete.

    .venv/bin/python bench/bench_ledger.py [--quick] [--hashes 5000] [--rounds 2] [--drain-rounds 5]
        [--out bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_post import ROOT, SMT_WATCH, update_markdown  # bench/ is not a package: run as scripts
from bench_watch import Bench, CsvMaker, Drain, SinkLog, make_pool, measure_drain
from benchlib import (
    BenchError,
    Figure,
    Procs,
    Start,
    begin,
    figures_table,
    header_lines,
    install_sigterm,
    note,
)
from sink import start_sink_process

sys.path.insert(0, str(ROOT / "tests"))
from pgcluster import PgCluster, available, pg_bin  # the test suite's throwaway PostgreSQL cluster

from smt_watch.hashing import Signature  # the package is installed in the venv this runs with
from smt_watch.ledger import Claim, Remember, SqliteLedger
from smt_watch.ledger.postgres import PostgresLedger

SECTION = "## ledger (issue 16)"
MIN_PG_DRAIN_VS_SQLITE = 0.9  # issue 27 (issue 16 asked 0.8)
THREADS = 4
WORKERS = 2  # SMT_WORKERS default
# Appended after PgCluster's test settings (a later line wins): the server's own defaults again.
SERVER_DEFAULTS = "fsync = on\nsynchronous_commit = on\nfull_page_writes = on\nshared_buffers = 128MB\n"


@dataclass(frozen=True)
class Sizes:
    hashes: int
    drain_files: int
    rounds: int
    drain_rounds: int  # more than the claims': one drain is ~7 s, and one round's ratio moved 0.78-1.14x


FULL = Sizes(5_000, 10_000, 2, 5)
QUICK = Sizes(500, 300, 1, 1)


# --- PostgreSQL server CPU ---------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def server_cpu_seconds(cluster: PgCluster) -> float:
    """CPU time of the cluster so far: the postmaster's own, its reaped children's (backends that ended),
    and its live children's."""
    postmaster = int((cluster.data / "postmaster.pid").read_text().split()[0])
    tick = os.sysconf("SC_CLK_TCK")
    f = _stat_fields(postmaster)
    total = sum(int(x) for x in f[11:15])  # utime, stime, cutime, cstime
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            g = _stat_fields(int(entry.name))
            if int(g[1]) == postmaster:
                total += int(g[11]) + int(g[12])
        except (OSError, IndexError, ValueError):
            continue  # ended meanwhile: now in the postmaster's cutime
    return total / tick


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


# --- claims + mark_sent ------------------------------------------------------------------------------


@dataclass
class ClaimRun:
    backend: str
    threads: int
    hashes: int
    seconds: float
    client_cpu_s: float
    server_cpu_s: float | None  # PostgreSQL only

    @property
    def rate(self) -> float:
        return self.hashes / self.seconds


def work_items(n: int, salt: str) -> list[tuple[str, str, Remember]]:
    items = []
    for i in range(n):
        sha = hashlib.sha256(f"{salt}-{i}".encode()).hexdigest()
        path = f"/srv/smt/inbox/SMT_M1_{salt}_{i:06d}.csv"
        items.append((sha, path, Remember(path, Signature(2049, 1_000_000 + i, 20_000 + i, 1_700_000_000 * 10**9 + i),
                                          sha)))
    return items


def claim_and_send(ledger: SqliteLedger | PostgresLedger, items: list[tuple[str, str, Remember]]) -> None:
    for sha, path, remember in items:
        got = ledger.claim(sha, filename=Path(path).name, path=path, size=remember.signature.size,
                           mode="multipart", respect_backoff=True, remember=remember)
        if got is not Claim.CLAIMED:
            raise BenchError(f"claim of a new hash answered {got}")
        ledger.mark_sent(sha, status=200, destination="http://127.0.0.1/upload", attempts=1)


def measure_claims(backend: str, ledger: SqliteLedger | PostgresLedger, n: int, threads: int, salt: str,
                   cluster: PgCluster | None) -> ClaimRun:
    items = work_items(n, salt)
    slices = [items[k::threads] for k in range(threads)]
    errors: list[BaseException] = []
    start = threading.Barrier(threads + 1)

    def worker(part: list[tuple[str, str, Remember]]) -> None:
        start.wait()
        try:
            claim_and_send(ledger, part)
        except BaseException as exc:  # reported below, after every thread ended
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(s,), name=f"claims-{k}") for k, s in enumerate(slices)]
    for t in pool:
        t.start()
    server_before = server_cpu_seconds(cluster) if cluster else 0.0
    cpu_before = own_cpu_seconds()
    began = time.perf_counter()
    start.wait()
    for t in pool:
        t.join()
    seconds = time.perf_counter() - began
    client_cpu = own_cpu_seconds() - cpu_before
    server_cpu = server_cpu_seconds(cluster) - server_before if cluster else None
    if errors:
        raise BenchError(f"{backend}, {threads} thread(s): {errors[0]!r}")
    sent = ledger.counts()["sent"]
    if sent != n:
        raise BenchError(f"{backend}, {threads} thread(s): {sent} rows sent, not {n}")
    run = ClaimRun(backend, threads, n, seconds, client_cpu, server_cpu)
    note(f"  {backend}, {threads} thread(s): {n} claims + mark_sent in {seconds:.2f} s = {run.rate:.0f}/s")
    return run


def open_pg(cluster: PgCluster, threads: int) -> PostgresLedger:
    # As statedir.connect sizes the pool for watch: one connection per worker and a few more.
    return PostgresLedger(cluster.new_database(), shown_as="bench", node="bench", max_connections=threads + 4)


# --- drain -------------------------------------------------------------------------------------------


@dataclass
class DrainRun:
    backend: str
    drain: Drain
    server_cpu_s: float | None
    code: str = "this tree"  # which source tree ran watch (--src: an A/B in one run)
    statements: float | None = None  # PostgreSQL statements per file (--statements)

    @property
    def cpu_ms_per_file(self) -> float:
        return (self.drain.cpu_s + (self.server_cpu_s or 0.0)) / self.drain.files * 1000


@dataclass
class Results:
    claims: list[ClaimRun] = field(default_factory=list)
    drains: list[DrainRun] = field(default_factory=list)
    loads: dict[str, float] = field(default_factory=dict)

    def done(self, part: str) -> None:
        self.loads[part] = os.getloadavg()[0]

    def median_claims(self, backend: str, threads: int) -> float:
        return statistics.median(r.rate for r in self.claims if r.backend == backend and r.threads == threads)

    def median_drain(self, backend: str, code: str = "this tree") -> float:
        return statistics.median(r.drain.rate for r in self.drains if r.backend == backend and r.code == code)

    def median_cpu(self, backend: str, code: str = "this tree") -> float:
        return statistics.median(r.cpu_ms_per_file for r in self.drains if r.backend == backend and r.code == code)

    def codes(self) -> list[str]:
        return list(dict.fromkeys(r.code for r in self.drains))


def statement_counts(cluster: PgCluster, url: str, files: int) -> float:
    """Print what the drain's database was asked, per file (``--statements``: pg_stat_statements is loaded);
    returns the statements per file (the 15 most called, which is all a drain asks but start-up's DDL)."""
    database = url.rsplit("/", 1)[1]
    out = cluster.admin_sql(
        "SELECT calls, round(total_exec_time::numeric, 1), left(regexp_replace(query, '\\s+', ' ', 'g'), 90)"
        f" FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = '{database}')"
        " ORDER BY calls DESC LIMIT 15")
    rows = [line.split("|", 2) for line in out.splitlines() if line]
    total = sum(int(r[0]) for r in rows)
    note(f"  statements in {database}: {total:,} = {total / files:.1f} per file (calls, ms executing, query):")
    for calls, ms, query in rows:
        note(f"    {int(calls) / files:5.2f}/file {ms:>8} ms  {query}")
    return total / files


def run_drains(work: Path, procs: Procs, cluster: PgCluster, sizes: Sizes, res: Results,
               statements: bool = False, sources: tuple[Path | None, ...] = (None,)) -> None:
    """Each round: for each source tree in turn (``None``: this one), a SQLite drain then a PostgreSQL one."""
    sink_log = work / "sink-requests.tsv"
    with start_sink_process(log_path=str(sink_log)) as port:
        log = SinkLog(sink_log)
        try:
            b = Bench(work, port, log, procs)
            note(f"drain: writing {sizes.drain_files} files ...")
            pool = make_pool(b, CsvMaker(), sizes.drain_files)
            for r in range(1, sizes.drain_rounds + 1):
                for k, src in enumerate(sources):
                    b.src = src  # --src: the drains run another checkout's code (before/after comparisons)
                    code = "this tree" if src is None else str(src)
                    tag = f"{r}" if len(sources) == 1 else f"{r}-{k}"
                    note(f"  code: {code}")
                    d = measure_drain(b, pool, WORKERS, "thread", suffix=f"-sqlite{tag}")
                    res.drains.append(DrainRun("SQLite", d, None, code))
                    res.done(f"drain SQLite {tag}")
                    url = cluster.new_database()
                    before = server_cpu_seconds(cluster)
                    d = measure_drain(b, pool, WORKERS, "thread", extra_env={"SMT_LEDGER_URL": url},
                                      suffix=f"-pg{tag}")
                    run = DrainRun("PostgreSQL", d, server_cpu_seconds(cluster) - before, code)
                    if statements:
                        run.statements = statement_counts(cluster, url, d.files)
                    res.drains.append(run)
                    res.done(f"drain PostgreSQL {tag}")
        finally:
            procs.stop_all()
            log.close()


def run_claims(work: Path, cluster: PgCluster, sizes: Sizes, res: Results) -> None:
    for r in range(1, sizes.rounds + 1):
        for threads in (1, THREADS):
            salt = f"r{r}t{threads}"
            with SqliteLedger(work / f"claims-{salt}.sqlite3", node="bench") as lite:
                res.claims.append(measure_claims("SQLite", lite, sizes.hashes, threads, salt, None))
            with open_pg(cluster, threads) as pg:
                res.claims.append(measure_claims("PostgreSQL", pg, sizes.hashes, threads, salt, cluster))
            res.done(f"claims {threads} thread(s) {r}")


# --- report ------------------------------------------------------------------------------------------


def figures(res: Results) -> list[Figure]:
    out = []
    for threads in (1, THREADS) if res.claims else ():
        pg, lite = res.median_claims("PostgreSQL", threads), res.median_claims("SQLite", threads)
        out.append(Figure(
            f"claim + mark_sent per second, {threads} thread{'s' * (threads > 1)}"
            + (" sharing one ledger" if threads > 1 else ""),
            f"PostgreSQL {pg:,.0f}/s", f"SQLite {lite:,.0f}/s", f"{pg / lite:.2f}×",
        ))
    pg, lite = res.median_drain("PostgreSQL"), res.median_drain("SQLite")
    files = res.drains[0].drain.files
    out.append(Figure(
        f"watch drain, {files:,} files, {WORKERS} workers", f"PostgreSQL {pg:.0f} files/s",
        f"SQLite {lite:.0f} files/s",
        f"{pg / lite:.2f}×", f"≥ {MIN_PG_DRAIN_VS_SQLITE:g}×", pg / lite >= MIN_PG_DRAIN_VS_SQLITE,
    ))
    return out


def pg_version() -> str:
    postgres = pg_bin("postgres")
    if postgres is None:
        return "?"
    return subprocess.run([postgres, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()


def render(sizes: Sizes, quick: bool, start: Start, res: Results, checks: list[Figure], notes: list[str]) -> str:
    lines = [line for line in header_lines(SECTION, start, quick) if not line.startswith("- one-shot")]
    lines += [
        "- 1-min load average at the end of each part: " + ", ".join(f"{k} {v:.1f}" for k, v in res.loads.items()),
        f"- PostgreSQL: {pg_version()}, a throwaway cluster from `tests/pgcluster.PgCluster` on 127.0.0.1 (TCP,"
        " scram-sha-256), with the test suite's `fsync=off`/`synchronous_commit=off`/`full_page_writes=off` undone"
        " (server defaults: every commit waits for its WAL flush); SQLite: `synchronous=NORMAL`, WAL, a file under"
        " /tmp (a disk); both on this machine",
        "",
        *figures_table(checks),
        "",
        f"**Claims** — {sizes.hashes:,} distinct SHA-256s per run, each `claim(…, respect_backoff=True,"
        " remember=…)` (the stat-cache row in the claim's transaction, as `watch` claims a new file) then"
        f" `mark_sent`, on a fresh ledger; {THREADS} threads split the hashes and share one ledger object"
        f" (PostgreSQL pool: threads + 4 connections, as `watch` sizes it). Median of {sizes.rounds} run(s)"
        " above; every run here. CPU: this process (client) and the PostgreSQL cluster (server).",
        "",
        "| backend | threads | wall (s) | per second | client CPU (s) | server CPU (s) | CPU ms per claim+sent |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res.claims:
        server = r.server_cpu_s or 0.0
        lines.append(f"| {r.backend} | {r.threads} | {r.seconds:.2f} | {r.rate:,.0f} | {r.client_cpu_s:.1f} "
                     f"| {'' if r.server_cpu_s is None else f'{server:.1f}'} "
                     f"| {(r.client_cpu_s + server) / r.hashes * 1000:.2f} |")
    lines += [
        "",
        f"**Drain** — `bench_watch.py`'s drain ({res.drains[0].drain.files:,} distinct CSVs of 1–50 KB renamed into"
        f" the inbox of a running `smt-watch watch`, `SMT_SETTLE_SECONDS=0`, {WORKERS} workers in threads; first"
        " rename → last request complete at `bench/sink.py`), SQLite and PostgreSQL (`SMT_LEDGER_URL`, a fresh"
        f" database each time) alternately, {sizes.drain_rounds} round(s); the verdict compares medians. watch CPU"
        " includes its threads;"
        " server CPU is the PostgreSQL cluster's over the same drain.",
        "",
        "| code | backend | files | wall (s) | files/s | watch CPU (s) | server CPU (s) | CPU ms/file (both) "
        "| statements/file | watch VmHWM (MB) | sent twice |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in res.drains:
        d = run.drain
        lines.append(
            f"| {run.code} | {run.backend} | {d.files:,} | {d.seconds:.2f} | {d.rate:.0f} | {d.cpu_s:.1f} "
            f"| {'' if run.server_cpu_s is None else f'{run.server_cpu_s:.1f}'} | {run.cpu_ms_per_file:.2f} "
            f"| {'' if run.statements is None else f'{run.statements:.2f}'} "
            f"| {d.hwm_kib * 1024 / 1e6:.1f} | {d.repeats} |"
        )
    for code in res.codes():
        lite = [r.drain.rate for r in res.drains if r.code == code and r.backend == "SQLite"]
        pg = [r.drain.rate for r in res.drains if r.code == code and r.backend == "PostgreSQL"]
        lines += ["", f"Each round's ratio ({code}; PostgreSQL / the SQLite drain just before it): "
                  + ", ".join(f"{p / q:.2f}×" for p, q in zip(pg, lite, strict=False))]
    if len(res.codes()) > 1:
        lines += ["", "Medians per source tree (the same run, alternating):", ""]
        for code in res.codes():
            pg, lite = res.median_drain("PostgreSQL", code), res.median_drain("SQLite", code)
            lines.append(f"- {code}: PostgreSQL {pg:.0f} files/s, SQLite {lite:.0f} files/s, {pg / lite:.2f}×;"
                         f" CPU ms/file (watch + server) PostgreSQL {res.median_cpu('PostgreSQL', code):.2f},"
                         f" SQLite {res.median_cpu('SQLite', code):.2f}")
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


# --- main --------------------------------------------------------------------------------------------


def with_cluster(body: Callable[[PgCluster], None], statements: bool) -> None:
    cluster = PgCluster()
    try:
        cluster.init()
        with (cluster.data / "postgresql.conf").open("a") as conf:
            conf.write(SERVER_DEFAULTS)
            if statements:
                conf.write("shared_preload_libraries = 'pg_stat_statements'\n")
        cluster.start()
        if statements:
            cluster.admin_sql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        body(cluster)
    finally:
        cluster.destroy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, help=f"Markdown file whose {SECTION!r} section to write")
    parser.add_argument("--quick", action="store_true", help="reduced sizes, for a smoke test")
    parser.add_argument("--hashes", type=int, help="distinct hashes per claims run (default 5,000)")
    parser.add_argument("--drain-files", type=int, help="files per drain (default 10,000)")
    parser.add_argument("--rounds", type=int, help="claims runs per backend (default 2)")
    parser.add_argument("--drain-rounds", type=int,
                        help="drains per backend, alternating; medians are judged (default 5)")
    parser.add_argument("--skip-drain", action="store_true", help="claims only")
    parser.add_argument("--skip-claims", action="store_true", help="drains only")
    parser.add_argument("--src", type=Path, action="append", default=[],
                        help="the drains also run this checkout's source tree (with this venv), alternating with"
                             " this one in each round (an A/B in one run); may be given more than once")
    parser.add_argument("--statements", action="store_true",
                        help="diagnosis: load pg_stat_statements and print what each PostgreSQL drain asked, per file")
    parser.add_argument("--note-file", type=Path, action="append", default=[],
                        help="a file whose text is added under the tables (e.g. what an earlier run measured)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when the target fails")
    args = parser.parse_args(argv)
    if not SMT_WATCH.exists():
        raise SystemExit(f"{SMT_WATCH} not found: run `make` (pip install -e .) first")
    reason = available()
    if reason:
        raise SystemExit(f"bench_ledger: PostgreSQL cannot run here: {reason}")
    sizes = QUICK if args.quick else FULL
    sizes = Sizes(args.hashes or sizes.hashes, args.drain_files or sizes.drain_files, args.rounds or sizes.rounds,
                  args.drain_rounds or sizes.drain_rounds)
    install_sigterm()
    start = begin()
    res = Results()
    procs = Procs()
    with tempfile.TemporaryDirectory(prefix="bench-ledger-", dir="/tmp") as tmp:
        work = Path(tmp)

        def body(cluster: PgCluster) -> None:
            if not args.skip_claims:
                note("claims + mark_sent:")
                run_claims(work, cluster, sizes, res)
            if not args.skip_drain:
                run_drains(work, procs, cluster, sizes, res, args.statements, (None, *args.src))

        try:
            with_cluster(body, args.statements)
        except BenchError as exc:
            print(f"bench_ledger: {exc}", file=sys.stderr)
            return 2
        finally:
            procs.stop_all()
    if args.skip_drain:
        for threads in (1, THREADS):
            note(f"claims, {threads} thread(s): PostgreSQL {res.median_claims('PostgreSQL', threads):,.0f}/s, "
                 f"SQLite {res.median_claims('SQLite', threads):,.0f}/s")
        return 0
    checks = figures(res)
    section = render(sizes, args.quick, start, res, checks, [f.read_text().strip() for f in args.note_file])
    print(section)
    if args.out:
        update_markdown(args.out, section, title=SECTION)
        note(f"wrote section {SECTION!r} of {args.out}")
    return 1 if args.strict and not all(f.ok is not False for f in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
