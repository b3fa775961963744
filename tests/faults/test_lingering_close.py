"""Early refusals the client can read: serve closes a refused connection as nginx's lingering close does.

A refusal sent before the request body is read (401, 403, 413, 429, 503) ends the connection; closing it
with the client's bytes still unread would make the kernel reset it, and a reset can erase the reply before
the client reads it (RFC 9112 §9.6). Real `smt-watch serve` processes on loopback:

- raw sockets check the wire: the reply, then a FIN, while everything the client still sends is read and
  thrown away without a reset; and the bounds (a silent client, too many bytes) close it;
- headless Chromium posts a file with a wrong ``x-smt-upload-token`` through :class:`ResetRelay`, and must
  show the 401's JSON, not "Failed to fetch". Linux keeps a reply that arrived before a reset readable, so
  on loopback a browser would see it either way; the relay stands in for a client stack that does not
  (RFC 9112 §9.6, as Windows' does), holding the reply until the upload is sent, as a browser reads no
  reply before its upload is done, and erasing it if a reset comes first.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
from test_server_process import TOKEN, Serve, serving
from test_server_process import env as env  # the fixture, shared

from conftest import fresh_chromium, wait_for
from faults.support import assert_clean

pytestmark = pytest.mark.faults

DRIBBLE_SECONDS = 0.25  # the dribbling client's pace: a byte this often
IDLE = 2.0  # SMT_UPLOAD_IDLE_SECONDS: also the lingering close's idle bound (min(5 s, this))
SECRET = "webhook-secret-7c7c7c7c7c7c-SECRET"  # test_server_process's env sets it
BOUNDARY = "lingerboundary"
BLOCK = b"x" * 65536
AFTER_REPLY = 8 * 1024 * 1024  # what a client sends after the reply, under the 64 MiB bound
MAX_DISCARD = 64 * 1024 * 1024  # smt_watch.linger.LINGER_MAX_BYTES
STATUS_TOKEN = "status-token-linger-tests-0123456789abcdef"


@contextmanager
def linger_serve(env: dict[str, str], tmp_path: Path, **extra: str) -> Iterator[Serve]:
    with serving({**env, "SMT_UPLOAD_IDLE_SECONDS": str(IDLE), "SMT_STATUS_TOKEN": STATUS_TOKEN, **extra},
                 tmp_path / "serve.log") as s:
        yield s
        assert s.healthy(), "serve stopped answering"
        assert_clean(s.text(), "serve log")


def head(port: int, target: str, length: int, *lines: str) -> bytes:
    return "\r\n".join([f"POST {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Content-Length: {length}",
                        *lines, "", ""]).encode()


def early_refusals(port: int) -> dict[str, tuple[bytes, int]]:
    """Requests refused before their body is read: the head, and the status it must get."""
    form = f"Content-Type: multipart/form-data; boundary={BOUNDARY}"
    big = 10 * 1024 * 1024 * 1024  # never all sent: the connection must end on the refusal, not the body
    return {
        "upload 401": (head(port, "/upload", big, form, "x-smt-upload-token: wrong"), 401),
        "upload 403": (head(port, "/upload", big, form, f"x-smt-upload-token: {TOKEN}",
                            "Origin: https://evil.example"), 403),
        "upload 413": (head(port, "/upload", 10 * 1024 * 1024 * 1024, form, f"x-smt-upload-token: {TOKEN}"), 413),
        "trigger 401": (head(port, "/trigger/smt-now", big, "Content-Type: application/json",
                             "x-smt-secret: wrong"), 401),
        "bridge 413": (head(port, "/agreements", big, "Content-Type: application/json"), 413),
    }


def reply_then_fin(sock: socket.socket) -> bytes:
    """Send body bytes until the server's reply and FIN have arrived; returns the reply."""
    sock.setblocking(False)
    got = b""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
            if not chunk:  # the FIN: the whole reply is here
                return got
            got += chunk
        except BlockingIOError:
            pass
        with suppress(BlockingIOError):
            sock.send(BLOCK)
    raise AssertionError(f"no reply and FIN within 30 s: {got[:300]!r}")


