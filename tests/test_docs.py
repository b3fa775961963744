"""Docs that cannot drift and that a newcomer can follow: a short README whose first delivery really works,
generated settings and CLI references, each default written once, links that resolve, log lines that exist.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import re
import runpy
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import wait_for
from smt_watch.config import SETTINGS, Settings, _Reader, load_settings

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
GUIDE = ROOT / "docs" / "operator.md"
FIRST_DELIVERY_DEADLINE = 60.0  # seconds for receiver + watch to start and deliver, on a loaded 2-core machine
TOP_DIRS = ("smt_watch", "tests", "scripts", "docs", "systemd", "bench")


def section(text: str, heading: str) -> str:
    """The body of the markdown section whose heading line starts with ``heading``, up to the next heading of
    the same or a higher level."""
    level = heading.split(" ", 1)[0]
    found = re.search(rf"^{re.escape(heading)}", text, re.M)
    assert found, f"no heading {heading!r}"
    start = found.start()
    nxt = re.search(rf"^#{{1,{len(level)}}} ", text[start + len(heading):], re.M)
    return text[start:start + len(heading) + nxt.start()] if nxt else text[start:]


def bash_blocks(text: str) -> list[str]:
    return [m.group(1) for m in re.finditer(r"^```bash\n(.*?)^```", text, re.M | re.S)]


# --- generated parts -------------------------------------------------------------------------------------


def run_script(path: Path, *args: str) -> int:
    """``python PATH ARGS`` in this process (runpy, as ``__main__``): its exit status. What it prints stays in
    pytest's capture (``capsys``). sys.path, argv and the ``docs`` module it imports are put back: the scripts
    are plain code over smt_watch's CLI, and a process for each run cost ~0.7 s of CPU start-up and imports."""
    saved_path, saved_argv, saved_docs = list(sys.path), sys.argv, sys.modules.pop("docs", None)
    sys.argv = [str(path), *args]
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.path[:] = saved_path
        sys.argv = saved_argv
        sys.modules.pop("docs", None)
        if saved_docs is not None:
            sys.modules["docs"] = saved_docs
    return 0


def test_generated_docs_are_current(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_script(ROOT / "scripts" / "docs.py", "--check") == 0, capsys.readouterr().err


def test_the_old_command_still_checks_the_cli_reference(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_script(ROOT / "scripts" / "cli_reference.py", "--check") == 0, capsys.readouterr().err


def test_a_stale_generated_doc_fails_naming_it_and_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A copy of the repository's docs with one default changed by hand: `--check` exits 1, names the file
    and the command that rewrites it, and `--write` puts the generated text back. The copy's scripts/docs.py
    runs (its root is the copy, found from its own path)."""
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copytree(ROOT / "scripts", tmp_path / "scripts")
    settings = tmp_path / "docs" / "settings.md"
    text = settings.read_text()
    assert "| `SMT_WORKERS` | concurrent deliveries in `watch` (1–64) | `2` |" in text
    settings.write_text(text.replace("(1–64) | `2` |", "(1–64) | `4` |"))
    capsys.readouterr()
    assert run_script(tmp_path / "scripts" / "docs.py", "--check") == 1
    err = capsys.readouterr().err
    assert "docs/settings.md" in err and "python scripts/docs.py --write" in err
    assert run_script(tmp_path / "scripts" / "docs.py", "--write") == 0, capsys.readouterr().err
    assert settings.read_text() == text
    assert (ROOT / "docs" / "settings.md").read_text() == text  # the copy was checked and written, not the checkout


def test_every_setting_has_one_row_and_is_documented() -> None:
    """Every name `load_settings` reads has a row in SETTINGS (and no row is orphaned), and each is in
    docs/settings.md with its default and in docs/contract.md §1's list."""
    source = (ROOT / "smt_watch" / "config.py").read_text()
    body = source[source.index("def load_settings("):]
    read = set(re.findall(r'r\.\w+\("([A-Z_]+)"', body))
    assert read == set(SETTINGS), (read ^ set(SETTINGS))
    settings_md = (ROOT / "docs" / "settings.md").read_text()
    contract = (ROOT / "docs" / "contract.md").read_text()
    for name, spec in SETTINGS.items():
        row = re.search(rf"^\| `{name}` \|.*\| (.*) \|$", settings_md, re.M)
        assert row, f"docs/settings.md has no row for {name}"
        if spec.default is not None and spec.shown is None:
            assert row.group(1) == f"`{spec.default}`", (name, row.group(1))
        assert f"`{name}`" in section(contract, "## §1"), f"docs/contract.md §1 does not list {name}"


def test_each_default_is_written_once() -> None:
    """Issue 25: the default lives in SETTINGS only. The dataclass has none, the reader takes none, the
    docs are generated, and docs/contract.md §1 has no table of its own."""
    with_default = [f.name for f in dataclasses.fields(Settings)
                    if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING]
    assert with_default == ["warnings"], with_default
    for method in ("integer", "number", "choice", "boolean", "items", "text", "path"):
        assert "default" not in inspect.signature(getattr(_Reader, method)).parameters, method
    assert "| variable | meaning | default |" not in section((ROOT / "docs" / "contract.md").read_text(), "## §1")
    assert "| variable | meaning | default |" not in README.read_text()


def test_every_default_is_what_load_settings_gives(tmp_path: Path) -> None:
    """Each default, written as an operator would write it, gives the same settings as leaving it unset:
    the table is the defaults load_settings uses, not a copy of them."""
    unset = load_settings({"HOME": str(tmp_path)})
    for name, spec in SETTINGS.items():
        if spec.default is not None:
            assert load_settings({"HOME": str(tmp_path), name: spec.default}) == unset, name


def test_a_setting_read_without_a_row_says_what_to_do() -> None:
    """A setting added in load_settings alone fails loudly, saying where its default and meaning go; one
    read with a default of its own (the old `r.integer(NAME, 8, …)`) does not run at all."""
    with pytest.raises(LookupError, match=r"SMT_NEW_THING has no row .* SETTINGS.*scripts/docs.py --write"):
        _Reader({}).integer("SMT_NEW_THING", minimum=1)
    with pytest.raises(TypeError):
        _Reader({}).integer("SMT_WORKERS", 8, minimum=1)  # type: ignore[misc]
    with pytest.raises(TypeError):
        _Reader({}).text("SOURCE_TAG", "adhocusage")  # type: ignore[call-arg]


# --- README ------------------------------------------------------------------------------------------


def test_readme_is_short_and_has_the_two_setup_commands() -> None:
    text = README.read_text()
    assert len(text.splitlines()) < 250
    quick = section(text, "## Quick start")
    assert "make demo" in quick and "make test" in quick


def test_readme_keeps_the_module_map_and_points_into_docs() -> None:
    text = README.read_text()
    assert "**Module map**" in text and "| `config.py` |" in text
    nxt = section(text, "## Where to go next")
    for doc in ("operator.md", "settings.md", "cli.md", "how-it-works.md", "contract.md", "development.md"):
        assert f"(docs/{doc}" in nxt, doc


# --- links and paths ---------------------------------------------------------------------------------------


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but `-` and `_` dropped, spaces to `-`."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.*)$", text, re.M)}


