"""The poster's own HTTP/1.1 exchange (``delivery/http11.py``'s ``_Http11``, driven by ``delivery/http.py``'s
poster) against a scripted server on loopback: what goes on the wire, keep-alive, and every way of framing
an answer, hostile ones included.

The server reads each request whole (head, then ``Content-Length`` bytes) and writes the scripted answer
for it; a ``None`` in the script closes the connection instead."""

from __future__ import annotations

import gzip
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

import h11
import httpcore
import pytest

from smt_watch.config import Secret, Settings
from smt_watch.delivery.base import Body, classify
from smt_watch.delivery.http import Poster
from smt_watch.delivery.http11 import MAX_ANSWER_BYTES, MAX_HEAD_BYTES, _Answer, _Http11
from smt_watch.delivery.inline import classify_inline
from smt_watch.delivery.multipart import classify_multipart
from smt_watch.errors import ConfigError, PermanentDelivery, RetryableDelivery

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
            try:
                conn.sendall(answer)
            except OSError:  # a client that stopped reading a hostile answer closed first
                return
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
], ids=["chunked", "100-continue", "bare-lf", "folded-header", "length-list", "big", "big-chunked", "gzip"])
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


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "httpx-client"])
def test_a_token_that_would_split_the_head_is_never_sent(make_settings: Make, scripted: Any, direct: bool) -> None:
    """Refused once, when the poster is made (a configuration matter, the token never quoted), on both paths."""
    s = scripted(reply("200 OK"))
    url = s.url if direct else s.url.replace("http://", "http://user:pw@")
    with pytest.raises(ConfigError, match=r"x-smt-upload-token token for .* cannot travel") as info:
        poster(make_settings, url, token="tok\r\nX-Evil: 1")
    assert "X-Evil" not in str(info.value)
    assert s.connections == 0


def _until(check: Callable[[], Any], timeout: float = 10.0) -> bool:
    """Poll ``check`` until it is true or ``timeout`` passes (a condition with a deadline, not a sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        threading.Event().wait(0.01)  # the poll interval of a condition with a deadline
    return bool(check())



def _chunked(*lines: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"".join(lines)


# Each answer's verdict is h11's (the parser httpcore used before); see test_h11_takes_or_refuses_each_answer.
H11_CASES: Final = {
    "length-5000-digits": (b"HTTP/1.1 200 OK\r\nContent-Length: " + b"1" * 5000 + b"\r\n\r\n" + OK, False),
    "length-21-digits": (b"HTTP/1.1 200 OK\r\nContent-Length: " + b"11".zfill(21) + b"\r\n\r\n" + OK, False),
    "length-20-digits": (b"HTTP/1.1 200 OK\r\nContent-Length: " + b"11".zfill(20) + b"\r\n\r\n" + OK, True),
    "length-02-twice": (b"HTTP/1.1 200 OK\r\nContent-Length: 02\r\nContent-Length: 02\r\n\r\n{}", True),
    "length-02-and-2": (b"HTTP/1.1 200 OK\r\nContent-Length: 02\r\nContent-Length: 2\r\n\r\n{}", False),
    "chunk-underscore": (_chunked(b"0_b\r\n", OK, b"\r\n0\r\n\r\n"), False),
    "chunk-21-digits": (_chunked(b"b".rjust(21, b"0") + b"\r\n", OK, b"\r\n0\r\n\r\n"), False),
    "chunk-20-digits": (_chunked(b"b".rjust(20, b"0") + b"\r\n", OK, b"\r\n0\r\n\r\n"), True),
    "chunk-space-before": (_chunked(b" b\r\n", OK, b"\r\n0\r\n\r\n"), False),
    "chunk-space-after": (_chunked(b"b \t\r\n", OK, b"\r\n0\r\n\r\n"), True),
    "chunk-space-before-ext": (_chunked(b"b ;x=1\r\n", OK, b"\r\n0\r\n\r\n"), False),
    "chunk-plus": (_chunked(b"+b\r\n", OK, b"\r\n0\r\n\r\n"), False),
    "chunk-line-bare-lf": (_chunked(b"b\n", OK, b"\r\n0\r\n\r\n"), False),
    "chunk-data-bare-lf": (_chunked(b"b\r\n", OK, b"\n0\r\n\r\n"), False),
    "trailer-ok": (_chunked(b"b\r\n", OK, b"\r\n0\r\nX-T: 1\r\n\r\n"), True),
    "trailer-bare-lf": (_chunked(b"b\r\n", OK, b"\r\n0\r\nX-T: 1\n\n"), True),
    "trailer-bad-line": (_chunked(b"b\r\n", OK, b"\r\n0\r\nBad Trailer\r\n\r\n"), False),
    "trailer-nul": (_chunked(b"b\r\n", OK, b"\r\n0\r\nX-T: a\x00b\r\n\r\n"), False),
    "chunked-and-length": (b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\n\r\n"
                           b"b\r\n" + OK + b"\r\n0\r\n\r\n", True),
    "fold-nul": (b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nX: a\r\n \x00b\r\n\r\n" + OK, False),
    "fold-vt": (b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nX: a\r\n \x0bb\r\n\r\n" + OK, False),
    "fold-ff": (b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nX: a\r\n\t\x0cb\r\n\r\n" + OK, False),
    "fold-ok": (b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nX: a\r\n \t b \r\n\r\n" + OK, True),
    "status-042": (b"HTTP/1.1 042 Odd\r\n\r\n" + reply("200 OK"), False),
    "status-099": (b"HTTP/1.1 099 Odd\r\n\r\n" + reply("200 OK"), False),
    "status-103": (b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + reply("200 OK"), True),
    "reason-nul": (reply("200 O\x00K"), False),
    "reason-vt": (reply("200 O\x0bK"), False),
    "reason-ff": (reply("200 O\x0cK"), False),
    "reason-tab-obs-text": (reply("200 O\tK \xe9"), True),
    "reason-empty": (reply("200 "), True),
    "no-reason": (reply("200"), True),
}


def _h11_takes(answer: bytes) -> bool:
    """Whether h11, as httpcore drove it, reads ``answer`` (then the end of the connection) as a whole answer."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="POST", target="/", headers=[("Host", "x"), ("Content-Length", "4")]))
    conn.send(h11.Data(data=b"data"))
    conn.send(h11.EndOfMessage())
    conn.receive_data(answer)
    conn.receive_data(b"")
    try:
        while (event := conn.next_event()) is not h11.NEED_DATA:
            if isinstance(event, h11.EndOfMessage):
                return True
            if isinstance(event, h11.ConnectionClosed):
                return False
    except h11.RemoteProtocolError:
        return False
    return False


