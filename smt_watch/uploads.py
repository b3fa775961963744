"""Streaming ``multipart/form-data`` reader for Starlette requests.

Starlette's own ``request.form()`` spools file parts to anonymous temporary files in the system temp dir
and only hands them over once the whole body has arrived. Our receivers need something stricter: the file
part must land in a hidden ``.upload-<random>.part`` file *inside the destination directory* (so the
caller can publish it with an atomic ``rename``), its SHA-256 and size must be known without a second
read, an oversize upload must be refused as soon as it crosses the limit, and nothing may be left behind
when the client goes away or the body is malformed. Memory stays flat: at most one network chunk plus a
bounded write batch is held at a time; text fields are capped.

The module is deliberately generic (no tokens, no routes, no storage policy) so that both the reference
receiver and the ``serve`` upload server can share it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import BinaryIO

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from smt_watch.errors import MalformedUpload, UploadStalled, UploadTooLarge

__all__ = [
    "FIELD_MAX_BYTES",
    "FORM_OVERHEAD_BYTES",
    "MalformedUpload",
    "ParsedUpload",
    "ReceivedFile",
    "UploadStalled",
    "UploadTooLarge",
    "idle_limited",
    "read_multipart",
]

FIELD_MAX_BYTES = 64 * 1024
"""Largest accepted text field; fields are metadata (ESIID, hashes), never content."""
MAX_FIELDS = 64
"""Bounds the memory a hostile form can make us hold (``MAX_FIELDS * FIELD_MAX_BYTES``)."""
FORM_OVERHEAD_BYTES = 64 * 1024
"""Slack allowed on top of ``max_bytes`` for boundaries, part headers and text fields when judging
``Content-Length`` up front."""
_FLUSH_BYTES = 1024 * 1024
"""File data is batched up to this size before one threadpool hop writes and hashes it: fewer hops
than one per network chunk, while memory stays bounded."""
TMP_PREFIX = ".upload-"
TMP_SUFFIX = ".part"


@dataclass(frozen=True)
class ReceivedFile:
    """The file part, complete and fsynced at ``tmp_path``; the caller renames (or unlinks) it."""

    tmp_path: Path
    filename: str
    content_type: str | None
    size: int
    sha256: str


@dataclass(frozen=True)
class ParsedUpload:
    """Text fields of the form plus the file part (``None`` when the form had no such part)."""

    fields: dict[str, str]
    file: ReceivedFile | None


class _Kind(Enum):
    FIELD = "field"
    FILE = "file"
    SKIP = "skip"  # a file part under another name: drained, never stored


class _Reader:
    """Callback target for ``MultipartParser``; owns the temporary file until it is handed over.

    Parser callbacks are synchronous, so file bytes are only queued (as zero-copy memoryviews of the
    immutable request chunks) and written by ``flush`` in a worker thread, keeping disk I/O off the loop.
    """

    def __init__(self, dest_dir: Path, file_field: str, max_bytes: int | None,
                 before_file: Callable[[dict[str, str]], None] | None = None) -> None:
        self.dest_dir = dest_dir
        self.before_file = before_file
        self.file_field = file_field
        self.max_bytes = max_bytes
        self.fields: dict[str, str] = {}
        self.ended = False
        self._field_count = 0
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._disposition: bytes | None = None
        self._part_type: bytes | None = None
        self._kind: _Kind | None = None
        self._name = ""
        self._buf = bytearray()
        # file part state
        self.tmp_path: Path | None = None
        self._fh: BinaryIO | None = None
        self._hasher = hashlib.sha256()
        self.size = 0
        self.filename = ""
        self.content_type: str | None = None
        self.file_complete = False
        self._pending: list[memoryview] = []
        self.pending_bytes = 0

    # -- parser callbacks -------------------------------------------------------------------------------
    def on_part_begin(self) -> None:
        self._disposition = None
        self._part_type = None
        self._kind = None
        self._buf = bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        name = bytes(self._header_name).strip().lower()
        if name == b"content-disposition":
            self._disposition = bytes(self._header_value)
        elif name == b"content-type":
            self._part_type = bytes(self._header_value).strip()
        self._header_name = bytearray()
        self._header_value = bytearray()

    def on_headers_finished(self) -> None:
        disposition, options = parse_options_header(self._disposition)
        if disposition != b"form-data" or b"name" not in options:
            raise MalformedUpload("part without 'Content-Disposition: form-data; name=...'")
        self._name = _decode(options[b"name"], "part name")
        if self._name == self.file_field:
            if self.tmp_path is not None:
                raise MalformedUpload(f"more than one {self.file_field!r} part")
            self.filename = _decode(options.get(b"filename", b""), "file name")
            self.content_type = self._part_type.decode("latin-1") if self._part_type else None
            if self.before_file is not None:
                self.before_file(dict(self.fields))  # may refuse: nothing has been written yet
            self._open_tmp()
            self._kind = _Kind.FILE
        elif b"filename" in options:
            self._kind = _Kind.SKIP
        else:
            self._field_count += 1
            if self._field_count > MAX_FIELDS:
                raise MalformedUpload(f"more than {MAX_FIELDS} form fields")
            self._kind = _Kind.FIELD

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._kind is _Kind.FILE:
            self.size += end - start
            if self.max_bytes is not None and self.size > self.max_bytes:
                raise UploadTooLarge(self.max_bytes)
            self._pending.append(memoryview(data)[start:end])
            self.pending_bytes += end - start
        elif self._kind is _Kind.FIELD:
            if len(self._buf) + (end - start) > FIELD_MAX_BYTES:
                raise MalformedUpload(f"form field {self._name!r} exceeds {FIELD_MAX_BYTES} bytes")
            self._buf += data[start:end]

    def on_part_end(self) -> None:
        if self._kind is _Kind.FIELD:
            self.fields[self._name] = _decode(bytes(self._buf), f"form field {self._name!r}")
        elif self._kind is _Kind.FILE:
            self.file_complete = True
        self._kind = None
        self._buf = bytearray()

    def on_end(self) -> None:
        self.ended = True

    # -- temporary file ---------------------------------------------------------------------------------
    def _open_tmp(self) -> None:
        # mkstemp: O_EXCL, mode 0600, unpredictable name; hidden so inbox watchers never pick it up.
        fd, name = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=TMP_SUFFIX, dir=self.dest_dir)
        self.tmp_path = Path(name)
        self._fh = os.fdopen(fd, "wb")

    def _write_sync(self, pieces: list[memoryview]) -> None:
        assert self._fh is not None
        for piece in pieces:
            self._hasher.update(piece)
            self._fh.write(piece)

    async def flush(self) -> None:
        if not self._pending:
            return
        pieces, self._pending, self.pending_bytes = self._pending, [], 0
        await run_in_threadpool(self._write_sync, pieces)

    def _finish_sync(self) -> None:
        assert self._fh is not None
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self._fh = None

    async def finish(self) -> ReceivedFile | None:
        """Write what is queued, make it durable and describe it."""
        if self.tmp_path is None:
            return None
        await self.flush()
        await run_in_threadpool(self._finish_sync)
        digest = self._hasher.hexdigest()
        return ReceivedFile(self.tmp_path, self.filename, self.content_type, self.size, digest)

    def discard(self) -> None:
        """Synchronous on purpose: it must also run while the task is being cancelled."""
        self._pending = []
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.close()
            self._fh = None
        if self.tmp_path is not None:
            with contextlib.suppress(OSError):
                self.tmp_path.unlink(missing_ok=True)


def _decode(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedUpload(f"{what} is not valid UTF-8") from exc


def _boundary(request: Request) -> bytes:
    ctype, params = parse_options_header(request.headers.get("content-type"))
    if ctype != b"multipart/form-data":
        raise MalformedUpload("Content-Type must be multipart/form-data")
    boundary = params.get(b"boundary")
    if not boundary:
        raise MalformedUpload("multipart boundary missing from Content-Type")
    return boundary


def _check_declared_length(request: Request, max_bytes: int | None) -> None:
    """Refuse before reading a byte when the client already told us the body is too big."""
    declared = request.headers.get("content-length")
    if max_bytes is None or declared is None:
        return
    try:
        length = int(declared)
    except ValueError as exc:
        raise MalformedUpload("invalid Content-Length") from exc
    if length > max_bytes + FORM_OVERHEAD_BYTES:
        raise UploadTooLarge(max_bytes)


async def idle_limited(stream: AsyncIterator[bytes], idle_seconds: float | None) -> AsyncIterator[bytes]:
    """The chunks of a request body; ``UploadStalled`` when none arrives for ``idle_seconds`` (None: wait)."""
    while True:
        try:
            async with asyncio.timeout(idle_seconds):
                chunk = await anext(stream)
        except StopAsyncIteration:
            return
        except TimeoutError as exc:
            raise UploadStalled(idle_seconds or 0.0) from exc
        yield chunk


async def read_multipart(
    request: Request,
    *,
    dest_dir: Path,
    file_field: str = "file",
    max_bytes: int | None = None,
    before_file: Callable[[dict[str, str]], None] | None = None,
    idle_seconds: float | None = None,
) -> ParsedUpload:
    """Stream a multipart body: the ``file_field`` part into a hidden temp file in ``dest_dir``.

    Other parts with a file name are drained and dropped; remaining parts are text fields (UTF-8, at
    most ``FIELD_MAX_BYTES`` each, a repeated name keeps the last value). Raises ``UploadTooLarge``,
    ``MalformedUpload``, or whatever reading the body raises (``ClientDisconnect``, cancellation); in every
    failure case the temporary file is already gone. On success the caller owns ``file.tmp_path``.

    ``before_file`` is called with the text fields read so far when the file part begins, before a byte of
    it is written; an exception it raises aborts the upload (a rate limit that depends on form fields).

    ``idle_seconds``: no byte for that long raises ``UploadStalled`` (the temp file is removed). The whole
    body, every part counted, may not exceed ``max_bytes + FORM_OVERHEAD_BYTES`` (a huge part under another
    name is refused while it streams, not read to its end).
    """
    _check_declared_length(request, max_bytes)
    boundary = _boundary(request)
    reader = _Reader(dest_dir, file_field, max_bytes, before_file)
    try:
        parser = MultipartParser(
            boundary,
            {
                "on_part_begin": reader.on_part_begin,
                "on_part_data": reader.on_part_data,
                "on_part_end": reader.on_part_end,
                "on_header_field": reader.on_header_field,
                "on_header_value": reader.on_header_value,
                "on_header_end": reader.on_header_end,
                "on_headers_finished": reader.on_headers_finished,
                "on_end": reader.on_end,
            },
        )
        body_limit = None if max_bytes is None else max_bytes + FORM_OVERHEAD_BYTES
        seen = 0
        async with contextlib.aclosing(request.stream()) as stream:
            async for chunk in idle_limited(stream, idle_seconds):
                seen += len(chunk)
                if body_limit is not None and seen > body_limit:
                    raise UploadTooLarge(max_bytes or 0)
                if chunk and not reader.ended:  # an epilogue after the closing boundary is ignored
                    parser.write(chunk)
                    if reader.pending_bytes >= _FLUSH_BYTES or reader.file_complete:
                        await reader.flush()
        parser.finalize()
        if not reader.ended:
            raise MalformedUpload("multipart body ended before its closing boundary")
        if reader.tmp_path is not None and not reader.file_complete:  # pragma: no cover - implied by ended
            raise MalformedUpload(f"{file_field!r} part is incomplete")
        received = await reader.finish()
    except FormParserError as exc:
        reader.discard()
        raise MalformedUpload(f"invalid multipart body: {exc}") from exc
    except BaseException:
        reader.discard()
        raise
    return ParsedUpload(fields=dict(reader.fields), file=received)
