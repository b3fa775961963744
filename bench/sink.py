"""A tiny HTTP/1.1 sink for benchmarks: it reads every request body, throws it away and answers ``{"ok":true}``.

Why a hand-written sink and not the reference receiver (``smt-watch receive``)? The benchmark compares the
client side (curl vs ``smt-watch post``); a receiver that parses multipart, hashes and stores files would
put its own cost into every figure. This sink does the least a correct server can do: read the headers,
read and discard exactly ``Content-Length`` bytes (or a chunked body) in 1 MiB reads, answer 200 with a
``Content-Length``, keep the connection alive. It answers ``Expect: 100-continue`` at once, because curl
sends that header for large ``-F`` uploads and would otherwise sit out its 1 s expect timeout.

Run it in its own process (:func:`start_sink_process`) so it never shares a GIL with what is measured:

    python bench/sink.py --port 0        # prints the bound port on stdout, then serves until killed

``GET /stats`` returns the body size of the last request and the totals, so a benchmark can check that
each measured upload really delivered the whole file.

With ``--log PATH`` the sink also appends one line per request (``/stats`` excluded), written as soon as the
whole body has been read and before the answer goes out::

    <time.time() when the body was complete, 6 decimals>\t<Idempotency-Key header or ->\t<body bytes>\t<path>

so a benchmark in another process can time "file landed" → "request complete" on the same wall clock
(``bench_watch.py`` keys its files by their SHA-256, which smt-watch sends as ``Idempotency-Key``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import TextIO

READ_SIZE = 1024 * 1024  # large reads: the sink must never be what limits throughput
STREAM_LIMIT = 4 * READ_SIZE  # StreamReader buffer before it pauses the socket
MAX_HEADER_BYTES = 64 * 1024
OK_BODY = b'{"ok":true}'


@dataclass
class Stats:
    """What the sink has swallowed, for ``GET /stats``."""

    requests: int = 0
    body_bytes: int = 0
    last_body_bytes: int = 0
    last_path: str = ""

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__).encode()


class BadRequest(Exception):
    """The peer sent something this sink will not parse; the connection is closed."""


async def _discard(reader: asyncio.StreamReader, n: int) -> None:
    """Read and drop exactly ``n`` bytes."""
    while n > 0:
        data = await reader.read(min(READ_SIZE, n))
        if not data:
            raise BadRequest("connection closed mid-body")
        n -= len(data)


async def _discard_chunked(reader: asyncio.StreamReader) -> int:
    """Read and drop a ``Transfer-Encoding: chunked`` body, trailers included; return its data size."""
    total = 0
    while True:
        line = await reader.readline()
        if not line:
            raise BadRequest("connection closed in chunk header")
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise BadRequest(f"bad chunk size line {line[:40]!r}") from None
        if size == 0:
            break
        await _discard(reader, size + 2)  # the data and its CRLF
        total += size
    while True:  # trailer section ends with an empty line
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            return total


def _response(status: str, body: bytes, keep_alive: bool) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
    )
    return head.encode("ascii") + body


async def _serve_one(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stats: Stats, log: TextIO | None = None
) -> bool:
    """Handle one request; return whether the connection stays open for another."""
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return False  # peer closed between requests: the normal end of keep-alive
    except asyncio.LimitOverrunError:
        raise BadRequest("header section too large") from None
    if len(raw) > MAX_HEADER_BYTES:
        raise BadRequest("header section too large")
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise BadRequest(f"bad request line {lines[0][:80]!r}")
    method, path, version = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    keep_alive = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
    if headers.get("expect", "").lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        size = await _discard_chunked(reader)
    else:
        size = int(headers.get("content-length", "0") or "0")
        await _discard(reader, size)
    done = time.time()
    if method == "GET" and path == "/stats":
        body = stats.to_json()
    elif method == "GET" and path == "/health":
        body = OK_BODY  # smt-watch asks a loopback target whether it is its own serve: not a delivery
    else:
        stats.requests += 1
        stats.body_bytes += size
        stats.last_body_bytes = size
        stats.last_path = path
        body = OK_BODY
        if log is not None:
            log.write(f"{done:.6f}\t{headers.get('idempotency-key') or '-'}\t{size}\t{path}\n")
            log.flush()
    writer.write(_response("200 OK", body, keep_alive))
    await writer.drain()
    return keep_alive


async def _handle(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stats: Stats, log: TextIO | None = None
) -> None:
    try:
        while await _serve_one(reader, writer, stats, log):
            pass
    except (BadRequest, ConnectionError) as exc:
        if isinstance(exc, BadRequest):
            print(f"sink: {exc}", file=sys.stderr)
    finally:
        writer.close()
        with suppress(ConnectionError):
            await writer.wait_closed()


async def serve(host: str = "127.0.0.1", port: int = 0, announce: bool = True, log_path: str | None = None) -> None:
    """Serve forever; with ``announce``, print the bound port on stdout once listening.

    ``log_path``: append the per-request line described in the module docstring (the file exists, possibly
    empty, by the time the port is announced).
    """
    stats = Stats()
    log = open(log_path, "a", encoding="utf-8") if log_path else None  # noqa: SIM115 (open for the server's life)
    server = await asyncio.start_server(
        lambda r, w: _handle(r, w, stats, log), host, port, limit=STREAM_LIMIT, reuse_address=True
    )
    bound = server.sockets[0].getsockname()[1]
    if announce:
        print(bound, flush=True)
    async with server:
        await server.serve_forever()


@contextmanager
def start_sink_process(host: str = "127.0.0.1", port: int = 0, log_path: str | None = None) -> Iterator[int]:
    """Run the sink in a child process (its own GIL and core) and yield its port; stop it on exit.

    ``log_path``: passed as ``--log`` (one line per request, see the module docstring).
    """
    proc = subprocess.Popen(
        [sys.executable, __file__, "--host", host, "--port", str(port), *(["--log", log_path] if log_path else [])],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line.isdigit():
            raise RuntimeError(f"sink did not start (exit {proc.poll()}, said {line!r})")
        yield int(line)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Discard-everything HTTP/1.1 sink for benchmarks.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on stdout).")
    parser.add_argument("--log", metavar="PATH", help="append one line per request: time, Idempotency-Key, size, path")
    args = parser.parse_args(argv)
    with suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port, log_path=args.log))


if __name__ == "__main__":
    main()
