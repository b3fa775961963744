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
