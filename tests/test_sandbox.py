"""Each shipped unit run inside its own filesystem sandbox (tests/sandbox.py), as on the droplet.

The droplet layout is stood in for by the test's dirs: a home for ``deploy`` (the SMT key in its default
keyring ``~/.gnupg``, the inbox, ``~/.ssh``) bound at ``/home/deploy``, read-only but for the inbox as the
units say; ``/var/lib/smt-watch``; ``/etc/default/intelliwatt-smt``; a read-only ``/run/user/UID`` with the
``gnupg`` socket dir a logged-in ``deploy`` has. The process runs as an unprivileged uid that owns them (``nobody``: see
tests/sandbox.py for why ``setpriv`` and not a user namespace). Root and bwrap are needed: skipped with the
reason elsewhere, a failure under CI.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sandbox
from gpg_keys import GpgHome, make_home
from sandbox import UNPRIVILEGED, Sandbox, chown_tree, leftovers, parse_unit, unit_running
from sftp_server import running_sftp_server

from conftest import ADMIN_TOKEN, UPLOAD_TOKEN, wait_for, write_csv

ESIID = "10443720000000001"
START = 60.0  # the sandboxed process's first start (Python imports on a loaded 2-core machine)


@pytest.fixture(autouse=True)
def _needs_sandbox() -> None:
    sandbox.require()


@pytest.fixture(scope="module")
def smt_key(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GpgHome]:
    """IntelliWatt's SMT key pair, made once; each test copies it into its ``~deploy/.gnupg``."""
    if shutil.which("gpg") is None:
        pytest.skip("gpg is not installed")
    home = make_home(tmp_path_factory.mktemp("smtkey") / "g", "IntelliWatt SMT <smt@intelliwatt.invalid>")
    home.close()
    yield home
    home.close()


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GpgHome]:
    home = make_home(tmp_path_factory.mktemp("stranger") / "g", "Someone Else <else@example.invalid>")
    home.close()
    yield home
    home.close()


@dataclass
class Droplet:
    root: Path
    home: Path  # /home/deploy
    inbox: Path  # /home/deploy/smt_inbox
    state: Path  # /var/lib/smt-watch
    env_file: Path  # /etc/default/intelliwatt-smt

    def sandbox(self, command: str) -> Sandbox:
        return Sandbox(parse_unit(unit_running(command)), {
            "/home/deploy": self.home,
            "/home/deploy/smt_inbox": self.inbox,
            "/var/lib/smt-watch": self.state,
            "/etc/default/intelliwatt-smt": self.env_file,
            f"/run/user/{UNPRIVILEGED[0]}": self.root / "run-user",
        }, output=self.root / f"{command}.log")

    def write_env(self, **env: str) -> None:
        self.env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
        self.env_file.chmod(0o640)


@pytest.fixture
def droplet(tmp_path: Path, smt_key: GpgHome) -> Droplet:
    """The deploy user's home as IntelliWatt has it: the SMT key in ``~/.gnupg``, the inbox; owned by it."""
    home = tmp_path / "home"
    home.mkdir()
    shutil.copytree(smt_key.home, home / ".gnupg", ignore=shutil.ignore_patterns("S.*", "*.lock"))
    (home / "smt_inbox").mkdir()
    (home / ".ssh").mkdir(mode=0o700)
    # deploy has logged in and used gpg: its /run/user/UID/gnupg exists (read-only in the unit, as ProtectHome
    # makes /run/user), so gpg's own socket-dir logic meets it and must fall back to the private home
    (tmp_path / "run-user" / "gnupg").mkdir(mode=0o700, parents=True)
    (tmp_path / "run-user").chmod(0o700)
    for d in (home, tmp_path / "run-user"):
        chown_tree(d, *UNPRIVILEGED)
    return Droplet(tmp_path, home, home / "smt_inbox", tmp_path / "state", tmp_path / "intelliwatt-smt")


