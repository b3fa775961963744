"""The poster's own HTTP/1.1 exchange, the wire parser on its own: :class:`_Http11` (one keep-alive client
connection over an httpcore network stream) writes a request from header bytes encoded once and reads its
answer by the rules h11 reads it by (``tests/test_http11.py`` holds it to h11's verdicts), refusing an answer
longer than :data:`MAX_ANSWER_BYTES`; :class:`_Answer` is what a verdict reads of it
(:class:`~smt_watch.delivery.base.Reply`). :mod:`smt_watch.delivery.http` (the poster: retries, errors,
one connection per thread) drives it."""

from __future__ import annotations

import json
import re
import ssl
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Final

import httpcore
import httpx

from smt_watch.delivery.base import Reply

_TOKEN: Final = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")  # a header name (RFC 9110 token), as h11 checks
_FIELD_VALUE: Final = re.compile(rb"[^\x00\s]+(?:[ \t]+[^\x00\s]+)*")  # a header value, as h11 checks
_STATUS_LINE: Final = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: (?:[ \t]|[^\x00\s])*)?")  # h11's reason phrase
_CHUNK_LINE: Final = re.compile(rb"[0-9A-Fa-f]{1,20}(?:;.*)?[ \t]*")  # h11's chunk header, its CRLF cut off
_LINE_END: Final = re.compile(rb"\r?\n")
_CRLF: Final = re.compile(rb"\r\n")  # a chunk line's end (h11 takes no bare LF there)
_BLANK_LINE: Final = re.compile(rb"\n\r?\n")  # the end of a response head (h11 also takes bare LF endings)
MAX_HEAD_BYTES: Final = 64 * 1024  # heads (1xx ones included) and trailers longer in all: a protocol error
MAX_LENGTH_DIGITS: Final = 20  # a longer Content-Length is refused (h11's CONTENT_LENGTH_MAX_DIGITS)
# An answer (its body, or a chunked body's lines and data) longer than this is a protocol error: only its first
# 500 bytes (the poster's ERROR_BODY_BYTES) and its JSON verdict are used, and a server streaming without end
# would hold a worker forever (each read gets data, so the read timeout never fires).
MAX_ANSWER_BYTES: Final = 16 * 1024 * 1024
READ_BYTES: Final = 64 * 1024
DECODE_PIECE: Final = 16 * 1024  # deflate expands ~1000:1 at most: one piece decodes to ~16 MiB, not ~64


def valid_header(name: bytes, value: bytes) -> bool:
    """What h11 would send: a token for a name, no CR, LF or NUL in a value, no surrounding whitespace."""
    return _TOKEN.fullmatch(name) is not None and (not value or _FIELD_VALUE.fullmatch(value) is not None)


