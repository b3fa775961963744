"""Benchmark ``smt-watch sync`` against the OpenSSH ``sftp`` client, same sshd, same files, same run (issue 4).

Why this shape: sync replaces a cron job that ran OpenSSH ``sftp``; the promise is that it is not much
slower than that client (target: at least half its throughput on a big file) and that its memory does not
grow with the file (measured before: paramiko's prefetch can buffer a whole file). A shared machine is noisy,
so the only figures that mean anything are ratios to OpenSSH measured in the same run: every case runs
round-robin, the median of the rounds is kept.

The server is OpenSSH ``sshd`` on loopback, started by ``tests/sftp_server.running_sshd`` (temp host key,
key-only login as the current user). Data, all under that server's root:

- ``big/``: one file of 1 GiB (SMT-style CSV rows; the content does not matter to SSH);
- ``many/``: 1,000 distinct CSVs of ~100 KB;
- ``mid/``: one 10 MB file, only for the RSS comparison (memory must be flat in file size).

Cases: ``smt-watch sync --workers 4`` (the default) and ``--workers 1``, each with a fresh inbox and
state dir, vs ``sftp -b`` (``get`` for the big file, ``mget`` for the many). Each run is timed from spawn
to reap; peak RSS is ``/usr/bin/time -f %M``. Every run is checked: the right file names and sizes land
(nothing else, no ``.part`` left), sync says it fetched them all; the big file's SHA-256 is checked on the
first run of each case. Outputs are deleted and ``sync(2)`` is called (untimed) after each run, so the
dirty pages of one run are not written back during the next.

    .venv/bin/python bench/bench_sync.py [--quick] [--rounds 3] [--out bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_post import MAX_RSS_GROWTH_MIB, ROOT, SMT_WATCH, clean_env, update_markdown
from bench_watch import CsvMaker
from benchlib import (
    MB,
    MIB,
    BenchError,
    CpuRun,
    Figure,
    Start,
    Timed,
    begin,
    figures_table,
    header_lines,
    install_sigterm,
    note,
    sha256_file,
    timed,
    write_repeated,
)

sys.path.insert(0, str(ROOT / "tests"))
from sftp_server import SSHD, SshdServer, running_sshd, sftp_env  # the test suite's sshd harness

SECTION = "## sync (issue 4)"
MIN_BIG_VS_OPENSSH = 0.9  # smt-watch sync throughput / OpenSSH sftp get, big file (issue 27; 0.6 in issue 17)
MIN_MANY_VS_OPENSSH = 1.0  # smt-watch sync files/s / OpenSSH sftp -b mget files/s, many small files (issue 17)
SFTP_TIMEOUT_S = 60
SYNC_RE = re.compile(r"sync: (\d+) new .*, (\d+) failed")


@dataclass(frozen=True)
class Sizes:
    big_bytes: int
    many_files: int
    many_bytes: int  # upper bound per file; CsvMaker cuts at a line end
    mid_bytes: int
    rounds: int


FULL = Sizes(1024 * MIB, 1000, 100_000, 10_000_000, 3)
QUICK = Sizes(64 * MIB, 100, 100_000, 10_000_000, 1)


@dataclass
class Dataset:
    label: str
    rel: str  # directory under the server root
    expected: dict[str, int]  # file name -> size
    sha256: dict[str, str] = field(default_factory=dict)  # only for the big file

    @property
    def files(self) -> int:
        return len(self.expected)

    @property
    def total(self) -> int:
        return sum(self.expected.values())


@dataclass
class Case(Timed):
    workers: int = 0  # 0: the OpenSSH sftp client
    src: Path | None = None  # run ``python -m smt_watch`` from this source tree instead of the installed one

    @property
    def is_sftp(self) -> bool:
        return self.workers == 0


def cases(with_workers_1: bool = True, sources: tuple[Path, ...] = ()) -> list[Case]:
    out = [Case("smt-watch sync --workers 4", workers=4)]
    out += [Case(f"smt-watch sync --workers 4 from {src}", workers=4, src=src) for src in sources]
    if with_workers_1:
        out.append(Case("smt-watch sync --workers 1", workers=1))
    out.append(Case("OpenSSH sftp -b", workers=0))
    return out


# --- data -------------------------------------------------------------------------------------------


def make_data(root: Path, sizes: Sizes) -> tuple[Dataset, Dataset, Dataset]:
    big_name = "SMT_M1_big.csv"
    note(f"writing {sizes.big_bytes / MIB:.0f} MiB, {sizes.mid_bytes / MB:.0f} MB and {sizes.many_files} files ...")
    big = Dataset(f"1 file of {sizes.big_bytes / MIB:,.0f} MiB", "big", {big_name: sizes.big_bytes})
    big.sha256[big_name] = write_repeated(root / "big" / big_name, sizes.big_bytes)
    mid = Dataset(f"1 file of {sizes.mid_bytes / MB:,.0f} MB", "mid", {"SMT_M1_mid.csv": sizes.mid_bytes})
    write_repeated(root / "mid" / "SMT_M1_mid.csv", sizes.mid_bytes)
    maker = CsvMaker()
    many = Dataset(f"{sizes.many_files:,} files of ~{sizes.many_bytes / 1000:.0f} KB", "many", {})
    (root / "many").mkdir(parents=True)
    for i in range(sizes.many_files):
        name = f"SMT_M1_many_{i:05d}.csv"
        data = maker.make(sizes.many_bytes)
        (root / "many" / name).write_bytes(data)
        many.expected[name] = len(data)
    return big, many, mid


# --- one run ----------------------------------------------------------------------------------------


@dataclass
class SyncBench:
    work: Path
    server: SshdServer
    known_hosts: Path
    verified_sha: set[str] = field(default_factory=set)  # case names whose big file was hashed

    def sftp_argv(self, batch: Path) -> list[str]:
        s = self.server
        return [
            "sftp", "-q", "-b", str(batch), "-F", "/dev/null", "-i", str(s.client_key), "-P", str(s.port),
            "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", f"ConnectTimeout={SFTP_TIMEOUT_S}", f"{s.user}@{s.host}",
        ]

    def run(self, case: Case, data: Dataset) -> CpuRun:
        out, state = self.work / "out", self.work / "state"
        out.mkdir()
        what = f"{case.name} ({data.label})"
        try:
            if case.is_sftp:
                batch = self.work / "batch.txt"
                remote = self.server.remote(data.rel)
                line = f"get {remote}/{next(iter(data.expected))}" if data.files == 1 else f"mget {remote}/*"
                batch.write_text(f"{line} {out}/\n")
                run = timed(self.sftp_argv(batch), clean_env(), what)
            else:
                env = clean_env()
                env.update(sftp_env(self.server, self.known_hosts, remote_dirs=[data.rel], timeout=SFTP_TIMEOUT_S,
                                    SMT_LOCAL_DIR=str(out), SMT_STATE_DIR=str(state)))
                argv = [str(SMT_WATCH), "sync", "--workers", str(case.workers)]
                if case.src is not None:  # --src: the same venv, another checkout's code first on the path
                    env["PYTHONPATH"] = str(case.src)
                    argv = [sys.executable, "-P", "-m", "smt_watch", *argv[1:]]  # -P: not the cwd first
                run = timed(argv, env, what)
                m = SYNC_RE.search(run.stdout + run.stderr)
                if not m or int(m.group(1)) != data.files or int(m.group(2)) != 0:
                    raise BenchError(f"{what}: expected 'sync: {data.files} new …, 0 failed', got:\n"
                                     f"{run.stdout[-1500:]}{run.stderr[-1500:]}")
            self.verify(case, data, out, what)
        finally:
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(state, ignore_errors=True)
            os.sync()  # untimed: write back this run's dirty pages before the next run starts
        return run

    def verify(self, case: Case, data: Dataset, out: Path, what: str) -> None:
        """Exactly the expected names and sizes (no temp files left); the big file's hash once per case."""
        got = {p.name: p.stat().st_size for p in out.rglob("*") if p.is_file()}
        if got != data.expected:
            missing = sorted(set(data.expected) - set(got))[:5]
            extra = sorted(set(got) - set(data.expected))[:5]
            wrong = sorted(n for n in set(got) & set(data.expected) if got[n] != data.expected[n])[:5]
            raise BenchError(f"{what}: fetched files differ: missing {missing}, unexpected {extra}, wrong size {wrong}")
        if data.sha256 and case.name not in self.verified_sha:
            for path in out.rglob("*"):
                if path.name in data.sha256 and sha256_file(path) != data.sha256[path.name]:
                    raise BenchError(f"{what}: SHA-256 of {path.name} differs from the source")
            self.verified_sha.add(case.name)