@pytest.mark.parametrize("case", list(H11_CASES))
def test_h11_takes_or_refuses_each_answer(case: str) -> None:
    """The table's verdicts are h11's own (so the next test holds the parser to h11)."""
    answer, taken = H11_CASES[case]
    assert _h11_takes(answer) is taken


@pytest.mark.parametrize("case", list(H11_CASES))
def test_an_answer_is_taken_or_refused_as_h11_did(make_settings: Make, scripted: Any, case: str) -> None:
    answer, taken = H11_CASES[case]
    s = scripted(answer, close_after=(0,))
    p = poster(make_settings, s.url)
    try:
        if taken:
            assert p.post("a.csv", KEY, body(b"data"), None)[0] == 200
        else:
            with pytest.raises(RetryableDelivery, match="ProtocolError") as info:
                p.post("a.csv", KEY, body(b"data"), None)
            assert "\n" not in str(info.value)
    finally:
        p.close()


def test_chunked_and_a_length_together_never_reuse_the_connection(make_settings: Make, scripted: Any) -> None:
    """RFC 9112 §6.3: such an answer may be a smuggling attempt; what follows it on the connection is not read."""
    s = scripted(H11_CASES["chunked-and-length"][0], reply("200 OK"))
    p = poster(make_settings, s.url)
    try:
        assert p.post("a.csv", KEY, body(b"data"), None)[0] == 200
        assert p.post("b.csv", KEY, body(b"data"), None)[0] == 200
    finally:
        p.close()
    assert s.connections == 2


READ: Final = 60000


