"""post's big-file send under a kernel read lease (issue 27, smt_watch/readlease.py): the send reads the leased
descriptor instead of hashing the file a second time, a writer that opens the file during the send aborts it
(and is not kept waiting), and where no lease can be had the send re-hashes what it sends, as before.

Real parts: the real receiver on loopback (a request held with ``Fault(release=...)``), the real CLI in a
subprocess, real files, a writer in another process.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest

from conftest import ADMIN_TOKEN, UPLOAD_TOKEN, wait_for, write_csv
from smt_watch import passrules, pipeline, readlease
from smt_watch.config import Settings
from smt_watch.delivery import stream
from smt_watch.errors import FileChanged
from smt_watch.hashing import identify
from smt_watch.pipeline import post_files
from smt_watch.readlease import LEASE_MIN
from smt_watch.reference.receiver import Fault, running_receiver
from smt_watch.statedir import open_ledger

Make = Callable[..., Settings]

# The writer's own clock, from just before its open(..., "r+b") to just after: a lease not given up would hold it
# for /proc/sys/fs/lease-break-time (45 s by default).
WRITER = (
    "import sys, time\n"
    "t = time.monotonic()\n"
    "with open(sys.argv[1], 'r+b') as f:\n"
    "    waited = time.monotonic() - t\n"
    "    f.seek(-2, 2)\n"
    "    f.write(b'9')\n"
    "print(f'{waited:.3f}')\n"
)
SMALL_LEASE_MIN = 64 * 1024  # a lease's smallest file where the size at which one is taken is not the point
WRITER_MAX_WAIT = 5.0  # seconds: far under the 45 s a writer waits for a lease nobody gives up
# `smt-watch post FILE` as the console script runs it (the early hash pass starts as cli.py loads), with the
# send's re-hash replaced by an exit: the file must go by its lease, taken in the early pass's helper thread.
CONSOLE_POST = (
    "import sys\n"
    "import smt_watch.delivery.stream as stream\n"
    "stream._hashed_beside = lambda *a: sys.exit('the send re-hashed a file post had leased')\n"
    "sys.argv = ['smt-watch', 'post', sys.argv[1]]\n"
    "from smt_watch.cli import main\n"
    "main()\n"
)


def big_csv(path: Path, size: int = LEASE_MIN + 8 * 1024 * 1024) -> Path:
    """An SMT interval CSV of about ``size`` bytes (past LEASE_MIN, and far more than loopback's socket
    buffers: a held request keeps the sender mid-body)."""
    header = b"ESIID,USAGE_DATE,REVISION_DATE,USAGE_START_TIME,USAGE_END_TIME,USAGE_KWH,ESTIMATED_ACTUAL\n"
    row = b"10443720000000001,01/01/2026,01/02/2026,00:00,00:15,0.208,A\n"
    path.write_bytes(header + row * (size // len(row)))
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def multipart(make: Make, receiver: Any, **env: str) -> Settings:
    return make(SMT_UPLOAD_URL=f"{receiver.url}/upload", SMT_UPLOAD_TOKEN=UPLOAD_TOKEN, **env)


@pytest.fixture
def hashed_beside(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The paths the send re-hashed as it sent them (the path without a lease)."""
    calls: list[Path] = []
    real = stream._hashed_beside

    def spy(path: Path, *a: Any) -> Iterator[bytes]:
        calls.append(path)
        return real(path, *a)

    monkeypatch.setattr(stream, "_hashed_beside", spy)
    return calls


def test_a_big_file_is_sent_under_its_lease_without_a_second_hash(make_settings: Make, receiver: Any,
                                                                  tmp_path: Path, hashed_beside: list[Path]) -> None:
    """The bytes arrive whole and exact, the send never re-hashed them, and the lease is given up after.
    Checked against post-hash-pass-lease (no lease: the send re-hashes)."""
    f = big_csv(tmp_path / "IntervalData_M1.csv")
    [o] = post_files(multipart(make_settings, receiver), [f])
    assert (o.result, o.sha256) == ("sent", sha(f)), o
    assert receiver.read(sha(f)) == f.read_bytes()
    assert hashed_beside == []
    assert len(readlease._keeper._held) == 0  # given up when the delivery ended
    with f.open("r+b"):  # and no writer waits on it (the keeper would also have let it through)
        pass


