"""The poster's own HTTP/1.1 exchange (``delivery/http.py``'s ``_Http11``) against a scripted server on
loopback: what goes on the wire, keep-alive, and every way of framing an answer, hostile ones included.

The server reads each request whole (head, then ``Content-Length`` bytes) and writes the scripted answer
for it; a ``None`` in the script closes the connection instead."""

from __future__ import annotations

import gzip
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from smt_watch.config import Secret, Settings
from smt_watch.delivery.base import Body, classify
from smt_watch.delivery.http import MAX_HEAD_BYTES, Poster
from smt_watch.errors import PermanentDelivery, RetryableDelivery

Make = Callable[..., Settings]
KEY = "ab" * 32
OK = b'{"ok":true}'


@dataclass
class Scripted:
    """A loopback HTTP server answering request N with ``answers[N]`` (raw bytes; None: close at once)."""

    answers: list[bytes | None]
    requests: list[bytes] = field(default_factory=list)  # each request, head and body, as received
    connections: int = 0
    closed: threading.Event = field(default_factory=threading.Event)  # set whenever the server closed one
    close_after: set[int] = field(default_factory=set)  # close the connection after answering these
    sock: socket.socket = field(default_factory=lambda: socket.create_server(("127.0.0.1", 0)))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/upload?x=1"

    def serve(self) -> None:
        while self.answers:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                self._connection(conn)
            self.closed.set()

    def _connection(self, conn: socket.socket) -> None:
        buf = b""
        while self.answers:
            while b"\r\n\r\n" not in buf:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            head, _, buf = buf.partition(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:")))
            while len(buf) < length:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            self.requests.append(head + b"\r\n\r\n" + buf[:length])
            buf = buf[length:]
            answer = self.answers.pop(0)
            if answer is None:
                return
            conn.sendall(answer)
            if len(self.requests) - 1 in self.close_after:
                return


@pytest.fixture
def scripted() -> Iterator[Callable[..., Scripted]]:
    servers: list[tuple[Scripted, threading.Thread]] = []

    def start(*answers: bytes | None, close_after: tuple[int, ...] = ()) -> Scripted:
        s = Scripted(list(answers), close_after=set(close_after))
        t = threading.Thread(target=s.serve, daemon=True)
        t.start()
        servers.append((s, t))
        return s

    yield start
    for s, t in servers:
        s.answers.clear()
        with socket.create_connection(s.sock.getsockname()):  # wakes an accept() still waiting
            pass
        t.join(10)
        s.sock.close()
        assert not t.is_alive()


def reply(status: str, body: bytes = OK, *headers: str) -> bytes:
    lines = [f"HTTP/1.1 {status}", *headers]
    if not any(h.lower().startswith(("content-length", "transfer-encoding")) for h in headers):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def body(data: bytes, length: int | None = None) -> Body:
    return Body("text/csv", len(data) if length is None else length, lambda progress: iter([data[:5], data[5:]]))


def poster(make: Make, url: str, token: str | None = None, **env: str) -> Poster:
    settings = make(SMT_UPLOAD_URL=url, SMT_RETRY_ATTEMPTS="1", SMT_MAX_REQUESTS_PER_SECOND="0",
                    SMT_MAX_IN_FLIGHT="0", **env)
    return Poster(settings, url, ("x-smt-upload-token", Secret(token) if token else None), classify)


def test_requests_go_out_as_h11_wrote_them_on_one_kept_alive_connection(make_settings: Make,
                                                                        scripted: Any) -> None:
    s = scripted(reply("200 OK"), reply("201 Created", b'{"ok":true,"n":2}'))
    p = poster(make_settings, s.url, token="tok")
    try:
        assert p.post("a.csv", KEY, body(b"hello world"), None) == (200, '{"ok":true}', 1)
        assert p.post("b.csv", KEY, body(b"second"), None) == (201, '{"ok":true,"n":2}', 1)
    finally:
        p.close()
    port = s.sock.getsockname()[1]
    assert s.requests[0] == (
        f"POST /upload?x=1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: smt-watch\r\n"
        f"x-smt-upload-token: tok\r\nContent-Type: text/csv\r\nContent-Length: 11\r\n"
        f"Idempotency-Key: {KEY}\r\n\r\nhello world").encode()
    assert s.requests[1].endswith(b"\r\n\r\nsecond")
    assert s.connections == 1


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4;ext=1\r\n{\"ok\r\n8\r\n\":false}\r\n0\r\nX-T: 1\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n{\"ok\":false}",
    b"HTTP/1.1 200 OK\nContent-Length: 12\n\n{\"ok\":false}",  # bare LF line ends, which h11 takes too
    b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nX-Folded: a\r\n b\r\n\r\n{\"ok\":false}",
    b"HTTP/1.1 200 OK\r\nContent-Length: 12, 12\r\nContent-Length: 12\r\n\r\n{\"ok\":false}",
    reply("200 OK", b'{"ok":false,"pad":"' + b"x" * (4 << 20) + b'"}'),  # many reads, grown by appends
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"".join(
        b"%x\r\n%s\r\n" % (len(part), part) for part in [b'{"ok":false,"pad":"'] + [b"y" * 70000] * 60 + [b'"}'])
    + b"0\r\n\r\n",
    reply("200 OK", gzip.compress(b'{"ok":false}'), "Content-Encoding: gzip"),  # decoded as httpx decodes
], ids=["chunked", "100-continue", "bare-lf", "folded-header", "big", "big-chunked", "gzip", "length-list"])
def test_every_framing_of_an_answer_is_read_whole(make_settings: Make, scripted: Any, answer: bytes) -> None:
    """The body decides the verdict (``ok:false`` is a refusal), so it must have been read whole."""
    s = scripted(answer, reply("200 OK"))
    p = poster(make_settings, s.url)
    try:
        with pytest.raises(PermanentDelivery, match="ok:false"):
            p.post("a.csv", KEY, body(b"data"), None)
        assert p.post("b.csv", KEY, body(b"data"), None)[0] == 200  # the same connection, still in step
    finally:
        p.close()
    assert s.connections == 1


@pytest.mark.parametrize("answer", [
    b"HTTP/1.0 200 OK\r\n\r\n{\"ok\":true}",  # no length: the body ends with the connection
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 11\r\n\r\n{\"ok\":true}",
], ids=["until-close", "connection-close"])
def test_an_answer_that_ends_the_connection_is_followed_by_a_new_one(make_settings: Make, scripted: Any,
                                                                      answer: bytes) -> None:
    s = scripted(answer, reply("200 OK"), close_after=(0,))
    p = poster(make_settings, s.url)
    try:
        assert p.post("a.csv", KEY, body(b"data"), None) == (200, '{"ok":true}', 1)
        assert p.post("b.csv", KEY, body(b"data"), None) == (200, '{"ok":true}', 1)
    finally:
        p.close()
    assert s.connections == 2


def test_a_connection_the_server_closed_while_idle_is_replaced_before_use(make_settings: Make,
                                                                         scripted: Any) -> None:
    """Closed without ``Connection: close`` (a keep-alive timeout on the server): the next request goes on a
    new connection at once, not as a failed attempt."""
    s = scripted(reply("200 OK"), reply("200 OK"), close_after=(0,))
    p = poster(make_settings, s.url)
    try:
        assert p.post("a.csv", KEY, body(b"data"), None)[2] == 1
        assert s.closed.wait(10)
        stream = p._pool._local.conn._stream  # type: ignore[union-attr]
        assert stream is not None
        assert _until(lambda: stream.get_extra_info("is_readable"))  # our side has seen the server's FIN
        assert p.post("b.csv", KEY, body(b"data"), None)[2] == 1
    finally:
        p.close()
    assert s.connections == 2


@pytest.mark.parametrize("answer", [
    None,  # closed without a word
    b"HTTP/2 200\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab",  # shorter than it said, then closed
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nab",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX: " + b"a" * (MAX_HEAD_BYTES + 10),  # a head that never ends
], ids=["closed", "http2", "short", "negative-length", "two-lengths", "gzip", "bad-chunk", "bad-header",
        "101", "endless-head"])
def test_a_hostile_answer_is_one_retryable_protocol_error(make_settings: Make, scripted: Any,
                                                           answer: bytes | None) -> None:
    s = scripted(answer, close_after=(0,))
    p = poster(make_settings, s.url)
    try:
        with pytest.raises(RetryableDelivery, match=r"ProtocolError|disconnected|peer closed") as info:
            p.post("a.csv", KEY, body(b"data"), None)
    finally:
        p.close()
    assert "\n" not in str(info.value)


def test_a_retry_after_is_read_from_the_answers_headers(make_settings: Make, scripted: Any) -> None:
    s = scripted(reply("503 Service Unavailable", b"busy", "retry-after: 7"))
    p = poster(make_settings, s.url)
    try:
        with pytest.raises(RetryableDelivery) as info:
            p.post("a.csv", KEY, body(b"data"), None)
    finally:
        p.close()
    assert (info.value.status, info.value.retry_after) == (503, 7.0)


def test_a_body_shorter_than_its_length_never_completes_a_request(make_settings: Make, scripted: Any) -> None:
    s = scripted(reply("200 OK"))
    p = poster(make_settings, s.url)
    try:
        with pytest.raises(RetryableDelivery, match="Too little data"):
            p.post("a.csv", KEY, body(b"data", length=10), None)
    finally:
        p.close()
    assert s.closed.wait(10)
    assert s.requests == []


def test_a_token_that_would_split_the_head_is_never_sent(make_settings: Make, scripted: Any) -> None:
    s = scripted(reply("200 OK"))
    p = poster(make_settings, s.url, token="tok\r\nX-Evil: 1")
    try:
        with pytest.raises(RetryableDelivery, match="Illegal header value"):
            p.post("a.csv", KEY, body(b"data"), None)
    finally:
        p.close()
    assert s.connections == 0


def _until(check: Callable[[], Any], timeout: float = 10.0) -> bool:
    """Poll ``check`` until it is true or ``timeout`` passes (a condition with a deadline, not a sleep)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        threading.Event().wait(0.01)  # the poll interval of a condition with a deadline
    return bool(check())

