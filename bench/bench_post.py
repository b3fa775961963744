"""Benchmark ``smt-watch post`` against bare curl and the bash script's ``sha256sum`` + curl, in one run.

Why this shape: this is a noisy shared machine, so absolute seconds mean little; the targets are ratios
to curl measured in the same run, on the same file, to the same sink. Every case runs as a child process
and is timed wall-clock from spawn to reap, because that is what an operator (or the bash script's timer loop)
pays: interpreter start-up, imports, hashing, sending. Cases are interleaved round-robin so drift on the
host hits them all alike, and the median of the rounds is kept.

Peak RSS is the child's ``ru_maxrss`` (KiB on Linux), taken with ``/usr/bin/time -f %M`` when present
(see :func:`run_child` for why not ``os.wait4`` directly); for ``bash -c`` it also covers the children
bash reaped. It is measured at the big size and at 1 MiB, because the promise is
that memory stays flat in file size, not just that it is small.

    .venv/bin/python bench/bench_post.py [--size-mib 1024] [--out bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sink import start_sink_process  # bench/ is not a package: it is run as a script

ROOT = Path(__file__).resolve().parent.parent
SMT_WATCH = ROOT / ".venv" / "bin" / "smt-watch"
SECTION = "## post (issue 2)"
MIB = 1024 * 1024

# Targets (issue 2).
MAX_VS_CURL = 1.5
MAX_VS_SEED = 0.6
MAX_VS_HASH_AND_CURL = 1.2  # issue 17: a file must be hashed before it is sent; one hash pass + curl is the limit
HASH_PASS = ("import hashlib, sys\nh = hashlib.sha256()\nwith open(sys.argv[1], 'rb', buffering=0) as f:\n"
             "    while b := f.read(1 << 20):\n        h.update(b)\nprint(h.hexdigest())\n")
MAX_RSS_MIB = 64.0
MAX_RSS_GROWTH_MIB = 16.0
MAX_VERSION_S = 0.25

# Variables that would change what smt-watch does if inherited from the caller's shell.
_STRIP_PREFIXES = ("SMT_", "INTELLIWATT_", "DROPLET_")
_STRIP_NAMES = {"ADMIN_TOKEN", "ESIID_DEFAULT", "METER_DEFAULT", "SOURCE_TAG", "STATE_FILE", "GNUPGHOME"}


@dataclass
class Run:
    """One child process: wall time from spawn to reap, its peak RSS, and what it printed."""

    seconds: float
    maxrss_kib: int
    returncode: int
    stdout: str
    stderr: str


@dataclass
class Case:
    """A command measured several times; ``env_for`` gives a fresh environment per run."""

    name: str
    argv: list[str]
    env_for: Callable[[], dict[str, str]] | None = None
    smt_mode: str | None = None  # set for smt-watch cases: their RSS has targets
    posts: bool = True  # False for the hash-pass anchor, which sends nothing
    runs: list[Run] = field(default_factory=list)
    body_bytes: list[int] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(r.seconds for r in self.runs)

    @property
    def peak_rss_mib(self) -> float:
        return max(r.maxrss_kib for r in self.runs) / 1024


GNU_TIME = "/usr/bin/time"


def rss_method() -> str:
    """How peak RSS is measured, for the report."""
    if os.access(GNU_TIME, os.X_OK):
        return f"`{GNU_TIME} -f %M` (the child's `ru_maxrss` in KiB, shown in MiB)"
    return (
        "`ru_maxrss` from `os.wait4` on the child (KiB, shown in MiB); no /usr/bin/time here, so each figure"
        " has this script's own RSS as a floor (a forked child keeps its parent's high-water mark over exec)"
    )


def run_child(argv: Sequence[str], env: dict[str, str] | None = None) -> Run:
    """Spawn, reap, return wall time and peak RSS; output goes to temp files, so no pipe can fill up.

    Peak RSS comes from GNU time when present. ``os.wait4`` straight on our own child would be wrong
    for small programs: Linux carries the high-water mark of the forked copy of this Python process
    (~30 MiB) over ``exec``, so curl would show ~30 MiB. GNU time forks from a ~1 MiB process instead.
    """
    use_time = os.access(GNU_TIME, os.X_OK)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.NamedTemporaryFile() as rss:
        full = [GNU_TIME, "-f", "%M", "-o", rss.name, *argv] if use_time else list(argv)
        start = time.perf_counter()
        proc = subprocess.Popen(full, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
        if use_time:
            # GNU time writes "Command exited with non-zero status N" before the figure when it fails.
            last = Path(rss.name).read_text().strip().splitlines()[-1:]
            maxrss = int(last[0]) if last and last[0].isdigit() else 0
        else:
            maxrss = usage.ru_maxrss
        out.seek(0)
        err.seek(0)
        return Run(
            seconds, maxrss, proc.returncode,
            out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace"),
        )


def clean_env() -> dict[str, str]:
    """The caller's environment without any smt-watch settings, so only what a case sets counts."""
    return {
        k: v for k, v in os.environ.items() if not k.startswith(_STRIP_PREFIXES) and k not in _STRIP_NAMES
    }