def test_a_writer_during_the_send_aborts_it_and_is_not_kept_waiting(base_env: dict[str, str], make_settings: Make,
                                                                     receiver: Any, tmp_path: Path) -> None:
    """The console script (its first file hashed before typer loads, under a lease taken in that helper
    thread; the send must not re-hash it): while the receiver holds the request mid-body, another process
    opens the file for writing and changes a byte. Its open goes through within seconds (the lease is given
    up at once, not after the lease-break time), post survives the lease-break signal, and the send is
    aborted: never sent complete, ``changed``, the row left pending. Checked against post-lease-check-per-chunk
    (the send carries on and delivers the changed bytes), post-lease-keeper-drops (the writer waits 45 s)
    and post-hash-pass-lease (no lease: the send re-hashes)."""
    f = big_csv(tmp_path / "IntervalData_M1.csv")
    digest = sha(f)
    held = threading.Event()
    receiver.state.faults.append(Fault(release=held))
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **base_env,
           "SMT_UPLOAD_URL": f"{receiver.url}/upload", "SMT_UPLOAD_TOKEN": UPLOAD_TOKEN, "SMT_HTTP_TIMEOUT": "60"}
    post = subprocess.Popen([sys.executable, "-c", CONSOLE_POST, str(f)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: not receiver.state.faults or post.poll() is not None, 60, "the request to be held")
        assert post.poll() is None, post.communicate()
        writer = subprocess.run([sys.executable, "-c", WRITER, str(f)], capture_output=True, text=True,
                                timeout=4 * WRITER_MAX_WAIT)
        assert writer.returncode == 0, writer.stderr
        assert float(writer.stdout) < WRITER_MAX_WAIT, writer.stdout
    finally:
        held.set()
    out, err = post.communicate(timeout=60)
    assert post.returncode == 1, (out, err)
    assert out.startswith("changed ") and "opened for writing since it was hashed" in out, (out, err)
    assert "Traceback" not in err
    assert receiver.stored() == []
    with open_ledger(make_settings()) as ledger:
        row = ledger.get(digest)
    assert row is not None and row.state == "pending", row


def test_a_file_open_for_writing_before_post_is_sent_by_the_re_hashing_path(
        make_settings: Make, receiver: Any, tmp_path: Path, hashed_beside: list[Path]) -> None:
    """No lease while someone holds the file open for writing: the send re-hashes what it sends, as before,
    and an untouched file is delivered whole."""
    f = big_csv(tmp_path / "IntervalData_M1.csv")
    with f.open("r+b"):
        [o] = post_files(multipart(make_settings, receiver), [f])
    assert o.result == "sent", o
    assert receiver.read(sha(f)) == f.read_bytes()
    assert hashed_beside == [f]


def test_without_leases_a_change_during_the_send_is_still_caught(make_settings: Make, receiver: Any,
                                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 hashed_beside: list[Path]) -> None:
    """Where the kernel grants no lease (a filesystem without them, a file not ours), the send falls back to
    hashing what it sends: a byte changed after the first chunk went out is still never sent complete."""
    def unavailable(fd: int) -> None:
        raise OSError(22, "leases unavailable here (the test's stand-in for a filesystem without them)")

    monkeypatch.setattr(readlease, "_set_lease", unavailable)
    f = big_csv(tmp_path / "IntervalData_M1.csv")
    digest = sha(f)
    calls: list[int] = []

    def tamper(n: int) -> None:  # after the first chunk went out; the last chunk has not been read yet
        calls.append(n)
        if len(calls) == 1:
            with f.open("r+b") as fh:
                fh.seek(-2, 2)
                fh.write(b"9")

    settings = multipart(make_settings, receiver)
    [o] = post_files(settings, [f], progress_for=lambda _: nullcontext(tamper))
    assert o.result == "changed", o
    assert hashed_beside == [f]
    assert receiver.stored() == []
    with open_ledger(settings) as ledger:
        row = ledger.get(digest)
    assert row is not None and row.state == "pending"


def test_a_writer_during_the_hash_pass_makes_it_changed(tmp_path: Path) -> None:
    """A lease broken while the file is being hashed (what was hashed may be torn) is ``FileChanged`` at the
    end of the pass, and the lease is given up and its descriptor closed. Checked against
    post-lease-hash-pass-check."""
    f = big_csv(tmp_path / "IntervalData_M1.csv")
    lease = readlease.hold(f)
    assert lease is not None and lease.intact()
    opened: list[bool] = []

    def observe(block: bytes) -> None:  # a writer's open in the middle of the pass (the keeper lets it through)
        if not opened:
            with f.open("r+b"):
                opened.append(True)

    with pytest.raises(FileChanged):
        identify(f, observe=observe, lease=lease)
    assert opened and lease.fd == -1


@pytest.fixture
def leases(monkeypatch: pytest.MonkeyPatch) -> list[readlease.ReadLease]:
    """Every lease post's later hash passes take, kept alive here: a lease not closed by the delivery would
    otherwise be closed by the garbage collector, and no test would see the difference."""
    taken: list[readlease.ReadLease] = []
    real = passrules.hold

    def spy(path: Path, *a: Any) -> readlease.ReadLease | None:
        lease = real(path, *a)
        if lease is not None:
            taken.append(lease)
        return lease

    monkeypatch.setattr(passrules, "hold", spy)
    return taken


def test_a_lease_broken_before_the_send_falls_back_to_the_re_hash(
        make_settings: Make, receiver: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        hashed_beside: list[Path], leases: list[readlease.ReadLease]) -> None:
    """An open for writing between the hash pass and the send that changes nothing (a writability test, a tool
    locking the file, while post waits for the ledger) breaks the lease: the send re-hashes what it sends, as
    without a lease, and the untouched file is sent, not ``changed``. The lease is closed when the delivery
    ends. Checked against post-lease-broken-before-send-rehashes and post-lease-closed-after-delivery."""
    f = big_csv(tmp_path / "IntervalData_M1.csv")
    real = pipeline.hash_pass

    def then_opened_for_writing(path: Path) -> Any:
        hashed = real(path)
        with path.open("r+b"):  # the keeper gives the lease up: this open goes through, nothing is written
            pass
        return hashed

    monkeypatch.setattr(pipeline, "hash_pass", then_opened_for_writing)
    [o] = post_files(multipart(make_settings, receiver), [f])
    assert (o.result, o.sha256) == ("sent", sha(f)), o
    assert receiver.read(sha(f)) == f.read_bytes()
    assert hashed_beside == [f]
    assert len(leases) == 1 and leases[0].fd == -1


def test_no_lease_on_a_fuse_filesystem_the_send_re_hashes(make_settings: Make, receiver: Any, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          hashed_beside: list[Path]) -> None:
    """On a FUSE-type filesystem the kernel's generic lease is granted but a write from the host or another
    client never breaks it: no lease is taken there, and the send re-hashes what it sends. Checked against
    post-lease-local-fs-only."""
    f = big_csv(tmp_path / "IntervalData_M1.csv")
    lease = readlease.hold(f)
    assert lease is not None  # this test's own filesystem is a local one
    lease.close()
    monkeypatch.setattr(readlease, "_fs_type", lambda fd: 0x65735546)  # FUSE_SUPER_MAGIC
    assert readlease.hold(f) is None
    [o] = post_files(multipart(make_settings, receiver), [f])
    assert o.result == "sent", o
    assert hashed_beside == [f]


def test_the_leased_descriptor_reads_blocking(tmp_path: Path) -> None:
    """The lease's descriptor is opened O_NONBLOCK (never to wait on an open) but read blocking: a read
    answering EAGAIN (FUSE, mandatory locks) would end the hash loop early. Checked against
    post-lease-blocking-reads."""
    lease = readlease.hold(big_csv(tmp_path / "IntervalData_M1.csv"))
    assert lease is not None
    try:
        assert os.get_blocking(lease.fd)
    finally:
        lease.close()


def test_no_lease_where_the_process_handles_sigurg_nor_for_what_is_not_a_big_regular_file(tmp_path: Path) -> None:
    """A lease break signals SIGURG: a process with its own SIGURG handler gets no lease (the handler is never
    called by us). Nor does a small file, a FIFO (never opened: a blocked writer would be released) or a
    symlink."""
    f = big_csv(tmp_path / "IntervalData_M1.csv")
    previous = signal.signal(readlease.BREAK_SIGNAL, lambda *_: None)
    try:
        assert readlease.hold(f) is None
    finally:
        signal.signal(readlease.BREAK_SIGNAL, previous)
    small = tmp_path / "small.csv"
    small.write_bytes(b"x")
    fifo = tmp_path / "fifo.csv"
    os.mkfifo(fifo)
    link = tmp_path / "link.csv"
    link.symlink_to(f)
    assert [readlease.hold(p) for p in (small, fifo, link)] == [None, None, None]
    lease = readlease.hold(f)
    assert lease is not None
    lease.close()


def test_a_forked_child_closing_the_lease_leaves_the_parents(tmp_path: Path) -> None:
    """A child shares the descriptor's open file description: its close of the inherited lease must not unlock
    the parent's (nor take a lock that may have been held at the fork). Checked against post-lease-fork-child."""
    lease = readlease.hold(big_csv(tmp_path / "IntervalData_M1.csv"))
    assert lease is not None
    try:
        pid = os.fork()
        if pid == 0:  # the child: close the inherited lease, report whether it was seen as ours
            code = 0
            try:
                code = 3 if lease.intact() else 0
                lease.close()
            except BaseException:
                code = 2
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert lease.intact()
    finally:
        lease.close()


def test_a_sink_that_does_not_read_the_lease_gives_it_up_before_the_send(
        make_settings: Make, tmp_path: Path, leases: list[readlease.ReadLease],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Only multipart sends from the lease's descriptor; raw-upload (as inline) re-hashes what it sends, so the
    lease is given up before its send (a writer is never kept waiting on a lease nothing uses). Checked against
    post-lease-unused-sink-closes.

    The lease is taken here from ``SMALL_LEASE_MIN`` instead of LEASE_MIN (``hold``'s own parameter): what is
    proven is what the sink does with a lease, not the size a lease starts at (a file past LEASE_MIN made
    raw-upload parse 16 MiB, ~10 s of a loaded suite's run)."""
    spy = passrules.hold  # the ``leases`` fixture's, which keeps every lease taken
    monkeypatch.setattr(passrules, "hold", lambda path: spy(path, SMALL_LEASE_MIN))
    f = write_csv(tmp_path / "IntervalData_M1.csv", rows=SMALL_LEASE_MIN // 64)  # the columns raw-upload reads
    assert f.stat().st_size >= SMALL_LEASE_MIN
    during: list[int] = []
    with running_receiver(tmp_path / "received", admin_token=ADMIN_TOKEN, upload_token=UPLOAD_TOKEN,
                          inline=True) as r:
        settings = make_settings(SMT_DELIVERY="raw-upload", INTELLIWATT_BASE_URL=r.url, ADMIN_TOKEN=ADMIN_TOKEN)
        [o] = post_files(settings, [f], progress_for=lambda _: nullcontext(lambda n: during.append(leases[0].fd)))
    assert o.result == "sent", o
    assert len(leases) == 1 and during and set(during) == {-1}


def test_a_hash_pass_whose_bytes_are_not_the_stat_size_is_changed() -> None:
    """The hash pass counts the bytes it hashed: a read that ended early (EAGAIN on a descriptor left
    non-blocking, a FUSE read) must not pass a prefix off as the file. A real file whose reads disagree with
    its stat size: procfs reports 0 bytes for /proc/version and reads out more. Checked against
    post-hash-pass-counts-bytes."""
    with pytest.raises(FileChanged):
        identify(Path("/proc/version"))
