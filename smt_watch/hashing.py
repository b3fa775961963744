"""Content identity: the SHA-256 of a file, taken only while the file holds still."""

from __future__ import annotations

import hashlib
import os
import stat as stat_mod
from dataclasses import dataclass
from pathlib import Path

from smt_watch.errors import FileChanged, InputError

CHUNK = 1024 * 1024


@dataclass(frozen=True)
class FileIdentity:
    """What was hashed, and the stat fields that tell whether it has changed since."""

    path: Path
    sha256: str
    size: int
    mtime_ns: int
    device: int
    inode: int
    source: Path | None = None  # where the bytes are read from, when not ``path`` (an open descriptor)

    @property
    def mtime(self) -> float:
        return self.mtime_ns / 1e9

    @property
    def read_path(self) -> Path:
        return self.source or self.path


def _signature(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino)


def check_regular(path: Path) -> os.stat_result:
    """Refuse what we must not read: missing files, directories, symlinks (they may point outside)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from None
    if stat_mod.S_ISLNK(st.st_mode):
        raise InputError(f"{path}: is a symlink; refusing to follow it")
    if stat_mod.S_ISDIR(st.st_mode):
        raise InputError(f"{path}: is a directory")
    if not stat_mod.S_ISREG(st.st_mode):
        raise InputError(f"{path}: not a regular file")
    return st


def identify(path: Path, source: Path | None = None) -> FileIdentity:
    """Hash ``path``; raise :class:`FileChanged` if it changed while being read.

    ``source``: read the bytes there instead (``/proc/self/fd/N`` of a descriptor opened safely beneath the
    inbox): ``path`` then only names the file."""
    before = check_regular(path) if source is None else os.stat(source)
    digest = hashlib.sha256()
    try:
        with open(source or path, "rb", buffering=0) as fh:
            opened = os.fstat(fh.fileno())
            if _signature(opened) != _signature(before):
                raise FileChanged(f"{path}: changed while being hashed")
            buf = bytearray(CHUNK)
            view = memoryview(buf)
            while n := fh.readinto(buf):
                digest.update(view[:n])
            after = os.fstat(fh.fileno())
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from None
    if _signature(after) != _signature(before):
        raise FileChanged(f"{path}: changed while being hashed")
    return FileIdentity(
        source=source,
        path=path,
        sha256=digest.hexdigest(),
        size=before.st_size,
        mtime_ns=before.st_mtime_ns,
        device=before.st_dev,
        inode=before.st_ino,
    )
