"""Break a README promise on purpose and check that a test goes red: the suite's own mutation check.

Each mutant in ``tests/mutants/*.toml`` names the promise it breaks, a one-line change to the code
(``old`` must occur exactly once in ``file``; it is replaced by ``new``) and the tests that must catch it.
The change is made in place (subprocess tests import the checkout, not a copy), the named tests run, and
the file is restored byte for byte whatever happens, before the next mutant. A mutant is *killed* when
pytest reports a failing test (exit 1); *survived* when the tests pass; anything else (a collection
error, a time-out) is reported as it is, so a broken mutant is never counted as caught.

    make mutants                                 # every mutant; the table goes to stdout
    .venv/bin/python scripts/mutants.py -k sync  # those whose id contains "sync"
    .venv/bin/python scripts/mutants.py --list   # what would run

Exit 0 when every mutant was killed, 1 otherwise. It refuses to run on a checkout whose mutated files
have uncommitted changes, so an interrupted run can always be undone with ``git checkout``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTANT_DIR = ROOT / "tests" / "mutants"
PER_MUTANT_TIMEOUT = 600.0  # seconds for one mutant's tests


@dataclass(frozen=True)
class Mutant:
    id: str
    promise: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


def load(directory: Path = MUTANT_DIR) -> list[Mutant]:
    out: list[Mutant] = []
    for path in sorted(directory.glob("*.toml")):
        for entry in tomllib.loads(path.read_text(encoding="utf-8")).get("mutant", []):
            out.append(Mutant(entry["id"], entry["promise"], entry["file"], entry["old"], entry["new"],
                              tuple(entry["tests"])))
    ids = [m.id for m in out]
    if len(ids) != len(set(ids)):
        raise SystemExit(f"mutants: duplicate ids in {directory}")
    return out


def check(m: Mutant) -> str | None:
    """Why this mutant cannot be applied, or None."""
    path = ROOT / m.file
    if not path.is_file():
        return f"{m.file} does not exist"
    count = path.read_text(encoding="utf-8").count(m.old)
    if count != 1:
        return f"'old' occurs {count} times in {m.file} (must be exactly once)"
    if m.old == m.new:
        return "'old' and 'new' are the same"
    return None


def run_one(m: Mutant, python: str) -> tuple[str, float, str]:
    """Apply, test, restore. Returns (verdict, seconds, the last lines pytest printed)."""
    path = ROOT / m.file
    original = path.read_bytes()
    started = time.monotonic()
    try:
        path.write_bytes(original.replace(m.old.encode(), m.new.encode(), 1))
        try:
            proc = subprocess.run(
                [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "", *m.tests],
                cwd=ROOT, capture_output=True, text=True, timeout=PER_MUTANT_TIMEOUT,
            )
        except subprocess.TimeoutExpired:
            return "timeout", time.monotonic() - started, ""
    finally:
        path.write_bytes(original)
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
    verdict = {0: "SURVIVED", 1: "killed"}.get(proc.returncode, f"error (pytest exit {proc.returncode})")
    return verdict, time.monotonic() - started, tail


def dirty(files: set[str]) -> list[str]:
    out = subprocess.run(["git", "status", "--porcelain", "--", *sorted(files)], cwd=ROOT,
                         capture_output=True, text=True, check=False).stdout
    return [line[3:] for line in out.splitlines()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", default="", help="only mutants whose id contains this")
    ap.add_argument("--list", action="store_true", help="list the mutants and check they apply; run nothing")
    ap.add_argument("--python", default=sys.executable, help="the interpreter that runs pytest")
    args = ap.parse_args(argv)
    mutants = [m for m in load() if args.k in m.id]
    problems = [(m.id, why) for m in mutants if (why := check(m))]
    for mid, why in problems:
        print(f"mutants: {mid}: {why}", file=sys.stderr)
    if problems:
        return 2
    if args.list:
        for m in mutants:
            print(f"{m.id}: {m.promise} [{m.file}] -> {' '.join(m.tests)}")
        return 0
    if changed := dirty({m.file for m in mutants}):
        print(f"mutants: commit or stash these first: {', '.join(changed)}", file=sys.stderr)
        return 2
    print("| mutant | promise | change | verdict | seconds |")
    print("|---|---|---|---|---|")
    survivors = 0
    for m in mutants:
        verdict, seconds, tail = run_one(m, args.python)
        survivors += verdict != "killed"
        old, new = (" ⏎ ".join(line.strip() for line in t.strip().splitlines()) for t in (m.old, m.new))
        change = f"`{m.file}`: `{old}` → `{new}`".replace("|", "\\|")
        print(f"| {m.id} | {m.promise} | {change} | {verdict} | {seconds:.0f} |", flush=True)
        if verdict != "killed" and tail:
            print(f"    {tail}".replace("\n", "\n    "), file=sys.stderr, flush=True)
    print(f"\n{len(mutants) - survivors} of {len(mutants)} mutants killed")
    return 1 if survivors else 0


if __name__ == "__main__":
    raise SystemExit(main())
