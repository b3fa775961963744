"""`watch` with a real watchdog observer on a real temp inbox, delivering to the real receiver on loopback.

Every wait is a condition with a deadline. "Never delivered" is proven with a sentinel: a file that lands
after the ones that must be ignored; once the sentinel is delivered, anything earlier would have been too.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import POLL_SECONDS, UPLOAD_TOKEN, wait_for, watching, write_csv
from smt_watch.config import Settings
from smt_watch.reference.receiver import Fault, running_receiver
from smt_watch.statedir import open_ledger

Make = Callable[..., Settings]
APPEND_GAP_SECONDS = 0.1  # between appends: shorter than the settle time, so the file never looks done
SAMPLE_SECONDS = 0.2  # how often the outage loop looks at the clock


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def settings(make_settings: Make, receiver: Any) -> Settings:
    return make_settings(
        SMT_UPLOAD_URL=f"{receiver.url}/upload", SMT_UPLOAD_TOKEN=UPLOAD_TOKEN, SMT_SETTLE_SECONDS="0.2",
    )


def inbox(settings: Settings) -> Path:
    return settings.local_dir


def stored_names(receiver: Any) -> list[str]:
    return sorted(r["filename"] for r in receiver.stored())


def test_copied_file_is_delivered_once(settings: Settings, receiver: Any, tmp_path: Path) -> None:
    src = write_csv(tmp_path / "outside" / "a.csv")
    with watching(settings) as service:
        shutil.copy(src, inbox(settings) / "a.csv")
        wait_for(lambda: stored_names(receiver) == ["a.csv"], 10, "a.csv delivered")
        wait_for(lambda: service.counts.sent == 1, 5)
    assert receiver.read(sha(src.read_bytes())) == src.read_bytes()
    assert len(receiver.state.requests) == 1


def test_rename_from_hidden_temp_name(settings: Settings, receiver: Any) -> None:
    with watching(settings):
        tmp = write_csv(inbox(settings) / ".incoming.csv.part")
        os.rename(tmp, inbox(settings) / "renamed.csv")
        wait_for(lambda: stored_names(receiver) == ["renamed.csv"], 10, "renamed.csv delivered")
    assert len(receiver.state.requests) == 1


def test_rename_from_outside_the_inbox(settings: Settings, receiver: Any, tmp_path: Path) -> None:
    src = write_csv(tmp_path / "elsewhere" / "moved.csv")  # same filesystem, outside the watched tree
    with watching(settings):
        os.rename(src, inbox(settings) / "moved.csv")
        wait_for(lambda: stored_names(receiver) == ["moved.csv"], 10, "moved.csv delivered")


def test_ignored_files_are_never_delivered(settings: Settings, receiver: Any, tmp_path: Path) -> None:
    outside = write_csv(tmp_path / "secret" / "outside.csv", seed=99)
    with watching(settings):
        box = inbox(settings)
        write_csv(box / ".hidden.csv", seed=1)
        (box / ".hiddendir").mkdir()
        write_csv(box / ".hiddendir" / "inner.csv", seed=2)
        for name in ("a.csv.part", "b.partial", "c.tmp", "d.csv.filepart", "e.crdownload", "f.csv~", "notes.txt"):
            write_csv(box / name, seed=len(name))
        (box / "link.csv").symlink_to(outside)
        write_csv(box / "sentinel.csv", seed=3)
        wait_for(lambda: stored_names(receiver) == ["sentinel.csv"], 10, "sentinel delivered")
    assert stored_names(receiver) == ["sentinel.csv"]
    assert sha(outside.read_bytes()) not in {r["sha256"] for r in receiver.stored()}


def test_patterns_are_case_insensitive_and_nested(settings: Settings, receiver: Any) -> None:
    with watching(settings):
        nested = inbox(settings) / "adhocusage" / "2026" / "11"
        nested.mkdir(parents=True)  # created after start: must be watched too
        write_csv(nested / "UPPER.CSV", seed=1)
        write_csv(nested / "Mixed.Csv", seed=2)
        wait_for(lambda: stored_names(receiver) == ["Mixed.Csv", "UPPER.CSV"], 10, "nested files delivered")


def test_directory_moved_in_with_files(settings: Settings, receiver: Any, tmp_path: Path) -> None:
    staging = tmp_path / "staging" / "batch"
    for i in range(3):
        write_csv(staging / f"f{i}.csv", seed=i)
    with watching(settings):
        os.rename(staging, inbox(settings) / "batch")
        wait_for(lambda: stored_names(receiver) == ["f0.csv", "f1.csv", "f2.csv"], 10, "moved-in dir delivered")


def test_same_bytes_under_two_names_one_delivery(settings: Settings, receiver: Any, tmp_path: Path) -> None:
    src = write_csv(tmp_path / "src.csv")
    with watching(settings) as service:
        shutil.copy(src, inbox(settings) / "one.csv")
        shutil.copy(src, inbox(settings) / "two.csv")
        wait_for(lambda: service.counts.sent + service.counts.duplicate == 2, 10, "both names handled")
    assert len(receiver.stored()) == 1
    assert len(receiver.state.requests) == 1


def test_files_present_before_start(settings: Settings, receiver: Any) -> None:
    for i in range(5):
        write_csv(inbox(settings) / "old" / f"f{i}.csv", seed=i)
    with watching(settings):
        wait_for(lambda: len(receiver.stored()) == 5, 10, "pre-existing files delivered")


@pytest.mark.parametrize("polling", [False, True])
def test_writer_with_pauses_is_never_sent_partially(polling: bool, make_settings: Make, receiver: Any) -> None:
    """A writer that keeps the file open and pauses longer than the settle time (like a stalled scp).

    A rescan every second (and, with polling, modify events) makes the open file a candidate during
    every pause; only the open-for-writing check keeps it from being sent. Two pauses (each past a rescan
    and the settle time) prove what five did: the first one alone is enough to send a partial file when the
    check is broken (mutants ``watch-writer-open``, ``watch-writer-lease``).
    """
    settings = make_settings(SMT_UPLOAD_URL=f"{receiver.url}/upload", SMT_UPLOAD_TOKEN=UPLOAD_TOKEN,
                             SMT_SETTLE_SECONDS="0.2", SMT_RESCAN_SECONDS="1", SMT_VALIDATE="0")
    block = os.urandom(1024 * 1024)
    target = inbox(settings) / "slow.csv"
    with watching(settings, polling=polling) as service:
        with target.open("wb") as fh:
            for i in range(20):
                fh.write(block)
                fh.flush()
                if i % 10 == 9:
                    # Pause past the settle time with the file still open for writing.
                    deadline = time.monotonic() + 1.3
                    while time.monotonic() < deadline:
                        assert receiver.stored() == []
                        time.sleep(POLL_SECONDS)  # checking throughout the pause under test
        wait_for(lambda: service.counts.sent == 1, 20, "slow.csv delivered")
    [row] = receiver.stored()
    assert row["sizeBytes"] == 20 * len(block)
    assert row["sha256"] == sha(target.read_bytes())


def test_writer_that_closes_and_reopens_to_append(settings: Settings, receiver: Any, make_settings: Make) -> None:
    settings = make_settings(SMT_UPLOAD_URL=settings.upload_url, SMT_UPLOAD_TOKEN=UPLOAD_TOKEN,
                             SMT_SETTLE_SECONDS="1.0", SMT_VALIDATE="0")
    block = os.urandom(5 * 1024 * 1024)
    target = inbox(settings) / "appended.csv"
    with watching(settings) as service:
        for _ in range(10):
            with target.open("ab") as fh:
                fh.write(block)
            time.sleep(APPEND_GAP_SECONDS)  # the behaviour under test: gaps shorter than the settle time
        wait_for(lambda: service.counts.sent >= 1, 30, "appended.csv delivered")
    full = target.read_bytes()
    assert [r["sha256"] for r in receiver.stored()] == [sha(full)]


def test_target_down_then_up_drains_without_duplicates(make_settings: Make, tmp_path: Path, unused_port: int) -> None:
    settings = make_settings(
        SMT_UPLOAD_URL=f"http://127.0.0.1:{unused_port}/upload", SMT_SETTLE_SECONDS="0.1",
        SMT_RETRY_ATTEMPTS="2", SMT_RETRY_BACKOFF_SECONDS="0.05",
    )
    with watching(settings) as service:
        for i in range(6):
            write_csv(inbox(settings) / f"f{i}.csv", seed=i)
        wait_for(lambda: service.counts.retrying >= 6, 15, "every file to be retrying")
        # a 3 s outage of the target: every file has failed calls behind it and a doubled backoff ahead of it
        # when the target comes back (a 10 s one proved the same, and left a longer backoff to wait out)
        outage_end = time.monotonic() + 3
        while time.monotonic() < outage_end:
            time.sleep(SAMPLE_SECONDS)  # the behaviour under test: an outage of the target
        with running_receiver(tmp_path / "late", port=unused_port) as late:
            wait_for(lambda: len(late.stored()) == 6, 30, "backlog drained after the outage")
            requests = late.state.wait_for_requests(6)
            assert len([r for r in requests if r.status == 200]) == 6
            assert all(r.duplicate is False for r in late.state.requests)
    with open_ledger(settings) as ledger:
        assert ledger.counts()["sent"] == 6


def test_failed_file_stays_and_is_not_retried(settings: Settings, receiver: Any) -> None:
    receiver.state.faults.append(Fault(status=422, body={"ok": False, "error": "bad csv"}))
    with watching(settings) as service:
        write_csv(inbox(settings) / "bad.csv", seed=1)
        wait_for(lambda: service.counts.failed == 1, 10, "bad.csv failed")
        write_csv(inbox(settings) / "sentinel.csv", seed=2)
        wait_for(lambda: "sentinel.csv" in stored_names(receiver), 10, "sentinel delivered")
    assert (inbox(settings) / "bad.csv").exists()
    assert len(receiver.state.requests) == 2
    with open_ledger(settings) as ledger:
        [row] = ledger.rows("failed")
    assert row.http_status == 422 and "bad csv" in (row.last_error or "")


@pytest.mark.parametrize("action", ["keep", "move", "delete"])
def test_after_send(action: str, make_settings: Make, receiver: Any) -> None:
    settings = make_settings(SMT_UPLOAD_URL=f"{receiver.url}/upload", SMT_UPLOAD_TOKEN=UPLOAD_TOKEN,
                             SMT_SETTLE_SECONDS="0.1", SMT_AFTER_SEND=action)
    archive = settings.archive_path
    (archive / "sub").mkdir(parents=True)
    (archive / "sub" / "a.csv").write_text("an earlier file with the same name\n")
    with watching(settings) as service:
        f = write_csv(inbox(settings) / "sub" / "a.csv")
        data = f.read_bytes()
        wait_for(lambda: service.counts.sent == 1, 10, "a.csv delivered")
        if action == "keep":
            assert f.read_bytes() == data
        else:
            wait_for(lambda: not f.exists(), 5, "a.csv moved or deleted")
    if action == "move":
        assert (archive / "sub" / "a.csv.1").read_bytes() == data
        assert (archive / "sub" / "a.csv").read_text() == "an earlier file with the same name\n"
    if action == "delete":
        assert not (archive / "sub" / "a.csv.1").exists()


def test_restart_over_sent_files_reads_none(settings: Settings, receiver: Any) -> None:
    """The second start must account for every file before the check: stopping right after READY would
    pass with the stat cache switched off (the files would not have reached a worker yet). Checked against
    the mutant ``watch-stat-cache-scan`` (tests/mutants/headline.toml): it fails the ``cached`` assertion.
    300 files, not 1000: still several times the watch's queue bound (64), and with a broken stat cache the
    second start hashes every one of them, whatever their number."""
    files = 300
    for i in range(files):
        (inbox(settings) / f"f{i:04d}.csv").write_text(f"ESIID,X\n{10443720000000000 + i}\n")
    with watching(settings) as first:
        wait_for(lambda: first.counts.sent == files, 60, f"{files} files delivered")
        assert first.counts.hashed == files
    with watching(settings) as second:
        c = second.counts
        wait_for(lambda: c.cached + c.duplicate + c.sent + c.failed >= files, 60, "every file looked at again")
    assert (c.cached, c.hashed, c.duplicate, c.sent) == (files, 0, 0, 0)
    assert len(receiver.state.requests) == files


def test_retried_file_is_hashed_once(make_settings: Make, receiver: Any) -> None:
    """A file whose first call failed goes back to a worker when its backoff expires; the worker takes its
    hash from the stat cache instead of reading it again. Checked against ``watch-stat-cache-worker``."""
    settings = make_settings(SMT_UPLOAD_URL=f"{receiver.url}/upload", SMT_UPLOAD_TOKEN=UPLOAD_TOKEN,
                             SMT_SETTLE_SECONDS="0.1", SMT_RETRY_ATTEMPTS="1")
    receiver.state.faults.append(Fault(status=503))
    write_csv(inbox(settings) / "retried.csv")
    with watching(settings) as service:
        wait_for(lambda: service.counts.sent == 1, 20, "delivered on the second call")
        assert service.counts.retrying == 1 and service.counts.hashed == 1
    assert [r.status for r in receiver.state.requests] == [503, 200]


def test_forgotten_row_is_delivered_again_on_rescan(make_settings: Make, receiver: Any) -> None:
    settings = make_settings(SMT_UPLOAD_URL=f"{receiver.url}/upload", SMT_UPLOAD_TOKEN=UPLOAD_TOKEN,
                             SMT_SETTLE_SECONDS="0.1", SMT_RESCAN_SECONDS="1")
    f = write_csv(inbox(settings) / "again.csv")
    with watching(settings) as service:
        wait_for(lambda: service.counts.sent == 1, 10, "first delivery")
        with open_ledger(settings) as ledger:
            assert ledger.forget([sha(f.read_bytes())]) == 1
        wait_for(lambda: service.counts.sent == 2, 10, "re-delivery after ledger forget")


def test_inotify_limit_falls_back_to_polling(settings: Settings, receiver: Any, monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    # A fake only here: exhausting the machine-wide inotify watch limit would disturb other processes.
    import watchdog.observers.inotify as inotify

    def refuse(self: object) -> None:
        raise OSError(errno.ENOSPC, "inotify watch limit reached")

    monkeypatch.setattr(inotify.InotifyObserver, "start", refuse)
    with watching(settings) as service:
        assert service.backend == "polling"
        write_csv(inbox(settings) / "polled.csv")
        wait_for(lambda: stored_names(receiver) == ["polled.csv"], 15, "delivered by the polling backend")
    assert "fs.inotify.max_user_watches" in caplog.text
