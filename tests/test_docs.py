"""Docs that cannot drift: the README's CLI reference, its commands and variables, the help texts."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

from smt_watch.config import Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_cli_reference_is_current() -> None:
    proc = subprocess.run([sys.executable, "scripts/cli_reference.py", "--check"], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr


def test_readme_has_the_two_setup_commands() -> None:
    assert "make demo" in README and "make test" in README


def test_every_setting_is_documented() -> None:
    source = (ROOT / "smt_watch" / "config.py").read_text()
    names = set(re.findall(r'r\.\w+\("([A-Z_]+)"', source))
    assert len(names) >= len(fields(Settings)) - 1
    missing = sorted(n for n in names if f"`{n}`" not in README)
    assert not missing, f"README does not document {missing}"


def test_every_command_has_help_text() -> None:
    from typer.main import get_command

    from smt_watch.cli import app

    def walk(cmd: object, path: str) -> None:
        assert getattr(cmd, "help", None), f"{path} has no help text"
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, f"{path} {name}")

    walk(get_command(app), "smt-watch")
