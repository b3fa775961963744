"""`serve` as a public endpoint, against clients that stall, flood, lie about themselves or send junk.

A real `smt-watch serve` process on loopback, raw sockets for the bytes a polite client would never send.
Each case ends with what must hold whatever the client did: no temp file left in the inbox, no traceback
in the log, and the server still answering.
"""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest
from test_server_process import TOKEN, Serve, serving, upload
from test_server_process import env as env  # the fixture, shared

from conftest import wait_for
from faults.support import assert_clean

pytestmark = pytest.mark.faults

IDLE = 1.0  # SMT_UPLOAD_IDLE_SECONDS for these tests
DRIBBLE_SECONDS = 0.2  # a slowloris client's pace between bytes: the pause is the behaviour under test
BOUNDARY = "hostileboundary1234"
FORM = f"multipart/form-data; boundary={BOUNDARY}"
SECRET = "webhook-secret-7c7c7c7c7c7c-SECRET"  # test_server_process's env sets it


def inbox(env: dict[str, str]) -> Path:
    return Path(env["SMT_LOCAL_DIR"])


def temps(env: dict[str, str]) -> list[str]:
    return sorted(p.name for p in inbox(env).glob(".upload-*"))


@contextmanager
def hostile_serve(env: dict[str, str], tmp_path: Path, **extra: str) -> Iterator[Serve]:
    with serving({**env, "SMT_UPLOAD_IDLE_SECONDS": str(IDLE), **extra}, tmp_path / "serve.log") as s:
        yield s
        assert s.healthy(), "serve stopped answering"
        assert_clean(s.text(), "serve log")


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.settimeout(30)
    return sock


