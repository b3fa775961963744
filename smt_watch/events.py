"""The inbox's event source: a watchdog observer that reports paths worth a look to ``watch``'s main loop.

inotify reports ``IN_CLOSE_WRITE`` (``FileClosedEvent``: a writer finished) and renames into place
(``FileMovedEvent``: no close event follows a rename). A rename from *outside* the inbox has no matching
source, and watchdog reports it as ``FileCreatedEvent``, so creations are taken too: a file still being
written is held back by the open-for-writing check and the settle period. New directories are reported so
the loop can scan them: files may land in a directory before its watch exists. The kernel filters to these events
(``event_filter``), so a busy inbox costs little.

If inotify cannot start (``ENOSPC``: the ``fs.inotify.max_user_watches`` limit; ``EMFILE``: the
``max_user_instances`` limit) we log one line saying so and fall back to polling, where there are no close
events and the settle period alone decides readiness. After an inotify queue overflow (events were lost)
``on_overflow`` is called so the loop rescans at once; the periodic rescan is the backstop. The overflow is
watchdog's own event, ``EventsLostEvent`` (watchdog >= 7.1.1, pinned in pyproject.toml): its inotify
observer queues one for each watch once it has rebuilt its watches, and a watch scheduled with an
``event_filter`` gets it only if the filter lists it, so every filter here does. Older watchdogs only logged a
warning (6.x not even that): ``import`` fails on them rather than lose overflows without a word.

An inbox that is itself a symlink (``SMT_LOCAL_DIR`` → the real directory): watchdog watches a symlink
itself, not its target (``IN_DONT_FOLLOW``), so a file landing at the top of the inbox would wait for the
rescan. The observer is given the resolved directory instead, and every event path is translated back to
the inbox as configured, so what ``watch`` reads is still reached through ``SMT_LOCAL_DIR`` and held to its
boundary checks (a path that is not below the watched directory is dropped). The directory holding the
symlink is watched too (for that one name): when the symlink is swapped to point elsewhere, the observer
moves to the new target, whose files are then scanned, and events from the old one are dropped.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    EventsLostEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver, ObservedWatch
from watchdog.observers.polling import PollingObserver

log = logging.getLogger("smt_watch.watcher")  # the module's former name: log filters in the field use it

INOTIFY_EVENTS: list[type[FileSystemEvent]] = [
    FileClosedEvent, FileMovedEvent, FileCreatedEvent, DirCreatedEvent, DirMovedEvent, EventsLostEvent,
]
ROOT_LINK_EVENTS: list[type[FileSystemEvent]] = [  # a symlink replaced: created, or renamed over the old one
    FileCreatedEvent, FileMovedEvent, FileDeletedEvent, DirCreatedEvent, DirMovedEvent, DirDeletedEvent,
    EventsLostEvent,
]
POLLING_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent, FileModifiedEvent, FileMovedEvent, DirCreatedEvent, DirMovedEvent,
]


def _inotify_observer() -> BaseObserver:
    """watchdog's inotify observer, its emitters' move grouping indexed by cookie (:func:`_index_moves`)."""
    from watchdog.observers.inotify import InotifyEmitter, InotifyObserver
    from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper, PathedInotifyEvent

    class IndexedGrouper(InotifyMoveEventGrouper):
        """watchdog's grouper, told which cookies have an ``IN_MOVED_FROM`` queued, so an ``IN_MOVED_TO``
        without one (a file renamed into the inbox from outside it: how most files land) does not scan the
        whole queue twice. watchdog's scans are linear in the events queued: a burst of N renames cost N²
        predicate calls (a 3,000-file drain spent ~10 % of the watcher's GIL time in them). A cookie known
        here is only a hint: the scan still decides, so a stale one costs a scan, never a lost pairing."""

        def __init__(self, queued: InotifyMoveEventGrouper) -> None:
            super().__init__()
            self._queue = queued._queue  # the events read before this grouper took over stay where they are
            self._from: dict[int, int] = {}  # cookie → IN_MOVED_FROM events with it put and not yet taken
            for item in list(self._queue._queue):
                if isinstance(item[0], PathedInotifyEvent) and item[0].ev.is_moved_from:
                    self._count(item[0].ev.cookie, 1)

        def _count(self, cookie: int, step: int) -> None:
            n = self._from.get(cookie, 0) + step
            if n > 0:
                self._from[cookie] = n
            else:
                self._from.pop(cookie, None)

        def put_event(self, event: PathedInotifyEvent) -> None:
            if event.ev.is_moved_from:
                self._count(event.ev.cookie, 1)  # before it is queued: never queued and unknown here
            super().put_event(event)

        def _group_moved_to_event(self, to_event: PathedInotifyEvent) -> Any:
            cookie = to_event.ev.cookie
            if cookie not in self._from:
                return to_event
            grouped = super()._group_moved_to_event(to_event)
            if grouped is not to_event:
                self._count(cookie, -1)
            return grouped

        def get_queued_moved_from_event(self, cookie: int) -> PathedInotifyEvent | None:
            return super().get_queued_moved_from_event(cookie) if cookie in self._from else None

        def read_event(self) -> Any:
            event = super().read_event()
            if isinstance(event, PathedInotifyEvent) and event.ev.is_moved_from:
                self._count(event.ev.cookie, -1)  # its delay passed unpaired (moved out of the inbox)
            return event

    class Emitter(InotifyEmitter):
        def on_thread_start(self) -> None:
            super().on_thread_start()
            _index_moves(self._inotify, IndexedGrouper)

    observer = InotifyObserver()
    if hasattr(observer, "_emitter_class"):
        observer._emitter_class = Emitter
    return observer


def _index_moves(group: Any, grouper: Callable[[Any], Any]) -> None:
    """Give an inotify watch group the cookie-indexed grouper, taking over its queue under the group's lock
    (the reader thread puts events only under it). A watchdog whose internals differ keeps its own."""
    lock, current = getattr(group, "_lock", None), getattr(group, "_move_event_grouper", None)
    if lock is None or current is None or not hasattr(getattr(current, "_queue", None), "_queue"):
        return
    with lock:
        group._move_event_grouper = grouper(group._move_event_grouper)


def _text(path: bytes | str) -> str:
    return path.decode("utf-8", "surrogateescape") if isinstance(path, bytes) else path


class _Handler(FileSystemEventHandler):
    def __init__(self, on_file: Callable[[Path], None], on_dir: Callable[[Path], None],
                 translate: Callable[[Path], Path | None], on_lost: Callable[[], None] | None) -> None:
        self.on_file = on_file
        self.on_dir = on_dir
        self.translate = translate
        self.on_lost = on_lost

    def on_any_event(self, event: FileSystemEvent) -> None:
        if isinstance(event, EventsLostEvent):  # its path is the watch's, not a file's
            if self.on_lost is not None:
                self.on_lost()
            return
        if isinstance(event, (FileMovedEvent, DirMovedEvent)):
            seen = Path(_text(event.dest_path))
        else:
            seen = Path(_text(event.src_path))
        target = self.translate(seen)
        if target is None:
            return  # not below the directory watched now (an event of a target the root no longer names)
        if event.is_directory:
            if isinstance(event, (DirCreatedEvent, DirMovedEvent)):
                self.on_dir(target)
        else:
            self.on_file(target)


class _RootLinkHandler(FileSystemEventHandler):
    """Events in the directory that holds a symlinked inbox root: a change of that one name re-targets."""

    def __init__(self, name: str, changed: Callable[[], None]) -> None:
        self.name = name
        self.changed = changed

    def on_any_event(self, event: FileSystemEvent) -> None:
        if isinstance(event, EventsLostEvent):  # a swap of the symlink may be among what was lost
            self.changed()
            return
        names = {os.path.basename(_text(event.src_path)), os.path.basename(_text(getattr(event, "dest_path", "")))}
        if self.name in names:
            self.changed()


class InboxWatcher:
    """Owns the observer; ``start()`` returns the backend it got: ``inotify`` or ``polling``."""

    def __init__(
        self,
        root: Path,
        on_file: Callable[[Path], None],
        on_dir: Callable[[Path], None],
        *,
        on_overflow: Callable[[], None] | None = None,
        polling: bool = False,
        poll_interval: float = 1.0,
    ) -> None:
        self.root = root
        self.real = Path(os.path.realpath(root))  # the directory the observer watches
        self._watching(self.real)
        self._on_dir = on_dir
        self._handler = _Handler(on_file, on_dir, self._translate, on_overflow)
        self._polling = polling
        self._poll_interval = poll_interval
        self._observer: BaseObserver | None = None
        self._watch: ObservedWatch | None = None
        self._filter = INOTIFY_EVENTS
        self._retarget_lock = threading.Lock()
        self.backend = ""

    def _watching(self, real: Path) -> None:
        """What :meth:`_translate` compares event paths with, for the directory the observer watches now."""
        self._real_text = str(real)
        self._real_prefix = self._real_text.rstrip("/") + "/"
        self._direct = real == self.root

    def _translate(self, seen: Path) -> Path | None:
        """An event's path (below the resolved directory) as the same path below the configured root."""
        real = self.real
        if self._direct:  # the inbox is not a symlink: a lexical check, no new path (every event comes here)
            text = str(seen)
            return seen if text == self._real_text or text.startswith(self._real_prefix) else None
        if seen == real:
            return self.root
        try:
            return self.root / seen.relative_to(real)
        except ValueError:
            return None

    def _schedule(self, observer: BaseObserver, events: list[type[FileSystemEvent]]) -> None:
        self._filter = events
        self._watch = observer.schedule(self._handler, str(self.real), recursive=True, event_filter=events)
        if self.root.is_symlink():
            parent = os.path.realpath(self.root.parent)
            try:
                observer.schedule(_RootLinkHandler(self.root.name, self._retarget), parent, recursive=False,
                                  event_filter=ROOT_LINK_EVENTS)
            except OSError as exc:  # the inbox itself is watched; only a swap of its symlink goes unseen
                log.warning("Cannot watch %s for a change of the inbox symlink %s (%s); if it is swapped, files "
                            "in its new target wait for the periodic rescan", parent, self.root, exc.strerror or exc)

    def _retarget(self) -> None:
        """The root symlink changed: watch what it names now, and have the loop scan it."""
        with self._retarget_lock:
            real = Path(os.path.realpath(self.root))
            observer = self._observer
            if real == self.real or observer is None or not real.is_dir():
                return
            log.warning("SMT_LOCAL_DIR %s now leads to %s (was %s): watching it", self.root, real, self.real)
            if self._watch is not None:
                with contextlib.suppress(KeyError, OSError):  # the old target is gone: its watch went with it
                    observer.unschedule(self._watch)
            self.real = real
            self._watching(real)
            self._watch = observer.schedule(self._handler, str(real), recursive=True, event_filter=self._filter)
        self._on_dir(self.root)

    def start(self) -> str:
        if not self._polling:
            try:
                observer: BaseObserver = _inotify_observer()
                self._schedule(observer, INOTIFY_EVENTS)
                observer.start()
                self._observer, self.backend = observer, "inotify"
                return self.backend
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    log.error(
                        "inotify watch limit reached (raise fs.inotify.max_user_watches, e.g. "
                        "sysctl fs.inotify.max_user_watches=524288); falling back to polling"
                    )
                elif exc.errno == errno.EMFILE:
                    log.error(
                        "inotify instance limit reached (raise fs.inotify.max_user_instances; "
                        "fs.inotify.max_user_watches may also need raising); falling back to polling"
                    )
                else:
                    log.error("inotify unavailable (%s); falling back to polling", exc)
            except ImportError:
                log.warning("inotify is not available on this system; polling the inbox")
        observer = PollingObserver(timeout=self._poll_interval)
        self._schedule(observer, POLLING_EVENTS)
        observer.start()
        self._observer, self.backend = observer, "polling"
        return self.backend

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None
