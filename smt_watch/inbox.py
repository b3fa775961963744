"""The inbox: what counts as a ready file in it (docs/contract.md §3), how to reach a file in it without
leaving it, and creating it. Mostly pure functions over paths and stat results.

A file is a candidate when its path relative to the inbox matches ``SMT_PATTERNS`` (case-insensitive), no
part is hidden, and its name is not a temporary one. It is ready when it is a regular file (symlinks are
refused: never read outside the inbox), no process has it open for writing, and its size/mtime have not
changed for ``SMT_SETTLE_SECONDS``.

"Open for writing" is asked of the kernel with a read lease (``F_SETLEASE``), which Linux refuses while
any process holds the file open for writing: an ``scp`` that pauses mid-file is never mistaken for a
finished one. Where leases are unavailable (not the owner, a filesystem without them) the quiet period
alone decides, and hashing/sending re-check size and content.

Used by ``watch`` (the scan, the settle period, a worker's opening of a file), by ``serve`` and ``sync``
(the names they accept), and by both ``watch`` and ``serve`` to create the inbox (:func:`create_inbox`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import functools
import heapq
import logging
import os
import re
import stat as stat_mod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Final, NamedTuple

from smt_watch.errors import ConfigError
from smt_watch.hashing import Signature

log = logging.getLogger("smt_watch.inbox")

TEMP_SUFFIXES: Final = (".part", ".partial", ".tmp", ".filepart", ".crdownload")


def create_inbox(root: Path) -> None:
    """Create the inbox (``SMT_LOCAL_DIR``, mode 0750, with its parents) unless it exists already."""
    try:
        root.mkdir(mode=0o750, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"SMT_LOCAL_DIR {root} cannot be created: {exc.strerror}") from exc
    if not root.is_dir():
        raise ConfigError(f"SMT_LOCAL_DIR {root} is not a directory")


class Matcher:
    """``SMT_PATTERNS`` compiled once into two case-insensitive regexes: a pattern with ``/`` matches the
    whole relative path, any other the file name. Scans call this for every entry, so it stays cheap."""

    def __init__(self, patterns: tuple[str, ...]) -> None:
        def compile_(pats: list[str]) -> re.Pattern[str] | None:
            return re.compile("|".join(fnmatch.translate(p) for p in pats), re.IGNORECASE) if pats else None

        self._name = compile_([p for p in patterns if "/" not in p])
        self._path = compile_([p for p in patterns if "/" in p])

    def name_ok(self, name: str) -> bool:
        """Not hidden, not a temporary name, and matching by name (path patterns are checked later)."""
        if name.startswith(".") or is_temporary(name):
            return False
        return self._path is not None or (self._name is not None and self._name.match(name) is not None)

    def matches(self, rel: str, name: str) -> bool:
        return bool((self._name and self._name.match(name)) or (self._path and self._path.match(rel)))


@functools.lru_cache(maxsize=8)
def matcher(patterns: tuple[str, ...]) -> Matcher:
    return Matcher(patterns)


def matches(rel: PurePosixPath, patterns: tuple[str, ...]) -> bool:
    """Case-insensitive glob match: a pattern with ``/`` matches the whole relative path, else the name."""
    return matcher(patterns).matches(rel.as_posix(), rel.name)


def is_temporary(name: str) -> bool:
    lowered = name.lower()
    return lowered.endswith(TEMP_SUFFIXES) or lowered.endswith("~")


def is_candidate(rel: PurePosixPath, patterns: tuple[str, ...]) -> bool:
    """docs/contract.md §3 by name alone: matching, not hidden anywhere in the path, not a temporary name."""
    if not rel.parts or any(part.startswith(".") for part in rel.parts):
        return False
    return not is_temporary(rel.name) and matches(rel, patterns)


def is_candidate_name(name: str, patterns: tuple[str, ...]) -> bool:
    """:func:`is_candidate` for a file straight in the inbox (a relative path of one part, ``name``), on the
    string alone: the watch loop asks this for every event, and a path object per event costs more than
    the check itself."""
    return bool(name) and not name.startswith(".") and not is_temporary(name) and matcher(patterns).matches(
        name, name)


def _directories_below(root: Path, path: Path) -> tuple[str, ...] | None:
    """The directory names from ``root`` (exclusive) down to ``path``'s parent, or None when ``path`` is not
    below ``root``: :func:`relative`'s parts but the last, on the strings (a worker asks this twice per file,
    and a file straight in the inbox, the common case, has none)."""
    full, base = str(path), str(root)
    prefix = base if base.endswith("/") else base + "/"
    if full == base:
        return ()
    if not full.startswith(prefix):
        return None
    rest = full[len(prefix):]
    return () if "/" not in rest else PurePosixPath(rest).parts[:-1]


def relative(root: Path, path: Path) -> PurePosixPath | None:
    """``path`` relative to the inbox, or None when it is outside (never follow it there).

    Lexical, like ``Path.relative_to``, on the (already normalised) strings: the watch loop asks this for
    every event, and one string slice costs a fraction of two path constructions."""
    full, base = str(path), str(root)
    if full == base:
        return PurePosixPath()
    prefix = base if base.endswith("/") else base + "/"
    return PurePosixPath(full[len(prefix):]) if full.startswith(prefix) else None


def regular_stat(path: Path, root: Path | None = None) -> os.stat_result | None:
    """lstat, or None when it is gone, not a regular file, or a symlink (with a warning for the latter).

    ``root``: also refuse (with a warning) when a directory between ``root`` and the file is not a real
    directory any more (one swapped for a symlink after its file was seen would lead outside the inbox)."""
    if root is not None and not parents_are_real(root, path):
        log.warning("Refusing %s: a directory on its way from the inbox is a symlink now; smt-watch never "
                    "reads outside the inbox", path)
        return None
    try:
        st = path.lstat()
    except OSError:
        return None
    if stat_mod.S_ISLNK(st.st_mode):
        log.warning("Refusing symlink %s: smt-watch never reads outside the inbox", path)
        return None
    return st if stat_mod.S_ISREG(st.st_mode) else None


def parents_are_real(root: Path, path: Path) -> bool:
    """Every directory from ``root`` (exclusive) down to ``path``'s parent is a directory, not a symlink."""
    parts = _directories_below(root, path)
    if parts is None:
        return False
    current = root
    for part in parts:
        current = current / part
        try:
            if not stat_mod.S_ISDIR(current.lstat().st_mode):
                return False
        except OSError:
            return False
    return True