def closed_by_server(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (blocks up to the socket timeout). A reset
    counts as closed: a server that closes with our unread bytes in its buffer resets the connection."""
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def upload_head(port: int, length: int, **headers: str) -> bytes:
    lines = ["POST /upload HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Content-Type: {FORM}",
             f"Content-Length: {length}", f"x-smt-upload-token: {TOKEN}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


FILE_PART = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="slow.csv"\r\n'
             "Content-Type: text/csv\r\n\r\n").encode()


def test_unfinished_headers_are_closed_after_the_idle_time(env: dict[str, str], tmp_path: Path) -> None:
    """Slowloris: ten connections that never finish their request head, one dribbling a byte at a time."""
    with hostile_serve(env, tmp_path) as s, ExitStack() as stack:
        socks = [stack.enter_context(connect(s.port)) for _ in range(10)]
        for sock in socks:
            sock.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        started = time.monotonic()
        dribbler = socks[0]
        for _ in range(int(IDLE * 10) + 10):  # a byte every 0.2 s must not keep the head alive
            try:
                dribbler.sendall(b"a")
            except OSError:
                break  # closed by the server: the point
            time.sleep(DRIBBLE_SECONDS)  # the slow client's pace (not synchronisation)
        for sock in socks:
            assert closed_by_server(sock) == b""
        assert time.monotonic() - started < 10 * IDLE + 5
        assert "no complete request head" in s.text()


def test_stalled_uploads_are_dropped_and_leave_nothing(env: dict[str, str], tmp_path: Path) -> None:
    with hostile_serve(env, tmp_path) as s, ExitStack() as stack:
        socks = [stack.enter_context(connect(s.port)) for _ in range(10)]
        for sock in socks:  # a complete head, the start of the file, then silence
            sock.sendall(upload_head(s.port, 5_000_000) + FILE_PART + b"ESIID,X\n" * 1000)
        wait_for(lambda: len(temps(env)) == 10 or "abandoned" in s.text(), 20, "the uploads to begin")
        for sock in socks:
            reply = closed_by_server(sock)
            assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
            assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"] == "timeout"
        wait_for(lambda: temps(env) == [], 10, "every temp file removed")
    assert [p for p in inbox(env).iterdir()] == []


def test_uploads_beyond_the_cap_get_503_with_retry_after(env: dict[str, str], tmp_path: Path) -> None:
    with hostile_serve(env, tmp_path, SMT_UPLOAD_MAX_CONCURRENT="2", SMT_UPLOAD_IDLE_SECONDS="5") as s:
        with ExitStack() as stack:
            holders = [stack.enter_context(connect(s.port)) for _ in range(2)]
            for sock in holders:
                sock.sendall(upload_head(s.port, 5_000_000) + FILE_PART + b"x" * 1000)
            wait_for(lambda: len(temps(env)) == 2, 20, "two uploads in progress")
            refused = upload(s.url, b"ESIID\n1\n")
            assert refused.status_code == 503, refused.text
            assert int(refused.headers["retry-after"]) > 0 and "try again" in refused.json()["message"]
        wait_for(lambda: temps(env) == [], 20, "the held uploads dropped")
        wait_for(lambda: upload(s.url, b"ESIID\n2\n").status_code == 202, 20, "uploads taken again")


def test_a_huge_part_under_another_name_counts_toward_the_limit(env: dict[str, str], tmp_path: Path) -> None:
    with hostile_serve(env, tmp_path, SMT_UPLOAD_MAX_BYTES="100000") as s:
        other = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="other"; filename="x.bin"\r\n\r\n'
                 ).encode()
        block = b"\0" * 65536
        with connect(s.port) as sock:  # chunked, no Content-Length: the limit can only be enforced while reading
            sock.sendall(upload_head(s.port, 0).replace(b"Content-Length: 0", b"Transfer-Encoding: chunked")
                         + b"%x\r\n%s\r\n" % (len(other), other))
            sent, reply = 0, b""
            while sent < 50_000_000 and not reply:  # the server must answer long before the 50 MB part ends
                sock.sendall(b"%x\r\n%s\r\n" % (len(block), block))
                sent += len(block)
                if select.select([sock], [], [], 0)[0]:
                    reply = sock.recv(65536)
            reply += closed_by_server(sock)  # closed once we fall silent (lingering close: no reset)
        assert sent < 20_000_000 and reply.startswith(b"HTTP/1.1 413"), (sent, reply[:200])
        assert b"connection: close" in reply.lower()
        assert temps(env) == []


def test_webhook_body_is_capped_and_bad_json_is_400(env: dict[str, str], tmp_path: Path) -> None:
    with hostile_serve(env, tmp_path) as s:
        def trigger(content: bytes) -> httpx.Response:
            return httpx.post(f"{s.url}/trigger/smt-now", content=content, timeout=20, trust_env=False,
                              headers={"x-smt-secret": SECRET, "content-type": "application/json"})

        big = trigger(b'{"reason": "' + b"a" * 200_000 + b'"}')
        assert big.status_code == 413 and big.json()["maxBytes"] == 64 * 1024
        deep = trigger(b"[" * 30_000 + b"]" * 30_000)  # under the cap, deeper than the JSON parser goes
        assert deep.status_code == 400 and deep.json()["error"] == "invalid_json"
        for junk in (b'"just a string"', b"\xff\xfe\x00", b"{" * 10, b"null"):
            r = trigger(junk)
            assert r.status_code == 400 and r.json()["message"], (junk, r.text)
        assert "Traceback" not in s.text()


@pytest.mark.parametrize("trusted", [False, True], ids=["default", "trusted-proxy"])
def test_x_forwarded_for_is_believed_only_from_trusted_proxies(env: dict[str, str], tmp_path: Path,
                                                               trusted: bool) -> None:
    extra = {"SMT_TRUSTED_PROXIES": "127.0.0.1"} if trusted else {}
    with hostile_serve(env, tmp_path, **extra) as s:
        r = upload(s.url, b"ESIID\n1\n", headers={"x-forwarded-for": "203.0.113.9"})
    assert r.status_code == 202, r.text
    assert r.json()["meta"]["accountKey"] == ("203.0.113.9" if trusted else "127.0.0.1")
