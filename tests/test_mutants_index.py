"""The mutation check's index (tests/mutants/*.toml, scripts/mutants.py) stays usable as code moves: every
entry resolves to exactly one place, and every test id it names still collects. Without this a refactor
leaves a mutant pointing nowhere (found only by a 45-minute ``make mutants``), or naming a renamed test
that then "kills" it with a collection error."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from conftest import COLLECTED

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mutants() -> ModuleType:
    """scripts/mutants.py, imported from its file (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("mutants_script", ROOT / "scripts" / "mutants.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_every_mutant_resolves_to_exactly_one_place(mutants: ModuleType) -> None:
    entries = mutants.load()
    assert len(entries) > 200
    located = {m.id: mutants.locate(m) for m in entries}
    problems = {mid: why for mid, why in located.items() if isinstance(why, str)}
    assert not problems, problems
    for m in entries:
        at = located[m.id]
        text = (ROOT / at.file).read_text(encoding="utf-8")
        assert mutants.mutated(text, m, at) != text, m.id


def test_every_named_test_id_collects(mutants: ModuleType) -> None:
    """Each id is looked up in what this very run collected (conftest's ``COLLECTED``, taken before ``-m 'not
    slow'`` leaves any out): the whole suite under ``make test``, each xdist worker collecting all of it. Ids
    in files this run did not collect (a run of some files only) get one ``pytest --collect-only`` over
    those; a module that skips itself there (no Chromium) collects nothing, and its ids are taken as they
    are. An id that is gone is named."""
    ids = sorted({t for m in mutants.load() for t in m.tests})
    files = {c.split("::")[0] for c in COLLECTED}
    here = [i for i in ids if i.split("::")[0] in files]
    missing = [i for i in here if not _collects(i, COLLECTED)]
    assert not missing, missing
    if elsewhere := [i for i in ids if i.split("::")[0] not in files]:
        _collect_in_a_subprocess(elsewhere)


def _collects(node_id: str, collected: set[str]) -> bool:
    """``node_id`` is a collected test, or the parametrized function (``id[…]``) or class (``id::…``) of one."""
    return node_id in collected or any(c.startswith((f"{node_id}[", f"{node_id}::")) for c in collected)


def _collect_in_a_subprocess(ids: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-rs", "-p", "no:cacheprovider", "-p", "no:xdist",
         "-m", "", *ids], cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    collected = {line.strip() for line in proc.stdout.splitlines()
                 if line.startswith("tests/") and "::" in line}  # a node id per line (parameters may hold spaces)
    skipped = {line.split()[2].split(":")[0] for line in proc.stdout.splitlines() if line.startswith("SKIPPED [")}
    missing = [i for i in ids if i.split("::")[0] not in skipped and not _collects(i, collected)]
    assert not missing, (missing, proc.stdout[-2000:], proc.stderr[-2000:])
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("ERROR")
              and not any(f"/{path}::" in line for path in skipped)]  # "found no collectors" in a skipped module
    assert proc.returncode == 0 or not errors, proc.stdout[-2000:] + proc.stderr[-2000:]


def _mutant(mutants: ModuleType, file: str, old: str, function: str | None = None) -> object:
    return mutants.Mutant("m", "p", file, old, "CHANGED", ("tests/x.py",), function)


def test_a_moved_line_is_found_by_a_unique_hit_and_a_repeated_one_by_its_function(
    mutants: ModuleType, tmp_path: Path
) -> None:
    pkg = tmp_path / "smt_watch"
    (pkg / "ledger").mkdir(parents=True)
    (pkg / "a.py").write_text("def f():\n    return 1\n")
    (pkg / "ledger" / "b.py").write_text(
        "class Store:\n    def claim(self):\n        return x > 0\n\n    @staticmethod\n    def due():\n"
        "        return x > 0\n\n\ndef claim():\n    return x > 0\n"
    )
    # where it says: found there
    at = mutants.locate(_mutant(mutants, "smt_watch/a.py", "return 1"), tmp_path)
    assert (at.file, at.line) == ("smt_watch/a.py", 2)
    # moved to another file (or the named file is gone): the unique hit in the package
    at = mutants.locate(_mutant(mutants, "smt_watch/gone.py", "return 1"), tmp_path)
    assert (at.file, at.line) == ("smt_watch/a.py", 2)
    # three times: ambiguous without a function; a function (or Class.method) picks one
    why = mutants.locate(_mutant(mutants, "smt_watch/ledger/b.py", "return x > 0"), tmp_path)
    assert isinstance(why, str) and "3 times" in why
    for function, line in (("Store.claim", 3), ("due", 7), ("Store.due", 7)):
        at = mutants.locate(_mutant(mutants, "smt_watch/a.py", "return x > 0", function), tmp_path)
        assert (at.file, at.line) == ("smt_watch/ledger/b.py", line), function
    why = mutants.locate(_mutant(mutants, "smt_watch/ledger/b.py", "return x > 0", "claim"), tmp_path)
    assert isinstance(why, str) and "2 times" in why  # Store.claim and the module-level claim
    why = mutants.locate(_mutant(mutants, "smt_watch/a.py", "return 2"), tmp_path)
    assert isinstance(why, str) and "nowhere" in why
    # the replacement is made at the located place only
    m = _mutant(mutants, "smt_watch/ledger/b.py", "return x > 0", "due")
    text = (pkg / "ledger" / "b.py").read_text()
    out = mutants.mutated(text, m, mutants.locate(m, tmp_path))
    assert out.count("CHANGED") == 1 and out.splitlines()[6] == "        CHANGED"


def test_list_shows_where_each_entry_resolved(mutants: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    """``scripts/mutants.py --list``: its ``main`` in this process (the script is its ``main`` and nothing else)."""
    code = mutants.main(["--list"])
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = out.splitlines()
    assert lines and all(" [smt_watch/" in line and ".py:" in line for line in lines), lines[:3]
