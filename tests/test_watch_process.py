"""`smt-watch watch` as a real process: signals, kill -9 mid-delivery, systemd notify, metrics, exit codes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from faults.support import WatchProc, sha_file, watch_process

from conftest import UPLOAD_TOKEN, cli_in_process, wait_for, write_csv
from smt_watch.reference.receiver import Fault

# One watch-process wrapper for the suite (tests/faults/support.py); test_operator imports these names.
Watch = WatchProc
started = watch_process


@pytest.fixture
def watch_env(base_env: dict[str, str], receiver: Any, tmp_path: Path) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), **base_env,
        "SMT_UPLOAD_URL": f"{receiver.url}/upload", "SMT_UPLOAD_TOKEN": UPLOAD_TOKEN, "SMT_SETTLE_SECONDS": "0.1",
        "SMT_VALIDATE": "0",  # some tests send random bytes; content checks have their own tests
    }


def ledger_rows(env: dict[str, str]) -> list[dict[str, Any]]:
    """``ledger list --json`` (what it prints is the point, not its process: run in this one)."""
    out = cli_in_process(["ledger", "list", "--json"], env)
    assert out.returncode == 0, out.stderr
    return list(json.loads(out.stdout))


def test_sigterm_lets_the_in_flight_delivery_finish(watch_env: dict[str, str], receiver: Any,
                                                     tmp_path: Path) -> None:
    """The delivery is held by the receiver until the watch has said it waits for it: the stop is certainly
    in progress while the delivery is in flight (no fixed delay racing the signal)."""
    held = threading.Event()
    receiver.state.faults.append(Fault(release=held))
    with started(watch_env, tmp_path / "w.log") as w:
        write_csv(Path(watch_env["SMT_LOCAL_DIR"]) / "a.csv")
        wait_for(lambda: [r["state"] for r in ledger_rows(watch_env)] == ["sending"], 10, "delivery in flight")
        t0 = time.monotonic()
        w.proc.send_signal(signal.SIGTERM)
        try:
            wait_for(lambda: "Stopping: waiting up to" in w.text() or w.proc.poll() is not None, 15,
                     "the stop to wait for the delivery")
        finally:
            held.set()
        assert w.proc.wait(40) == 0  # not w.stop(): a second SIGTERM would mean "quit now"
        assert time.monotonic() - t0 < 30
    assert [r["state"] for r in ledger_rows(watch_env)] == ["sent"]
    assert len(receiver.stored()) == 1
    assert "Traceback" not in w.text()


def test_grace_expiry_then_restart_resumes(watch_env: dict[str, str], receiver: Any, tmp_path: Path) -> None:
    held = threading.Event()  # the first delivery hangs until released after the stop (not a 15 s sleep that
    receiver.state.faults.append(Fault(release=held))  # the receiver's shutdown would wait out at teardown)
    env = {**watch_env, "SMT_STOP_GRACE_SECONDS": "1"}
    with started(env, tmp_path / "w1.log") as w:
        f = write_csv(Path(env["SMT_LOCAL_DIR"]) / "stuck.csv")
        wait_for(lambda: [r["state"] for r in ledger_rows(env)] == ["sending"], 10, "delivery in flight")
        t0 = time.monotonic()
        try:
            assert w.stop() == 0
        finally:
            held.set()
        assert time.monotonic() - t0 < 10
    assert "will be sent again at next start" in w.text()
    assert [r["state"] for r in ledger_rows(env)] == ["sending"]
    with started(env, tmp_path / "w2.log") as w2:
        wait_for(lambda: [r["state"] for r in ledger_rows(env)] == ["sent"], 20, "resumed delivery")
        assert w2.stop() == 0
    assert "Resuming stuck.csv" in w2.text()
    assert receiver.read(hashlib.sha256(f.read_bytes()).hexdigest()) == f.read_bytes()


def test_kill_9_mid_delivery_of_200_mb(watch_env: dict[str, str], receiver: Any, tmp_path: Path) -> None:
    big = Path(watch_env["SMT_LOCAL_DIR"]) / "big.csv"
    block = os.urandom(1024 * 1024)
    staging = tmp_path / "big.staging"
    hashed = hashlib.sha256()  # hashed as written: not 200 MB read back into memory
    with staging.open("wb") as fh:
        for _ in range(200):
            fh.write(block)
            hashed.update(block)
    digest = hashed.hexdigest()
    receiver.state.faults.append(Fault(delay=3.0))  # hold the first attempt open on the wire
    with started(watch_env, tmp_path / "w1.log") as w:
        os.rename(staging, big)
        wait_for(lambda: [r["state"] for r in ledger_rows(watch_env)] == ["sending"], 20, "200 MB in flight")
        w.proc.kill()
        w.proc.wait(10)
    assert receiver.stored() == []
    with started(watch_env, tmp_path / "w2.log") as w2:
        wait_for(lambda: [r["state"] for r in ledger_rows(watch_env)] == ["sent"], 60, "delivered after restart")
        assert w2.stop() == 0
    [row] = receiver.stored()
    assert row["sha256"] == digest and row["sizeBytes"] == 200 * len(block)
    assert sha_file(receiver.state.store.files_dir / digest) == digest  # the stored bytes, streamed


def test_systemd_notify_protocol(watch_env: dict[str, str], tmp_path: Path) -> None:
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(10)
    env = {**watch_env, "NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "200000"}
    messages: list[str] = []
    with started(env, tmp_path / "w.log") as w:
        while not any("WATCHDOG=1" in m for m in messages):
            messages.append(sock.recv(4096).decode())
        assert w.stop() == 0
    # The watch has exited: every datagram it sent is already queued on our socket (a unix datagram send
    # completes into the receiver's queue), so drain it without waiting for more.
    sock.setblocking(False)
    try:
        while True:
            messages.append(sock.recv(4096).decode())
    except BlockingIOError:
        pass
    sock.close()
    assert messages[0].startswith("READY=1\nSTATUS=queue 0, sent 0")
    assert any(m.startswith("STATUS=") for m in messages[1:])
    assert any(m.startswith("STOPPING=1") for m in messages)


def test_metrics_endpoint(watch_env: dict[str, str], receiver: Any, tmp_path: Path, unused_port: int) -> None:
    with started(watch_env, tmp_path / "w.log", "--metrics-port", str(unused_port)) as w:
        write_csv(Path(watch_env["SMT_LOCAL_DIR"]) / "m.csv")
        wait_for(lambda: len(receiver.stored()) == 1, 10, "delivery")

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{unused_port}/metrics", timeout=5) as resp:
                return str(resp.read().decode())

        wait_for(lambda: 'smt_watch_files_delivered_total{mode="multipart"} 1.0' in scrape(), 5, "metric")
        text = scrape()
        assert "smt_watch_delivery_latency_seconds_count 1.0" in text
        assert "smt_watch_queue_depth" in text and "smt_watch_last_success_timestamp_seconds" in text
        assert w.stop() == 0


def test_inbox_is_created_0750_only_when_asked(watch_env: dict[str, str], tmp_path: Path) -> None:
    """A missing inbox (a typo in SMT_LOCAL_DIR) is exit 2 in one line, nothing created; --create-inbox (or
    SMT_CREATE_INBOX=1) creates it 0750."""
    env = {**watch_env, "SMT_LOCAL_DIR": str(tmp_path / "new" / "inbox")}
    proc = cli_in_process(["watch"], env)  # its exit and its one line are the point, not its process
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "does not exist" in proc.stderr
    assert "--create-inbox" in proc.stderr and not (tmp_path / "new").exists()
    with started(env, tmp_path / "w.log", "--create-inbox") as w:
        assert w.stop() == 0
    assert (tmp_path / "new" / "inbox").stat().st_mode & 0o777 == 0o750
    env = {**env, "SMT_LOCAL_DIR": str(tmp_path / "other"), "SMT_CREATE_INBOX": "1"}
    with started(env, tmp_path / "w2.log") as w:
        assert w.stop() == 0
    assert (tmp_path / "other").is_dir()


def test_unusable_state_dir_exits_2(watch_env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "plain-file").write_text("x")
    env = {**watch_env, "SMT_STATE_DIR": str(tmp_path / "plain-file" / "state")}
    proc = cli_in_process(["watch"], env)  # its exit and its one line are the point, not its process
    assert proc.returncode == 2
    assert "SMT_STATE_DIR" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_no_target_exits_2(watch_env: dict[str, str]) -> None:
    env = {k: v for k, v in watch_env.items() if k != "SMT_UPLOAD_URL"}
    proc = cli_in_process(["watch"], env)  # its exit and its one line are the point, not its process
    assert proc.returncode == 2 and "no delivery target" in proc.stderr


# --- SMT_WORKER_MODE=process ---------------------------------------------------------------------------


def worker_pids(parent: int) -> list[int]:
    """The watch's delivery worker processes (multiprocessing spawn children of ``parent``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return sorted(found)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_worker_processes_deliver_and_leave_nothing_behind(watch_env: dict[str, str], receiver: Any,
                                                           tmp_path: Path) -> None:
    env = {**watch_env, "SMT_WORKER_MODE": "process", "SMT_WORKERS": "2"}
    box = Path(env["SMT_LOCAL_DIR"])
    with started(env, tmp_path / "w.log") as w:
        wait_for(lambda: len(worker_pids(w.proc.pid)) == 2, 20, "two worker processes")
        pids = worker_pids(w.proc.pid)
        files = [write_csv(box / f"f{i}.csv", seed=i) for i in range(6)]
        wait_for(lambda: len(receiver.stored()) == 6, 30, "six files delivered")
        assert w.stop() == 0
    assert sorted(r["filename"] for r in receiver.stored()) == sorted(f.name for f in files)
    assert len(receiver.state.requests) == 6
    assert {r["state"] for r in ledger_rows(env)} == {"sent"}
    assert not [p for p in pids if alive(p)], "a worker process outlived the watcher"
    text = w.text()
    assert text.count("Using droplet upload server at") == 1 and "Traceback" not in text