def keep_sending(sock: socket.socket, n: int) -> int:
    """Send ``n`` more bytes (blocking); the bytes sent before the server closed."""
    sock.setblocking(True)
    sock.settimeout(30)
    sent = 0
    try:
        while sent < n:
            sent += sock.send(BLOCK)
    except (BrokenPipeError, ConnectionResetError):
        pass
    return sent


@pytest.fixture(scope="module")
def refusing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Serve, dict[str, str]]]:
    """One serve for the five early refusals (not one each): every case is a connection of its own, refused
    before any body is read, so none leaves state behind for the next; the log is checked clean at the end."""
    root = tmp_path_factory.mktemp("refusing")
    (root / "inbox").mkdir()
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(root / "home"), "SMT_LOCAL_DIR": str(root / "inbox"),
           "SMT_STATE_DIR": str(root / "state"), "SMT_UPLOAD_TOKEN": TOKEN, "INTELLIWATT_WEBHOOK_SECRET": SECRET,
           "SMT_WEBHOOK_PORT": "0", "SMT_MAX_REQUESTS_PER_SECOND": "0", "SMT_MAX_IN_FLIGHT": "0"}
    with linger_serve(env, root, SMT_WEBHOOK_FORWARD_URL="http://127.0.0.1:9/") as s:
        yield s, env


@pytest.mark.parametrize("case", ["upload 401", "upload 403", "upload 413", "trigger 401", "bridge 413"])
def test_an_early_refusal_is_read_whole_then_the_rest_is_discarded(refusing: tuple[Serve, dict[str, str]],
                                                                    case: str) -> None:
    s, env = refusing
    request, status = early_refusals(s.port)[case]
    with socket.create_connection(("127.0.0.1", s.port), timeout=30) as sock:
        sock.sendall(request + BLOCK)
        reply = reply_then_fin(sock)
        assert reply.startswith(f"HTTP/1.1 {status} ".encode()) and reply.count(b"HTTP/1.1 ") == 1, reply[:600]
        reply_head = reply.partition(b"\r\n\r\n")[0].lower() + b"\r\n"
        assert b"\r\nconnection: close\r\n" in reply_head and b'"message":' in reply
        # the server still reads: 8 MB more go through without a reset
        assert keep_sending(sock, AFTER_REPLY) >= AFTER_REPLY
    assert Path(env["SMT_LOCAL_DIR"]).exists() and list(Path(env["SMT_LOCAL_DIR"]).glob(".upload-*")) == []
    assert s.healthy(), "serve stopped answering"


def test_a_lingering_connection_is_closed_by_its_bounds(env: dict[str, str], tmp_path: Path) -> None:
    with linger_serve(env, tmp_path) as s:
        request, _ = early_refusals(s.port)["upload 401"]
        with socket.create_connection(("127.0.0.1", s.port), timeout=30) as silent:
            silent.sendall(request + BLOCK)
            reply_then_fin(silent)
            started = time.monotonic()
            silent.setblocking(True)
            silent.settimeout(30)
            # silent from now on, never closing: the server closes after min(5 s, SMT_UPLOAD_IDLE_SECONDS)
            client_port = silent.getsockname()[1]
            assert server_holds(s.port, client_port)
            wait_for(lambda: not server_holds(s.port, client_port), 20, "the silent lingering connection closed")
            assert time.monotonic() - started < IDLE + 10
        with socket.create_connection(("127.0.0.1", s.port), timeout=30) as flood:
            flood.sendall(request + BLOCK)
            reply_then_fin(flood)
            sent = keep_sending(flood, 4 * MAX_DISCARD)  # never stops: cut off past 64 MiB
            assert MAX_DISCARD // 2 < sent < 2 * MAX_DISCARD, sent
        assert "over 67108864 bytes sent after the reply" in s.text()