def measure(b: SyncBench, data: Dataset, todo: list[Case], rounds: int) -> None:
    for r in range(rounds):
        for case in todo:
            run = b.run(case, data)
            case.runs.append(run)
            note(f"  [{data.label}, round {r + 1}/{rounds}] {case.name}: {run.seconds:.2f} s, "
                 f"CPU {run.cpu_s:.1f} s, {run.maxrss_kib / 1024:.1f} MiB")


# --- report -----------------------------------------------------------------------------------------


def by_name(todo: list[Case]) -> dict[str, Case]:
    return {c.name: c for c in todo}


def figures(big: Dataset, big_cases: list[Case], many: Dataset, many_cases: list[Case], mid: Dataset,
            mid_cases: list[Case]) -> list[Figure]:
    out: list[Figure] = []
    ssh_big = by_name(big_cases)["OpenSSH sftp -b"]
    anchor_rate = big.total / ssh_big.median / MB
    for c in big_cases:
        if c.is_sftp:
            continue
        rate = big.total / c.median / MB
        ratio = rate / anchor_rate
        out.append(Figure(f"{c.name}, {big.label}", f"{rate:.0f} MB/s", f"sftp get {anchor_rate:.0f} MB/s",
                          f"{ratio:.2f}×", *((f"≥ {MIN_BIG_VS_OPENSSH}×", ratio >= MIN_BIG_VS_OPENSSH)
                                             if c.workers > 1 and c.src is None else ())))
    for c in big_cases:
        if not c.is_sftp:
            out.append(Figure(f"client CPU (user + sys) of {c.name}, {big.label}", f"{c.median_cpu:.1f} s",
                              f"sftp + ssh {ssh_big.median_cpu:.1f} s", f"{c.median_cpu / ssh_big.median_cpu:.1f}×"))
    ssh_many = by_name(many_cases)["OpenSSH sftp -b"]
    anchor_fps = many.files / ssh_many.median
    for c in many_cases:
        if c.is_sftp:
            continue
        fps = many.files / c.median
        ratio = fps / anchor_fps
        out.append(Figure(f"{c.name}, {many.label}", f"{fps:.0f} files/s ({many.total / c.median / MB:.1f} MB/s)",
                          f"sftp mget {anchor_fps:.0f} files/s", f"{ratio:.2f}×",
                          *((f"≥ {MIN_MANY_VS_OPENSSH}×", ratio >= MIN_MANY_VS_OPENSSH)
                            if c.workers > 1 and c.src is None else ())))
    big_rss = by_name(big_cases)["smt-watch sync --workers 4"].peak_rss_mib
    mid_rss = by_name(mid_cases)["smt-watch sync --workers 4"].peak_rss_mib
    growth = big_rss - mid_rss
    out.append(Figure(f"peak RSS of smt-watch sync --workers 4, {big.label}", f"{big_rss:.1f} MiB",
                      f"{mid.label}: {mid_rss:.1f} MiB", f"{growth:+.1f} MiB",
                      f"flat: ≤ +{MAX_RSS_GROWTH_MIB:g} MiB", growth <= MAX_RSS_GROWTH_MIB))
    return out