def _big_chunked() -> bytes:
    piece = b"%x\r\n%s\r\n" % (READ, b"y" * READ)
    return _chunked(b'b\r\n{"ok":true,\r\n', piece * (MAX_ANSWER_BYTES // READ + 1), b"0\r\n\r\n")


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (MAX_ANSWER_BYTES + 1),  # refused before reading
    _big_chunked(),
    _chunked((b"1;" + b"e" * READ + b"\r\nx\r\n") * (MAX_ANSWER_BYTES // READ + 1)),  # long extensions
    b"HTTP/1.0 200 OK\r\n\r\n" + b" " * (MAX_ANSWER_BYTES + 1),  # until the connection ends
    b"HTTP/1.1 100 Continue\r\n\r\n" * (MAX_HEAD_BYTES // 25 + 1) + reply("200 OK"),
    _chunked(b"0\r\n", b"X-T: 1\r\n" * (MAX_HEAD_BYTES // 8 + 1), b"\r\n"),
    reply("200 OK", gzip.compress(b" " * (MAX_ANSWER_BYTES + 1)), "Content-Encoding: gzip"),  # a gzip bomb
], ids=["length", "chunked", "chunk-extensions", "until-close", "endless-1xx", "endless-trailers", "gzip-bomb"])
def test_an_answer_too_long_is_refused_before_it_is_all_read(make_settings: Make, scripted: Any,
                                                              answer: bytes) -> None:
    """Only the first 500 bytes and the JSON verdict are used; a server streaming without end would hold a
    worker forever (each read gets data, so the read timeout never fires)."""
    s = scripted(answer, close_after=(0,))
    p = poster(make_settings, s.url)
    try:
        with pytest.raises(RetryableDelivery, match=r"answer too long|response head too long"):
            p.post("a.csv", KEY, body(b"data"), None)
    finally:
        p.close()


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "httpx-client"])
def test_a_body_its_content_encoding_cannot_decode_is_a_retryable_error(make_settings: Make, scripted: Any,
                                                                        direct: bool) -> None:
    s = scripted(reply("200 OK", b"not gzip at all", "Content-Encoding: gzip"), close_after=(0,))
    url = s.url if direct else s.url.replace("http://", "http://user:pw@")  # credentials: httpx's client
    p = poster(make_settings, url)
    try:
        assert (p._pool is not None) is direct
        with pytest.raises(RetryableDelivery, match=r"talking to http://.*undecodable answer"):
            p.post("a.csv", KEY, body(b"data"), None)
    finally:
        p.close()


@pytest.mark.parametrize("verdict", [classify, classify_multipart, classify_inline])
@pytest.mark.parametrize("status", [200, 400])
def test_json_nested_too_deep_is_not_an_object(verdict: Any, status: int) -> None:
    """``[`` * 100000 makes json.loads raise RecursionError: the verdict reads it as a body that is no JSON
    object (a 2xx lands, a 400 is the plain refusal), not as an internal error."""
    answer = _Answer(status, [(b"Content-Type", b"application/json")], b"[" * 100000)
    error = verdict(answer, "[[[", "http://target")
    assert (error is None) is (status == 200)
    with pytest.raises(RecursionError) as first:
        answer.json()
    with pytest.raises(RecursionError) as again:
        answer.json()
    assert again.value is first.value  # parsed once: the failure is kept, as a success is


def test_a_request_cut_short_lets_its_body_go_at_once(make_settings: Make, scripted: Any) -> None:
    """The body's generator (a big file's: an open file, a hash pool) is closed when the exchange fails, not
    when the traceback that the retry's backoff keeps is dropped."""
    closed = threading.Event()

    def chunks(progress: object) -> Iterator[bytes]:
        try:
            yield b"data"
            yield b"more"
        finally:
            closed.set()

    s = scripted(reply("200 OK"))
    p = poster(make_settings, s.url)
    try:
        with pytest.raises(RetryableDelivery, match="Too much data") as info:
            p.post("a.csv", KEY, Body("text/csv", 2, chunks), None)
        assert closed.is_set()  # while the error (its traceback through the attempt's frames) is still held
        assert info.value.attempts == 1
    finally:
        p.close()


def test_a_connection_opened_after_close_is_closed_by_the_next_close(make_settings: Make, scripted: Any) -> None:
    s = scripted(reply("200 OK"), reply("200 OK"))
    p = poster(make_settings, s.url)
    try:
        assert p.post("a.csv", KEY, body(b"data"), None)[0] == 200
        assert p._pool is not None
        p._pool.close()
        assert p.post("b.csv", KEY, body(b"data"), None)[0] == 200  # a new connection on the same _Http11
    finally:
        p.close()
    assert p._pool._local.conn._stream is None


class _Pieces:
    """A network stream that hands out ``pieces`` one read at a time, then times out (nothing more comes:
    a keep-alive server waiting for the next request)."""

    def __init__(self, *pieces: bytes) -> None:
        self.pieces = list(pieces)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if not self.pieces:
            raise httpcore.ReadTimeout("nothing more came")
        return self.pieces.pop(0)


@pytest.mark.parametrize("last", [[b"0\r\n", b"\r\n"], [b"0\r\n\r", b"\n"], [b"0\r\n", b"\r", b"\n"],
                                  [b"0\r\n\r\n"]], ids=["crlf-later", "lf-later", "byte-by-byte", "together"])
def test_a_chunked_answers_last_blank_line_may_arrive_in_pieces(last: list[bytes]) -> None:
    """The empty trailer section's CRLF in a later read than the last chunk (two TLS records, a slow
    writer) ends the answer; waiting for a second line end instead would time out and send it again."""
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n"
    stream = _Pieces(head, *last)
    http = _Http11(httpcore.Origin(b"http", b"127.0.0.1", 80), None, httpcore.SyncBackend(), None)
    status, _, content, keep = http._response(stream, 1.0)  # type: ignore[arg-type]
    assert (status, content, keep, stream.pieces) == (200, b"ok", True, [])
