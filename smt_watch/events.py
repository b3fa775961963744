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
``on_overflow`` is called so the loop rescans at once; the periodic rescan is the backstop.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

log = logging.getLogger("smt_watch.watcher")  # the module's former name: log filters in the field use it

INOTIFY_EVENTS: list[type[FileSystemEvent]] = [
    FileClosedEvent, FileMovedEvent, FileCreatedEvent, DirCreatedEvent, DirMovedEvent,
]
POLLING_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent, FileModifiedEvent, FileMovedEvent, DirCreatedEvent, DirMovedEvent,
]


def _text(path: bytes | str) -> str:
    return path.decode("utf-8", "surrogateescape") if isinstance(path, bytes) else path


class _Handler(FileSystemEventHandler):
    def __init__(self, on_file: Callable[[Path], None], on_dir: Callable[[Path], None]) -> None:
        self.on_file = on_file
        self.on_dir = on_dir

    def on_any_event(self, event: FileSystemEvent) -> None:
        if isinstance(event, (FileMovedEvent, DirMovedEvent)):
            target = Path(_text(event.dest_path))
        else:
            target = Path(_text(event.src_path))
        if event.is_directory:
            if isinstance(event, (DirCreatedEvent, DirMovedEvent)):
                self.on_dir(target)
        else:
            self.on_file(target)


# watchdog (7.x) rebuilds its watches after an IN_Q_OVERFLOW but tells event handlers nothing; it logs a
# warning (then rebuilds). That warning is the only signal it gives, so it is what we listen for.
OVERFLOW_LOGGERS = ("watchdog.observers.inotify_c",)


class _OverflowHook(logging.Handler):
    def __init__(self, callback: Callable[[], None]) -> None:
        super().__init__(level=logging.WARNING)
        self._callback = callback

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self._callback()


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
        self._handler = _Handler(on_file, on_dir)
        self._overflow_hook = _OverflowHook(on_overflow) if on_overflow else None
        self._polling = polling
        self._poll_interval = poll_interval
        self._observer: BaseObserver | None = None
        self.backend = ""

    def start(self) -> str:
        if not self._polling:
            try:
                from watchdog.observers.inotify import InotifyObserver

                self._hook_overflow()
                observer: BaseObserver = InotifyObserver()
                observer.schedule(self._handler, str(self.root), recursive=True, event_filter=INOTIFY_EVENTS)
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
        observer.schedule(self._handler, str(self.root), recursive=True, event_filter=POLLING_EVENTS)
        observer.start()
        self._observer, self.backend = observer, "polling"
        return self.backend

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None
        if self._overflow_hook is not None:
            for name in OVERFLOW_LOGGERS:
                logging.getLogger(name).removeHandler(self._overflow_hook)

    def _hook_overflow(self) -> None:
        if self._overflow_hook is None:
            return
        for name in OVERFLOW_LOGGERS:
            logger = logging.getLogger(name)
            logger.setLevel(logging.WARNING)  # heard even under --log-level error
            logger.addHandler(self._overflow_hook)