def render(sizes: Sizes, quick: bool, start: Start, server: SshdServer,
           results: list[tuple[Dataset, list[Case]]], checks: list[Figure]) -> str:
    ssh = {data.label: by_name(todo)["OpenSSH sftp -b"].median for data, todo in results}
    lines = [
        *header_lines(SECTION, start, quick),
        f"- server: OpenSSH `{SSHD}` on 127.0.0.1:{server.port} (`tests/sftp_server.running_sshd`: ed25519 host"
        " and client keys, `internal-sftp`), default ciphers on both sides; source files warm in the page cache,"
        " local disk under /tmp",
        f"- {sizes.rounds} round(s), cases round-robin, median kept; each smt-watch run gets a fresh inbox and"
        " `SMT_STATE_DIR`; after every run the output is deleted and `sync(2)` called, untimed. smt-watch fsyncs"
        " every file, and its directory once per batch of files, and records each in its SQLite ledger;"
        " `sftp` does neither. A pass of"
        " ≥ 64 MiB or ≥ 100 files runs `--workers N` as processes (own SSH connection each); a file ≥ 64 MiB"
        " is fetched as 32 MiB ranges by all of them into one part; `--workers 1` is one stream (no target)",
        "- client CPU: user + system seconds of the command and what it reaped (`ssh` under `sftp`; not sshd),"
        " median; unlike wall time it hardly moves when other processes compete for the 2 cores",
        "- verified every run: exactly the expected names and sizes landed, nothing else (no `.part`), and sync"
        " printed `N new …, 0 failed`; the big file's SHA-256 matched the source on the first run of each case",
        "",
        "| data | command | runs (s) | median (s) | MB/s | files/s | × sftp (throughput) | client CPU (s) "
        "| peak RSS (MiB) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for data, todo in results:
        for c in todo:
            lines.append(
                f"| {data.label} ({data.total / MB:,.1f} MB) | {c.name} | {c.times()} | {c.median:.2f} "
                f"| {data.total / c.median / MB:.1f} | {f'{data.files / c.median:.1f}' if data.files > 1 else ''} "
                f"| {ssh[data.label] / c.median:.2f} | {c.median_cpu:.1f} | {c.peak_rss_mib:.1f} |"
            )
    lines += ["", *figures_table(checks)]
    return "\n".join(lines) + "\n"


# --- main -------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, help=f"Markdown file whose {SECTION!r} section to write")
    parser.add_argument("--quick", action="store_true", help="reduced sizes (64 MiB, 100 files, 1 round)")
    parser.add_argument("--rounds", type=int, help="rounds per case (default 3, --quick 1)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when any target fails")
    parser.add_argument("--only", choices=("big", "many"), help="measure one data set only (no RSS figure); "
                        "prints the table, writes nothing to --out")
    parser.add_argument("--no-workers-1", action="store_true", help="skip the --workers 1 cases")
    parser.add_argument("--src", type=Path, action="append", default=[],
                        help="also run `--workers 4` from this checkout (same venv, its code first on the path), "
                        "round-robin with the others: an A/B in one run; repeatable")
    args = parser.parse_args(argv)
    if not SMT_WATCH.exists():
        raise SystemExit(f"{SMT_WATCH} not found: run `make` (pip install -e .) first")
    if not SSHD.exists() or shutil.which("sftp") is None:
        raise SystemExit(f"{SSHD} and sftp (OpenSSH) are needed")
    sizes = QUICK if args.quick else FULL
    rounds = args.rounds or sizes.rounds
    sizes = Sizes(sizes.big_bytes if args.only != "many" else MIB, sizes.many_files, sizes.many_bytes,
                  sizes.mid_bytes, rounds)
    install_sigterm()
    start = begin()
    with tempfile.TemporaryDirectory(prefix="bench-sync-", dir="/tmp") as tmp:
        work = Path(tmp)
        try:
            with running_sshd(work / "sshd") as server:
                big, many, mid = make_data(server.root, sizes)
                b = SyncBench(work, server, work / "known_hosts")
                results: list[tuple[Dataset, list[Case]]] = []
                w1 = not args.no_workers_1
                srcs = tuple(p.resolve() for p in args.src)
                plan = [(big, cases(w1, srcs)), (many, cases(w1, srcs)), (mid, cases(with_workers_1=False))]
                if args.only:
                    plan = [plan[0] if args.only == "big" else plan[1]]
                for data, todo in plan:
                    note(f"{data.label}:")
                    measure(b, data, todo, rounds)
                    results.append((data, todo))
                if args.only:
                    print(render(sizes, args.quick, start, server, results, []))
                    return 0
                checks = figures(big, results[0][1], many, results[1][1], mid, results[2][1])
                section = render(sizes, args.quick, start, server, results, checks)
        except BenchError as exc:
            print(f"bench_sync: {exc}", file=sys.stderr)
            return 2
    print(section)
    if args.out:
        update_markdown(args.out, section, title=SECTION)
        note(f"wrote section {SECTION!r} of {args.out}")
    return 1 if args.strict and not all(f.ok is not False for f in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