@contextlib.contextmanager
def parent_dir_fd(root: Path, path: Path) -> Iterator[int]:
    """A descriptor of ``path``'s directory, reached from ``root`` one component at a time without following
    a symlink anywhere (``O_NOFOLLOW | O_DIRECTORY``): what is done relative to it cannot land outside the
    inbox, whatever is swapped meanwhile. Raises OSError (ELOOP/ENOTDIR) when a component is not a real
    directory."""
    parts = _directories_below(root, path)
    if parts is None:
        raise OSError(errno.EXDEV, f"{path} is outside {root}")
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(root, flags & ~os.O_NOFOLLOW)  # the inbox itself may be a symlink the operator set
    try:
        for part in parts:
            child = os.open(part, flags, dir_fd=fd)
            os.close(fd)
            fd = child
        yield fd
    finally:
        os.close(fd)


def open_beneath(root: Path, path: Path) -> int:
    """A read-only descriptor of the regular file ``path``, opened relative to its directory reached from
    ``root`` without following a symlink on any component (the file itself included)."""
    with parent_dir_fd(root, path) as dir_fd:
        fd = os.open(path.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
    if not stat_mod.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, f"{path} is not a regular file")
    return fd


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
    path: str  # a string: a restart over 100,000 handled files never needs them as Path objects
    signature: Signature


