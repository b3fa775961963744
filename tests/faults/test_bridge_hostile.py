"""The webhook bridge pass-through (SMT_WEBHOOK_FORWARD_URL) as a public path, attacked from outside.

A real `smt-watch serve` process on loopback in front of a stand-in bridge (a real uvicorn server in a
thread that records the raw request target and headers it gets, and has a slow path that waits until its
client leaves). Clients are raw sockets, several bound to their own loopback address (127.0.0.x), so that
per-client fairness is what the server sees, not a test double. Every case ends with serve still answering
and no traceback in its log.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from test_server_process import Serve, serving
from test_server_process import env as env  # the fixture, shared

from conftest import wait_for
from faults.support import assert_clean
from faults.test_serve_hostile import closed_by_server as reply_of
from smt_watch.reference.receiver import app_in_thread

pytestmark = pytest.mark.faults

IDLE = 3.0  # SMT_UPLOAD_IDLE_SECONDS: a pass-through body silent this long is dropped (408)
POOL = 8  # SMT_UPLOAD_MAX_CONCURRENT: requests at the bridge at once; one address gets POOL // 4
SHARE = POOL // 4
STATUS_TOKEN = "status-token-for-the-bridge-tests-0123456789"
SLOW_LIMIT = 60.0  # the stand-in's slow path gives up after this (a test that failed must still end)
DEADLINE = 20.0  # for a well-behaved call or a count to be reached, generous for a loaded 2-core machine


@dataclass
class Upstream:
    """The old bridge moved to another port: records every request; ``/base/slow`` waits for its client."""

    url: str = ""
    seen: list[tuple[str, bytes, dict[str, str]]] = field(default_factory=list)
    slow_in_flight: int = 0
    cancelled: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def any(self, request: Request) -> Response:
        qs = request.scope["query_string"]
        target = request.scope["raw_path"] + (b"?" + qs if qs else b"")
        await request.body()
        with self.lock:
            self.seen.append((request.method, target, {k.lower(): v for k, v in request.headers.items()}))
        if request.url.path == "/base/slow":
            return await self.slow(request)
        resp = Response(b'{"ok":true,"from":"bridge"}', status_code=207, media_type="application/json")
        resp.raw_headers += [(b"connection", b"x-hop"), (b"x-hop", b"hop-by-hop"), (b"x-kept", b"1")]
        return resp

    async def slow(self, request: Request) -> Response:
        with self.lock:
            self.slow_in_flight += 1
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + SLOW_LIMIT
            while loop.time() < deadline:
                if await request.is_disconnected():
                    with self.lock:
                        self.cancelled += 1
                    return Response(b"", status_code=499)
                await asyncio.sleep(0.02)  # the stand-in's own poll for its client leaving
            return Response(b"slow done")
        finally:
            with self.lock:
                self.slow_in_flight -= 1

    def targets(self) -> list[bytes]:
        with self.lock:
            return [t for _, t, _ in self.seen]


@contextmanager
def upstream() -> Iterator[Upstream]:
    up = Upstream()
    app = Starlette(routes=[Route("/{path:path}", up.any, methods=["GET", "POST", "PUT", "DELETE"])])
    with app_in_thread(app, name="stand-in-bridge") as port:
        up.url = f"http://127.0.0.1:{port}"
        yield up


@contextmanager
def bridged(env: dict[str, str], tmp_path: Path, **extra: str) -> Iterator[tuple[Serve, Upstream]]:
    with upstream() as up, serving({**env, "SMT_WEBHOOK_FORWARD_URL": f"{up.url}/base",
                                    "SMT_UPLOAD_IDLE_SECONDS": str(IDLE), "SMT_UPLOAD_MAX_CONCURRENT": str(POOL),
                                    "SMT_STATUS_TOKEN": STATUS_TOKEN, **extra}, tmp_path / "serve.log") as s:
        yield s, up
        assert s.healthy(), "serve stopped answering"
        assert_clean(s.text(), "serve log")
        assert "Traceback" not in s.text() and "Exception in ASGI" not in s.text()


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    sock.settimeout(30)
    return sock


def raw_request(port: int, target: bytes, *, method: bytes = b"GET", headers: bytes = b"",
                body: bytes = b"", half_close: bool = False) -> tuple[int, bytes]:
    with connect(port) as sock:
        sock.sendall(method + b" " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + headers
                     + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        if half_close:  # all sent: a refusal's lingering close ends at once (uvicorn takes it as leaving)
            sock.shutdown(socket.SHUT_WR)
        reply = reply_of(sock)
    status = int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1 ") else 0
    return status, reply


def well_behaved(s: Serve) -> httpx.Response:
    """The web app's own call: must get through whatever the others do."""
    return httpx.post(f"{s.url}/agreements", json={"esiid": "10443720000000001"}, timeout=DEADLINE,
                      trust_env=False, headers={"x-intelliwatt-secret": "bridge-secret"})