def sink_stats(port: int) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=10) as resp:
        data: dict[str, int] = json.load(resp)
    return data


# --- test data --------------------------------------------------------------------------------------


def csv_block(size: int, seed: int = 2) -> bytes:
    """``size`` bytes of SMT-style interval rows with random readings.

    Cheap (built once, written repeatedly) and compressible the way real SMT CSVs are, so the gzip mode
    is measured on realistic input; pure random bytes would make gzip do useless work.
    """
    rng = random.Random(seed)
    rows = ["ESIID,USAGE_DATE,REVISION_DATE,USAGE_START_TIME,USAGE_END_TIME,USAGE_KWH,ESTIMATED_ACTUAL\n"]
    total = len(rows[0])
    while total < size:
        minute = rng.randrange(96) * 15
        row = (
            f"10443720000{rng.randrange(10**6):06d},{rng.randrange(1, 13):02d}/{rng.randrange(1, 29):02d}/2024,"
            f"{rng.randrange(1, 13):02d}/{rng.randrange(1, 29):02d}/2024 00:00:00,"
            f"{minute // 60:02d}:{minute % 60:02d},{(minute + 15) // 60 % 24:02d}:{(minute + 15) % 60:02d},"
            f"{rng.random() * 3:.3f},{rng.choice('AE')}\n"
        )
        rows.append(row)
        total += len(row)
    return "".join(rows).encode()[:size]


def make_file(path: Path, size_mib: int, content: str) -> None:
    """Write ``size_mib`` MiB by repeating one 1 MiB block (CSV rows, or random bytes)."""
    block = csv_block(MIB) if content == "csv" else random.Random(1).randbytes(MIB)
    with open(path, "wb") as fh:
        for _ in range(size_mib):
            fh.write(block)


# --- cases ------------------------------------------------------------------------------------------