def test_killed_worker_process_is_replaced(watch_env: dict[str, str], receiver: Any, tmp_path: Path) -> None:
    env = {**watch_env, "SMT_WORKER_MODE": "process", "SMT_WORKERS": "1"}
    box = Path(env["SMT_LOCAL_DIR"])
    held = threading.Event()  # the first delivery hangs (until released below): kill its process mid-send
    receiver.state.faults.append(Fault(release=held))
    with started(env, tmp_path / "w.log") as w:
        wait_for(lambda: len(worker_pids(w.proc.pid)) == 1, 20, "a worker process")
        [first] = worker_pids(w.proc.pid)
        f = write_csv(box / "a.csv")
        wait_for(lambda: [r["state"] for r in ledger_rows(env)] == ["sending"], 20, "delivery in flight")
        os.kill(first, signal.SIGKILL)
        held.set()  # its connection died with it; the receiver's handler need not wait out a fixed delay
        wait_for(lambda: [r["state"] for r in ledger_rows(env)] == ["sent"], 30, "delivered by the new process")
        [second] = worker_pids(w.proc.pid)
        assert second != first
        assert w.stop() == 0
    assert "worker process smt-watch-delivery-0 exited" in w.text()
    assert receiver.read(hashlib.sha256(f.read_bytes()).hexdigest()) == f.read_bytes()