@pytest.mark.parametrize("doc", [README, *DOCS], ids=lambda p: p.name)
def test_every_link_and_path_resolves(doc: Path) -> None:
    """Markdown links and images point at files in the repository (and at headings that exist); a path
    in backticks under one of the repository's own directories exists, unless the text says it is a path
    in IntelliWatt's repository."""
    text = re.sub(r"^```.*?^```", "", doc.read_text(), flags=re.M | re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.exists() or ROOT not in dest.parents:
            broken.append(target)
        elif anchor and anchor not in anchors(dest):
            broken.append(f"{target} (no such heading)")
    for path, theirs in re.findall(rf"`((?:{'|'.join(TOP_DIRS)})/[\w./-]*)`( in IntelliWatt's repository)?", text):
        if not theirs and not (ROOT / path.rstrip("/")).exists():
            broken.append(path)
    assert not broken, f"{doc.name}: {broken}"


# --- log lines the docs quote ---------------------------------------------------------------------------


def log_formats() -> list[re.Pattern[str]]:
    """Every message smt_watch logs, as a pattern: its literal text, each %-placeholder any text."""
    out = []
    for path in (ROOT / "smt_watch").rglob("*.py"):
        src = path.read_text()
        for m in re.finditer(r"\blog\.(?:debug|info|warning|error|exception|critical)\(", src):
            literals = re.match(r'(?:\s*"((?:[^"\\]|\\.)*)")+', src[m.end():])
            if literals is None:
                continue
            fmt = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', literals.group(0)))
            parts = re.split(r"%[-#0 +]*\d*(?:\.\d+)?[sdfr]", fmt)
            if len("".join(parts).strip()) < 8:
                continue  # "%s" and the like: matches anything, proves nothing
            out.append(re.compile(".*?".join(re.escape(p) for p in parts) + r".*", re.S))
    assert len(out) > 50
    return out


def quoted_lines(text: str) -> list[str]:
    """Backticked quotes that read as log lines: a capitalised word, then more words."""
    return [q.replace("\n", " ").replace("   ", " ") for q in re.findall(r"`([A-Z][a-z]+ [^`]+)`", text)]


def test_migration_step_5_names_lines_raw_upload_prints() -> None:
    """Issue 23 item 15: step 5 tells the operator what raw-upload's journal shows, and every smt-watch line
    it quotes is one smt-watch logs."""
    migrating = section(GUIDE.read_text(), "## Migrating from `fetch_and_post.sh`")
    step5 = migrating[migrating.index("\n5. "):migrating.index("**What remains")]
    ours = re.sub(r"\s+", " ", step5[:step5.index("journalctl -u intelliwatt-ensure-services")])
    assert "Raw upload success" in ours and "mode=raw-upload" in ours
    formats = log_formats()
    quotes = quoted_lines(ours)
    assert len(quotes) >= 5, quotes
    unknown = [q for q in quotes if not any(f.fullmatch(q) for f in formats)]
    assert not unknown, f"step 5 quotes lines smt-watch never logs: {unknown}"


def test_the_first_delivery_quotes_real_log_lines() -> None:
    first = re.sub(r"\s+", " ", section(README.read_text(), "## First delivery"))
    formats = log_formats()
    quotes = [q for q in quoted_lines(first) if not q.startswith("Stop ")]
    assert any(q.startswith("Delivered ") for q in quotes), quotes
    unknown = [q for q in quotes if not any(f.fullmatch(q) for f in formats)]
    assert not unknown, unknown


# --- the newcomer's first delivery, run as written ----------------------------------------------------------


@pytest.fixture
def first_delivery(tmp_path: Path) -> Iterator[tuple[list[str], Path]]:
    """README's first-delivery blocks with its directory and port mapped to this test's, and the venv
    this test runs in as `.venv/bin`. Yields the blocks; stops what the first block started."""
    blocks = bash_blocks(section(README.read_text(), "## First delivery"))
    assert len(blocks) == 2, blocks
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    venv_bin = Path(sys.executable).parent
    mapped = [b.replace("/tmp/smt-try", str(tmp_path / "try")).replace("8099", str(port))
              .replace('"$PWD/.venv/bin', f'"{venv_bin}') for b in blocks]
    pidfile = tmp_path / "pids"
    yield mapped, pidfile
    pids = [int(p) for p in pidfile.read_text().split()] if pidfile.exists() else []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)

    def gone() -> bool:
        for pid in pids:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue
            return False
        return True

    wait_for(gone, 60.0, "the first delivery's receiver and watch to stop")


