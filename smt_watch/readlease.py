"""A kernel read lease held on a big file from before its hash pass to the end of its send: the proof, in place
of a second SHA-256 while sending, that the bytes sent are the bytes hashed (issue 27).

Linux grants ``F_SETLEASE F_RDLCK`` only while no process has the file open for writing, and any later open
for writing or truncate of that inode (by any path or hard link, root included) must first break it: the
opener blocks (up to /proc/sys/fs/lease-break-time, 45 s by default) or gets EWOULDBLOCK, and ``F_GETLEASE``
on our descriptor stops answering ``F_RDLCK``. A lease still held after a read therefore proves that no one
could have written the file since the lease was taken, before the hash pass began: the bytes just read are
bytes the hash covered. We never take a broken lease again, so one look after each read is enough.

Two things make holding one safe for others:

- :class:`_Keeper`, one daemon thread per process while any lease is held, looks at each lease every
  :data:`POLL_SECONDS` and gives up a broken one at once, so a writer waits a few tens of milliseconds, not
  the lease-break time, even while our send is blocked on a slow receiver or the ledger.
- A lease break signals the holder, by default with SIGIO, whose default action ends the process. :func:`hold`
  sets the descriptor's break signal (``F_SETSIG``) to :data:`BREAK_SIGNAL`, SIGURG, whose default action is
  to ignore it, before it takes the lease: per descriptor, from any thread (post's first hash pass takes its
  lease in a helper thread, where Python cannot change a signal's handler), and nothing process-wide changes.
  If this process handles SIGURG itself, no lease is taken.

Where a lease cannot be had (the file is open for writing now, it is not ours and we lack CAP_LEASE, the
filesystem has no leases: some network filesystems), :func:`hold` answers None and nothing changes. Nor is
one taken on a filesystem outside :data:`LOCAL_FILESYSTEMS` (ext2/3/4, xfs, btrfs, tmpfs, f2fs): FUSE-type
filesystems (virtiofs, sshfs, rclone, s3fs, gcsfuse, glusterfs, ...) and network ones may be granted the
kernel's generic lease, which a write from the host or another client never breaks, so it would prove
nothing; there the send re-hashes what it sends, as before.

A lease held is a writer's wait only while this process runs: a post that is stopped (SIGSTOP, Ctrl-Z)
cannot give up a broken lease, and a writer then waits the full lease-break time. The lease is therefore
held only as long as needed: from the hash pass to the end of a multipart send (the one sink that reads from
it), given up at once for any other sink and as soon as the ledger answers that the bytes are busy.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import stat as stat_mod
import threading
import weakref
from pathlib import Path
from typing import Final

from smt_watch.errors import FileChanged

BREAK_SIGNAL: Final = signal.SIGURG  # default action: ignore (signal(7)); nothing here uses TCP urgent data
POLL_SECONDS: Final = 0.02  # how long a writer can wait on us for a broken lease (plus a GIL hand-over)
LEASE_MIN: Final = 16 * 1024 * 1024  # smaller files are re-hashed as they are sent: a few ms, no thread
# statfs f_type of the filesystems whose leases every writer breaks (linux/magic.h): local ones only.
LOCAL_FILESYSTEMS: Final = frozenset({
    0xEF53,  # EXT2/3/4_SUPER_MAGIC
    0x58465342,  # XFS_SUPER_MAGIC
    0x9123683E,  # BTRFS_SUPER_MAGIC
    0x01021994,  # TMPFS_MAGIC
    0xF2F52010,  # F2FS_SUPER_MAGIC
})


class ReadLease:
    """A read-only descriptor of one file and the read lease on it. ``fd`` is read with ``pread`` (no shared
    offset); whoever holds the lease closes it (:meth:`close`) when the delivery ends, or, failing that, the
    garbage collector does once nothing refers to it any more (no thread can be reading it then: a reader
    holds a reference). Thread-safe: the keeper looks at it while the sender reads it.

    A forked child shares the descriptor's open file description, and with it the lease: in any process but
    the one that took it, the lease is never intact, never unlocked (that would remove the parent's), and
    closing only closes the child's descriptor, without the lock (it may have been held at the fork)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._pid = os.getpid()
        self._lock = threading.Lock()

    @property
    def fd(self) -> int:
        return self._fd

    def intact(self) -> bool:
        """True while the lease has never been broken (nor given up): the file is as it was when it was taken."""
        if self._pid != os.getpid():
            return False
        with self._lock:
            if self._fd < 0:
                return False
            try:
                return fcntl.fcntl(self._fd, fcntl.F_GETLEASE) == fcntl.F_RDLCK
            except OSError:
                return False

    def check(self, name: str, when: str = "since it was hashed") -> None:
        """Raise :class:`FileChanged` unless the lease is intact."""
        if not self.intact():
            raise FileChanged(f"{name}: opened for writing {when}")

    def drop(self) -> None:
        """Give the lease up (a writer waiting on it proceeds); the descriptor stays open for its owner."""
        if self._pid != os.getpid():
            return
        with self._lock:
            if self._fd >= 0:
                _unlock(self._fd)

    def close(self) -> None:
        """Give the lease up and close the descriptor (idempotent). Only once no thread reads ``fd`` any more:
        a closed number can be reused by the next open."""
        _keeper.forget(self)
        self._close()

    def __del__(self) -> None:  # an identity dropped without close() (an embedding caller): no fd, no lease left
        try:
            self._close()
        except Exception:  # at interpreter exit modules may be gone; the exit gives the lease up anyway
            return

    def _close(self) -> None:
        if self._pid != os.getpid():  # a forked child: the lease is the parent's (class docstring)
            fd, self._fd = self._fd, -1
            if fd >= 0:
                os.close(fd)
            return
        with self._lock:
            fd, self._fd = self._fd, -1
            if fd >= 0:
                _unlock(fd)
                os.close(fd)


def _unlock(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)


def hold(path: Path, min_size: int = LEASE_MIN) -> ReadLease | None:
    """Open ``path`` read-only and take a read lease on it, or None: the file is smaller than ``min_size``,
    not a plain regular file (a symlink is not followed), cannot be opened (the hash pass then says why, as
    before), is not on a local filesystem (:data:`LOCAL_FILESYSTEMS`), or the lease cannot be had (see the
    module's docstring). Call it before the hash pass starts, and hash the lease's descriptor."""
    if signal.getsignal(BREAK_SIGNAL) not in (signal.SIG_DFL, signal.SIG_IGN):
        return None  # someone handles SIGURG: a lease break must not call their handler
    try:  # before any open: a FIFO's blocked writer must not be released, nor a tty become ours
        st = os.lstat(path)
    except OSError:
        return None
    if not stat_mod.S_ISREG(st.st_mode) or st.st_size < min_size:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)  # what was opened (the path may have been replaced since the lstat)
        if not stat_mod.S_ISREG(st.st_mode) or st.st_size < min_size or _fs_type(fd) not in LOCAL_FILESYSTEMS:
            os.close(fd)
            return None
        # Blocking reads from here: a read answering EAGAIN would end a hash loop early (a prefix hashed).
        os.set_blocking(fd, True)
        fcntl.fcntl(fd, fcntl.F_SETSIG, BREAK_SIGNAL)  # before the lease: a break never sends SIGIO
        _set_lease(fd)
    except OSError:  # EAGAIN: open for writing now; EACCES/EPERM: not ours; EINVAL/ENOLCK: no leases here
        os.close(fd)
        return None
    lease = ReadLease(fd)
    _keeper.watch(lease)
    return lease


