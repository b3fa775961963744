"""A file's identity: its stat :class:`Signature`, and the SHA-256 of its bytes taken only while it holds still.

:class:`Signature` is the one shape of a file's stat identity: the settle period, the stat cache in the
ledger, the worker's re-checks and the after-send check all compare it whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat as stat_mod
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from smt_watch.errors import FileChanged, InputError

if TYPE_CHECKING:  # only annotations here: a process that never leases need not load readlease
    from smt_watch.readlease import ReadLease

CHUNK = 1024 * 1024
OVERLAP_MIN = 16 * CHUNK  # below this a helper thread costs more than it saves
OVERLAP_CHUNK = CHUNK  # blocks handed between the two threads: 1 MiB keeps the transient peak low (issue 27)
# A file up to this size is read ONCE by a watch worker and its bytes kept (:func:`identify_held`): the hash,
# the CSV check and the request body all use them. Memory stays bounded: GROUP_MAX files a worker at most.
HOLD_MAX = 256 * 1024


@dataclass(frozen=True, slots=True)  # slots: a scan makes one per file, 100,000 of them on a restart
class Signature:
    """The stat fields that change when a file is written, replaced or moved: equal signatures mean the
    same file with the same bytes, as far as ``stat`` can tell."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Signature:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class FileIdentity:
    """What was hashed, and the signature that tells whether it has changed since."""

    path: Path
    sha256: str
    signature: Signature
    source: Path | None = None  # where the bytes are read from, when not ``path`` (an open descriptor)
    # The very bytes that hashed to ``sha256``, when they were kept (a small file: :func:`identify_held`); a
    # sink sends these, so what is sent is what was hashed by construction, with no second read or hash.
    data: bytes | None = field(default=None, repr=False, compare=False)
    # The read lease taken before the hash pass (a big file ``post`` sends: :mod:`smt_watch.readlease`): while
    # it holds, the bytes of its descriptor are the bytes hashed, and the send need not hash them again.
    lease: ReadLease | None = field(default=None, repr=False, compare=False)

    @property
    def size(self) -> int:
        return self.signature.size

    @property
    def mtime_ns(self) -> int:
        return self.signature.mtime_ns

    @property
    def mtime(self) -> float:
        return self.mtime_ns / 1e9

    @property
    def read_path(self) -> Path:
        return self.source or self.path

    def without_data(self) -> FileIdentity:
        """The same identity without the kept bytes or the lease (what outlives the delivery: results, logs)."""
        if self.data is None and self.lease is None:
            return self
        return FileIdentity(self.path, self.sha256, self.signature, self.source)

    def close(self) -> None:
        """Give up the read lease, if any, once the delivery is over (a writer no longer waits on us)."""
        if self.lease is not None:
            self.lease.close()


def check_regular(path: Path) -> os.stat_result:
    """Refuse what we must not read: missing files, directories, symlinks (they may point outside)."""
    try:
        st = path.lstat()
    except FileNotFoundError as exc:
        raise InputError(f"{path}: no such file") from exc
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from exc
    if stat_mod.S_ISLNK(st.st_mode):
        raise InputError(f"{path}: is a symlink; refusing to follow it")
    if stat_mod.S_ISDIR(st.st_mode):
        raise InputError(f"{path}: is a directory")
    if not stat_mod.S_ISREG(st.st_mode):
        raise InputError(f"{path}: not a regular file")
    return st