# --- the request target --------------------------------------------------------------------------------


def test_the_raw_target_goes_through_under_the_base(env: dict[str, str], tmp_path: Path) -> None:
    with bridged(env, tmp_path) as (s, up):
        for target in (b"/a%2Fb?x=%2F&y=a+b", b"/agreements", b"/smt/report-status?id=r%201", b"/%7Bx%7D/%41"):
            status, reply = raw_request(s.port, target)
            assert status == 207, reply[:300]
            assert up.targets()[-1] == b"/base" + target  # byte for byte: %2F is not turned into /


LEAVING = [b"/..%2f..%2fsecret", b"/..%2F", b"/%2e%2e/secret", b"/a/../../secret", b"/a/..%5c..%5csecret",
           b"/.%2e/x", b"/%2E%2E%2Fsecret", b"/a/./b", b"/..", b"/x/%2e", b"/agreements/..%2f..%2f..%2fetc"]


def test_a_path_that_could_leave_the_base_is_400(env: dict[str, str], tmp_path: Path) -> None:
    with bridged(env, tmp_path) as (s, up):
        for target in LEAVING:
            status, reply = raw_request(s.port, target, method=b"POST", body=b'{"x":1}', half_close=True)
            assert status == 400, (target, reply[:300])
            assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"] == "bad_path"
        assert up.targets() == []


def test_any_bytes_in_a_path_are_a_clear_answer_never_a_500(env: dict[str, str], tmp_path: Path) -> None:
    nasty = [b"/%00", b"/%ff%fe", b"/%0d%0aX-Injected:%201", b"/a%20b", b"/" + b"x" * 4000, b"/%c0%ae%c0%ae/",
             b"/{}|^`", b"/%", b"/%zz", b"/a?%00=%ff", b"/status/%ff", b"/%2F%2F%2F", b"//double", b"/\\x"]
    with bridged(env, tmp_path) as (s, up):
        for target in nasty:
            status, reply = raw_request(s.port, target)
            assert 200 <= status < 500, (target, reply[:300])
            if status == 207:
                assert up.targets()[-1] == b"/base" + target  # as it came: no header injected, nothing decoded
        assert not any(b"\r\n" in t for t in up.targets())


# --- headers ----------------------------------------------------------------------------------------------


def test_connection_named_and_serves_own_auth_headers_stay_behind(env: dict[str, str], tmp_path: Path) -> None:
    with bridged(env, tmp_path) as (s, up):
        status, reply = raw_request(
            s.port, b"/status/other", headers=(
                b"Connection: X-Private, keep-alive\r\nX-Private: private\r\nKeep-Alive: timeout=5\r\n"
                b"Proxy-Connection: keep-alive\r\nTE: trailers\r\nUpgrade: h2c\r\n"
                b"Cookie: smt_status=1.0.abcdef; other=1\r\nx-smt-upload-token: SEKRET-upload-2d8e4f6a0c\r\n"
                b"x-smt-upload-ticket: abc.def\r\nAuthorization: Bearer " + STATUS_TOKEN.encode() + b"\r\n"
                b"x-intelliwatt-secret: bridge-secret\r\n"))
        assert status == 207, reply[:300]
        head = reply.partition(b"\r\n\r\n")[0].lower()
        assert b"x-kept: 1" in head and b"x-hop" not in head  # named in the bridge's Connection: dropped
        (_, target, seen), = up.seen
        assert target == b"/base/status/other"
        for name in ("x-private", "keep-alive", "proxy-connection", "te", "upgrade", "x-smt-upload-token",
                     "x-smt-upload-ticket", "authorization"):
            assert name not in seen, (name, seen)
        assert seen["cookie"] == "other=1" and STATUS_TOKEN not in json.dumps(seen)
        assert seen["x-intelliwatt-secret"] == "bridge-secret"  # the bridge's own secret goes through
        # the bridge's own bearer token (its SMT proxy routes) goes through
        status, _ = raw_request(s.port, b"/smt/subscriptions/list", method=b"POST",
                                headers=b"Authorization: Bearer bridge-proxy-token\r\n", body=b"{}")
        assert status == 207 and up.seen[-1][2]["authorization"] == "Bearer bridge-proxy-token"


