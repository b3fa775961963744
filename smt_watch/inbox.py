"""What counts as a ready file in the inbox (SPEC §3). Mostly pure functions over paths and stat results.

A file is a candidate when its path relative to the inbox matches ``SMT_PATTERNS`` (case-insensitive), no
part is hidden, and its name is not a temporary one. It is ready when it is a regular file (symlinks are
refused: never read outside the inbox), no process has it open for writing, and its size/mtime have not
changed for ``SMT_SETTLE_SECONDS``.

"Open for writing" is asked of the kernel with a read lease (``F_SETLEASE``), which Linux refuses while
any process holds the file open for writing: an ``scp`` that pauses mid-file is never mistaken for a
finished one. Where leases are unavailable (not the owner, a filesystem without them) the quiet period
alone decides, and hashing/sending re-check size and content.
"""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import logging
import os
import stat as stat_mod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Final

log = logging.getLogger("smt_watch.inbox")

TEMP_SUFFIXES: Final = (".part", ".partial", ".tmp", ".filepart", ".crdownload")


@dataclass(frozen=True)
class Signature:
    """The stat fields that change when a file is written, replaced or moved."""

    size: int
    mtime_ns: int
    device: int
    inode: int

    @classmethod
    def of(cls, st: os.stat_result) -> Signature:
        return cls(st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino)


def matches(rel: PurePosixPath, patterns: tuple[str, ...]) -> bool:
    """Case-insensitive glob match: a pattern with ``/`` matches the whole relative path, else the name."""
    name = rel.name.lower()
    full = rel.as_posix().lower()
    return any(fnmatch.fnmatchcase(full if "/" in p else name, p.lower()) for p in patterns)


def is_temporary(name: str) -> bool:
    lowered = name.lower()
    return lowered.endswith(TEMP_SUFFIXES) or lowered.endswith("~")


def is_candidate(rel: PurePosixPath, patterns: tuple[str, ...]) -> bool:
    """SPEC §3 by name alone: matching, not hidden anywhere in the path, not a temporary name."""
    if not rel.parts or any(part.startswith(".") for part in rel.parts):
        return False
    return not is_temporary(rel.name) and matches(rel, patterns)


def relative(root: Path, path: Path) -> PurePosixPath | None:
    """``path`` relative to the inbox, or None when it is outside (never follow it there)."""
    try:
        return PurePosixPath(path.relative_to(root).as_posix())
    except ValueError:
        return None


def regular_stat(path: Path) -> os.stat_result | None:
    """lstat, or None when it is gone, not a regular file, or a symlink (with a warning for the latter)."""
    try:
        st = path.lstat()
    except OSError:
        return None
    if stat_mod.S_ISLNK(st.st_mode):
        log.warning("Refusing symlink %s: smt-watch never reads outside the inbox", path)
        return None
    return st if stat_mod.S_ISREG(st.st_mode) else None


def open_for_writing(path: Path) -> bool | None:
    """True when some process holds ``path`` open for writing; None when the kernel cannot tell us."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EBUSY):
            return True
        return None  # EACCES/EPERM (not our file), EINVAL (no lease support): unknown
    else:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return False
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Found:
    path: Path
    signature: Signature


def scan(root: Path, patterns: tuple[str, ...], start: Path | None = None) -> Iterator[Found]:
    """Every candidate under ``start`` (default: ``root``), with names judged relative to ``root``.

    Hidden directories are not entered and symlinks are not followed.
    """
    start = root if start is None else start
    rel_start = relative(root, start)
    if rel_start is None or any(part.startswith(".") for part in rel_start.parts):
        return
    stack = [start]
    while stack:
        directory = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError as exc:
            log.warning("Cannot scan %s: %s", directory, exc.strerror)
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                    continue
                path = Path(entry.path)
                rel = relative(root, path)
                if rel is None or not is_candidate(rel, patterns):
                    continue
                if entry.is_symlink():
                    log.warning("Refusing symlink %s: smt-watch never reads outside the inbox", path)
                    continue
                if entry.is_file(follow_symlinks=False):
                    yield Found(path, Signature.of(entry.stat(follow_symlinks=False)))
            except OSError:
                continue  # vanished while we looked


class Settler:
    """Holds candidates until their signature has been unchanged for ``settle`` seconds.

    Not thread-safe: the watch loop owns it. A file still open for writing is looked at again after
    ``max(settle, OPEN_RECHECK)``, so ``settle = 0`` never turns into a busy loop.
    """

    OPEN_RECHECK: Final = 0.25

    def __init__(self, settle: float) -> None:
        self.settle = settle
        self._waiting: dict[Path, tuple[Signature, float]] = {}  # path -> (signature, due time)

    def __len__(self) -> int:
        return len(self._waiting)

    def __contains__(self, path: object) -> bool:
        return path in self._waiting

    def add(self, path: Path, signature: Signature, now: float) -> None:
        known = self._waiting.get(path)
        if known is None or known[0] != signature:
            self._waiting[path] = (signature, now + self.settle)

    def discard(self, path: Path) -> None:
        self._waiting.pop(path, None)

    def next_due(self) -> float | None:
        return min((due for _, due in self._waiting.values()), default=None)

    def ready(self, now: float) -> list[tuple[Path, Signature]]:
        """Re-stat every due candidate; unchanged ones are ready, changed ones start their wait again."""
        out: list[tuple[Path, Signature]] = []
        for path, (signature, due) in list(self._waiting.items()):
            if due > now:
                continue
            st = regular_stat(path)
            if st is None:
                del self._waiting[path]
                continue
            current = Signature.of(st)
            if current != signature:
                self._waiting[path] = (current, now + self.settle)
            elif open_for_writing(path):
                self._waiting[path] = (current, now + max(self.settle, self.OPEN_RECHECK))
            else:
                del self._waiting[path]
                out.append((path, current))
        return out