def test_the_lingering_bounds_are_settings(env: dict[str, str], tmp_path: Path) -> None:
    """SMT_LINGER_MAX_BYTES=4 MiB cuts a flood off long before the default 64 MiB; SMT_LINGER_SECONDS=2 ends
    a client that keeps dribbling (never silent long enough for the idle bound) long before the default 30 s."""
    cap = 4 * 1024 * 1024
    with linger_serve(env, tmp_path, SMT_UPLOAD_IDLE_SECONDS="30", SMT_LINGER_SECONDS="2",
                      SMT_LINGER_MAX_BYTES=str(cap)) as s:
        request, _ = early_refusals(s.port)["upload 401"]
        with socket.create_connection(("127.0.0.1", s.port), timeout=30) as flood:
            flood.sendall(request + BLOCK)
            reply_then_fin(flood)
            sent = keep_sending(flood, MAX_DISCARD)
            assert sent < MAX_DISCARD // 2, sent  # well short of the default bound
        assert f"over {cap} bytes sent after the reply" in s.text()
        with socket.create_connection(("127.0.0.1", s.port), timeout=30) as dribbler:
            dribbler.sendall(request + BLOCK)
            reply_then_fin(dribbler)
            started = time.monotonic()
            client_port = dribbler.getsockname()[1]
            while server_holds(s.port, client_port) and time.monotonic() - started < 20:
                with suppress(OSError):
                    dribbler.send(b"x")
                # A fixed pause on purpose, not synchronisation: the behaviour under test is a client that
                # dribbles one byte every 0.25 s (so the 5 s idle bound never ends it; only the 2 s total does).
                time.sleep(DRIBBLE_SECONDS)  # the behaviour under test: a dribbling client
            assert not server_holds(s.port, client_port), "still lingering after 20 s"
            assert time.monotonic() - started < 15  # the 2 s bound, not the default 30 s


def server_holds(server_port: int, client_port: int) -> bool:
    """serve still has this connection's socket open: its end is in /proc/net/tcp with an owner (a socket
    that was closed lingers in the kernel a while, but with inode 0). Reading it sends nothing, so it does
    not feed the lingering connection's idle bound as a probe write would."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], fields[9]
        if int(local.rsplit(":", 1)[1], 16) == server_port and int(remote.rsplit(":", 1)[1], 16) == client_port:
            return inode != "0"
    return False


def test_a_request_read_whole_still_closes_at_once(env: dict[str, str], tmp_path: Path) -> None:
    """No lingering where nothing is left unread: a refused request whose body was all read."""
    with linger_serve(env, tmp_path) as s, socket.create_connection(("127.0.0.1", s.port), timeout=30) as sock:
        body = b'{"reason": 5}'
        sock.sendall(head(s.port, "/trigger/smt-now", len(body), "Content-Type: application/json",
                          f"x-smt-secret: {SECRET}", "Connection: close") + body)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 400 "), reply[:200]


# --- in Chromium, through a client stack whose reset erases an unread reply --------------------------------


class ResetRelay:
    """A TCP relay between the browser and serve, modelling a client whose reset erases unread input (module
    docstring): what serve sends while a request body is still being forwarded is held; when that body is
    all forwarded, the held bytes go to the browser; a reset from serve while bytes are held (or a send to
    serve failing) erases them and resets the browser's connection."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.resets = 0
        self._threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, name="reset-relay", daemon=True)
        self._accepting.start()

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                browser, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=_Link(self, browser).run, name="reset-relay-link", daemon=True).start()