def scan(root: Path, patterns: tuple[str, ...], start: Path | None = None) -> Iterator[Found]:
    """Every candidate under ``start`` (default: ``root``), with names judged relative to ``root``.

    Hidden directories are not entered and symlinks are not followed. Works on ``DirEntry`` strings and
    builds a ``Path`` only for candidates: a restart over 100,000 files is dominated by this loop.
    """
    start = root if start is None else start
    rel_start = relative(root, start)
    if rel_start is None or any(part.startswith(".") for part in rel_start.parts):
        return
    m = matcher(patterns)
    prefix = len(str(root)) + 1
    stack = [str(start)]
    while stack:
        directory = stack.pop()
        try:
            entries = os.scandir(directory)  # iterated, not listed: 100,000 entries need not sit in memory
        except OSError as exc:
            log.warning("Cannot scan %s: %s", directory, exc.strerror)
            continue
        with entries:
            yield from _candidates(entries, m, prefix, stack)


def _candidates(entries: Iterator[os.DirEntry[str]], m: Matcher, prefix: int, stack: list[str]
                ) -> Iterator[Found]:
    """The candidates among one directory's entries; subdirectories go onto ``stack``."""
    for entry in entries:
        name = entry.name
        if name.startswith("."):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
                continue
            if not m.name_ok(name) or not m.matches(entry.path[prefix:], name):
                continue
            if entry.is_symlink():
                log.warning("Refusing symlink %s: smt-watch never reads outside the inbox", entry.path)
                continue
            if entry.is_file(follow_symlinks=False):
                yield Found(entry.path, Signature.of(entry.stat(follow_symlinks=False)))
        except OSError:
            continue  # vanished while we looked


class _Waiting(NamedTuple):
    signature: Signature
    due: float  # monotonic time the signature will have held still for ``settle`` seconds


class Settler:
    """Holds candidates until their signature has been unchanged for ``settle`` seconds.

    Not thread-safe: the watch loop owns it. Due times live in a heap, so the loop only looks at files that
    are due, and ``ready(limit=…)`` looks at no more of them than the work queue can take: a backlog of
    100,000 files costs nothing per pass. A file still open for writing is looked at again after
    ``max(settle, OPEN_RECHECK)``, so ``settle = 0`` never turns into a busy loop.
    """

    OPEN_RECHECK: Final = 0.25

    def __init__(self, settle: float) -> None:
        self.settle = settle
        self._waiting: dict[Path, _Waiting] = {}
        self._heap: list[tuple[float, int, Path]] = []
        self._seq = 0

    def __len__(self) -> int:
        return len(self._waiting)

    def __contains__(self, path: object) -> bool:
        return path in self._waiting

    def _schedule(self, path: Path, signature: Signature, due: float) -> None:
        self._waiting[path] = _Waiting(signature, due)
        self._seq += 1
        heapq.heappush(self._heap, (due, self._seq, path))

    def add(self, path: Path, signature: Signature, now: float) -> None:
        known = self._waiting.get(path)
        if known is None or known.signature != signature:
            self._schedule(path, signature, now + self.settle)

    def discard(self, path: Path) -> None:
        self._waiting.pop(path, None)  # its heap entry becomes stale and is skipped

    def _top(self) -> tuple[float, Path] | None:
        while self._heap:
            due, _, path = self._heap[0]
            current = self._waiting.get(path)
            if current is not None and current.due == due:
                return due, path
            heapq.heappop(self._heap)  # stale: discarded or rescheduled since
        return None

    def next_due(self) -> float | None:
        top = self._top()
        return top[0] if top else None

    def ready(self, now: float, limit: int | None = None) -> list[tuple[Path, Signature]]:
        """Re-stat due candidates (at most ``limit`` become ready); changed ones start their wait again."""
        out: list[tuple[Path, Signature]] = []
        while limit is None or len(out) < limit:
            top = self._top()
            if top is None or top[0] > now:
                break
            heapq.heappop(self._heap)
            path = top[1]
            signature = self._waiting.pop(path).signature
            if not self.settle:
                # No quiet period to confirm: the worker compares the signature again before it reads a byte
                # (a file changed meanwhile comes back to settle) and the lease probe below still asks the
                # kernel for writers, so a second lstat here would only cost time (a drain's every file).
                current = signature
            else:
                st = regular_stat(path)
                if st is None:
                    continue
                current = Signature.of(st)
            if current != signature:
                self._schedule(path, current, now + self.settle)
            elif open_for_writing(path):
                self._schedule(path, current, now + max(self.settle, self.OPEN_RECHECK))
            else:
                out.append((path, current))
        return out