def test_the_readme_first_delivery_works_as_written(first_delivery: tuple[list[str], Path], tmp_path: Path) -> None:
    (start, ask), pidfile = first_delivery
    export = start.splitlines()[0]
    assert export.startswith("export PATH="), export
    ask = f"{export}\n{ask}"  # the second block runs in the same terminal as the first
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMT_", "INTELLIWATT_", "ADMIN_TOKEN"))}
    env["HOME"] = str(tmp_path / "home")
    # The README's first block starts two background jobs; their pids are kept to stop them afterwards.
    # Their output goes to a file: a pipe would stay open as long as they run.
    log = tmp_path / "first-delivery.log"
    with log.open("w") as out_file:
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", f"{start}\necho $(jobs -p) > {pidfile}"],
                              cwd=ROOT, env=env, stdout=out_file, stderr=subprocess.STDOUT, text=True, timeout=120)
    assert proc.returncode == 0, log.read_text()
    assert len(pidfile.read_text().split()) == 2
    def ask_() -> subprocess.CompletedProcess[str] | None:
        out = subprocess.run(["bash", "-euo", "pipefail", "-c", ask], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=120)
        # status, then ledger list: both must show the delivery (status may run before the ledger's commit)
        done = "sent 1" in out.stdout and "running since" in out.stdout and "sent/" in out.stdout
        return out if done and "IntervalData.csv" in out.stdout else None

    out = wait_for(ask_, FIRST_DELIVERY_DEADLINE, "the README's first delivery")
    assert isinstance(out, subprocess.CompletedProcess)
    assert out.returncode == 0, out.stderr  # status: nothing needs attention
    assert "│ 200" in out.stdout or " 200 " in out.stdout  # the delivery's HTTP status
    stored = list((tmp_path / "try" / "app").rglob("*"))
    assert stored, "the receiver stored nothing"
    # The lines the README says watch logs, as it logs them.
    wait_for(lambda: "Delivered IntervalData.csv" in log.read_text(), FIRST_DELIVERY_DEADLINE, "the Delivered line")
    text = log.read_text()
    assert "Using raw-upload delivery to http://127.0.0.1:" in text
    assert "Raw upload success (200): IntervalData.csv in 1 chunk(s), 1 sent: " in text
    assert re.search(r"Delivered IntervalData.csv sha256=\w+ size=\d+ mode=raw-upload status=200 attempts=1", text)


def test_every_command_is_in_the_commands_table() -> None:
    from typer.main import get_command

    from smt_watch.cli import app

    table = section((ROOT / "docs" / "cli.md").read_text(), "# Commands")
    names = [n for n, c in getattr(get_command(app), "commands", {}).items() if not getattr(c, "hidden", False)]
    missing = [n for n in names if not re.search(rf"^\| `{n}[ `]", table, re.M)]
    assert not missing, f"docs/cli.md's commands table lacks {missing}"


# --- help texts -------------------------------------------------------------------------------------------


def test_every_command_has_help_text() -> None:
    from typer.main import get_command

    from smt_watch.cli import app

    def walk(cmd: object, path: str) -> None:
        assert getattr(cmd, "help", None), f"{path} has no help text"
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, f"{path} {name}")

    walk(get_command(app), "smt-watch")