# --- bodies and connections --------------------------------------------------------------------------------


def test_100_clients_holding_a_post_mid_body_do_not_starve_the_web_app(env: dict[str, str], tmp_path: Path,
                                                                       fault_report: object) -> None:
    with bridged(env, tmp_path) as (s, up), ExitStack() as stack:
        holders = []
        for i in range(100):  # half from their own addresses, half from the web app's own (127.0.0.1)
            sock = stack.enter_context(connect(s.port, f"127.0.1.{i + 1}" if i % 2 else "127.0.0.1"))
            sock.sendall(b"POST /agreements HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100000\r\n\r\n" + b'{"esiid": "' + b"1" * 5000)
            holders.append(sock)
        r = well_behaved(s)
        assert r.status_code == 207 and r.json()["from"] == "bridge", r.text
        assert up.targets() == [b"/base/agreements"]  # the held bodies never reached the bridge
        for sock in holders:  # each dropped once silent for SMT_UPLOAD_IDLE_SECONDS
            reply = reply_of(sock)
            assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert up.targets() == [b"/base/agreements"]


def test_110_clients_hanging_up_on_a_slow_path_cancel_their_upstream_requests(env: dict[str, str],
                                                                               tmp_path: Path) -> None:
    with bridged(env, tmp_path) as (s, up), ExitStack() as stack:
        socks = [stack.enter_context(connect(s.port, f"127.0.2.{i + 1}")) for i in range(110)]
        for sock in socks:
            sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_for(lambda: up.slow_in_flight == POOL, DEADLINE, "the bridge's connections all taken")
        for sock in socks:
            sock.close()  # the clients hang up
        wait_for(lambda: up.cancelled == POOL and up.slow_in_flight == 0, DEADLINE,
                 "every upstream request cancelled when its client left")
        r = well_behaved(s)
        assert r.status_code == 207, r.text
        wait_for(lambda: s.text().count("the client left; the request to the webhook bridge is cancelled") == POOL,
                 DEADLINE, "each cancellation logged")


def test_the_body_cap_is_a_setting(env: dict[str, str], tmp_path: Path) -> None:
    """SMT_BRIDGE_MAX_BODY_BYTES=100: 100 bytes go through, 101 are 413, declared or streamed (chunked)."""
    with bridged(env, tmp_path, SMT_BRIDGE_MAX_BODY_BYTES="100", SMT_BRIDGE_BUFFER_BYTES="400") as (s, up):
        status, _ = raw_request(s.port, b"/agreements", method=b"POST", body=b"x" * 100)
        assert status == 207
        status, reply = raw_request(s.port, b"/agreements", method=b"POST", body=b"x" * 101, half_close=True)
        assert status == 413 and b"at most 100 bytes" in reply, reply[:400]
        with connect(s.port) as sock:
            sock.sendall(b"POST /agreements HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % 101 + b"y" * 101 + b"\r\n0\r\n\r\n")
            sock.shutdown(socket.SHUT_WR)
            reply = reply_of(sock)
        assert reply.startswith(b"HTTP/1.1 413 "), reply[:400]
        assert up.targets() == [b"/base/agreements"], "an oversized body reached the bridge"


def test_one_client_cannot_take_the_pool(env: dict[str, str], tmp_path: Path) -> None:
    with bridged(env, tmp_path) as (s, up), ExitStack() as stack:
        socks = [stack.enter_context(connect(s.port, "127.0.3.1")) for _ in range(20)]
        for sock in socks:
            sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        wait_for(lambda: up.slow_in_flight == SHARE, DEADLINE, "this client's share at the bridge")
        replies: dict[int, bytes] = {}
        for sock in socks:
            sock.setblocking(False)
        wait_for(lambda: len(_closed(socks, replies)) == 20 - SHARE, DEADLINE, "the rest refused")
        assert all(r.startswith(b"HTTP/1.1 429") and b"retry-after: " in r.lower() for r in _closed(socks, replies))
        r = well_behaved(s)  # another address: its share is untouched
        assert r.status_code == 207, r.text
        assert up.slow_in_flight == SHARE


def _closed(socks: list[socket.socket], replies: dict[int, bytes]) -> list[bytes]:
    """Replies of the connections the server has closed so far (read without blocking)."""
    closed = []
    for i, sock in enumerate(socks):
        while True:
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                break
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                closed.append(replies.get(i, b""))
                break
            replies[i] = replies.get(i, b"") + chunk
    return closed