def build_cases(path: Path, port: int, work: Path, inline: bool = True, sources: Sequence[Path] = ()) -> list[Case]:
    """The six measured commands for one file (``inline=False``: without the two inline modes). ``sources``
    (``--src``): multipart post once more for each other checkout, run as ``python -m smt_watch`` with this
    venv and that tree first on the path, and for this tree the same way (an A/B in one run, alternating)."""
    upload_url = f"http://127.0.0.1:{port}/upload"
    base_url = f"http://127.0.0.1:{port}"
    curl = ["curl", "-sS", "-o", "/dev/null", "-F", f"file=@{path}", upload_url]
    counter = iter(range(10**9))
    inbox = work / "inbox"
    inbox.mkdir(exist_ok=True)

    def smt_env(**extra: str) -> Callable[[], dict[str, str]]:
        def make() -> dict[str, str]:
            env = clean_env()
            env.update(SMT_LOCAL_DIR=str(inbox), SMT_STATE_DIR=str(work / f"state-{next(counter)}"), **extra)
            return env

        return make

    inline_max = str(2 * path.stat().st_size + MIB)
    cases = [
        Case("curl -F (anchor)", curl),
        Case("python hashlib.sha256 pass (anchor)", [sys.executable, "-c", HASH_PASS, str(path)], posts=False),
        Case(
            "sha256sum + curl -F (seed)",
            ["bash", "-c", f"sha=$(sha256sum {shlex.quote(str(path))} | cut -d' ' -f1) && {shlex.join(curl)}"],
        ),
        Case(
            "smt-watch post, multipart", [str(SMT_WATCH), "post", str(path)],
            smt_env(SMT_DELIVERY="multipart", SMT_UPLOAD_URL=upload_url), smt_mode="multipart",
        ),
        Case(
            "smt-watch post, inline base64", [str(SMT_WATCH), "post", str(path)],
            smt_env(SMT_DELIVERY="inline", INTELLIWATT_BASE_URL=base_url, SMT_INLINE_ENCODING="base64",
                    SMT_INLINE_MAX_BYTES=inline_max),
            smt_mode="inline base64",
        ),
        Case(
            "smt-watch post, inline base64+gzip", [str(SMT_WATCH), "post", str(path)],
            smt_env(SMT_DELIVERY="inline", INTELLIWATT_BASE_URL=base_url, SMT_INLINE_ENCODING="base64+gzip",
                    SMT_INLINE_MAX_BYTES=inline_max),
            smt_mode="inline base64+gzip",
        ),
    ]
    python = str(SMT_WATCH.parent / "python")
    for label, tree in ([("this tree", ROOT)] if sources else []) + [(f"src {s}", s) for s in sources]:
        cases.append(Case(
            # -P: the working directory is not put first on the path (run from a checkout, it would win)
            f"smt-watch post, multipart ({label}, -m)", [python, "-P", "-m", "smt_watch", "post", str(path)],
            smt_env(SMT_DELIVERY="multipart", SMT_UPLOAD_URL=upload_url, PYTHONPATH=str(Path(tree).resolve())),
            smt_mode=f"multipart ({label})",
        ))
    return cases if inline else [c for c in cases if not (c.smt_mode or "").startswith("inline")]


def measure(cases: list[Case], rounds: int, port: int, size: int, label: str) -> None:
    """Run every case ``rounds`` times, round-robin; check each delivered one whole body to the sink."""
    for r in range(rounds):
        for case in cases:
            env = case.env_for() if case.env_for else None
            before = sink_stats(port)["requests"]
            run = run_child(case.argv, env)
            after = sink_stats(port)
            if run.returncode != 0:
                raise SystemExit(
                    f"{case.name} ({label}) exited {run.returncode}:\n{run.stdout}\n{run.stderr}"
                )
            if case.smt_mode and ("sent " not in run.stdout or " 1 attempt(s)" not in run.stdout):
                raise SystemExit(f"{case.name} ({label}) did not send in one attempt:\n{run.stdout}{run.stderr}")
            if not case.posts:
                if after["requests"] != before:
                    raise SystemExit(f"{case.name} ({label}): sink saw a request")
                case.runs.append(run)
                case.body_bytes.append(0)
                continue
            if after["requests"] != before + 1:
                raise SystemExit(f"{case.name} ({label}): sink saw {after['requests'] - before} requests, not 1")
            body = after["last_body_bytes"]
            if case.smt_mode != "inline base64+gzip" and body < size:
                raise SystemExit(f"{case.name} ({label}): sink got {body} body bytes for a {size}-byte file")
            case.runs.append(run)
            case.body_bytes.append(body)
            if env is not None:
                shutil.rmtree(env["SMT_STATE_DIR"], ignore_errors=True)
            print(f"  [{label} round {r + 1}/{rounds}] {case.name}: {run.seconds:.2f} s, "
                  f"{run.maxrss_kib / 1024:.1f} MiB, {body} body bytes", file=sys.stderr, flush=True)


