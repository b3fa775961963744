"""What identifies this build, for ``smt-watch --version``: the release plus the commit it was built from.

``0.1.0`` alone reads the same before and after an upgrade, so an operator could not tell whether the
droplet runs the new code. The commit comes from the checkout the package runs from (``pip install -e``,
docs/operator.md's install) or, for a wheel installed from a Git URL (pipx), from the ``direct_url.json`` pip
records. Nothing here runs at import time; ``describe()`` is called only by ``--version``.
"""

from __future__ import annotations

import json
import subprocess
from importlib import metadata
from pathlib import Path

from smt_watch import __version__

GIT_TIMEOUT = 5.0  # a --version must answer even when git hangs on a broken checkout


def _git(checkout: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(checkout), *args], capture_output=True, text=True,
                              timeout=GIT_TIMEOUT, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _from_checkout(package_dir: Path) -> str | None:
    checkout = package_dir.parent
    if not (checkout / ".git").exists():
        return None
    commit = _git(checkout, "rev-parse", "--short=12", "HEAD")
    if not commit:
        return None
    dirty = _git(checkout, "status", "--porcelain", "--untracked-files=no")
    return f"git {commit}{'+changes' if dirty else ''}"


def _from_install_record() -> str | None:
    try:
        text = metadata.distribution("smt-watch").read_text("direct_url.json")
    except metadata.PackageNotFoundError:
        return None
    if not text:
        return None
    try:
        commit = json.loads(text).get("vcs_info", {}).get("commit_id")
    except (ValueError, AttributeError):
        return None
    return f"git {commit[:12]}" if isinstance(commit, str) and commit else None


def describe(package_dir: Path | None = None) -> str:
    """``smt-watch 0.2.0 (git 41fb7f0a1b2c, /opt/smt-watch/src/smt_watch)``: release, commit, where it runs from."""
    here = package_dir or Path(__file__).resolve().parent
    build = _from_checkout(here) or _from_install_record() or "build unknown"
    return f"smt-watch {__version__} ({build}, {here})"