def smt_asc(key: GpgHome, csv_text: bytes, name: str = "IntervalMeterUsage.CSV") -> bytes:
    """What SMT sends: an encrypted, armoured ZIP holding the CSV."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(name, csv_text)
    return key.encrypt(buf.getvalue())


def interval_csv(tmp_path: Path, seed: int) -> bytes:
    return write_csv(tmp_path / f"plain-{seed}.csv", rows=12, seed=seed).read_bytes()


def delivery_env(receiver: Any) -> dict[str, str]:
    return {"INTELLIWATT_BASE_URL": receiver.url, "ADMIN_TOKEN": ADMIN_TOKEN, "SMT_DELIVERY": "raw-upload",
            "SMT_SETTLE_SECONDS": "0.2", "SMT_RETRY_BACKOFF_SECONDS": "0.05"}


def received_text(receiver: Any) -> str:
    return "".join(receiver.read(row["sha256"]).decode() for row in receiver.stored())


def test_plain_gpg_cannot_decrypt_in_the_watch_sandbox(droplet: Droplet, smt_key: GpgHome, tmp_path: Path) -> None:
    """The failure the issue reports, reproduced: the old script's plain ``gpg -d`` as ``deploy`` cannot use the
    read-only ``~/.gnupg`` (no lock, no agent socket). Also proves the emulation is not a no-op."""
    (droplet.inbox / "a.CSV.1.asc").write_bytes(smt_asc(smt_key, interval_csv(tmp_path, 1)))
    droplet.write_env()
    box = droplet.sandbox("watch")
    done = box.run(command=["gpg", "--batch", "-d", "/home/deploy/smt_inbox/a.CSV.1.asc"])
    assert done.returncode != 0
    assert "Read-only file system" in done.stdout, done.stdout
    assert ESIID not in done.stdout
    wrote = box.run(command=["touch", "/home/deploy/x", "/var/lib/smt-watch/ok", "/home/deploy/smt_inbox/ok"])
    assert "/home/deploy/x" in wrote.stdout and "Read-only" in wrote.stdout, wrote.stdout
    assert (droplet.state / "ok").exists() and (droplet.inbox / "ok").exists() and not (droplet.home / "x").exists()


def test_inspect_decrypts_in_the_watch_sandbox_and_shows_gpgs_reason_when_it_cannot(
        droplet: Droplet, smt_key: GpgHome, stranger: GpgHome, tmp_path: Path) -> None:
    (droplet.inbox / "ours.CSV.1.asc").write_bytes(smt_asc(smt_key, interval_csv(tmp_path, 2)))
    (droplet.inbox / "theirs.CSV.1.asc").write_bytes(smt_asc(stranger, interval_csv(tmp_path, 3)))
    droplet.write_env()
    box = droplet.sandbox("watch")
    ok = box.run(command=["/opt/smt-watch/bin/smt-watch", "inspect", "/home/deploy/smt_inbox/ours.CSV.1.asc",
                          "--json"])
    assert ok.returncode == 0 and ESIID in ok.stdout, ok.stdout
    bad = box.run(command=["/opt/smt-watch/bin/smt-watch", "inspect", "/home/deploy/smt_inbox/theirs.CSV.1.asc"])
    assert bad.returncode == 1 and "Traceback" not in bad.stdout
    line = bad.stdout.strip().splitlines()[-1]
    # gpg's own words and where it looked; not a read-only home, not an agent that cannot start
    assert "decryption failed: No secret key" in line and "/home/deploy/.gnupg" in line, line
    assert "Read-only" not in bad.stdout and "agent" not in line, bad.stdout
    assert leftovers(box) == []


def test_watch_delivers_an_asc_end_to_end_in_its_sandbox(droplet: Droplet, smt_key: GpgHome, stranger: GpgHome,
                                                         receiver: Any, tmp_path: Path) -> None:
    """smt-watch.service as shipped, the key where IntelliWatt keeps it (no GNUPGHOME): an .asc in the inbox
    reaches the app, and nothing (no agent, no key copy) is left behind. One encrypted to another key is
    `failed` with gpg's own reason, not a read-only home or an agent that cannot start."""
    csv_text = interval_csv(tmp_path, 4)
    droplet.write_env(**delivery_env(receiver))
    box = droplet.sandbox("watch")
    ledger = droplet.sandbox("watch")
    ledger.output = droplet.root / "ledger.log"  # its own: `watch` writes to the other one meanwhile

    def failed_rows() -> list[dict[str, Any]]:
        done = ledger.run(command=["/opt/smt-watch/bin/smt-watch", "ledger", "list", "--state", "failed", "--json"])
        return list(json.loads(done.stdout)) if done.returncode == 0 else []

    with box.running() as proc:
        (droplet.inbox / "IntervalMeterUsage.CSV.1.asc").write_bytes(smt_asc(smt_key, csv_text))
        wait_for(lambda: ESIID in received_text(receiver) or proc.poll() is not None, START,
                 "the .asc to be delivered from inside the sandbox")
        assert proc.poll() is None, box.text()
        (droplet.inbox / "other.CSV.1.asc").write_bytes(smt_asc(stranger, interval_csv(tmp_path, 7)))
        wait_for(failed_rows, START, "the other key's .asc to be failed")
        [row] = failed_rows()
    assert proc.returncode == 0, box.text()
    assert "Traceback" not in box.text(), box.text()
    sent = received_text(receiver)
    assert csv_text.decode().splitlines()[1] in sent
    assert row["filename"] == "other.CSV.1.asc"
    assert "decryption failed: No secret key (no secret key for it in /home/deploy/.gnupg)" in row["last_error"]
    assert "Read-only" not in row["last_error"] and "agent" not in row["last_error"]
    assert leftovers(box) == [], "a gpg-agent outlived the decryption"
    assert sorted(p.name for p in droplet.inbox.iterdir()) == ["IntervalMeterUsage.CSV.1.asc", "other.CSV.1.asc"]