def time_version(n: int) -> list[float]:
    """``smt-watch --version`` n times after one warm-up (so .pyc files are in place)."""
    run_child([str(SMT_WATCH), "--version"], clean_env())
    times = []
    for _ in range(n):
        run = run_child([str(SMT_WATCH), "--version"], clean_env())
        if run.returncode != 0:
            raise SystemExit(f"smt-watch --version exited {run.returncode}: {run.stderr}")
        times.append(run.seconds)
    return times


# --- report -----------------------------------------------------------------------------------------


@dataclass
class Verdict:
    what: str
    measured: str
    limit: str
    ok: bool


def verdicts(big: list[Case], small: list[Case], version_median: float) -> list[Verdict]:
    by = {c.name: c for c in big}
    curl = by["curl -F (anchor)"].median
    seed = by["sha256sum + curl -F (seed)"].median
    multipart = by["smt-watch post, multipart"].median
    hash_pass = by["python hashlib.sha256 pass (anchor)"].median
    out = [
        Verdict("multipart post / (hashlib pass + curl)", f"{multipart / (hash_pass + curl):.2f}",
                f"≤ {MAX_VS_HASH_AND_CURL}", multipart / (hash_pass + curl) <= MAX_VS_HASH_AND_CURL),
        Verdict("multipart post / curl", f"{multipart / curl:.2f}", f"≤ {MAX_VS_CURL}",
                multipart / curl <= MAX_VS_CURL),
        Verdict("multipart post / (sha256sum + curl)", f"{multipart / seed:.2f}", f"≤ {MAX_VS_SEED}",
                multipart / seed <= MAX_VS_SEED),
    ]
    small_by = {c.smt_mode: c for c in small}
    for case in big:
        if case.smt_mode is None:
            continue
        rss = case.peak_rss_mib
        growth = rss - small_by[case.smt_mode].peak_rss_mib
        out.append(Verdict(f"peak RSS, {case.smt_mode}", f"{rss:.1f} MiB", f"≤ {MAX_RSS_MIB:g} MiB",
                           rss <= MAX_RSS_MIB))
        out.append(Verdict(f"peak RSS growth vs 1 MiB file, {case.smt_mode}", f"{growth:+.1f} MiB",
                           f"≤ {MAX_RSS_GROWTH_MIB:g} MiB", growth <= MAX_RSS_GROWTH_MIB))
    out.append(Verdict("`smt-watch --version` (median of 10)", f"{version_median:.3f} s", f"≤ {MAX_VERSION_S} s",
                       version_median <= MAX_VERSION_S))
    return out


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    curl = subprocess.run(["curl", "--version"], capture_output=True, text=True).stdout.split()[1]
    try:
        import httpx

        httpx_version = httpx.__version__
    except ImportError:
        httpx_version = "?"
    return (
        f"nproc {len(os.sched_getaffinity(0))} ({cpu}), {mem:.1f} GiB RAM, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}, curl {curl}, httpx {httpx_version}"
    )


