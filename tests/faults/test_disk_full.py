"""The disk fills under the state dir (ledger) or the inbox; errors are clear, the ledger stays sound, and
everything is delivered once space returns.

The small disk is a real tmpfs mount (``mount -t tmpfs -o size=16m``) when the tests run as root and the
kernel allows it; it is filled with a filler file until ``ENOSPC``, and "space returns" means deleting the
filler. Without root, the state-dir test caps the ``watch`` process's file size instead (``RLIMIT_FSIZE``
set with ``prlimit`` on the running process, raised again to recover): every write that would grow a file
fails (``EFBIG``), which is what a full disk looks like to SQLite's writer. The inbox tests need the
mount and are skipped without it, with the true reason (not root, or ``mount`` refused and what it said).
``SMT_FAULTS_AS_USER=1`` takes the no-root paths even as root (to test them).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import resource
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sftp_server import running_sftp_server, sftp_env

from conftest import SMT_WATCH, UPLOAD_TOKEN, wait_for, write_csv
from faults.support import (
    assert_clean,
    integrity_check,
    sha,
    states,
    subprocess_env,
    watch_process,
)
from smt_watch.reference.receiver import Fault

pytestmark = pytest.mark.faults

MiB = 1024 * 1024
# How SQLite reports the write it could not make: ENOSPC on the tmpfs, EFBIG under RLIMIT_FSIZE.
FULL = re.compile(r"database or disk is full|disk I/O error")


class SmallDisk:
    """A 16 MiB tmpfs at ``root``; ``fill()`` leaves ``leave`` bytes free, ``free()`` deletes the filler."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.filler = root / "filler"

    def fill(self, leave: int = 0) -> None:
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            block = b"\0" * 65536
            while True:
                try:
                    os.write(fd, block)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    if len(block) == 4096:
                        break
                    block = block[:4096]
            if leave:
                os.ftruncate(fd, max(0, os.fstat(fd).st_size - leave))
        finally:
            os.close(fd)

    def available(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)


def _mount_tmpfs(root: Path) -> str | None:
    """Mount the small tmpfs at ``root``; None when mounted, else the true reason it was not."""
    if os.environ.get("SMT_FAULTS_AS_USER"):
        return "SMT_FAULTS_AS_USER is set (the no-root paths are under test)"
    if os.geteuid() != 0:
        return f"mounting a tmpfs needs root (running as uid {os.geteuid()})"
    root.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", str(root)],
                              capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return "mount(8) is not installed"
    if proc.returncode != 0:  # root in a container without CAP_SYS_ADMIN, for one
        return f"mount -t tmpfs was refused even as root: {proc.stderr.strip() or f'exit {proc.returncode}'}"
    return None


@contextlib.contextmanager
def small_disk(root: Path) -> Iterator[SmallDisk | str]:
    """A mounted SmallDisk, or the reason this machine does not let us mount one."""
    refused = _mount_tmpfs(root)
    if refused is not None:
        yield refused
        return
    try:
        yield SmallDisk(root)
    finally:
        if subprocess.run(["umount", str(root)], capture_output=True, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(root)], capture_output=True, timeout=30)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[SmallDisk]:
    with small_disk(tmp_path / "disk") as d:
        if isinstance(d, str):
            pytest.skip(f"no small disk: {d}; the RLIMIT_FSIZE variant covers only the ledger")
        yield d


def _full_env(base_env: dict[str, str], tmp_path: Path, receiver: Any, **extra: str) -> dict[str, str]:
    return subprocess_env(base_env, tmp_path / "home", SMT_UPLOAD_URL=f"{receiver.url}/upload",
                          SMT_UPLOAD_TOKEN=UPLOAD_TOKEN, SMT_SETTLE_SECONDS="0.1", **extra)


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(("[ERROR]", "[WARNING]"))]


# --- the ledger's disk fills ------------------------------------------------------------------------------