class _Http11:
    """One keep-alive HTTP/1.1 client connection over an httpcore network stream (its TCP, TLS, timeouts
    and errors): the request written straight from the fixed header bytes, the response read with a small
    parser (status line, headers, ``Content-Length``, ``chunked``, or to the end of the connection).

    Why not httpcore's ``HTTP11Connection`` and h11: their per-request machinery (h11's state machine and
    event objects, header normalising, httpcore's trace and lock context managers) cost ~0.2 ms of CPU a
    request (CHANGELOG: 0.62-0.71 ms of watch CPU a small file here against 0.81-0.99 ms with them). What a
    request here sends is what h11 sent (the same headers, in order, and a body of exactly ``Content-Length``
    bytes); a response h11 would refuse raises :class:`httpcore.RemoteProtocolError`
    (retried like a dropped connection), as h11's refusal did. As httpcore does, a write error while the body
    goes out does not end the exchange: the server may have answered early (a 413) and closed."""

    def __init__(self, origin: httpcore.Origin, ssl_context: ssl.SSLContext | None,
                 backend: httpcore.NetworkBackend, keepalive_expiry: float | None) -> None:
        self._origin, self._ssl_context, self._backend = origin, ssl_context, backend
        self._keepalive_expiry = keepalive_expiry
        self._stream: httpcore.NetworkStream | None = None
        self._expire_at: float | None = None
        # what was read and not used yet (a bytearray: a big body grows by appends, not by copies)
        self._buf = bytearray()
        self._answered = False  # a byte of this exchange's answer arrived (what a dropped connection is called)
        self._head_left = MAX_HEAD_BYTES  # what this answer's heads and trailers may still take

    @property
    def connected(self) -> bool:
        return self._stream is not None

    def usable(self) -> bool:
        """Connected, its keep-alive not expired, and not closed by the server while idle (readable then
        means the next read gives EOF: httpcore's check before it reuses a connection)."""
        if self._stream is None:
            return False
        if self._expire_at is not None and time.monotonic() > self._expire_at:
            return False
        return not self._stream.get_extra_info("is_readable")

    def close(self) -> None:
        stream, self._stream, self._buf = self._stream, None, bytearray()
        if stream is not None:
            stream.close()

    def _connect(self, timeouts: dict[str, float | None]) -> httpcore.NetworkStream:
        host = self._origin.host.decode("ascii")
        stream = self._backend.connect_tcp(host, self._origin.port, timeout=timeouts.get("connect"))
        if self._ssl_context is not None:
            try:
                stream = stream.start_tls(self._ssl_context, server_hostname=host, timeout=timeouts.get("connect"))
            except BaseException:
                stream.close()
                raise
        return stream

    def exchange(self, head: bytes, length: int, chunks: Iterable[bytes], timeouts: dict[str, float | None]
                 ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """Send a request (``head``: its request line and headers; then exactly ``length`` bytes of body) and
        read the whole answer: status, headers, body. Any failure closes the connection."""
        if self._stream is None:
            self._stream = self._connect(timeouts)  # (its buffer is empty: new, or emptied by close())
        stream = self._stream
        self._expire_at = None
        self._answered = False
        try:
            write_timeout = timeouts.get("write")
            stream.write(head, write_timeout)
            sent = 0
            try:
                for chunk in chunks:
                    sent += len(chunk)
                    if sent > length:
                        raise httpcore.LocalProtocolError("Too much data for declared Content-Length")
                    stream.write(chunk, write_timeout)
                if sent != length:
                    raise httpcore.LocalProtocolError("Too little data for declared Content-Length")
                reusable = True
            except httpcore.WriteError:
                reusable = False  # httpcore's way: the server may have answered already; read it
            status, headers, content, keep = self._response(stream, timeouts.get("read"))
        except BaseException:
            self.close()
            raise
        if reusable and keep and not self._buf:
            if self._keepalive_expiry is not None:
                self._expire_at = time.monotonic() + self._keepalive_expiry
        else:
            self.close()
        return status, headers, content

    def _read(self, stream: httpcore.NetworkStream, timeout: float | None) -> bytes:
        data = stream.read(READ_BYTES, timeout)
        if not data:
            raise httpcore.RemoteProtocolError("peer closed connection without sending complete message body"
                                               if self._answered else "Server disconnected without sending a response.")
        self._answered = True
        return data

    def _fill(self, stream: httpcore.NetworkStream, timeout: float | None, size: int) -> None:
        """Read until at least ``size`` bytes are buffered."""
        while len(self._buf) < size:
            self._buf += self._read(stream, timeout)

    def _until(self, stream: httpcore.NetworkStream, timeout: float | None, end: re.Pattern[bytes], limit: int,
               what: str) -> re.Match[bytes]:
        """Read until ``end`` is found in what is buffered; more than ``limit`` bytes without it: ``what``."""
        while (found := end.search(self._buf)) is None:
            if len(self._buf) > limit:
                raise httpcore.RemoteProtocolError(what)
            self._buf += self._read(stream, timeout)
        return found

    def _lines(self, stream: httpcore.NetworkStream, timeout: float | None) -> list[bytes]:
        """The lines up to the next blank line (a head, or a chunked body's trailers; none when the blank line
        comes first), as h11 splits them; every head and trailer of one answer counts against
        :data:`MAX_HEAD_BYTES` in all (``self._head_left``)."""
        self._fill(stream, timeout, 1)  # a blank line first may arrive in pieces: "\r", then "\n"
        if self._buf[:1] == b"\r":
            self._fill(stream, timeout, 2)
        if self._buf[:1] == b"\n" or self._buf[:2] == b"\r\n":
            used, lines = (1 if self._buf[:1] == b"\n" else 2), []
        else:
            end = self._until(stream, timeout, _BLANK_LINE, self._head_left, "response head too long")
            head = bytes(self._buf[:end.start()])
            used, lines = end.end(), _LINE_END.split(head[:-1] if head.endswith(b"\r") else head)
        self._head_left -= used
        if self._head_left < 0:
            raise httpcore.RemoteProtocolError("response head too long")
        del self._buf[:used]
        return lines

    def _response(self, stream: httpcore.NetworkStream, timeout: float | None
                  ) -> tuple[int, list[tuple[bytes, bytes]], bytes, bool]:
        """The final response (1xx ones skipped): status, headers, body, and whether the connection may
        carry another request."""
        self._head_left = MAX_HEAD_BYTES
        while True:
            lines = self._lines(stream, timeout)
            status_line = _STATUS_LINE.fullmatch(lines[0]) if lines else None
            if status_line is None:
                raise httpcore.RemoteProtocolError(f"illegal status line: {lines[0][:100] if lines else b''!r}")
            status = int(status_line.group(2))
            if status < 100:
                raise httpcore.RemoteProtocolError(f"illegal status code {status}")
            headers = _header_fields(lines[1:])
            if status < 200 and status != 101:
                continue  # 100 Continue, 103 Early Hints: the answer follows
            break
        if status == 101:
            raise httpcore.RemoteProtocolError("unexpected 101 Switching Protocols")
        keep = status_line.group(1) == b"1"
        length: int | None = None
        seen: bytes | None = None  # the Content-Length as said, compared as h11 does (not as a number)
        chunked = False
        for name, value in headers:
            lower = name.lower()
            if lower == b"connection" and b"close" in [t.strip() for t in value.lower().split(b",")]:
                keep = False
            elif lower == b"content-length":  # "5" or, as h11 takes it, "5, 5": one length however often said
                said = {v.strip() for v in value.split(b",")}
                if (len(said) != 1 or not (text := said.pop()).isdigit() or len(text) > MAX_LENGTH_DIGITS
                        or seen not in (None, text)):
                    raise httpcore.RemoteProtocolError("bad Content-Length")
                seen, length = text, int(text)
            elif lower == b"transfer-encoding":
                if value.strip().lower() != b"chunked" or chunked:
                    raise httpcore.RemoteProtocolError("unsupported Transfer-Encoding")
                chunked = True
        if status in (204, 304):
            return status, headers, b"", keep
        if chunked:  # a length beside it is ignored, as h11 does; the connection is not reused (RFC 9112 §6.3)
            return status, headers, self._chunked(stream, timeout), keep and length is None
        if length is None:  # delimited by the end of the connection
            while data := stream.read(READ_BYTES, timeout):
                self._buf += data
                if len(self._buf) > MAX_ANSWER_BYTES:
                    raise httpcore.RemoteProtocolError("answer too long")
            content = bytes(self._buf)
            self._buf.clear()
            return status, headers, content, False
        if length > MAX_ANSWER_BYTES:
            raise httpcore.RemoteProtocolError("answer too long")
        self._fill(stream, timeout, length)
        content = bytes(self._buf[:length])
        del self._buf[:length]
        return status, headers, content, keep

    def _chunked(self, stream: httpcore.NetworkStream, timeout: float | None) -> bytes:
        """A chunked body, framed as h11 takes it: each size line hex (at most 20 digits, an extension after
        ``;``) ended by CRLF, each chunk's data by CRLF, then trailer fields up to a blank line. Its lines and
        data count against :data:`MAX_ANSWER_BYTES`."""
        body = bytearray()  # one buffer: 16 MiB said in 2-byte chunks is not millions of small objects
        left = MAX_ANSWER_BYTES
        while True:
            end = self._until(stream, timeout, _CRLF, MAX_HEAD_BYTES, "chunk line too long")
            line = bytes(self._buf[:end.start()])
            del self._buf[:end.end()]
            if _CHUNK_LINE.fullmatch(line) is None:
                raise httpcore.RemoteProtocolError(f"illegal chunk header: {line[:100]!r}")
            size = int(line.split(b";", 1)[0].rstrip(b" \t"), 16)
            left -= end.end() + size + 2
            if left < 0:
                raise httpcore.RemoteProtocolError("answer too long")
            if size == 0:
                _header_fields(self._lines(stream, timeout))  # trailer fields: checked, not used
                return bytes(body)
            self._fill(stream, timeout, size + 2)
            if self._buf[size:size + 2] != b"\r\n":
                raise httpcore.RemoteProtocolError("chunk not followed by CRLF")
            body += self._buf[:size]
            del self._buf[:size + 2]


def _header_fields(lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    """A head's header lines as (name, value) pairs, checked as h11 checks them: an obsolete folded line
    joins the one before with a space, and the joined line is checked whole."""
    folded: list[bytes] = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            if not folded:
                raise httpcore.RemoteProtocolError("folded header line first")
            folded[-1] += b" " + line.lstrip(b" \t")
        else:
            folded.append(line)
    fields: list[tuple[bytes, bytes]] = []
    for line in folded:
        name, colon, value = line.partition(b":")
        value = value.strip(b" \t")
        if not colon or not valid_header(name, value):
            raise httpcore.RemoteProtocolError(f"illegal header line: {line[:100]!r}")
        fields.append((name, value))
    return fields


_UNPARSED: Final = object()


class _Answer:
    """An answer as a verdict reads it (:class:`~smt_watch.delivery.base.Reply`), without an ``httpx.Response``
    (~16 µs a request to build, its body read again through its stream machinery); the body is parsed as JSON
    at most once, where the verdict and a sink's own reading each asked for it."""

    __slots__ = ("_error", "_json", "content", "headers", "status_code")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], content: bytes) -> None:
        self.status_code = status
        fields: dict[str, str] = {}  # by lower-case name; a repeated header's values joined, as httpx does
        for name, value in headers:
            key, text = name.decode("latin-1").lower(), value.decode("latin-1")
            fields[key] = f"{fields[key]}, {text}" if key in fields else text
        self.headers: Mapping[str, str] = fields
        self.content = content
        self._json: Any = _UNPARSED
        self._error: Exception | None = None  # a body that is not JSON fails once, not once per reader

    def json(self) -> Any:
        if self._error is not None:
            raise self._error
        if self._json is _UNPARSED:
            try:
                self._json = json.loads(self.content)
            except (ValueError, RecursionError) as exc:
                self._error = exc
                raise
        return self._json


