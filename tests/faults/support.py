"""Helpers shared by the fault tests: a ``watch`` subprocess, ledger reads, output checks, a small disk.

Every wait is a condition with a deadline (``conftest.wait_for``); nothing here sleeps to synchronise.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import signal
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from conftest import SMT_WATCH, cli_in_process, wait_for
from smt_watch.config import Settings
from smt_watch.logs import add_secrets, setup_logging

# Recognisable secrets: no output of any command may contain one of these.
SECRETS = {
    "ADMIN_TOKEN": "SEKRET-admin-7f3a9c1e5b",
    "SMT_UPLOAD_TOKEN": "SEKRET-upload-2d8e4f6a0c",
    "INTELLIWATT_WEBHOOK_SECRET": "SEKRET-webhook-9b1d3f5e7a",
    "SMT_KEY_PASSPHRASE": "SEKRET-passphrase-4c6e8a0b2d",
}
SECRET_MARK = "SEKRET-"  # every secret value used anywhere in the suite contains this


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1024 * 1024):
            digest.update(block)
    return digest.hexdigest()


def assert_clean(text: str, what: str = "output") -> None:
    """No traceback, no internal error and no secret in ``text``."""
    assert "Traceback" not in text, f"traceback in {what}:\n{text[-4000:]}"
    assert "internal error" not in text, f"internal error in {what}:\n{text[-4000:]}"
    assert SECRET_MARK not in text, f"a secret leaked into {what}:\n{text[-4000:]}"


def subprocess_env(base_env: dict[str, str], home: Path, **extra: str) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", ""), "HOME": str(home), **base_env, **extra}


class WatchProc:
    """``smt-watch watch`` as a subprocess. Its output goes through a pipe to a log file that the test
    polls: a pipe, so an ``RLIMIT_FSIZE`` put on the process caps its files, not its logging."""

    def __init__(self, env: dict[str, str], log: Path, *args: str, command: list[str] | None = None) -> None:
        self.env = env
        self.log = log
        self._start_offset = log.stat().st_size if log.exists() else 0
        log.touch()
        self.proc = subprocess.Popen([*(command or SMT_WATCH), "watch", *args], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._copier = threading.Thread(target=self._copy, name="watch-log", daemon=True)
        self._copier.start()

    def _copy(self) -> None:
        assert self.proc.stdout is not None
        with self.log.open("ab") as out:
            while chunk := self.proc.stdout.read1(65536):
                out.write(chunk)
                out.flush()

    def text(self) -> str:
        """This run's part of the log (the file may hold earlier runs)."""
        with self.log.open("rb") as fh:
            fh.seek(self._start_offset)
            return fh.read().decode(errors="replace")

    def wait_ready(self, timeout: float = 30) -> None:
        wait_for(lambda: "Watching " in self.text() or self.proc.poll() is not None, timeout, "watch to start")
        assert self.proc.poll() is None, self.text()

    def _finish(self) -> None:
        self._copier.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self._finish()

    def stop(self, timeout: float = 40) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._finish()

    def ensure_dead(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._finish()


@contextmanager
def watch_process(env: dict[str, str], log: Path, *args: str) -> Iterator[WatchProc]:
    w = WatchProc(env, log, *args)
    try:
        w.wait_ready()
        yield w
    finally:
        w.ensure_dead()


def ledger_rows_cli(env: dict[str, str]) -> list[dict[str, Any]]:
    """``smt-watch ledger list --json``: the operator's view."""
    proc = cli_in_process(["ledger", "list", "--json"], env)  # its output is the point, not its process
    assert proc.returncode == 0, proc.stderr
    assert_clean(proc.stderr, "ledger list")
    return list(json.loads(proc.stdout))


def read_ledger(state_dir: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """A quick query beside a running watch (WAL lets readers run next to the writer). A plain connection,
    not ``mode=ro``: after a kill -9 the first connection must be able to recover the WAL index."""
    path = state_dir / "ledger.sqlite3"
    if not path.exists():
        return []
    db = sqlite3.connect(path, timeout=30)
    try:
        return db.execute(sql, params).fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):  # a watch still creating the schema
            return []
        raise
    finally:
        db.close()


def states(state_dir: Path) -> dict[str, str]:
    """sha256 -> state, straight from the ledger."""
    return {str(s): str(st) for s, st in read_ledger(state_dir, "SELECT sha256, state FROM files")}


def integrity_check(state_dir: Path) -> str:
    rows = read_ledger(state_dir, "PRAGMA integrity_check")
    return "; ".join(str(r[0]) for r in rows)


def logged_through_redaction(settings: Settings, message: str) -> str:
    """``message`` logged by smt-watch's own handler, set up as the CLI sets it, with ``settings``' secrets
    registered: what an operator's journal would show (conftest restores the loggers afterwards)."""
    stream = io.StringIO()
    setup_logging("info", "text", stream)
    add_secrets(settings.secrets())
    logging.getLogger("smt_watch.test").error("%s", message)
    return stream.getvalue()
