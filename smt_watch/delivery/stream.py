"""Verified streaming: a file's bytes as a request body, never sent complete unless they are the bytes hashed.

The file is read in chunks and hashed as it streams; the last chunk is held back until the hash is known,
so a file that changed since it was hashed is never sent complete (:class:`FileChanged` aborts the request
mid-body). A big file is hashed in a helper thread beside the socket writes (sent as it is), or read and
encoded ahead in one (the inline body's base64). Memory stays flat in file size.

A big file whose hash pass held a kernel read lease (:mod:`smt_watch.readlease`) is not hashed again: it is
read from the leased descriptor, and the lease is looked at after every read, the last one included, before
that chunk is handed on. A lease still held proves no one could open the file for writing since before it
was hashed; one broken during the send aborts the request with :class:`FileChanged`, as a changed hash does.
A lease already broken before the send's first read (an open for writing that may have changed nothing: a
writability test, a tool locking the file, while post waited for the ledger) is not an abort: the file is
re-hashed as it is sent, exactly as without a lease.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeVar

from smt_watch.delivery.base import Progress
from smt_watch.errors import FileChanged

if TYPE_CHECKING:  # only annotations here
    from smt_watch.readlease import ReadLease

T = TypeVar("T")


def _resized(path: Path, grew: bool) -> FileChanged:
    """The one error of a file whose size moved while it was sent (it is read to its hashed size, then one more)."""
    return FileChanged(f"{path.name}: {'grew' if grew else 'shrank'} while being sent")

# A multiple of 3, so base64 of each chunk concatenates cleanly. 1.5 MiB, not 768 KiB: half the socket writes,
# HTTP writes and queue hand-overs a GiB, and the receiver reads fuller buffers (issue 27: the send phase's CPU,
# ours and the sink's, fell ~10-20 % in A/B runs; 3 MiB gained little more for twice the memory).
READ_CHUNK: Final = 2 * 3 * 256 * 1024
READ_AHEAD_MIN: Final = 4 * READ_CHUNK  # smaller files are read inline: a thread costs more than it saves
READ_AHEAD_DEPTH: Final = 2  # chunks buffered ahead of the socket (3 MiB, as before; 3 deep was no faster)


def _read_verified(path: Path, size: int, sha256: str, chunk: int) -> Iterator[bytes]:
    """Exactly ``size`` bytes of ``path``; after the last chunk, raise unless they hash to ``sha256``."""
    digest = hashlib.sha256()
    remaining = size
    with open(path, "rb", buffering=0) as fh:
        if size > READ_AHEAD_MIN:  # a big file read once, front to back: a larger kernel read-ahead if cold
            sequential(fh.fileno())
        while remaining > 0:
            data = fh.read(min(chunk, remaining))
            if not data:
                raise _resized(path, grew=False)
            digest.update(data)
            remaining -= len(data)
            yield data
        if fh.read(1):
            raise _resized(path, grew=True)
    if digest.hexdigest() != sha256:
        raise FileChanged(f"{path.name}: content changed since it was hashed")


def sequential(fd: int) -> None:
    """Tell the kernel ``fd`` is read front to back (a doubled read-ahead window when it is not cached);
    a filesystem that does not take the hint changes nothing."""
    if hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)


def _read_ahead(source: Iterator[T], depth: int) -> Iterator[T]:
    """Run ``source`` in a helper thread up to ``depth`` chunks ahead of the consumer.

    Reading and hashing then overlap with socket writes (hashlib and socket calls release the GIL), which
    matters for big files: a second SHA-256 pass would otherwise add its full time to every send.
    """
    q: queue.Queue[T | BaseException | None] = queue.Queue(depth)
    stop = threading.Event()

    def put(item: T | BaseException | None) -> None:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def run() -> None:
        try:
            for data in source:
                if stop.is_set():
                    return
                put(data)
            put(None)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put(exc)

    thread = threading.Thread(target=run, name="smt-watch-read-ahead", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def verified_chunks(
    path: Path, size: int, sha256: str, progress: Progress | None = None, chunk: int = READ_CHUNK,
    encode: Callable[[bytes], bytes] | None = None, lease: ReadLease | None = None,
) -> Iterator[bytes]:
    """Yield exactly ``size`` bytes of ``path``, holding the last chunk back until the hash matches.

    ``encode``: each chunk is yielded as ``encode(chunk)``, encoded where it is read: for a big file in the
    read-ahead thread, so encoding overlaps the socket writes (the inline body's base64, ~1 s of CPU a GiB;
    ``chunk`` must then be a multiple of 3). ``progress`` counts the file's bytes either way. ``lease``: the
    read lease taken before ``sha256`` was computed (:class:`~smt_watch.hashing.FileIdentity`'s): a file sent
    as it is is then read from its descriptor under the lease, not hashed again (:func:`_leased`), unless the
    lease is already broken (module docstring: then re-hashed, as without one)."""
    if lease is not None and encode is None and lease.intact():
        yield from _leased(lease, path, size, progress, chunk)
        return
    if size > READ_AHEAD_MIN and encode is None:
        yield from _hashed_beside(path, size, sha256, progress, chunk)
        return
    pieces: Iterator[tuple[bytes, int]] = (
        (encode(data) if encode else data, len(data)) for data in _read_verified(path, size, sha256, chunk))
    if size > READ_AHEAD_MIN:
        pieces = _read_ahead(pieces, READ_AHEAD_DEPTH)
    held: tuple[bytes, int] | None = None
    for piece in pieces:  # raises FileChanged after the last chunk, before it is released
        if held is not None:
            yield held[0]
            if progress:
                progress(held[1])
        held = piece
    if held is not None:
        yield held[0]
        if progress:
            progress(held[1])


def _hashed_beside(path: Path, size: int, sha256: str, progress: Progress | None, chunk: int) -> Iterator[bytes]:
    """:func:`verified_chunks` of a big file sent as it is (no encoding): read here, in the thread that sends,
    and hashed in a helper thread while the chunk before it is written to the socket.

    The helper does nothing but SHA-256 (hashlib releases the GIL), so the send phase's longest thread is the
    hash alone rather than read + hash (issue 27: the send of 1 GiB took 0.83-0.91 s against 0.93-1.00 s with
    a read-ahead thread reading and hashing, 4 rounds alternating). A chunk may be on the wire before its own
    hash is done: bytes are immutable, so the helper hashes exactly the bytes sent; the last chunk is still
    held back until every byte is hashed and the digest matches, so a changed file is never sent complete.
    Two chunks in memory at most: the one being sent and the one being hashed."""
    digest = hashlib.sha256()
    remaining = size
    with open(path, "rb", buffering=0) as fh, ThreadPoolExecutor(1, thread_name_prefix="smt-watch-send-hash") as pool:
        sequential(fh.fileno())
        hashing: Future[None] | None = None  # the last chunk read, being hashed
        held: bytes | None = None  # the chunk before it: sent while that one is hashed
        while remaining > 0:
            data = fh.read(min(chunk, remaining))
            if not data:
                raise _resized(path, grew=False)
            remaining -= len(data)
            hashed, hashing = hashing, pool.submit(digest.update, data)
            if held is not None:
                yield held
                if progress:
                    progress(len(held))
            if hashed is not None:
                hashed.result()
            held = data
        if fh.read(1):
            raise _resized(path, grew=True)
        if hashing is not None:
            hashing.result()
    if digest.hexdigest() != sha256:
        raise FileChanged(f"{path.name}: content changed since it was hashed")
    if held is not None:
        yield held
        if progress:
            progress(len(held))


def _leased(lease: ReadLease, path: Path, size: int, progress: Progress | None, chunk: int) -> Iterator[bytes]:
    """:func:`verified_chunks` of a file whose hash pass ran under ``lease``: exactly ``size`` bytes of the
    lease's descriptor, each chunk handed on only after the lease is seen intact AFTER it was read (so no
    writer could have opened the file before or while it was read), the last one too, after the check that
    the file did not grow. One pass at read speed instead of a second SHA-256 (issue 27: the send of 1 GiB was
    bounded by that hash, ~0.7 s). A lease broken after the caller saw it intact (the keeper has already given
    it up, so the writer is not kept waiting) aborts the request with :class:`FileChanged`: never sent complete."""
    fd = lease.fd
    offset = 0
    while offset < size:
        data = os.pread(fd, min(chunk, size - offset), offset)
        if not data:
            raise _resized(path, grew=False)
        offset += len(data)
        if offset == size and os.pread(fd, 1, offset):
            raise _resized(path, grew=True)
        lease.check(path.name)  # after the read: these bytes are the hashed ones
        yield data
        if progress:
            progress(len(data))


def verified_bytes(path: Path, size: int, sha256: str) -> bytes:
    """All ``size`` bytes of a small file in one piece, returned only when they hash to ``sha256``.

    For a body that fits in one chunk: one read, one buffer and one socket write instead of a generator
    chain holding the last chunk back (nothing is handed out before the check, so the guarantee is the same).
    """
    with open(path, "rb", buffering=0) as fh:
        data = fh.read(size + 1)  # one byte more: a file that grew is caught by the same read
        while len(data) < size + 1 and (more := fh.read(size + 1 - len(data))):
            data += more  # a short read (a network filesystem): keep reading until size + 1 or EOF
    if len(data) < size:
        raise _resized(path, grew=False)
    if len(data) > size:
        raise _resized(path, grew=True)
    if hashlib.sha256(data).hexdigest() != sha256:
        raise FileChanged(f"{path.name}: content changed since it was hashed")
    return data


def plain_chunks(path: Path, progress: Progress | None) -> Iterator[bytes]:
    """A private file of our own (already verified while it was written), in ``READ_CHUNK`` pieces."""
    with open(path, "rb") as fh:
        while data := fh.read(READ_CHUNK):
            yield data
            if progress:
                progress(len(data))


def b64_stream(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Base64 of the concatenated chunks, chunk by chunk (a remainder of 1–2 bytes carries over)."""
    carry = b""
    for data in chunks:
        data = carry + data
        cut = len(data) - len(data) % 3
        carry = data[cut:]
        if cut:
            yield base64.b64encode(data[:cut])
    if carry:
        yield base64.b64encode(carry)


def b64_len(n: int) -> int:
    """The length of the base64 text of ``n`` bytes."""
    return 4 * ((n + 2) // 3)