class _Pieces(httpx.SyncByteStream):
    """A body already read, handed to httpx's decoders in pieces (so a gzip bomb is caught a piece at a time)."""

    def __init__(self, content: bytes) -> None:
        self._content = content

    def __iter__(self) -> Iterator[bytes]:
        for start in range(0, len(self._content), DECODE_PIECE):
            yield self._content[start:start + DECODE_PIECE]


def _decoded(response: httpx.Response) -> _Answer:
    """The whole answer, its body decoded as httpx decodes it (gzip, …): more than :data:`MAX_ANSWER_BYTES`
    decoded, or a body its ``Content-Encoding`` cannot decode, is a protocol error (retried), not an
    internal error (httpx's DecodingError is no transport error)."""
    parts: list[bytes] = []
    size = 0
    try:
        for part in response.iter_bytes():
            size += len(part)
            if size > MAX_ANSWER_BYTES:
                raise httpx.RemoteProtocolError("answer too long")
            parts.append(part)
    except httpx.DecodingError as exc:
        raise httpx.RemoteProtocolError(f"undecodable answer: {exc}") from exc
    return _Answer(response.status_code, response.headers.raw, b"".join(parts))


def _answer(status: int, headers: list[tuple[bytes, bytes]], content: bytes) -> Reply:
    """The answer for the verdict; one whose body is content-encoded (gzip, …) is decoded as httpx decodes
    the answers of its own client (:func:`_decoded`)."""
    if any(name.lower() == b"content-encoding" and value.strip().lower() not in (b"", b"identity")
           for name, value in headers):
        return _decoded(httpx.Response(status, headers=headers, stream=_Pieces(content)))
    return _Answer(status, headers, content)
