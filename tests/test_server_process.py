"""`smt-watch serve` as a real process: the CLI, its ports, its output, signals and restarts.

The server's stdout and stderr go to one file that the tests read; every wait is a condition with a deadline.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from ports import free_ports

from conftest import LOOPBACK, SMT_WATCH, UPLOAD_TOKEN, wait_for

TOKEN = UPLOAD_TOKEN
SECRET = "webhook-secret-7c7c7c7c7c7c-SECRET"
BOUNDARY = "smtwatchprocboundaryQ9x"


class Serve:
    """A ``serve`` subprocess; output in a file we can poll."""

    def __init__(self, env: dict[str, str], log: Path, port: int, *args: str, global_args: tuple[str, ...] = ()):
        self.log = log
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self._fh = log.open("ab")
        if "--webhook-port" not in args and "SMT_WEBHOOK_PORT" not in env:
            args = (*args, "--webhook-port", "0")  # never the default 0.0.0.0:8787 in a test: tests name ports
        self.proc = subprocess.Popen([*SMT_WATCH, *global_args, "serve", *args], env=env, stdout=self._fh,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=log.parent)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def healthy(self, port: int | None = None) -> bool:
        try:
            r = LOOPBACK.get(f"http://127.0.0.1:{port or self.port}/health", timeout=2)
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    def wait_ready(self, *ports: int) -> None:
        for port in ports or (self.port,):
            self._wait_port(port)

    def _wait_port(self, port: int) -> None:
        wait_for(lambda: self.healthy(port) or self.proc.poll() is not None, 30, f"serve on port {port}")
        assert self.proc.poll() is None, self.text()

    def signal(self, sig: int = signal.SIGTERM, timeout: float = 40) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self._fh.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._fh.close()


@pytest.fixture
def env(base_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path / "home"), **base_env,
            "SMT_UPLOAD_TOKEN": TOKEN, "INTELLIWATT_WEBHOOK_SECRET": SECRET,
            "SMT_WEBHOOK_PORT": "0"}  # never the default 0.0.0.0:8787 in a test: a test names its ports


@contextmanager
def serving(env: dict[str, str], log: Path, *args: str, port: int | None = None, webhook_port: int | None = None,
            global_args: tuple[str, ...] = ()) -> Iterator[Serve]:
    port = port or free_ports(1)[0]
    extra = ("--webhook-port", str(webhook_port)) if webhook_port else ()
    s = Serve(env, log, port, "--port", str(port), *extra, *args, global_args=global_args)
    try:
        s.wait_ready(*(p for p in (port, webhook_port) if p))
        yield s
    finally:
        s.kill()


CUSTOMER = {"x-smt-upload-role": "customer"}  # naming no role is admin's, as IntelliWatt's Node server counts it


def upload(url: str, data: bytes, name: str = "a.csv", token: str | None = TOKEN,
           headers: dict[str, str] | None = None) -> httpx.Response:
    h = {"x-smt-upload-token": token} if token is not None else {}
    h.update(headers or {})
    return LOOPBACK.post(f"{url}/upload", files={"file": (name, data, "text/csv")}, headers=h, timeout=20)


def inbox_files(env: dict[str, str]) -> list[str]:
    return sorted(p.name for p in Path(env["SMT_LOCAL_DIR"]).iterdir())


# --- signals -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_serve_with_exit_0(env: dict[str, str], tmp_path: Path, sig: int) -> None:
    with serving(env, tmp_path / "serve.log") as s:
        assert upload(s.url, b"x,y\n").status_code == 202
        assert s.signal(sig) == 0, s.text()
    assert "Traceback" not in s.text()


def test_sigterm_lets_an_in_flight_upload_finish(env: dict[str, str], tmp_path: Path) -> None:
    data = os.urandom(1_000_000)
    head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="slow.csv"\r\n\r\n'.encode()
    body = head + data + f"\r\n--{BOUNDARY}--\r\n".encode()
    request = (f"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
               f"Content-Length: {len(body)}\r\nx-smt-upload-token: {TOKEN}\r\n\r\n").encode()
    inbox = Path(env["SMT_LOCAL_DIR"])
    with serving(env, tmp_path / "serve.log") as s:
        with socket.create_connection(("127.0.0.1", s.port), timeout=30) as sock:
            sock.sendall(request + body[:300_000])
            wait_for(lambda: list(inbox.glob(".upload-*.part")), 15, "the upload to be in flight")
            s.proc.send_signal(signal.SIGTERM)

            def refused() -> bool:  # shutting down: no new connections
                try:
                    socket.create_connection(("127.0.0.1", s.port), timeout=1).close()
                except OSError:
                    return True
                return False

            wait_for(refused, 15, "serve to stop listening")
            assert s.proc.poll() is None, "serve exited with an upload in flight"
            sock.sendall(body[300_000:])
            sock.settimeout(30)
            reply = b""
            while b"\r\n\r\n" not in reply:
                chunk = sock.recv(65536)
                assert chunk, reply
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 202"), reply
        assert s.signal() == 0, s.text()
    [stored] = [p for p in inbox.iterdir()]
    assert stored.name.endswith("_slow.csv") and stored.read_bytes() == data


# --- ports ---------------------------------------------------------------------------------------------


def test_webhook_port_serves_trigger_and_health_only(env: dict[str, str], tmp_path: Path) -> None:
    port, hook = free_ports(2)
    with serving(env, tmp_path / "serve.log", port=port, webhook_port=hook) as s:
        hook_url = f"http://127.0.0.1:{hook}"
        r = upload(hook_url, b"x\n")
        assert r.status_code == 404
        for path in ("/health", "/healthz"):
            h = LOOPBACK.get(hook_url + path, timeout=10)
            assert h.status_code == 200 and h.json()["service"] == "smt-watch"
        t = LOOPBACK.post(f"{hook_url}/trigger/smt-now", headers={"x-smt-secret": "wrong"}, timeout=10)
        assert t.status_code == 401
        t = LOOPBACK.post(f"{hook_url}/trigger/smt-now", headers={"x-smt-secret": SECRET}, timeout=10)
        assert t.status_code == 503 and "SMT_HOST" in t.json()["message"]  # the route is there; sync is not set up
        assert upload(s.url, b"x\n").status_code == 202  # the upload port still takes uploads
        assert LOOPBACK.post(f"{s.url}/trigger/smt-now", headers={"x-smt-secret": SECRET},
                             timeout=10).status_code == 503
        assert s.signal() == 0, s.text()
    assert len(inbox_files(env)) == 1


def test_webhook_port_from_the_environment(env: dict[str, str], tmp_path: Path) -> None:
    port, hook = free_ports(2)
    with serving({**env, "SMT_UPLOAD_PORT": str(port), "SMT_WEBHOOK_PORT": str(hook)}, tmp_path / "serve.log",
                 port=port) as s:
        s.wait_ready(hook)
        assert upload(f"http://127.0.0.1:{hook}", b"x\n").status_code == 404
        assert s.signal() == 0


def test_port_flag_overrides_the_environment(env: dict[str, str], tmp_path: Path) -> None:
    port, other = free_ports(2)
    with serving({**env, "SMT_UPLOAD_PORT": str(other)}, tmp_path / "serve.log", port=port) as s:
        assert s.healthy(port) and not s.healthy(other)
        assert s.signal() == 0


@pytest.mark.parametrize("which", ["upload", "webhook"])
def test_port_in_use_is_a_clean_error(env: dict[str, str], tmp_path: Path, which: str) -> None:
    """Either port taken: serve exits non-zero (never half up) with a line naming the address."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = int(busy.getsockname()[1])
        args = ["--port", str(port)] if which == "upload" else ["--port", str(free_ports(1)[0]),
                                                                 "--webhook-port", str(port)]
        s = Serve(env, tmp_path / "serve.log", port, *args)
        try:
            code = s.proc.wait(30)
        finally:
            s.kill()
    assert code != 0
    assert "Traceback" not in s.text(), s.text()
    assert str(port) in s.text() or "in use" in s.text(), s.text()


