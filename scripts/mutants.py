"""Break a README promise on purpose and check that a test goes red: the suite's own mutation check.

Each mutant in ``tests/mutants/*.toml`` names the promise it breaks, a one-line change to the code
(``old`` is replaced by ``new``) and the tests that must catch it. Where ``old`` is looked for survives a
refactor: it must occur exactly once in ``file``; if it does not (the code moved), the whole ``smt_watch/``
package is searched and a unique hit is taken. An optional ``function = "name"`` (or ``"Class.method"``)
narrows every search to the body of that function or class, so an entry names code by what it is rather
than by where it was. ``--list`` prints where each entry resolved and fails on any that is missing or
ambiguous; tests/test_mutants_index.py runs that check, and checks every named test id still collects, in the
default run.
The change is made in place (subprocess tests import the checkout, not a copy), the named tests run, and
the file is restored byte for byte whatever happens, before the next mutant. A mutant is *killed* when
pytest reports a failing test (exit 1); *survived* when the tests pass; anything else (a collection
error, a time-out) is reported as it is, so a broken mutant is never counted as caught.

    make mutants                                 # every mutant; the table goes to stdout
    .venv/bin/python scripts/mutants.py -k sync  # those whose id contains "sync"
    .venv/bin/python scripts/mutants.py --list   # where each entry resolved, and what would run

Exit 0 when every mutant was killed, 1 otherwise. It refuses to run on a checkout whose mutated files
have uncommitted changes, so an interrupted run can always be undone with ``git checkout``.
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTANT_DIR = ROOT / "tests" / "mutants"
PACKAGE = "smt_watch"  # where a moved ``old`` is searched for
PER_MUTANT_TIMEOUT = 600.0  # seconds for one mutant's tests


@dataclass(frozen=True)
class Mutant:
    id: str
    promise: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    function: str | None = None


@dataclass(frozen=True)
class Location:
    """Where a mutant applies: ``old`` starts at character ``offset`` of ``file`` (relative to the root)."""

    file: str
    offset: int
    line: int


def load(directory: Path = MUTANT_DIR) -> list[Mutant]:
    out: list[Mutant] = []
    for path in sorted(directory.glob("*.toml")):
        for entry in tomllib.loads(path.read_text(encoding="utf-8")).get("mutant", []):
            out.append(Mutant(entry["id"], entry["promise"], entry["file"], entry["old"], entry["new"],
                              tuple(entry["tests"]), entry.get("function")))
    ids = [m.id for m in out]
    if len(ids) != len(set(ids)):
        raise SystemExit(f"mutants: duplicate ids in {directory}")
    return out


def _spans(text: str, function: str) -> list[tuple[int, int]]:
    """Character ranges of each def/class named ``function`` (``"Class.method"`` names a nested one)."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return []
    starts = [0]
    for line in text.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    *outer, name = function.split(".")
    found: list[tuple[int, int]] = []

    def visit(node: ast.AST, path: tuple[str, ...]) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                if child.name == name and path[len(path) - len(outer):] == tuple(outer) and child.end_lineno:
                    first = min([child.lineno, *(d.lineno for d in child.decorator_list)])
                    found.append((starts[first - 1], starts[child.end_lineno]))
                visit(child, (*path, child.name))
            else:
                visit(child, path)

    visit(tree, ())
    return found


def _hits(text: str, old: str, function: str | None) -> list[int]:
    """Offsets where ``old`` starts in ``text`` (inside ``function`` when one is named)."""
    offsets, at = [], text.find(old)
    while at >= 0:
        offsets.append(at)
        at = text.find(old, at + 1)
    if function is None:
        return offsets
    spans = _spans(text, function)
    return [o for o in offsets if any(a <= o and o + len(old) <= b for a, b in spans)]


