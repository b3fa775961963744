"""Bad input across the commands: each case gets a clear message and the right exit code or HTTP status,
and no output ever holds a traceback, an "internal error" or a secret.

Every run sets the tokens, the webhook secret and the key passphrase to recognisable ``SEKRET-…`` values
(wrong tokens and URL passwords in the cases are ``SEKRET-…`` too) and asserts none appears anywhere.
``chmod 000`` does not stop root, so "unreadable" is a path inside a plain file (``ENOTDIR``), a FIFO (which
must not hang a command), a directory, or bytes that are not UTF-8.

The CLI cases run once each in a module fixture (an xdist worker that gets to them after the other has
run them all takes its results, through a file), and each parametrized test checks its own result: through
the CLI's own ``main()`` in this process (conftest's ``cli_in_process``: exit status and output as a process
gives them, without its start-up), except where a bug would be a command that never ends (``watch``,
``serve``, the cases that once hung), which run as real subprocesses with a time-out, in threads that overlap
the rest. The HTTP cases go
to one ``serve`` process shared by the module. Cases that show a bug are strict xfails naming it.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import paramiko
import pytest
from sftp_server import generate_key, public_line, running_sftp_server, write_private_key

from conftest import SMT_WATCH, SUBPROCESS_PYTHONPATH, cli_in_process, wait_for, write_csv
from faults.support import SECRETS, assert_clean
from smt_watch.reference.receiver import running_receiver

pytestmark = pytest.mark.faults

WRONG = "SEKRET-wrong-token-5e5e5e5e"
URL_PASSWORD = "SEKRET-urlpass-6f6f6f6f"
# A case in a process still running after this long is a hang. They answer in about a second; 20–30 s was
# overrun by start-up alone with -n 4 on a loaded 2-core machine (load 20: a hang reported that was not one).
# Generous costs nothing on the happy path: the wait ends when the process does.
HANG_SECONDS = 120.0


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]
    code: int | tuple[int, ...]  # the exit status, or the statuses that are all right
    expect: str  # a regex the output (stdout + stderr) must match, case-insensitive
    env: dict[str, str] = field(default_factory=dict)
    bug: str | None = None  # a strict xfail: the reason names the bug
    could_hang: bool = False  # once hung: run in a process with a time-out (as watch and serve always are)


RECV = {"SMT_UPLOAD_URL": "{recv}/upload"}
SFTP = {"SMT_HOST": "127.0.0.1", "SMT_PORT": "{sftp_port}", "SMT_USER": "smt", "SMT_KEY": "{w}/client_key",
        "SMT_KNOWN_HOSTS": "{w}/known_hosts", "SMT_SFTP_TIMEOUT": "5"}

CASES = [
    # --- post ----------------------------------------------------------------------------------------
    Case("post-missing-file", ("post", "{w}/nope.csv"), 1, r"nope\.csv: no such file", RECV),
    Case("post-directory", ("post", "{w}/dir"), 1, r"is a directory", RECV),
    Case("post-inside-a-plain-file", ("post", "{w}/plain/x.csv"), 1, r"cannot read: Not a directory", RECV),
    Case("post-fifo", ("post", "{w}/fifo"), 1, r"not a regular file", RECV),
    Case("post-no-target", ("post", "{w}/good.csv"), 2, r"no delivery target"),
    Case("post-bad-url-scheme", ("post", "{w}/good.csv"), 2, r"SMT_UPLOAD_URL must be an http:// or https:// URL",
         {"SMT_UPLOAD_URL": f"ftp://user:{URL_PASSWORD}@example.com/upload"}),
    Case("post-wrong-upload-token", ("post", "{w}/good.csv"), 1, r"HTTP 401",
         {**RECV, "SMT_UPLOAD_TOKEN": WRONG}),
    Case("post-wrong-admin-token", ("post", "{w}/good.csv"), 1, r"HTTP 401",
         {"INTELLIWATT_BASE_URL": "{recv}", "ADMIN_TOKEN": WRONG}),
    Case("post-inline-oversize", ("post", "{w}/good.csv"), 1, r"over SMT_INLINE_MAX_BYTES",
         {"SMT_DELIVERY": "inline", "INTELLIWATT_BASE_URL": "{recv}", "SMT_INLINE_MAX_BYTES": "100"}),
    Case("post-connection-refused", ("post", "{w}/good.csv"), 1, r"ConnectError",
         {"SMT_UPLOAD_URL": f"http://user:{URL_PASSWORD}@127.0.0.1:{{dead}}/upload", "SMT_RETRY_ATTEMPTS": "1"}),
    Case("post-unknown-flag", ("post", "--bogus", "{w}/good.csv"), 2, r"No such option", RECV),
    # --- watch ---------------------------------------------------------------------------------------
    Case("watch-no-target", ("watch",), 2, r"no delivery target"),
    Case("watch-inbox-is-a-file", ("watch",), 2, r"SMT_LOCAL_DIR .*(not a directory|cannot be created)",
         {**RECV, "SMT_LOCAL_DIR": "{w}/plain"}),
    Case("watch-state-dir-inside-a-file", ("watch",), 2, r"SMT_STATE_DIR", {**RECV, "SMT_STATE_DIR": "{w}/plain/s"}),
    Case("watch-zero-rescan", ("watch",), 2, r"SMT_RESCAN_SECONDS must be a number ≥ 1",
         {**RECV, "SMT_RESCAN_SECONDS": "0"}),
    # --- --env-file ----------------------------------------------------------------------------------
    Case("env-file-missing", ("ledger", "list", "--env-file", "{w}/nope.env"), 2, r"--env-file .*no such file"),
    Case("env-file-malformed-line", ("ledger", "list", "--env-file", "{w}/bad-line.env"), 2,
         r"bad-line\.env:2: expected KEY=VALUE"),
    Case("env-file-not-utf8", ("ledger", "list", "--env-file", "{w}/latin1.env"), 2, r"cannot read"),
    Case("env-file-bad-value", ("sync", "--env-file", "{w}/bad-port.env"), 2, r"SMT_PORT must be an integer"),
    Case("env-file-fifo", ("ledger", "list", "--env-file", "{w}/fifo"), 2, r"--env-file .*(regular file|cannot)",
         could_hang=True),
    # (a command that writes: `ledger list` only reads, and leaves STATE_FILE to the next writer)
    Case("state-file-fifo", ("ledger", "import", "{w}/good.csv"), (0, 1), r"STATE_FILE", {"STATE_FILE": "{w}/fifo"},
         could_hang=True),
    # --- sync ----------------------------------------------------------------------------------------
    Case("sync-not-configured", ("sync",), 2, r"sync needs SMT_HOST, SMT_USER and SMT_KEY"),
    Case("sync-key-not-a-key", ("sync",), 2, r"SMT_KEY .*cannot be loaded \(not a valid private key",
         {**SFTP, "SMT_KEY": "{w}/not_a_key", "SMT_KEY_PASSPHRASE": ""}),
    Case("sync-key-not-a-key-with-passphrase", ("sync",), 2, r"SMT_KEY .*cannot be loaded \(not a valid private key",
         {**SFTP, "SMT_KEY": "{w}/not_a_key", "SMT_KEY_PASSPHRASE": "SEKRET-not-the-passphrase"}),
    Case("sync-key-is-a-text-file", ("sync",), 2,
         r"SMT_KEY .*cannot be loaded \(not an OpenSSH or PEM private key\)",
         {**SFTP, "SMT_KEY": "{w}/text_key", "SMT_KEY_PASSPHRASE": "SEKRET-not-the-passphrase"}),
    Case("sync-key-is-a-directory", ("sync",), 2, r"SMT_KEY .* is not a regular file", {**SFTP, "SMT_KEY": "{w}"}),
    Case("sync-wrong-passphrase", ("sync",), 2, r"wrong SMT_KEY_PASSPHRASE",
         {**SFTP, "SMT_KEY": "{w}/encrypted_key", "SMT_KEY_PASSPHRASE": "SEKRET-not-the-passphrase"}),
    Case("sync-unknown-host-key", ("sync",), 2, r"host key for .* is unknown",
         {**SFTP, "SMT_KNOWN_HOSTS": "{w}/known_hosts_empty"}),
    Case("sync-changed-host-key", ("sync",), 2, r"CHANGED", {**SFTP, "SMT_KNOWN_HOSTS": "{w}/known_hosts_changed"}),
    Case("sync-key-not-authorized", ("sync",), 2, r"login to .* refused", {**SFTP, "SMT_KEY": "{w}/stranger_key"}),
    Case("sync-connection-refused", ("sync",), 1, r"cannot connect to", {**SFTP, "SMT_PORT": "{dead}"}),
    # --- inspect -------------------------------------------------------------------------------------
    Case("inspect-directory", ("inspect", "{w}/dir"), 1, r"is a directory"),
    Case("inspect-fifo", ("inspect", "{w}/fifo"), 1, r"not a regular file"),
    # --- ledger --------------------------------------------------------------------------------------
    Case("ledger-bad-state", ("ledger", "list", "--state", "lost"), 2, r"--state must be one of"),
    Case("ledger-corrupt", ("ledger", "list"), 1, r"cannot open ledger .*not a database",
         {"SMT_STATE_DIR": "{w}/corrupt-state"}),
    Case("ledger-import-fifo", ("ledger", "import", "{w}/fifo"), 1, r"not a regular file",
         could_hang=True),
    # --- serve (command line) ------------------------------------------------------------------------
    Case("serve-bad-port", ("serve",), 2, r"SMT_UPLOAD_PORT must be an integer", {"SMT_UPLOAD_PORT": "http"}),
    Case("serve-port-in-use", ("serve",), 1, r"cannot listen on 127\.0\.0\.1:\d+: Address already in use",
         {"SMT_UPLOAD_PORT": "{busy}"}),
    Case("serve-inbox-is-a-file", ("serve", "--port", "0"), 2, r"SMT_LOCAL_DIR .*(not a directory|cannot be created)",
         {"SMT_LOCAL_DIR": "{w}/plain"}),
]


@dataclass
class World:
    root: Path
    ctx: dict[str, str]
    busy: Any  # a listening socket: its port is "in use"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    import socket

    w = tmp_path_factory.mktemp("bad-input")
    (w / "dir").mkdir()
    (w / "plain").write_text("just a file\n")
    os.mkfifo(w / "fifo")
    write_csv(w / "good.csv")
    (w / "link.csv").symlink_to(w / "good.csv")
    (w / "corrupt-state").mkdir()
    (w / "corrupt-state" / "ledger.sqlite3").write_bytes(b"this is not an SQLite database" * 100)
    (w / "bad-line.env").write_text(f"ADMIN_TOKEN={SECRETS['ADMIN_TOKEN']}\nthis line has no equals {WRONG}\n")
    (w / "latin1.env").write_bytes(b"SOURCE_TAG=caf\xe9\n")
    (w / "bad-port.env").write_text("SMT_HOST=127.0.0.1\nSMT_PORT=twenty-two\n")
    _write_encrypted_key(w / "encrypted_key", SECRETS["SMT_KEY_PASSPHRASE"])
    write_private_key(w / "stranger_key")
    (w / "not_a_key").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nnot base64 at all\n")
    (w / "not_a_key").chmod(0o600)
    (w / "text_key").write_text("just a file\n")
    (w / "text_key").chmod(0o600)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()
    with running_receiver(w / "received", admin_token=SECRETS["ADMIN_TOKEN"],
                          upload_token=SECRETS["SMT_UPLOAD_TOKEN"]) as receiver, \
            running_sftp_server(w / "remote", w / "keys") as server:
        server.put("a.csv", b"ESIID,X\n1,2\n")
        os.link(server.client_key, w / "client_key")
        (w / "known_hosts").write_text(server.known_hosts_line + "\n")
        (w / "known_hosts_empty").write_text("")
        (w / "known_hosts_changed").write_text(f"[127.0.0.1]:{server.port} {public_line(generate_key())}\n")
        ctx = {"w": str(w), "recv": receiver.url, "dead": str(dead_port), "sftp_port": str(server.port),
               "busy": str(busy.getsockname()[1])}
        try:
            yield World(w, ctx, busy)
        finally:
            busy.close()


def _write_encrypted_key(path: Path, passphrase: str) -> None:
    """An OpenSSH key encrypted with few bcrypt rounds (the default 16+ cost seconds per load attempt);
    the comment is varied until paramiko reads it back (paramiko#2445, as in sftp_server.write_private_key)."""
    key = generate_key()
    for n in range(64):
        key.set_comment(f"smt-watch-faults{'-' * n}")
        with warnings.catch_warnings():  # bcrypt warns that 2 rounds are weak: this key guards nothing
            warnings.simplefilter("ignore", UserWarning)
            path.write_bytes(key.export_private_key("openssh", passphrase=passphrase, rounds=2))
        path.chmod(0o600)
        try:
            paramiko.PKey.from_path(path, passphrase.encode())  # type: ignore[arg-type]
        except paramiko.SSHException:
            continue
        return
    raise AssertionError("paramiko cannot read the encrypted test key")


def _fmt(text: str, ctx: dict[str, str]) -> str:
    return text.format(**ctx)


def _in_a_process(case: Case) -> bool:
    """A case whose command would never end if the bug came back: it needs a process and a time-out."""
    return case.could_hang or case.args[0] in ("watch", "serve")


def _run(case: Case, world: World) -> subprocess.CompletedProcess[str] | None:
    """The case's command with its own inbox and state dir (in a subprocess for the cases that could hang;
    None when one did)."""
    home = world.root / "cases" / case.id
    (home / "inbox").mkdir(parents=True)
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": SUBPROCESS_PYTHONPATH, "HOME": str(home),
           "SMT_LOCAL_DIR": str(home / "inbox"), "SMT_STATE_DIR": str(home / "state"), **SECRETS,
           **{k: _fmt(v, world.ctx) for k, v in case.env.items()}}
    args = [_fmt(a, world.ctx) for a in case.args]
    if not _in_a_process(case):
        return cli_in_process(args, env, home)
    try:
        return subprocess.run([*SMT_WATCH, *args], env=env, capture_output=True, text=True, timeout=HANG_SECONDS,
                              cwd=home, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return None


Results = dict[str, subprocess.CompletedProcess[str] | None]


def _run_all(world: World) -> Results:
    """Every CLI case run once (the cases are independent: own dirs, own env): the subprocess ones three at
    a time in threads, started first, so they overlap the in-process ones run here one by one (those change
    this process's environment and streams, so never two at once). More at once would starve each other
    past their time-outs on a loaded 2-core machine."""
    processes = sorted((c for c in CASES if _in_a_process(c)), key=lambda c: not c.could_hang)
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {case.id: pool.submit(_run, case, world) for case in processes}
        done = {case.id: _run(case, world) for case in CASES if not _in_a_process(case)}
        return {**done, **{case_id: f.result() for case_id, f in futures.items()}}


@pytest.fixture(scope="module")
def results(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Results:
    """Every CLI case's result. Under pytest-xdist a module fixture runs once per worker, and both workers
    may get some of these cases: a worker that gets here after the other has run them all takes the results
    it left in the run's own temp directory. One that gets here while the other is still running them runs
    its own (waiting would leave it idle for longer than running them takes: the run is mostly process
    start-ups that overlap). Each case is checked against the same output and exit status either way."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return _run_all(request.getfixturevalue("world"))
    shared = tmp_path_factory.getbasetemp().parent / "bad-input-cli-results.json"  # this run's, shared
    with (shared.parent / f"{shared.name}.lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held while running them; released on close
        except BlockingIOError:  # the other worker is running them now
            return _run_all(request.getfixturevalue("world"))
        if shared.exists():  # written whole (renamed into place) before the lock was released
            return {case_id: None if r is None else subprocess.CompletedProcess(*r)
                    for case_id, r in json.loads(shared.read_text()).items()}
        done = _run_all(request.getfixturevalue("world"))
        part = shared.with_name(f"{shared.name}.part")
        part.write_text(json.dumps({case_id: None if r is None else [r.args, r.returncode, r.stdout, r.stderr]
                                    for case_id, r in done.items()}))
        part.replace(shared)
        return done


def test_the_table_is_big_enough() -> None:
    commands = {next(a for a in c.args if not a.startswith("-") and a not in ("loud",)) for c in CASES}
    assert len(CASES) + len(HTTP_CASES) >= 30
    assert {"post", "watch", "serve", "sync", "inspect", "ledger"} <= commands
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.timeout(600)  # the first case's set-up runs every case: hung ones wait HANG_SECONDS, three at once
@pytest.mark.parametrize(
    "case", [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.bug)] if c.bug else [])
             for c in CASES])
def test_cli_case(case: Case, results: Results) -> None:
    result = results[case.id]
    assert result is not None, f"{case.id}: still running after {HANG_SECONDS:.0f} s (hung)"
    output = result.stdout + result.stderr
    assert_clean(output, f"{case.id} output")
    codes = case.code if isinstance(case.code, tuple) else (case.code,)
    assert result.returncode in codes, f"{case.id}: exit {result.returncode}, expected {case.code}:\n{output}"
    assert re.search(case.expect, output, re.IGNORECASE), f"{case.id}: no /{case.expect}/ in:\n{output}"
    if case.code == 2:  # configuration and usage errors alike: one line, naming the command
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("smt-watch"), f"{case.id}: not one clear line:\n{output}"


# --- serve over HTTP --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpCase:
    id: str
    method: str
    path: str
    status: int
    error: str  # a substring of the JSON "error" (or of the body when it is not JSON)
    headers: dict[str, str] = field(default_factory=dict)
    files: dict[str, tuple[str, bytes, str]] | None = None
    data: dict[str, str] | None = None
    content: bytes | None = None


UP = {"x-smt-upload-token": SECRETS["SMT_UPLOAD_TOKEN"]}
HOOK = {"x-intelliwatt-secret": SECRETS["INTELLIWATT_WEBHOOK_SECRET"], "content-type": "application/json"}
CSV = ("a.csv", b"ESIID,X\n1,2\n", "text/csv")

HTTP_CASES = [
    HttpCase("upload-no-token", "POST", "/upload", 401, "unauthorized", files={"file": CSV}),
    HttpCase("upload-wrong-token", "POST", "/upload", 401, "unauthorized", {"x-smt-upload-token": WRONG},
             files={"file": CSV}),
    HttpCase("upload-no-file-field", "POST", "/upload", 400, 'Missing file field "file"', UP,
             files={"other": CSV}),
    HttpCase("upload-too-large", "POST", "/upload", 413, "too_large", UP,
             files={"file": ("big.csv", b"x" * 20_000, "text/csv")}),
    HttpCase("upload-not-multipart", "POST", "/upload", 415, "multipart/form-data",
             {**UP, "content-type": "application/json"}, content=b'{"file": "a.csv"}'),
    HttpCase("upload-truncated-body", "POST", "/upload", 400, "could not be read",
             {**UP, "content-type": "multipart/form-data; boundary=XyZ"},
             content=b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.csv"\r\n\r\nESIID,X\n'),
    HttpCase("upload-bad-esiid", "POST", "/upload", 400, "invalid_label", {**UP, "x-smt-upload-role": "root"},
             files={"file": CSV}, data={"esiid": "1044'; DROP TABLE files; --"}),
    HttpCase("upload-bad-meter", "POST", "/upload", 400, "meter must be", UP, files={"file": CSV},
             data={"meter": "../../etc/passwd"}),
    HttpCase("upload-wrong-method", "GET", "/upload", 405, "not allowed"),
    HttpCase("upload-foreign-origin", "POST", "/upload", 403, "not allowed", {**UP, "origin": "https://evil.example"},
             files={"file": CSV}),
    HttpCase("trigger-no-secret", "POST", "/trigger/smt-now", 401, "unauthorized", content=b"{}"),
    HttpCase("trigger-wrong-secret", "POST", "/trigger/smt-now", 401, "unauthorized",
             {"x-smt-secret": WRONG}, content=b"{}"),
    HttpCase("trigger-reason-not-a-string", "POST", "/trigger/smt-now", 400, "reason must be a string", HOOK,
             content=b'{"reason": ["because"]}'),
    HttpCase("trigger-not-json", "POST", "/trigger/smt-now", 400, "body must be JSON", HOOK, content=b"reason=now"),
    HttpCase("trigger-json-array", "POST", "/trigger/smt-now", 400, "JSON object", HOOK, content=b"[1, 2]"),
    HttpCase("trigger-sync-not-configured", "POST", "/trigger/smt-now", 503, "sync is not configured", HOOK,
             content=b'{"reason": "admin_triggered"}'),
    HttpCase("cors-preflight-foreign-origin", "OPTIONS", "/upload", 400, "Disallowed CORS origin",
             {"origin": "https://evil.example", "access-control-request-method": "POST"}),
]


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path]]:
    """One ``serve`` process: uploads capped at 4096 bytes, tokens set, sync not configured."""
    import socket

    home = tmp_path_factory.mktemp("bad-input-serve")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(home), "SMT_LOCAL_DIR": str(home / "inbox"),
           "SMT_STATE_DIR": str(home / "state"), "SMT_UPLOAD_PORT": str(port), "SMT_UPLOAD_MAX_BYTES": "4096",
           "SMT_WEBHOOK_PORT": "0",  # never the default 0.0.0.0:8787 in a test
           **SECRETS}
    log = home / "serve.log"
    with log.open("ab") as fh:
        proc = subprocess.Popen([*SMT_WATCH, "serve"], env=env, stdout=fh, stderr=fh, stdin=subprocess.DEVNULL,
                                cwd=home)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=2, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(lambda: up() or proc.poll() is not None, 30, "serve to start")
        assert proc.poll() is None, log.read_text()
        yield url, home / "inbox", log
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in HTTP_CASES])
def test_serve_case(case: HttpCase, serve: tuple[str, Path, Path]) -> None:
    url, inbox, log = serve
    r = httpx.request(case.method, url + case.path, headers=case.headers, files=case.files, data=case.data,
                      content=case.content, timeout=20, trust_env=False)
    assert r.status_code == case.status, f"{case.id}: HTTP {r.status_code}: {r.text}"
    try:
        body = r.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        assert body.get("ok") is False, body
        # what a person reads (IntelliWatt's pages show `message`), or the machine-readable code
        assert isinstance(body.get("message"), str) and body["message"], body
        assert case.error.lower() in f"{body.get('error')} {body['message']}".lower(), body
    else:
        assert case.error in r.text, r.text
    assert SECRETS["SMT_UPLOAD_TOKEN"] not in r.text and WRONG not in r.text
    assert sorted(p.name for p in inbox.iterdir()) == [], "a refused request left a file in the inbox"
    assert_clean(log.read_text(errors="replace"), "serve log")
