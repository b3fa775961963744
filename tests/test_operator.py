"""An operator's day (issue 23): one state for the CLI and the service, nothing undelivered in silence, a
``status`` that exits non-zero for every state that needs a person, recovery in bulk.

Processes where the process is the point (``watch``'s lock, signals, a command run as another user); the
CLI in-process (typer's CliRunner) where only its output and exit code are. Running as root, "another user"
is ``nobody`` through ``setpriv`` (the real kernel permission checks); not root, the same checks are made
with ``chmod`` on our own files.
"""

from __future__ import annotations

import functools
import grp
import json
import os
import pwd
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_ledger import open_at
from test_status import row
from test_watch_process import Watch, started
from typer.testing import CliRunner

from conftest import SMT_WATCH, UPLOAD_TOKEN, cli_in_process, wait_for, write_csv
from smt_watch.cli import app
from smt_watch.clock import parse_when, utc_stamp
from smt_watch.config import load_settings
from smt_watch.errors import ConfigError, NoLedger
from smt_watch.pipeline import retry_failed
from smt_watch.reference.receiver import Fault
from smt_watch.statedir import open_ledger
from smt_watch.status import SYNC_KEY

REPO = Path(__file__).resolve().parent.parent
NOBODY = "nobody"
NOW = time.time()


# --- helpers ------------------------------------------------------------------------------------------------


def clean_env(**env: str) -> dict[str, str]:
    """What a subprocess needs, and only the settings a test gives (no SMT_STATE_DIR unless it says)."""
    return {"PATH": os.environ.get("PATH", ""), **env}