def locate(m: Mutant, root: Path = ROOT) -> Location | str:
    """Where the mutant applies, or why it cannot: ``old`` exactly once in ``file`` (within ``function``
    if named); failing that, exactly once in the whole package (within ``function`` if named)."""
    if m.old == m.new:
        return "'old' and 'new' are the same"
    if not m.old:
        return "'old' is empty"
    where = f" in function {m.function}" if m.function else ""
    path = root / m.file
    named: list[int] = []
    if path.is_file():
        named = _hits(path.read_text(encoding="utf-8"), m.old, m.function)
        if len(named) == 1:
            return _location(root, path, named[0])
    hits = [(p, o) for p in sorted((root / PACKAGE).rglob("*.py"))
            for o in _hits(p.read_text(encoding="utf-8"), m.old, m.function)]
    if len(hits) == 1:
        return _location(root, *hits[0])
    if len(named) > 1:
        return f"'old' occurs {len(named)} times in {m.file}{where} (must be exactly once; add function = ...)"
    if not hits:
        return f"'old' occurs nowhere in {m.file} or {PACKAGE}/{where}"
    files = sorted({str(p.relative_to(root)) for p, _ in hits})
    return f"'old' is not in {m.file}{where} and occurs {len(hits)} times in {', '.join(files)} (ambiguous)"


def _location(root: Path, path: Path, offset: int) -> Location:
    text = path.read_text(encoding="utf-8")
    return Location(str(path.relative_to(root)), offset, text.count("\n", 0, offset) + 1)


def check(m: Mutant) -> str | None:
    """Why this mutant cannot be applied, or None."""
    where = locate(m)
    return where if isinstance(where, str) else None


def mutated(text: str, m: Mutant, at: Location) -> str:
    """``text`` with the one located ``old`` replaced by ``new``."""
    assert text[at.offset:at.offset + len(m.old)] == m.old, (m.id, at)
    return text[:at.offset] + m.new + text[at.offset + len(m.old):]


def run_one(m: Mutant, at: Location, python: str) -> tuple[str, float, str]:
    """Apply, test, restore. Returns (verdict, seconds, the last lines pytest printed)."""
    path = ROOT / at.file
    original = path.read_bytes()
    started = time.monotonic()
    try:
        path.write_bytes(mutated(original.decode("utf-8"), m, at).encode("utf-8"))
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
    located = {m.id: locate(m) for m in mutants}
    problems = [(mid, why) for mid, why in located.items() if isinstance(why, str)]
    for mid, why in problems:
        print(f"mutants: {mid}: {why}", file=sys.stderr)
    if problems:
        return 2
    where = {mid: at for mid, at in located.items() if isinstance(at, Location)}
    if args.list:
        for m in mutants:
            at = where[m.id]
            moved = "" if at.file == m.file else f" (moved from {m.file})"
            inside = f" in {m.function}" if m.function else ""
            print(f"{m.id}: {m.promise} [{at.file}:{at.line}{inside}{moved}] -> {' '.join(m.tests)}")
        return 0
    if changed := dirty({at.file for at in where.values()}):
        print(f"mutants: commit or stash these first: {', '.join(changed)}", file=sys.stderr)
        return 2
    print("| mutant | promise | change | verdict | seconds |")
    print("|---|---|---|---|---|")
    survivors = 0
    for m in mutants:
        verdict, seconds, tail = run_one(m, where[m.id], args.python)
        survivors += verdict != "killed"
        old, new = (" ⏎ ".join(line.strip() for line in t.strip().splitlines()) for t in (m.old, m.new))
        change = f"`{where[m.id].file}`: `{old}` → `{new}`".replace("|", "\\|")
        print(f"| {m.id} | {m.promise} | {change} | {verdict} | {seconds:.0f} |", flush=True)
        if verdict != "killed" and tail:
            print(f"    {tail}".replace("\n", "\n    "), file=sys.stderr, flush=True)
    print(f"\n{len(mutants) - survivors} of {len(mutants)} mutants killed")
    return 1 if survivors else 0


if __name__ == "__main__":
    raise SystemExit(main())