def test_sync_fetches_in_its_sandbox(droplet: Droplet, smt_key: GpgHome, tmp_path: Path) -> None:
    """smt-sync.service as shipped: the SFTP key and known_hosts in ``~deploy/.ssh`` (read-only), files land in
    the inbox (writable), its memory in ``/var/lib/smt-watch``."""
    with running_sftp_server(tmp_path / "remote", tmp_path / "sftp-keys") as server:
        asc = smt_asc(smt_key, interval_csv(tmp_path, 5))
        server.put("adhocusage/IntervalMeterUsage.CSV.1.asc", asc)
        shutil.copyfile(server.client_key, droplet.home / ".ssh" / "smt_key")
        (droplet.home / ".ssh" / "smt_key").chmod(0o600)
        (droplet.home / ".ssh" / "known_hosts").write_text(server.known_hosts_line + "\n")
        chown_tree(droplet.home / ".ssh", *UNPRIVILEGED)
        droplet.write_env(SMT_HOST=server.host, SMT_PORT=str(server.port), SMT_USER="smt",
                          SMT_KEY="/home/deploy/.ssh/smt_key", SMT_KNOWN_HOSTS="/home/deploy/.ssh/known_hosts",
                          SMT_REMOTE_DIR="/", SMT_SFTP_TIMEOUT="10")
        box = droplet.sandbox("sync")
        done = box.run(timeout=START + 60)
    assert done.returncode == 0, done.stdout
    assert "Traceback" not in done.stdout
    fetched = droplet.inbox / "adhocusage" / "IntervalMeterUsage.CSV.1.asc"
    assert fetched.read_bytes() == asc
    assert fetched.stat().st_uid == UNPRIVILEGED[0]
    assert any(droplet.state.iterdir()), "sync kept no state in /var/lib/smt-watch"


def test_serve_stores_an_upload_in_its_sandbox(droplet: Droplet, tmp_path: Path, unused_port: int) -> None:
    """The serve unit (found by its ExecStart, whatever its file name) as shipped: an upload lands in the inbox."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        webhook_port = s.getsockname()[1]
    droplet.write_env(SMT_UPLOAD_HOST="127.0.0.1", SMT_UPLOAD_PORT=str(unused_port), SMT_UPLOAD_TOKEN=UPLOAD_TOKEN,
                      SMT_WEBHOOK_HOST="127.0.0.1", SMT_WEBHOOK_PORT=str(webhook_port))
    box = droplet.sandbox("serve")
    base = f"http://127.0.0.1:{unused_port}"
    csv_text = interval_csv(tmp_path, 6)

    def healthy() -> bool:
        try:
            return httpx.get(f"{base}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    with box.running() as proc:
        wait_for(lambda: healthy() or proc.poll() is not None, START, "serve to answer /health")
        assert proc.poll() is None, box.text()
        reply = httpx.post(f"{base}/upload", headers={"x-smt-upload-token": UPLOAD_TOKEN},
                           files={"file": ("usage.csv", csv_text, "text/csv")}, timeout=30)
        assert reply.status_code == 202, reply.text
    assert proc.returncode == 0, box.text()
    assert "Traceback" not in box.text(), box.text()
    stored = [p for p in droplet.inbox.iterdir() if p.name.endswith("usage.csv")]
    assert len(stored) == 1 and stored[0].read_bytes() == csv_text
    assert stored[0].stat().st_uid == UNPRIVILEGED[0]
    assert os.stat(droplet.inbox).st_uid == UNPRIVILEGED[0]


def test_doctor_proves_decryption_in_the_watch_sandbox(droplet: Droplet, receiver: Any) -> None:
    """doctor's round trip under the service's own sandbox: the same private-copy path as `watch`."""
    droplet.write_env(**delivery_env(receiver))
    box = droplet.sandbox("watch")
    done = box.run(command=["/opt/smt-watch/bin/smt-watch", "doctor", "--offline"])
    gpg_lines = [line for line in done.stdout.splitlines() if "gpg:" in line]
    assert len(gpg_lines) == 1 and gpg_lines[0].startswith("ok"), done.stdout
    assert "decryption works" in gpg_lines[0] and "/home/deploy/.gnupg" in gpg_lines[0]
    assert "Traceback" not in done.stdout
    assert leftovers(box) == []


def test_every_shipped_service_has_a_sandbox_test() -> None:
    """A new unit must get its own run in the sandbox above: these are the commands the tests run."""
    commands = {parse_unit(p).exec_start[1] for p in sandbox.units()}
    assert commands == {"watch", "sync", "serve"}, commands
    for command in commands:
        assert parse_unit(unit_running(command)).exec_start[0] == sandbox.INSTALLED_EXE