def cli(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``smt-watch ARGS`` with exactly ``env``, run in this process (what it prints and exits with is the
    point, not its process; ``timeout`` is kept for the signature, pytest-timeout bounds a hang)."""
    return cli_in_process(args, env)


def cli_process(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``smt-watch ARGS`` as a process of its own: for a second process, when the process is the point."""
    return subprocess.run([*SMT_WATCH, *args], env=env, capture_output=True, text=True, timeout=timeout)


@functools.cache
def as_nobody() -> tuple[list[str], dict[str, str]] | None:
    """The command prefix (and extra environment) that runs ``smt-watch`` as ``nobody``; None when not root or
    when no Python this user may run has our packages (then the tests that need it use chmod instead)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return None
    user = pwd.getpwnam(NOBODY)
    drop = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]
    # A virtualenv's interpreter may live under root's home, which nobody cannot enter: the system's Python of
    # the same version with our source and site-packages on PYTHONPATH runs the same code.
    path = os.pathsep.join([str(REPO), *site.getsitepackages()])
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for python in (sys.executable, f"/usr/bin/{version}", f"/usr/local/bin/{version}"):
        probe = subprocess.run([*drop, python, "-c", "import smt_watch.cli"], env=clean_env(PYTHONPATH=path),
                               capture_output=True, timeout=60, cwd="/")
        if probe.returncode == 0:
            return [*drop, python, "-m", "smt_watch"], {"PYTHONPATH": path}
    return None


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[Path]:
    """A directory every user may enter (pytest's tmp_path is root's alone when run as root)."""
    d = Path(tempfile.mkdtemp(prefix="smt-op-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def give_to_nobody(*paths: Path) -> None:
    user = pwd.getpwnam(NOBODY)
    for p in paths:
        os.chown(p, user.pw_uid, user.pw_gid)


def run_in_process(env: dict[str, str], *args: str) -> Any:
    """The CLI in this process (CliRunner patches os.environ for the call)."""
    return CliRunner().invoke(app, list(args), env={"NO_COLOR": "1", "COLUMNS": "200", **env})


# --- 1. one state, whoever runs the command ----------------------------------------------------------------


def test_state_dir_defaults_to_the_services_when_it_exists(tmp_path: Path) -> None:
    service_dir = tmp_path / "var-lib-smt-watch"
    env = {"SMT_SERVICE_STATE_DIR": str(service_dir)}
    assert load_settings(env).state_dir == Path("~/.local/state/smt-watch").expanduser()  # not installed
    service_dir.mkdir()
    assert load_settings(env).state_dir == service_dir  # the units' StateDirectory= exists: that one
    assert load_settings({**env, "SMT_STATE_DIR": str(tmp_path / "mine")}).state_dir == tmp_path / "mine"


def test_cli_without_flags_reads_the_services_ledger(receiver: Any, tmp_path: Path) -> None:
    """The service runs with SMT_STATE_DIR from its unit (not the env file); an operator's ``status``,
    ``ledger list`` and ``ledger import``, with no flags or with ``--env-file``, reach the same ledger."""
    service_dir = tmp_path / "var-lib-smt-watch"
    service_dir.mkdir()
    hook = {"SMT_SERVICE_STATE_DIR": str(service_dir), "HOME": str(tmp_path / "home")}
    delivered = write_csv(tmp_path / "a.csv")
    unit = clean_env(**hook, SMT_STATE_DIR=str(service_dir), SMT_UPLOAD_URL=f"{receiver.url}/upload",
                     SMT_UPLOAD_TOKEN=UPLOAD_TOKEN)
    assert cli(unit, "post", str(delivered)).returncode == 0
    env_file = tmp_path / "intelliwatt-smt"
    env_file.write_text(f"SMT_UPLOAD_URL={receiver.url}/upload\n")
    for extra in ([], ["--env-file", str(env_file)]):
        listed = cli(clean_env(**hook), "ledger", "list", "--json", *extra)
        assert listed.returncode == 0, listed.stderr
        assert [r["filename"] for r in json.loads(listed.stdout)] == ["a.csv"]
        status = cli(clean_env(**hook), "status", "--json", *extra)
        assert json.loads(status.stdout)["ledger"] == str(service_dir / "ledger.sqlite3"), status.stderr
    hashes = tmp_path / ".posted_sha256"
    hashes.write_text("f" * 64 + "\n")
    assert cli(clean_env(**hook), "ledger", "import", str(hashes)).returncode == 0
    assert load_settings(hook).ledger_path == service_dir / "ledger.sqlite3"
    with open_ledger(load_settings(hook)) as ledger:
        assert ledger.counts()["sent"] == 2
    assert not (tmp_path / "home" / ".local" / "state" / "smt-watch" / "ledger.sqlite3").exists()


def test_reading_commands_never_create_a_ledger(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = clean_env(SMT_STATE_DIR=str(state), SMT_LOCAL_DIR=str(tmp_path), HOME=str(tmp_path))
    for args in (("status",), ("status", "--json"), ("ledger", "list")):
        proc = cli(env, *args)
        assert proc.returncode == 1, (args, proc.stdout, proc.stderr)
        assert f"no ledger at {state / 'ledger.sqlite3'}" in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    assert not state.exists()
    state.mkdir()
    doctor = cli(env, "doctor", "--offline")
    (line,) = [x for x in doctor.stdout.splitlines() if "ledger:" in x]
    assert "does not exist yet" in line and not line.startswith("FAIL"), doctor.stdout
    assert not (state / "ledger.sqlite3").exists()


# --- 2. a ledger a command left root's ---------------------------------------------------------------------


def test_foreign_ledger_refused_at_start_and_readable_by_status(shared: Path, tmp_path: Path) -> None:
    """A command run as root first leaves ledger.sqlite3 root's: ``watch`` as the service user refuses at start
    with the chown command (not "attempt to write a readonly database" for every file); ``status`` and
    ``ledger list`` read it read-only, so a user who may only read it can run them."""
    inbox, state = shared / "inbox", shared / "state"
    inbox.mkdir()
    state.mkdir()
    hashes = tmp_path / "old.posted_sha256"
    hashes.write_text("a" * 64 + "\n")
    base = clean_env(SMT_LOCAL_DIR=str(inbox), SMT_STATE_DIR=str(state), HOME=str(shared),
                     SMT_UPLOAD_URL="http://127.0.0.1:9/upload")
    assert cli(base, "ledger", "import", str(hashes)).returncode == 0  # by us (root, when run as root)
    other = as_nobody()
    if other is not None:
        give_to_nobody(inbox, state)  # the service user's directories; the ledger stays root's
        prefix, extra = other
        user, group = NOBODY, grp.getgrgid(pwd.getpwnam(NOBODY).pw_gid).gr_name
    else:
        if os.geteuid() == 0:
            pytest.skip("root, and no Python that nobody may run with our packages")
        (state / "ledger.sqlite3").chmod(0o444)  # the same access check as a file root owns
        prefix, extra = SMT_WATCH, {}
        user, group = pwd.getpwuid(os.geteuid()).pw_name, grp.getgrgid(os.getegid()).gr_name

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*prefix, *args], env={**base, **extra}, capture_output=True, text=True,
                              timeout=60, cwd="/")

    proc = run("watch")
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert f"sudo chown -R {user}:{group} {state}" in proc.stderr
    assert f"ledger file {state / 'ledger.sqlite3'} is owned by " in proc.stderr  # the file, not its lock
    listed = run("ledger", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [r["sha256"] for r in json.loads(listed.stdout)] == ["a" * 64]
    status = run("status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["counts"]["sent"] == 1
    if other is not None:  # a monitoring user who may not write the directory either
        give_to_nobody(inbox)
        os.chown(state, 0, 0)
        status = run("status", "--json")
        assert status.returncode == 0 and json.loads(status.stdout)["counts"]["sent"] == 1, status.stderr


def test_doctor_hint_for_a_state_dir_root_owns_is_a_command(shared: Path) -> None:
    other = as_nobody()
    if other is None:
        pytest.skip("needs root to make a directory another user cannot write")
    prefix, extra = other
    state = shared / "state"
    state.mkdir()
    env = clean_env(SMT_LOCAL_DIR=str(shared), SMT_STATE_DIR=str(state), HOME=str(shared), **extra)
    out = subprocess.run([*prefix, "doctor", "--offline"], env=env, capture_output=True, text=True, timeout=60,
                         cwd="/").stdout
    (line,) = [x for x in out.splitlines() if "state dir:" in x]
    assert line.startswith("FAIL") and "owned by root" in line and "not writable by nobody" in line, out
    assert f"-> sudo chown -R nobody:{grp.getgrgid(pwd.getpwnam(NOBODY).pw_gid).gr_name} {state}" in line


# --- 3. a file the service user cannot read ----------------------------------------------------------------


def test_unreadable_file_is_warned_once_shown_in_status_and_doctor(shared: Path, receiver: Any) -> None:
    inbox, state = shared / "inbox", shared / "state"
    inbox.mkdir()
    state.mkdir()
    locked = write_csv(inbox / "locked.csv", seed=1)
    env = clean_env(SMT_LOCAL_DIR=str(inbox), SMT_STATE_DIR=str(state), HOME=str(shared),
                    SMT_UPLOAD_URL=f"{receiver.url}/upload", SMT_UPLOAD_TOKEN=UPLOAD_TOKEN,
                    SMT_SETTLE_SECONDS="0.1", SMT_RESCAN_SECONDS="1")
    other = as_nobody()
    if other is not None:
        locked.chmod(0o600)  # root's, as an scp by root leaves it
        give_to_nobody(inbox, state)
        prefix, extra, user, owner, mode = *other, NOBODY, "root", "600"
    elif os.geteuid() == 0:
        pytest.skip("root, and no Python that nobody may run with our packages")
    else:
        locked.chmod(0)
        prefix, extra = SMT_WATCH, {}
        user = owner = pwd.getpwuid(os.geteuid()).pw_name
        mode = "0"
    env.update(extra)
    log = shared / "watch.log"
    with log.open("ab") as fh:
        proc = subprocess.Popen([*prefix, "watch"], env=env, stdout=fh, stderr=fh, cwd="/")
    try:
        warning = f"Cannot read {locked} (owner {owner}, mode {mode}) as user {user}"
        wait_for(lambda: warning in log.read_text(), 30, "the warning")
        first_warned = time.monotonic()
        status = cli(env | {"PATH": os.environ["PATH"]}, "status")
        assert status.returncode == 1, status.stdout + status.stderr
        assert f"cannot read: {locked} (owner {owner}, mode {mode}" in status.stdout
        assert "needs attention" in status.stdout and f"cannot read as {user}" in status.stdout
        doctor = subprocess.run([*prefix, "doctor", "--offline"], env=env, capture_output=True, text=True,
                                timeout=60, cwd="/")
        (line,) = [x for x in doctor.stdout.splitlines() if "inbox files:" in x]
        assert line.startswith("FAIL") and str(locked) in line and f"owner {owner}, mode {mode}" in line
        assert doctor.returncode == 1
        write_csv(inbox / "other.csv", seed=2)  # the watcher goes on with the rest
        wait_for(lambda: len(receiver.stored()) == 1, 30, "the readable file delivered")
        # an observation window of two 1-second rescans after the warning (each tries the locked file again):
        # a second warning ends the wait at once and fails below
        wait_for(lambda: log.read_text().count("Cannot read ") > 1 or time.monotonic() - first_warned > 2.5,
                 30, "two rescans after the warning")
        assert log.read_text().count("Cannot read ") == 1
        locked.chmod(0o644)
        wait_for(lambda: len(receiver.stored()) == 2, 30, "the file delivered once readable")
        wait_for(lambda: cli(env, "status").returncode == 0, 30, "status to clear")
        assert log.read_text().count("Cannot read ") == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(40)


# --- 4. a missing inbox, and a second watch ----------------------------------------------------------------


def test_a_second_watch_on_the_inbox_is_refused_naming_the_first(receiver: Any, tmp_path: Path,
                                                                 base_env: dict[str, str]) -> None:
    env = clean_env(**base_env, HOME=str(tmp_path), SMT_UPLOAD_URL=f"{receiver.url}/upload",
                    SMT_UPLOAD_TOKEN=UPLOAD_TOKEN)
    with started(env, tmp_path / "first.log") as first:
        second = cli_process(env, "watch", timeout=30)
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
        assert f"another watch (pid {first.proc.pid}) is watching {base_env['SMT_LOCAL_DIR']}" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
        first.proc.kill()  # a crash: the kernel drops the lock with the process
        first.proc.wait(10)
    with started(env, tmp_path / "third.log") as third:
        assert third.stop() == 0


# --- 5. status exits non-zero for every state that needs a person ------------------------------------------


def _sync_pass(finished: float, *, error: str | None = None, failed: list[str] | None = None) -> str:
    return json.dumps({"node": "n1", "started_at": utc_stamp(finished - 5), "finished_at": utc_stamp(finished),
                       "listed": 3, "new": 1, "bytes": 10, "already": 2, "failed": failed or [], "error": error})


@pytest.mark.parametrize(("sync", "env", "alert"), [
    (None, {}, None),
    (_sync_pass(NOW - 60), {}, None),
    (_sync_pass(NOW - 60, error="host key for sftp.smt changed: refusing"), {}, "sync stopped on n1: host key"),
    (_sync_pass(NOW - 60, failed=["/adhocusage/a.csv"]), {}, "sync's last pass on n1 failed 1 file(s)"),
    (_sync_pass(NOW - 2 * 3600), {}, "sync has not run for 2 h"),
    (_sync_pass(NOW - 2 * 3600), {"SMT_SYNC_STALE_SECONDS": "0"}, None),
    (_sync_pass(NOW - 2 * 3600), {"SMT_SYNC_STALE_SECONDS": "10800"}, None),
])
def test_status_exits_1_for_a_sync_that_needs_a_person(base_env: dict[str, str], sync: str | None,
                                                        env: dict[str, str], alert: str | None) -> None:
    with open_ledger(load_settings(base_env)) as ledger:
        if sync is not None:
            ledger.set_meta(SYNC_KEY, sync)
    as_json = run_in_process({**base_env, **env}, "status", "--json")
    assert as_json.exit_code == (1 if alert else 0), as_json.output
    alerts = json.loads(as_json.output)["alerts"]
    assert (alerts == []) if alert is None else any(a.startswith(alert) for a in alerts), alerts
    text = run_in_process({**base_env, **env}, "status")
    assert text.exit_code == as_json.exit_code
    assert ("needs attention" in text.output) == (alert is not None)
    if alert:
        assert alert in text.output


# --- 6. the first Ctrl-C -----------------------------------------------------------------------------------


def test_first_ctrl_c_says_how_long_it_waits_and_the_second_quits(receiver: Any, tmp_path: Path,
                                                                  base_env: dict[str, str]) -> None:
    held = threading.Event()  # the delivery hangs until released at the end (no 25 s sleep left to wait out)
    receiver.state.faults.append(Fault(release=held))
    env = clean_env(**base_env, HOME=str(tmp_path), SMT_UPLOAD_URL=f"{receiver.url}/upload",
                    SMT_UPLOAD_TOKEN=UPLOAD_TOKEN, SMT_SETTLE_SECONDS="0.1", SMT_STOP_GRACE_SECONDS="20")
    w = Watch(env, tmp_path / "w.log")
    try:
        w.wait_ready()
        write_csv(Path(base_env["SMT_LOCAL_DIR"]) / "slow.csv")
        wait_for(lambda: [r["state"] for r in json.loads(cli(env, "ledger", "list", "--json").stdout or "[]")]
                 == ["sending"], 15, "a delivery in flight")
        w.proc.send_signal(signal.SIGINT)
        said = "waiting up to 20 s (SMT_STOP_GRACE_SECONDS) for 1 delivery(ies) in flight; press Ctrl-C again"
        wait_for(lambda: said in w.text() or w.proc.poll() is not None, 15, "the first Ctrl-C's message")
        assert w.proc.poll() is None and said in w.text(), w.text()  # said while it waits, not after
        t0 = time.monotonic()
        w.proc.send_signal(signal.SIGINT)
        assert w.proc.wait(15) == 0
        assert time.monotonic() - t0 < 10
    finally:
        held.set()
        if w.proc.poll() is None:
            w.proc.kill()
        w.stop()


# --- 11. recovery in bulk ----------------------------------------------------------------------------------


def test_parse_when() -> None:
    assert parse_when("2h", now=NOW) == NOW - 7200
    assert parse_when("3d", now=NOW) == NOW - 3 * 86400
    assert parse_when("30m", now=NOW) == NOW - 1800
    assert parse_when("2026-12-01") == parse_when("2026-12-01T00:00:00Z") == 1796083200.0
    assert parse_when("2026-12-01T08:00+02:00") == 1796083200.0 + 6 * 3600
    for bad in ("yesterday", "2h ago", "", "12/01/2026"):
        with pytest.raises(ValueError, match="not a time"):
            parse_when(bad)


FAILED_401, FAILED_400, OLD_401, RETRYING = "1" * 64, "2" * 64, "3" * 64, "4" * 64


def failed_rows(ledger: Any) -> None:
    ledger.import_rows([
        row(FAILED_401, "failed", first=NOW - 600, status=401, error="HTTP 401: unauthorized"),
        row(FAILED_400, "failed", first=NOW - 500, status=400, error="HTTP 400: bad ESIID"),
        row(OLD_401, "failed", first=NOW - 5 * 86400, status=401, error="HTTP 401: unauthorized"),
        row(RETRYING, "retrying", first=NOW - 60, status=503, error="HTTP 503"),
        row("5" * 64, "sent", first=NOW - 60, sent=NOW - 59),
    ])


def test_rows_since_and_status_and_retry_failed(where: str) -> None:
    with open_at(where) as ledger:
        failed_rows(ledger)
        assert [r.sha256 for r in ledger.rows(since=NOW - 3600)] == [FAILED_401, FAILED_400, RETRYING, "5" * 64]
        assert [r.sha256 for r in ledger.rows("failed", http_status=401)] == [OLD_401, FAILED_401]
        assert ledger.rows("failed", since=NOW + 60) == []
        assert retry_failed(ledger, http_status=401, since=NOW - 86400) == [FAILED_401]
        assert retry_failed(ledger, http_status=503) == []  # a retrying row is not a failed one
        assert sorted(retry_failed(ledger)) == [FAILED_400, OLD_401]
        assert retry_failed(ledger) == []
        assert ledger.counts()["pending"] == 3 and ledger.get(RETRYING).state == "retrying"  # type: ignore[union-attr]


def test_ledger_retry_failed_and_list_since_on_the_command_line(base_env: dict[str, str]) -> None:
    with open_ledger(load_settings(base_env)) as ledger:
        failed_rows(ledger)
    listed = run_in_process(base_env, "ledger", "list", "--since", "1h", "--json")
    assert listed.exit_code == 0, listed.output
    assert [r["sha256"] for r in json.loads(listed.output)] == [FAILED_401, FAILED_400, RETRYING, "5" * 64]
    bad = run_in_process(base_env, "ledger", "list", "--since", "last week")
    assert isinstance(bad.exception, ConfigError) and "--since" in str(bad.exception)
    moved = run_in_process(base_env, "ledger", "retry", "--failed", "--status", "401", "--since", "2d")
    assert moved.exit_code == 0 and moved.stdout == f"pending {FAILED_401}\n", moved.output
    moved = run_in_process(base_env, "ledger", "retry", "--failed")
    assert moved.exit_code == 0 and sorted(moved.stdout.split()) == sorted(
        ["pending", FAILED_400, "pending", OLD_401]), moved.output
    none = run_in_process(base_env, "ledger", "retry", "--failed")
    assert none.exit_code == 1 and "no failed or retrying ledger row for --failed" in none.output
    for args in (["ledger", "retry"], ["ledger", "retry", FAILED_400, "--failed"],
                 ["ledger", "retry", FAILED_400, "--status", "401"]):
        wrong = run_in_process(base_env, *args)
        assert isinstance(wrong.exception, ConfigError), (args, wrong.output)


def test_retry_commands_are_whole_in_a_narrow_terminal(run_cli: Callable[..., Any],
                                                       base_env: dict[str, str]) -> None:
    with open_ledger(load_settings(base_env)) as ledger:
        failed_rows(ledger)
    proc = run_cli("status", env={"COLUMNS": "40"})
    assert proc.returncode == 1, proc.stderr
    lines = [line.strip() for line in proc.stdout.splitlines()]
    for sha in (FAILED_401, FAILED_400, OLD_401, RETRYING):
        assert f"smt-watch ledger retry {sha}" in lines, proc.stdout
    assert any(line.startswith("smt-watch ledger retry --failed") for line in lines)
    assert "3 failed row(s)" in proc.stdout


def test_status_and_list_say_no_ledger_in_process(base_env: dict[str, str]) -> None:
    for args in (["status"], ["ledger", "list"]):
        result = run_in_process(base_env, *args)
        assert isinstance(result.exception, NoLedger) and "no ledger at" in str(result.exception)


# --- 12. post --force of a file already sent ---------------------------------------------------------------


def test_forced_resend_counts_latency_from_its_own_start(where: str) -> None:
    """The row was first seen a day ago; its forced re-send takes a moment: status's latency (and the sample
    serve's etaSeconds is estimated from) is that moment, not a day."""
    with open_at(where) as ledger:
        ledger.import_rows([row("6" * 64, "sent", first=NOW - 86400, sent=NOW - 86400 + 1)])
        assert ledger.delivery_times(NOW - 2 * 86400)[0][1] == pytest.approx(1.0, abs=0.01)
        from smt_watch.ledger import Claim

        assert ledger.claim("6" * 64, filename="f.csv", path="/in/f.csv", size=1, mode="multipart",
                            force=True) is Claim.CLAIMED
        ledger.mark_sent("6" * 64, status=200, destination="http://x/upload", attempts=1)
        ((_, seconds),) = [t for t in ledger.delivery_times(NOW - 2 * 86400) if t[0] > NOW - 3600]
        assert seconds < 60
        (recent,) = ledger.recent_deliveries(1)
        assert recent.first_seen < utc_stamp(NOW - 3600) and recent.started_at is not None
        assert recent.started_at > utc_stamp(NOW - 3600)
        # an operator's retry starts the delivery again too
        ledger.import_rows([row("7" * 64, "failed", first=NOW - 86400, status=401)])
        assert ledger.retry(["7" * 64]) == ["7" * 64]
        assert ledger.get("7" * 64).started_at > utc_stamp(NOW - 3600)  # type: ignore[union-attr,operator]


def test_post_force_of_a_zip_says_what_became_of_each_csv(run_cli: Callable[..., Any], receiver: Any,
                                                          tmp_path: Path) -> None:
    archive = tmp_path / "pair.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for n in (1, 2):
            z.write(write_csv(tmp_path / f"part{n}.csv", seed=n), f"part{n}.csv")
    env = {"SMT_UPLOAD_URL": f"{receiver.url}/upload", "SMT_UPLOAD_TOKEN": UPLOAD_TOKEN}
    assert run_cli("post", str(archive), env=env).returncode == 0
    forced = run_cli("post", "--force", str(archive), env=env)
    assert forced.returncode == 0, forced.stderr
    lines = forced.stdout.splitlines()
    assert "HTTP None" not in forced.stdout and "0 attempt(s)" not in forced.stdout, forced.stdout
    assert lines[0].startswith("sent") and "2 CSV file(s), 2 sent or duplicate" in lines[0]
    for n, line in zip((1, 2), lines[1:], strict=True):
        assert line.startswith("  sent") and f"part{n}.csv" in line and "HTTP 200, 1 attempt(s)" in line
    status = run_cli("status", "--json")
    recent = json.loads(status.stdout)["recent"]
    assert all(d["seconds"] < 30 for d in recent), recent