def identify(path: Path, source: Path | None = None, observe: Callable[[bytes], None] | None = None,
             fd: int | None = None, read_size: int = OVERLAP_CHUNK, lease: ReadLease | None = None) -> FileIdentity:
    """Hash ``path``; raise :class:`FileChanged` if it changed while being read.

    ``source``: read the bytes there instead (``/proc/self/fd/N`` of a descriptor opened safely beneath the
    inbox): ``path`` then only names the file. ``observe``: also hand every block to it (the CSV sniffer), so
    the file is read once for both; for a big file the hash runs in a second thread meanwhile (hashlib
    releases the GIL), so the pass takes about as long as the slower of the two, not their sum. ``fd``: that
    open descriptor itself (``source`` is its ``/proc/self/fd/N``), read from its start without opening it
    again: a watch worker saves a stat, an open and a close per file (procfs look-ups are not cheap).
    ``read_size``: the read size for a file of :data:`OVERLAP_MIN` or more (``post``'s first pass takes 2 MiB: it runs
    beside start-up's Python, and each block costs it a wait for the GIL). ``lease``: a read lease on ``path``
    taken before this pass (:func:`smt_watch.readlease.hold`): its descriptor is hashed, the identity carries
    it, and a lease broken by the end of the pass is :class:`FileChanged`; on any error it is given up here."""
    if lease is not None:
        try:
            ident = identify(path, source, observe, lease.fd, read_size)
            lease.check(str(path), "while being hashed")  # a writer opened it during the pass: maybe torn
        except BaseException:
            lease.close()
            raise
        return FileIdentity(ident.path, ident.sha256, ident.signature, ident.source, lease=lease)
    if fd is not None:
        st = os.fstat(fd)
        os.lseek(fd, 0, os.SEEK_SET)
    else:
        st = check_regular(path) if source is None else os.stat(source)
    before = Signature.of(st)
    digest = hashlib.sha256()
    hashed = 0  # bytes hashed: a read that ended early (EAGAIN, a short file) must not pass as the whole file
    try:
        with open(fd, "rb", buffering=0, closefd=False) if fd is not None else open(source or path, "rb",
                                                                                     buffering=0) as fh:
            opened = os.fstat(fh.fileno())
            if Signature.of(opened) != before:
                raise FileChanged(f"{path}: changed while being hashed")
            if before.size >= OVERLAP_MIN and hasattr(os, "posix_fadvise"):  # read front to back, once
                with contextlib.suppress(OSError):  # only a hint
                    os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            if observe is None:
                buf = bytearray(CHUNK if before.size < OVERLAP_MIN else read_size)
                view = memoryview(buf)
                while n := fh.readinto(buf):
                    digest.update(view[:n])
                    hashed += n
            elif before.size < OVERLAP_MIN:
                # reads sized to the file: a 20 KB file must not cost a 1 MiB buffer (an mmap) per read
                size = min(CHUNK, before.size + 1)
                while block := fh.read(size):
                    digest.update(block)
                    hashed += len(block)
                    observe(block)
            else:
                hashed = _hash_beside(fh, digest, observe, read_size)
            after = os.fstat(fh.fileno())
    except PermissionError as exc:
        raise InputError(f"{path}: permission denied") from exc
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from exc
    if Signature.of(after) != before or hashed != before.size:
        raise FileChanged(f"{path}: changed while being hashed")
    return FileIdentity(path, digest.hexdigest(), before, source)


def identify_held(path: Path, fd: int, before: Signature, source: Path | None = None,
                  observe: Callable[[bytes], None] | None = None) -> FileIdentity:
    """A small file (``before.size`` ≤ :data:`HOLD_MAX`) read ONCE through its open descriptor ``fd`` (whose
    signature, taken by the caller from ``fstat(fd)``, is ``before``): hashed, handed to ``observe`` (the CSV
    sniffer) and kept in the identity (``data``) for the request body. One ``pread`` of one byte more than
    the size catches a file that grew; a short read or a signature that moved while reading is
    :class:`FileChanged`, as in :func:`identify`."""
    want = before.size + 1
    try:
        data = os.pread(fd, want, 0)
        while len(data) < want and (more := os.pread(fd, want - len(data), len(data))):
            data += more  # a short read (a network filesystem): keep reading until size + 1 or EOF
        after = os.fstat(fd)
    except PermissionError as exc:
        raise InputError(f"{path}: permission denied") from exc
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from exc
    if len(data) != before.size or Signature.of(after) != before:
        raise FileChanged(f"{path}: changed while being hashed")
    if observe is not None:
        observe(data)
    return FileIdentity(path, hashlib.sha256(data).hexdigest(), before, source, data)


def _hash_beside(fh: BinaryIO, digest: hashlib._Hash, observe: Callable[[bytes], None],
                 block_size: int = OVERLAP_CHUNK) -> int:
    """Each block hashed in a helper thread while ``observe`` reads it here, and the next block is read here
    meanwhile: the pass takes about as long as the hash alone (hashlib and file reads release the GIL), with
    at most two blocks in flight. The helper's one worker takes blocks in order, so the digest is the file's.
    Returns the number of bytes hashed."""
    hashed = 0
    with ThreadPoolExecutor(1, thread_name_prefix="smt-watch-hash") as pool:
        pending: Future[None] | None = None  # the previous block's hash, still running
        try:
            while block := fh.read(block_size):
                submitted = pool.submit(digest.update, block)
                hashed += len(block)
                observe(block)
                if pending is not None:
                    pending.result()
                pending = submitted
        finally:
            if pending is not None:
                pending.result()  # never leave the helper updating the digest after we return or raise
    return hashed
