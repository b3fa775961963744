"""The real CLI: exit codes, one-line errors, no tracebacks, no secrets, ledger commands (in this process
through its own main(), in subprocesses where two processes or the installed script are the point)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import ADMIN_TOKEN, SMT_WATCH, UPLOAD_TOKEN, cli_in_process, wait_for, write_csv
from smt_watch.reference.receiver import Fault

Run = Callable[..., subprocess.CompletedProcess[str]]


def upload_env(receiver: Any) -> dict[str, str]:
    return {"SMT_UPLOAD_URL": f"{receiver.url}/upload", "SMT_UPLOAD_TOKEN": UPLOAD_TOKEN}


def assert_clean_error(proc: subprocess.CompletedProcess[str], code: int) -> None:
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    for secret in (UPLOAD_TOKEN, ADMIN_TOKEN):
        assert secret not in proc.stderr + proc.stdout


def test_version_and_help(run_cli: Run) -> None:
    assert run_cli("--version").stdout.startswith("smt-watch ")
    for cmd in (["--help"], ["post", "--help"], ["ledger", "--help"], ["ledger", "list", "--help"],
                ["ledger", "forget", "--help"], ["ledger", "import", "--help"], ["receive", "--help"]):
        proc = run_cli(*cmd)
        assert proc.returncode == 0 and "Usage:" in proc.stdout, cmd


def test_version_names_the_build_and_h_is_help(run_cli: Run, tmp_path: Path) -> None:
    """``0.1.0`` alone read the same before and after an upgrade: the commit it runs from is part of it."""
    line = run_cli("--version").stdout.strip()
    checkout = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                          text=True)
    if head.returncode == 0:
        assert f"git {head.stdout.strip()}" in line, line
    else:
        assert "(" in line and ")" in line, line
    for cmd in (["-h"], ["post", "-h"], ["ledger", "-h"], ["ledger", "retry", "-h"]):
        proc = run_cli(*cmd)
        assert proc.returncode == 0 and "Usage:" in proc.stdout, cmd
    assert "--install-completion" in run_cli("--help").stdout


def test_a_misspelt_setting_is_named_with_the_closest_known_one(run_cli: Run, tmp_path: Path) -> None:
    """SMT_UPLOAD_ULR beside INTELLIWATT_BASE_URL would silently run another mode: every command says so,
    and doctor lists it; IntelliWatt's own variables in the shared env file are not flagged."""
    env = {"SMT_UPLOAD_ULR": "http://127.0.0.1:9/upload", "SMT_PROXY_TOKEN": "x", "SMT_INGEST_SERVICE_NAME": "y"}
    proc = run_cli("ledger", "list", env=env)
    assert "unknown setting SMT_UPLOAD_ULR is ignored; did you mean SMT_UPLOAD_URL?" in proc.stderr, proc.stderr
    assert "SMT_PROXY_TOKEN" not in proc.stderr and "SMT_INGEST_SERVICE_NAME" not in proc.stderr
    doctor = run_cli("doctor", "--offline", env=env)
    assert "warn  settings: unknown setting SMT_UPLOAD_ULR is ignored; did you mean SMT_UPLOAD_URL?" in doctor.stdout


def test_help_never_shows_secret_defaults(run_cli: Run) -> None:
    env = {"SMT_UPLOAD_TOKEN": UPLOAD_TOKEN, "ADMIN_TOKEN": ADMIN_TOKEN}
    for cmd in (["--help"], ["post", "--help"], ["receive", "--help"]):
        assert_clean_error(run_cli(*cmd, env=env), 0)


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["watch", "--bogus"], "smt-watch watch: No such option: --bogus (see 'smt-watch watch --help')"),
        (["nosuch"], "smt-watch: No such command 'nosuch'. (see 'smt-watch --help')"),
        (["sync", "--workers", "x"], "smt-watch sync: Invalid value for '--workers'"),
        (["ledger", "forget"], "smt-watch ledger forget: Missing argument"),
    ],
)
def test_usage_errors_are_one_line(run_cli: Run, args: list[str], line: str) -> None:
    proc = run_cli(*args)
    assert_clean_error(proc, 2)
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith(line), proc.stderr


def test_bare_group_prints_its_help(run_cli: Run) -> None:
    proc = run_cli("ledger")
    assert proc.returncode == 2 and "Commands:" in proc.stdout + proc.stderr and "forget" in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("env", "args", "needle"),
    [
        ({}, ["post", "x.csv"], "no delivery target"),
        ({"SMT_UPLOAD_URL": "nope"}, ["post", "x.csv"], "SMT_UPLOAD_URL"),
        ({"SMT_UPLOAD_URL": "http://h/u", "SMT_INLINE_MAX_BYTES": "-5"}, ["post", "x.csv"], "SMT_INLINE_MAX_BYTES"),
        ({"SMT_AFTER_SEND": "burn"}, ["ledger", "list"], "SMT_AFTER_SEND"),
        ({}, ["post", "--env-file", "/nonexistent/env", "x.csv"], "no such file"),
        ({}, ["ledger", "list", "--state", "bogus"], "--state"),
        ({}, ["--log-level", "loud", "ledger", "list"], "--log-level"),
        ({}, ["post"], "Missing argument"),
    ],
)
def test_config_errors_exit_2_in_one_line(run_cli: Run, env: dict[str, str], args: list[str], needle: str) -> None:
    proc = run_cli(*args, env=env)
    assert_clean_error(proc, 2)
    assert needle in proc.stderr


