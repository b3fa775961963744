"""The inbox's event source (``smt_watch.events``) and what it relies on of watchdog.

An inotify queue overflow must reach ``watch`` (which rescans at once) through watchdog's own
``EventsLostEvent``, never through a log line that a watchdog release may reword or drop. The kernel overflow
itself is forced in ``tests/faults/test_burst.py`` (it needs root to lower ``max_queued_events``); here the
overflow enters watchdog where its reader thread hands over a kernel ``IN_Q_OVERFLOW`` record
(``InotifyFD.handle_event``), so everything after it (watch recovery, the emitter, the event filter, dispatch)
is the installed watchdog's real code, on a real inotify instance, without root.
"""

from __future__ import annotations

import threading
import tomllib
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement

from conftest import wait_for
from smt_watch.events import INOTIFY_EVENTS, ROOT_LINK_EVENTS, InboxWatcher

ROOT = Path(__file__).resolve().parent.parent


def kernel_overflow(watcher: InboxWatcher) -> None:
    """What watchdog's inotify reader does on reading an IN_Q_OVERFLOW record from the kernel. Reaches into
    watchdog's InotifyObserver for its reader (a private attribute): a real overflow needs root (test_burst)."""
    from watchdog.observers.inotify_c import InotifyConstants, InotifyEvent

    reader = watcher._observer._inotify_fd  # type: ignore[union-attr]
    reader.handle_event(InotifyEvent(-1, InotifyConstants.IN_Q_OVERFLOW, 0, b""))


@pytest.fixture
def watched(tmp_path: Path) -> tuple[InboxWatcher, threading.Event, list[Path]]:
    lost = threading.Event()
    files: list[Path] = []
    watcher = InboxWatcher(tmp_path, files.append, lambda p: None, on_overflow=lost.set)
    if watcher.start() != "inotify":
        watcher.stop()
        pytest.skip("inotify is not available here")
    yield watcher, lost, files
    watcher.stop()


def test_an_inotify_overflow_calls_on_overflow_and_the_watch_goes_on(
        watched: tuple[InboxWatcher, threading.Event, list[Path]], tmp_path: Path) -> None:
    watcher, lost, files = watched
    assert not lost.is_set()
    kernel_overflow(watcher)
    assert lost.wait(10), "the overflow never reached on_overflow"
    (tmp_path / "after.csv").write_text("ESIID,N\n1,2\n")  # the watches were rebuilt: events still arrive
    wait_for(lambda: tmp_path / "after.csv" in files, 10, "an event for a file written after the overflow")


def test_a_file_event_is_not_taken_for_an_overflow(
        watched: tuple[InboxWatcher, threading.Event, list[Path]], tmp_path: Path) -> None:
    _, lost, files = watched
    (tmp_path / "plain.csv").write_text("ESIID,N\n1,2\n")
    wait_for(lambda: tmp_path / "plain.csv" in files, 10, "the file's event")
    assert not lost.is_set()


def test_every_inotify_filter_lets_the_overflow_through() -> None:
    """watchdog delivers EventsLostEvent to a watch with an event_filter only when the filter lists it."""
    from watchdog.events import EventsLostEvent

    assert EventsLostEvent in INOTIFY_EVENTS and EventsLostEvent in ROOT_LINK_EVENTS


def test_the_installed_watchdog_is_the_pinned_one() -> None:
    """pyproject.toml pins the watchdog that has EventsLostEvent (7.1.1; 7.1.0 and 6.x do not)."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    pinned = next(Requirement(d) for d in deps if Requirement(d).name == "watchdog")
    assert "7.1.0" not in pinned.specifier and "7.1.1" in pinned.specifier
    assert version("watchdog") in pinned.specifier



def test_moves_inside_the_inbox_are_still_paired_and_renames_from_outside_still_seen(tmp_path: Path) -> None:
    """The observer watch uses (its move grouping indexed by cookie, so a rename into the inbox from outside
    skips watchdog's queue scans) still pairs a move inside the watched directory into one moved event, file
    or directory (watchdog moves its watches on a paired directory move), and still reports each of a burst
    of renames from outside as created."""
    from watchdog.events import DirMovedEvent, FileCreatedEvent, FileMovedEvent, FileSystemEventHandler

    from smt_watch.events import _inotify_observer

    inbox, outside = tmp_path / "inbox", tmp_path / "outside"
    inbox.mkdir()
    outside.mkdir()
    seen: list[tuple[type, str, str]] = []

    class Record(FileSystemEventHandler):
        def on_any_event(self, event: Any) -> None:
            seen.append((type(event), str(event.src_path), str(getattr(event, "dest_path", ""))))

    observer = _inotify_observer()
    observer.schedule(Record(), str(inbox), recursive=True,
                      event_filter=[FileMovedEvent, DirMovedEvent, FileCreatedEvent])
    observer.start()
    try:
        (outside / "d").mkdir()
        (inbox / "a.tmp").write_text("x")
        (inbox / "a.tmp").rename(inbox / "a.csv")
        (inbox / "old").mkdir()
        (inbox / "old").rename(inbox / "new")
        for i in range(200):  # a burst from outside: none of them has a move source to pair with
            (outside / f"{i:03d}.csv").write_text(str(i))
            (outside / f"{i:03d}.csv").rename(inbox / f"{i:03d}.csv")
        wanted = {(FileCreatedEvent, str(inbox / f"{i:03d}.csv"), "") for i in range(200)}
        wait_for(lambda: wanted <= set(seen), 20, "every file renamed in from outside, as created")
        wait_for(lambda: (FileMovedEvent, str(inbox / "a.tmp"), str(inbox / "a.csv")) in seen, 10,
                 "the file renamed inside the inbox, as one moved event")
        wait_for(lambda: (DirMovedEvent, str(inbox / "old"), str(inbox / "new")) in seen, 10,
                 "the directory renamed inside the inbox, as one moved event")
    finally:
        observer.stop()
        observer.join(5)