def test_state_dir_fills_then_recovers(tmp_path: Path, base_env: dict[str, str], receiver: Any,
                                       fault_report: Any) -> None:
    """Files land while the ledger's disk is full: one clear error line each, then all delivered."""
    with contextlib.ExitStack() as stack:
        mounted = stack.enter_context(small_disk(tmp_path / "disk"))
        disk = mounted if isinstance(mounted, SmallDisk) else None
        how = "tmpfs" if disk else f"RLIMIT_FSIZE ({mounted})"
        state_dir = (tmp_path / "disk" / "state") if disk else Path(base_env["SMT_STATE_DIR"])
        env = _full_env(base_env, tmp_path, receiver, SMT_STATE_DIR=str(state_dir))
        inbox = Path(env["SMT_LOCAL_DIR"])
        with watch_process(env, tmp_path / "watch.log") as w:
            first = write_csv(inbox / "warm-up.csv", seed=1)
            wait_for(lambda: states(state_dir).get(sha(first.read_bytes())) == "sent", 20, "warm-up delivered")

            if disk:
                disk.fill(leave=4096)
            else:
                cap = max(p.stat().st_size for p in state_dir.iterdir() if p.is_file())
                resource.prlimit(w.proc.pid, resource.RLIMIT_FSIZE, (cap, resource.RLIM_INFINITY))
            files = {sha(write_csv(inbox / "late" / f"f{i}.csv", seed=10 + i).read_bytes()) for i in range(8)}
            wait_for(lambda: FULL.search(w.text()), 30, "the watcher to report the full disk")
            assert integrity_check(state_dir) == "ok"
            full_errors = _error_lines(w.text())

            if disk:
                disk.free()
            else:
                resource.prlimit(w.proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            wait_for(lambda: all(states(state_dir).get(s) == "sent" for s in files), 60,
                     "every file delivered once space returned")
            assert w.stop() == 0
        assert integrity_check(state_dir) == "ok"  # before the tmpfs goes away
    example = full_errors[0].replace(str(tmp_path), "…") if full_errors else "-"
    fault_report(f"[{how}] {len(full_errors)} error line(s) while full, e.g. {example}")
    assert full_errors, "no error was logged while the disk was full"
    assert_clean(w.text(), "watch log")
    assert {r["sha256"] for r in receiver.stored()} == files | {sha(first.read_bytes())}
    assert all(r.duplicate is False for r in receiver.state.requests)


def test_disk_fills_while_a_delivery_is_in_flight(tmp_path: Path, base_env: dict[str, str], receiver: Any,
                                                   disk: SmallDisk) -> None:
    state_dir = disk.root / "state"
    env = _full_env(base_env, tmp_path, receiver, SMT_STATE_DIR=str(state_dir))
    inbox = Path(env["SMT_LOCAL_DIR"])
    with watch_process(env, tmp_path / "watch.log") as w:
        warm = write_csv(inbox / "warm-up.csv", seed=1)
        wait_for(lambda: states(state_dir).get(sha(warm.read_bytes())) == "sent", 20, "warm-up delivered")
        held = threading.Event()  # hold the next delivery on the wire until the disk is full (not a fixed
        receiver.state.faults.append(Fault(release=held))  # delay that a slow fill could outlast)
        digest = sha(write_csv(inbox / "in-flight.csv", seed=2).read_bytes())
        wait_for(lambda: states(state_dir).get(digest) == "sending", 20, "the delivery in flight")
        try:
            disk.fill(leave=4096)
        finally:
            held.set()
        wait_for(lambda: len(receiver.state.requests) == 2, 20, "the receiver answered the held delivery")
        wait_for(lambda: FULL.search(w.text()), 20, "the failed ledger write to be reported")
        disk.free()
        try:
            # A fixed watcher looks at the file again 5 s after the error (watch.py _worker), then sends it.
            wait_for(lambda: states(state_dir).get(digest) == "sent", 8, "the row marked sent without a restart")
        finally:
            w.stop()
    assert_clean(w.text(), "watch log")
    assert integrity_check(state_dir) == "ok"


# --- the inbox's disk fills -------------------------------------------------------------------------------


def test_sync_into_a_full_inbox_then_next_pass_completes(tmp_path: Path, base_env: dict[str, str],
                                                        disk: SmallDisk) -> None:
    inbox = disk.root / "inbox"
    inbox.mkdir()
    with running_sftp_server(tmp_path / "remote", tmp_path / "keys") as server:
        data = os.urandom(2 * MiB)
        server.put("adhocusage/big.csv", data)
        env = subprocess_env(base_env, tmp_path / "home", SMT_LOCAL_DIR=str(inbox),
                             **sftp_env(server, tmp_path / "ssh" / "known_hosts", timeout=10))
        disk.fill(leave=MiB)  # room for half the file

        def sync() -> subprocess.CompletedProcess[str]:
            return subprocess.run([*SMT_WATCH, "sync", "--workers", "1"], env=env, capture_output=True, text=True,
                                  timeout=90, cwd=tmp_path)

        first = sync()
        assert first.returncode == 1, first.stdout + first.stderr
        # The listed size does not fit the free space: the file fails before a byte is written (a disk that
        # fills mid-transfer, from another writer, is "No space left on device" and leaves a resumable part).
        assert "free in" in first.stderr and "/adhocusage/big.csv" in first.stderr
        assert_clean(first.stdout + first.stderr, "sync output")
        visible = sorted(p.relative_to(inbox).as_posix() for p in inbox.rglob("*")
                         if p.is_file() and not any(part.startswith(".") for part in p.relative_to(inbox).parts))
        assert visible == [], visible
        assert list(inbox.rglob(".big.csv.*.part")) == []  # nothing allocated for a size that cannot fit
        disk.free()
        second = sync()
        assert second.returncode == 0, second.stdout + second.stderr
        assert (inbox / "adhocusage" / "big.csv").read_bytes() == data
        assert not list(inbox.rglob(".*.part"))


def test_upload_into_a_full_inbox_is_a_clear_error(tmp_path: Path, base_env: dict[str, str],
                                                   disk: SmallDisk, unused_port: int) -> None:
    inbox = disk.root / "inbox"
    env = subprocess_env(base_env, tmp_path / "home", SMT_LOCAL_DIR=str(inbox), SMT_UPLOAD_PORT=str(unused_port),
                         SMT_UPLOAD_TOKEN=UPLOAD_TOKEN, SMT_WEBHOOK_PORT="0")
    log = tmp_path / "serve.log"
    with log.open("ab") as fh:
        proc = subprocess.Popen([*SMT_WATCH, "serve"], env=env, stdout=fh, stderr=fh, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{unused_port}"
    try:
        wait_for(lambda: _healthy(url) or proc.poll() is not None, 30, "serve to start")
        assert proc.poll() is None, log.read_text()
        disk.fill(leave=64 * 1024)
        r = httpx.post(f"{url}/upload", files={"file": ("big.csv", os.urandom(MiB), "text/csv")},
                       headers={"x-smt-upload-token": UPLOAD_TOKEN}, timeout=30, trust_env=False)
        leftovers = sorted(p.name for p in inbox.iterdir())
        disk.free()
        ok = httpx.post(f"{url}/upload", files={"file": ("after.csv", b"ESIID,X\n1,2\n", "text/csv")},
                        headers={"x-smt-upload-token": UPLOAD_TOKEN}, timeout=30, trust_env=False)
    finally:
        proc.terminate()
        proc.wait(30)
    assert leftovers == [], "a refused upload left a file behind"
    assert ok.status_code == 202, ok.text
    assert_clean(log.read_text(errors="replace"), "serve log")
    assert r.status_code in (500, 503, 507) and r.json()["ok"] is False, r.text


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False