def test_unwritable_state_dir_exits_2(run_cli: Run, tmp_path: Path) -> None:
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("x")
    proc = run_cli("ledger", "forget", "0" * 64, env={"SMT_STATE_DIR": str(blocker / "state")})
    assert_clean_error(proc, 2)
    assert "SMT_STATE_DIR" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    # a reading command creates nothing: it says where it looked (exit 1)
    proc = run_cli("ledger", "list", env={"SMT_STATE_DIR": str(blocker / "state")})
    assert_clean_error(proc, 1)
    assert f"no ledger at {blocker / 'state' / 'ledger.sqlite3'}" in proc.stderr


def test_post_then_list_json_then_forget(run_cli: Run, receiver: Any, tmp_path: Path) -> None:
    env = upload_env(receiver)
    f = write_csv(tmp_path / "inbox" / "a.csv")
    first = run_cli("post", str(f), env=env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("sent")
    assert "Using droplet upload server at" in first.stderr and "Droplet upload success (200)" in first.stderr
    second = run_cli("post", str(f), env=env)
    assert second.returncode == 0 and second.stdout.startswith("duplicate")
    rows = json.loads(run_cli("ledger", "list", "--json").stdout)
    assert len(rows) == 1
    required = {"sha256", "filename", "size", "state", "attempts", "http_status", "last_error", "first_seen",
                "sent_at", "destination"}
    assert required <= set(rows[0]) and rows[0]["state"] == "sent"
    assert "a.csv" in run_cli("ledger", "list").stdout
    assert run_cli("ledger", "forget", str(f)).returncode == 0
    assert json.loads(run_cli("ledger", "list", "--json").stdout) == []
    assert run_cli("ledger", "forget", rows[0]["sha256"]).returncode == 1
    assert run_cli("post", str(f), env=env).stdout.startswith("sent")
    assert run_cli("ledger", "forget", rows[0]["sha256"][:10]).returncode == 0


def test_post_exit_1_when_any_file_fails(run_cli: Run, receiver: Any, tmp_path: Path) -> None:
    good = write_csv(tmp_path / "good.csv")
    proc = run_cli("post", str(tmp_path / "missing.csv"), str(good), env=upload_env(receiver))
    assert_clean_error(proc, 1)
    assert "no such file" in proc.stdout and "sent" in proc.stdout
    receiver.state.faults.append(Fault(status=422, body={"ok": False, "error": "schema"}))
    proc = run_cli("post", str(write_csv(tmp_path / "b.csv", seed=1)), env=upload_env(receiver))
    assert_clean_error(proc, 1)
    assert "HTTP 422" in proc.stdout


def test_ledger_import_and_state_file(run_cli: Run, receiver: Any, tmp_path: Path) -> None:
    import hashlib

    f = write_csv(tmp_path / "old.csv")
    digest = hashlib.sha256(f.read_bytes()).hexdigest()
    legacy = tmp_path / ".posted_sha256"
    legacy.write_text(f"{digest}  old.csv\n{'e' * 64}\ngarbage\n")
    proc = run_cli("ledger", "import", str(legacy))
    assert proc.returncode == 0 and "imported 2 new of 2" in proc.stdout and "skipped 1" in proc.stdout
    assert "imported 0 new of 2" in run_cli("ledger", "import", str(legacy)).stdout
    # STATE_FILE is picked up automatically by a fresh state dir.
    env = {**upload_env(receiver), "STATE_FILE": str(legacy), "SMT_STATE_DIR": str(tmp_path / "state2")}
    proc = run_cli("post", str(f), env=env)
    assert proc.returncode == 0 and proc.stdout.startswith("duplicate")
    assert receiver.state.requests == []
    assert_clean_error(run_cli("ledger", "import", str(tmp_path / "nope")), 1)


def test_two_processes_posting_the_same_file_send_once(base_env: dict[str, str], receiver: Any, tmp_path: Path) -> None:
    """The second ``post`` starts while the first one's request is held by the receiver, so it meets the
    first one's claim: it must wait for that outcome (a duplicate), not send again. The overlap is shown,
    not assumed: the second process has announced its target (it is about to claim) before the first
    request was answered."""
    release = threading.Event()  # the first delivery is held in flight until the second process is at its claim
    receiver.state.faults.append(Fault(release=release))
    f = write_csv(tmp_path / "same.csv")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **base_env, **upload_env(receiver),
           "SMT_HTTP_TIMEOUT": "120"}  # the hold lasts as long as a second start takes on a loaded machine
    logs = [tmp_path / "first.log", tmp_path / "second.log"]

    def start(log: Path) -> subprocess.Popen[str]:
        with log.open("w") as err:
            return subprocess.Popen([*SMT_WATCH, "post", str(f)], env=env, stdout=subprocess.PIPE, stderr=err,
                                    text=True)

    first = start(logs[0])
    wait_for(lambda: not receiver.state.faults, 30, "the first request to reach the receiver")
    second = start(logs[1])
    wait_for(lambda: "Using droplet upload server" in logs[1].read_text() or second.poll() is not None, 30,
             "the second process to reach its claim")
    assert not receiver.state.requests, "the first request was answered before the second process started"
    release.set()
    outs = [p.communicate(timeout=60)[0] for p in (first, second)]
    assert [p.returncode for p in (first, second)] == [0, 0], [log.read_text() for log in logs]
    assert [out.split()[0] for out in outs] == ["sent", "duplicate"]
    assert len(receiver.state.requests) == 1
    rows = json.loads(cli_in_process(["ledger", "list", "--json"], env, tmp_path).stdout)
    assert [r["state"] for r in rows] == ["sent"]


def test_console_script_is_installed() -> None:
    exe = Path(sys.executable).parent / "smt-watch"
    assert exe.exists()
    assert subprocess.run([str(exe), "--version"], capture_output=True, text=True).returncode == 0