def render(
    big: list[Case], small: list[Case], size_mib: int, content: str, rounds: int, version: list[float],
    checks: list[Verdict],
) -> str:
    small_by = {c.name: c for c in small}
    curl = big[0].median
    lines = [
        SECTION,
        "",
        f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {machine()}",
        f"- command: `{shlex.join(sys.orig_argv)}` (cwd `{Path.cwd()}`)",
        f"- file: {size_mib} MiB ({'SMT-style CSV rows with random readings' if content == 'csv' else 'random bytes'},"
        " one 1 MiB block repeated), warm in the page cache; sink: `bench/sink.py` in its own process on loopback",
        f"- wall time: spawn to reap, median of {rounds} rounds run round-robin; peak RSS: {rss_method()},"
        " the max over the rounds",
        "",
        "| command | runs (s) | median (s) | × curl | body bytes at sink | peak RSS (MiB) | at 1 MiB: median (s) "
        "| at 1 MiB: peak RSS (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in big:
        s = small_by[c.name]
        runs = ", ".join(f"{r.seconds:.2f}" for r in c.runs)
        lines.append(
            f"| {c.name} | {runs} | {c.median:.2f} | {c.median / curl:.2f} | {max(c.body_bytes):,} "
            f"| {c.peak_rss_mib:.1f} | {s.median:.3f} | {s.peak_rss_mib:.1f} |"
        )
    lines.append(
        f"| `smt-watch --version` × {len(version)} | {min(version):.3f}–{max(version):.3f} "
        f"| {statistics.median(version):.3f} | | | | | |"
    )
    lines += ["", "| target | measured | limit | result |", "|---|---:|---:|---|"]
    lines += [f"| {v.what} | {v.measured} | {v.limit} | {'PASS' if v.ok else '**FAIL**'} |" for v in checks]
    return "\n".join(lines) + "\n"


def update_markdown(path: Path, section: str, title: str = SECTION) -> None:
    """Replace the section headed ``title`` (default: this script's ``## post (issue 2)``) in ``path``, or add it;
    keep every other section. Other bench scripts import this with their own ``title``."""
    if path.exists():
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    else:
        lines = ["# Benchmark results\n", "\n", "Each section is written by the script it names; re-running"
                 " a script replaces only its own section.\n"]
    start = next((i for i, line in enumerate(lines) if line.rstrip() == title), None)
    if start is None:
        text = "".join(lines).rstrip("\n") + "\n\n" + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        rest = "".join(lines[end:])
        text = "".join(lines[:start]) + section + ("\n" + rest if rest else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


# --- main -------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--size-mib", type=int, default=1024, help="size of the big test file (default 1024)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per case; the median is kept (default 3)")
    parser.add_argument("--content", choices=("csv", "random"), default="csv", help="test file content")
    parser.add_argument("--out", type=Path, help="Markdown file whose '## post (issue 2)' section to write")
    parser.add_argument("--tmp-dir", type=Path, help="where the test files go (default: the system temp dir)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when any target fails")
    parser.add_argument("--src", type=Path, action="append", default=[],
                        help="another checkout to A/B against: its multipart post runs too, with this venv")
    parser.add_argument("--no-inline", action="store_true",
                        help="leave out the inline modes (an A/B of multipart: base64+gzip alone takes ~45 s a round)")
    args = parser.parse_args(argv)
    if not SMT_WATCH.exists():
        raise SystemExit(f"{SMT_WATCH} not found: run `make` (pip install -e .) first")
    if shutil.which("curl") is None or shutil.which("sha256sum") is None:
        raise SystemExit("curl and sha256sum are needed")

    with tempfile.TemporaryDirectory(prefix="bench-post-", dir=args.tmp_dir) as tmp:
        work = Path(tmp)
        big_file = work / f"SMT_M1_{args.size_mib}MiB.csv"
        small_file = work / "SMT_M1_1MiB.csv"
        print(f"writing {big_file} ...", file=sys.stderr, flush=True)
        make_file(big_file, args.size_mib, args.content)
        make_file(small_file, 1, args.content)
        with start_sink_process() as port:
            version = time_version(10)
            small = build_cases(small_file, port, work, inline=not args.no_inline, sources=args.src)
            measure(small, args.rounds, port, small_file.stat().st_size, "1 MiB")
            big = build_cases(big_file, port, work, inline=not args.no_inline, sources=args.src)
            measure(big, args.rounds, port, big_file.stat().st_size, f"{args.size_mib} MiB")

    checks = verdicts(big, small, statistics.median(version))
    section = render(big, small, args.size_mib, args.content, args.rounds, version, checks)
    print(section)
    if args.out:
        update_markdown(args.out, section)
        print(f"wrote section {SECTION!r} of {args.out}", file=sys.stderr)
    return 1 if args.strict and not all(v.ok for v in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