def test_health_reports_inbox_and_ledger(env: dict[str, str], tmp_path: Path) -> None:
    with serving(env, tmp_path / "serve.log") as s:
        body = LOOPBACK.get(f"{s.url}/healthz", timeout=10).json()
        assert s.signal() == 0
    assert body == {"ok": True, "service": "smt-watch", "inbox": env["SMT_LOCAL_DIR"],
                    "uploadDir": env["SMT_LOCAL_DIR"], "maxBytes": 1_073_741_824,
                    "ledger": {"pending": 0, "sending": 0, "sent": 0, "retrying": 0, "failed": 0}}


def test_inbox_and_state_dir_flags(env: dict[str, str], tmp_path: Path) -> None:
    inbox, state = tmp_path / "other-inbox", tmp_path / "other-state"
    with serving(env, tmp_path / "serve.log", "--inbox", str(inbox), "--state-dir", str(state)) as s:
        r = upload(s.url, b"x,y\n")
        assert r.status_code == 202
        assert s.signal() == 0
    assert (inbox / r.json()["file"]["name"]).read_bytes() == b"x,y\n"
    assert (state / "ledger.sqlite3").exists()
    assert inbox_files(env) == []


# --- rate limits across a restart ----------------------------------------------------------------------


def test_customer_limit_survives_a_restart(env: dict[str, str], tmp_path: Path) -> None:
    env = {**env, "SMT_UPLOAD_CUSTOMER_LIMIT": "5"}
    with serving(env, tmp_path / "serve1.log") as s:
        for i in range(5):
            r = upload(s.url, os.urandom(200), f"{i}.csv", headers=CUSTOMER)
            assert r.status_code == 202, r.text
        r = upload(s.url, os.urandom(200), "6.csv", headers=CUSTOMER)
        assert r.status_code == 429
        assert s.signal() == 0
    with serving(env, tmp_path / "serve2.log") as s:
        r = upload(s.url, os.urandom(200), "7.csv", headers=CUSTOMER)
        assert r.status_code == 429, r.text
        assert r.json()["error"] == "rate_limited" and r.json()["remaining"] == 0
        assert int(r.headers["retry-after"]) > 29 * 86400
        other = upload(s.url, os.urandom(200), "8.csv", headers={"x-smt-upload-account-key": "someone-else"})
        assert other.status_code == 202
        assert s.signal() == 0
    assert len(inbox_files(env)) == 6
    assert not [n for n in inbox_files(env) if n.startswith(".")]