class _Link:
    def __init__(self, relay: ResetRelay, browser: socket.socket) -> None:
        self.relay = relay
        self.browser = browser
        self.server = socket.create_connection(("127.0.0.1", relay.upstream_port), timeout=60)
        self.browser.settimeout(60)
        self.cond = threading.Condition()
        self.sending = False
        self.held = bytearray()
        self.dead = False

    def run(self) -> None:
        back = threading.Thread(target=self._back, name="reset-relay-back", daemon=True)
        back.start()
        try:
            self._forth()
        except OSError:
            self._erase()
        back.join(60)
        for sock in (self.browser, self.server):
            sock.close()

    def _forth(self) -> None:
        """Browser → serve, one request after another, the body's length from its head."""
        buf = b""
        while not self.dead:
            while b"\r\n\r\n" not in buf:
                chunk = self.browser.recv(65536)
                if not chunk:
                    self.server.shutdown(socket.SHUT_WR)
                    return
                buf += chunk
            request_head, _, buf = buf.partition(b"\r\n\r\n")
            match = re.search(rb"(?im)^content-length:\s*(\d+)", request_head)
            left = int(match.group(1)) if match else 0
            with self.cond:
                self.sending = left > 0
            self.server.sendall(request_head + b"\r\n\r\n")
            while left > 0:
                if not buf:
                    buf = self.browser.recv(65536)
                    if not buf:
                        return
                piece, buf = buf[:left], buf[left:]
                self.server.sendall(piece)
                left -= len(piece)
            with self.cond:
                self.sending = False
                if self.held:
                    self.browser.sendall(bytes(self.held))
                    self.held.clear()
                self.cond.notify_all()

    def _back(self) -> None:
        """serve → browser; held while a body is being forwarded."""
        try:
            while chunk := self.server.recv(65536):
                with self.cond:
                    if self.sending:
                        self.held += chunk
                    else:
                        self.browser.sendall(chunk)
            with self.cond:  # serve's FIN: it goes to the browser after what is held
                self.cond.wait_for(lambda: not self.sending or self.dead, 60)
                if not self.dead:
                    self.browser.sendall(bytes(self.held))
                    self.held.clear()
                    self.browser.shutdown(socket.SHUT_WR)
        except ConnectionResetError:
            self._erase()
        except OSError:
            pass

    def _erase(self) -> None:
        with self.cond:
            if self.dead:
                return
            self.dead = True
            self.held.clear()
            self.relay.resets += 1
            self.cond.notify_all()
        try:  # SO_LINGER 0: close with a reset, as the client's stack does
            self.browser.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.browser.close()
        except OSError:
            pass


@pytest.fixture(scope="module")
def chromium(chromium_session: Any) -> Any:
    """conftest's one Chromium (skipped without it), fresh for this module."""
    return fresh_chromium(chromium_session, width=1100, height=900, page_load=60, script=90)


# IntelliWatt's admin page's call, with a token: fetch() of a FormData holding the file; what the page shows.
FETCH = """
const [size, done] = [arguments[0], arguments[arguments.length - 1]];
const form = new FormData();
form.append("file", new Blob([new Uint8Array(size).fill(65)], {type: "text/csv"}), "a.csv");
form.append("role", "admin");
fetch("/upload", {method: "POST", body: form, headers: {"x-smt-upload-token": "wrong-token"}})
  .then(r => r.text().then(t => done({status: r.status, text: t})))
  .catch(e => done({status: 0, text: String(e.message)}));
"""


@pytest.mark.browser
@pytest.mark.timeout(240)
@pytest.mark.parametrize("size", [200 * 1024, 8 * 1024 * 1024], ids=["small-file", "8-MB-file"])
def test_chromium_shows_the_401_of_a_wrong_token_not_failed_to_fetch(chromium: Any, env: dict[str, str],
                                                                     tmp_path: Path, size: int) -> None:
    with linger_serve(env, tmp_path) as s:
        relay = ResetRelay(s.port)
        try:
            chromium.get(f"http://127.0.0.1:{relay.port}/")  # serve's own page: the fetch is same-origin
            for _ in range(3):
                shown = chromium.execute_async_script(FETCH, size)
                assert shown["status"] == 401, (shown, relay.resets)
                assert '"message":"Invalid or missing SMT upload token"' in shown["text"], shown
            assert relay.resets == 0
        finally:
            relay.close()
        assert list(Path(env["SMT_LOCAL_DIR"]).iterdir()) == []