def _fs_type(fd: int) -> int | None:
    """The ``f_type`` of ``fstatfs(fd)`` (a magic number of linux/magic.h), or None if it cannot be had (a
    seam: tests give another filesystem's type here). ``os.fstatvfs`` does not report it, hence ctypes,
    imported only here: for a file big enough to lease, never on start-up's path. ``f_type`` is the first
    field of ``struct statfs``, a ``long`` on the architectures we run on; on one where it is not, the value
    read matches no local filesystem and no lease is taken (safe: the send re-hashes)."""
    import ctypes

    from smt_watch.clib import libc

    fstatfs = getattr(libc(), "fstatfs", None)
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on x86-64 and aarch64
    if fstatfs is None or fstatfs(fd, buf) != 0:
        return None
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def _set_lease(fd: int) -> None:
    """The one ``F_SETLEASE F_RDLCK`` (a seam: tests make leases unavailable here)."""
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)


class _Keeper:
    """The thread that gives up broken leases at once (module docstring); it runs while any lease is held."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: weakref.WeakSet[ReadLease] = weakref.WeakSet()  # a lease nobody holds is collected, closed
        self._thread: threading.Thread | None = None

    def watch(self, lease: ReadLease) -> None:
        global _at_fork
        if not _at_fork:  # registered on first use: a process that never leases registers nothing
            _at_fork = True
            os.register_at_fork(after_in_child=_after_fork)
        with self._lock:
            self._held.add(lease)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="smt-watch-lease", daemon=True)
                self._thread.start()

    def forget(self, lease: ReadLease) -> None:
        with self._lock:
            self._held.discard(lease)

    def _run(self) -> None:
        idle = threading.Event()  # never set: a wait with a timeout, the poll period
        while True:
            with self._lock:
                leases = list(self._held)
                if not leases:
                    self._thread = None  # under the lock: the next watch() starts a new thread
                    return
            for lease in leases:
                if not lease.intact():
                    lease.drop()
                    self.forget(lease)
            del leases, lease  # no strong reference while waiting (nor a collection under our lock)
            idle.wait(POLL_SECONDS)

    def _after_fork(self) -> None:
        """A forked child has no keeper thread: it starts one of its own when it takes a lease."""
        self._lock = threading.Lock()
        self._held = weakref.WeakSet()
        self._thread = None


_keeper = _Keeper()
_at_fork = False  # the at-fork hook registered (on the keeper's first use)


def _after_fork() -> None:
    _keeper._after_fork()