# --- output never carries secrets ----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_output_has_access_lines_and_no_secrets(env: dict[str, str], tmp_path: Path, fmt: str) -> None:
    wrong_token = "candidate-token-that-must-not-be-logged-0001"
    wrong_secret = "candidate-secret-that-must-not-be-logged-0002"
    with serving(env, tmp_path / "serve.log", global_args=("--log-level", "debug", "--log-format", fmt)) as s:
        assert upload(s.url, b"a,b\n", "ok.csv").status_code == 202
        assert upload(s.url, b"a,b\n", token=wrong_token).status_code == 401
        assert upload(s.url, b"a,b\n", token=None).status_code == 401
        for header in ("x-intelliwatt-secret", "x-smt-secret", "x-webhook-secret", "x-proxy-secret",
                       "x-droplet-webhook-secret"):
            for value in (SECRET, wrong_secret):
                LOOPBACK.post(f"{s.url}/trigger/smt-now", headers={header: value}, json={"reason": "admin_triggered"},
                              timeout=10)
        LOOPBACK.options(f"{s.url}/upload", headers={"Origin": "https://intelliwatt.com",
                                                  "Access-Control-Request-Method": "POST",
                                                  "Access-Control-Request-Headers": "x-smt-upload-token"},
                         timeout=10)
        LOOPBACK.get(f"{s.url}/health", timeout=10)
        assert s.signal() == 0
    out = s.text()
    assert "POST /upload" in out and "202" in out and "401" in out, out  # access lines are there
    assert "/trigger/smt-now" in out, out
    for secret in (TOKEN, SECRET, wrong_token, wrong_secret):
        assert secret not in out, f"{secret[:12]}… leaked:\n{out}"