def test_worker_processes_die_with_a_killed_watcher(watch_env: dict[str, str], tmp_path: Path) -> None:
    env = {**watch_env, "SMT_WORKER_MODE": "process", "SMT_WORKERS": "2"}
    with started(env, tmp_path / "w.log") as w:
        wait_for(lambda: len(worker_pids(w.proc.pid)) == 2, 20, "two worker processes")
        pids = worker_pids(w.proc.pid)
        w.proc.kill()
        w.proc.wait(10)
    wait_for(lambda: not [p for p in pids if alive(p)], 10, "worker processes to die with the watcher")


def _thread_cpus(pid: int) -> dict[int, set[int]]:
    """Each thread's allowed CPUs, read from /proc (what the kernel enforces, not what the process thinks)."""
    found: dict[int, set[int]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            found[int(tid)] = os.sched_getaffinity(int(tid))
        except OSError:  # a thread that ended meanwhile
            continue
    return found


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to choose from")
@pytest.mark.parametrize(("extra", "one"), [({}, True), ({"SMT_ONE_CPU": "0"}, False),
                                             ({"SMT_WORKER_MODE": "process"}, False)],
                         ids=["default", "off", "process-mode"])
def test_watch_keeps_its_threads_on_one_cpu_in_thread_mode(watch_env: dict[str, str], tmp_path: Path,
                                                           extra: dict[str, str], one: bool) -> None:
    """SMT_ONE_CPU (on by default): in thread mode every thread of the watcher, those started before the
    binding (none should be) and after it (watchdog's, the workers'), may run on the same single CPU; off,
    or in process mode, they keep every CPU the process was given. smt_watch/cpus.py says why."""
    given = os.sched_getaffinity(0)
    with started({**watch_env, **extra}, tmp_path / "w.log") as w:
        write_csv(Path(watch_env["SMT_LOCAL_DIR"]) / "a.csv")  # the workers have run
        wait_for(lambda: "Droplet upload success" in w.text() or "upload success" in w.text(), 20, "a delivery")
        threads = _thread_cpus(w.proc.pid)
        assert len(threads) >= 4, threads  # the intake loop, watchdog's, the workers
        if one:
            [cpu] = {frozenset(c) for c in threads.values()}
            assert len(cpu) == 1 and cpu <= given, threads
            assert f"Keeping watch's threads on CPU {next(iter(cpu))}" in w.text()
        else:
            assert all(c == given for c in threads.values()), threads
            assert "Keeping watch's threads" not in w.text()
        assert w.stop() == 0
