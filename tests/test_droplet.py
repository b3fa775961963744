"""IntelliWatt's droplet, its own tooling included, with smt-watch migrated onto it as docs/operator.md says.

On the droplet a watchdog (``intelliwatt-ensure-services.timer``, every 2 minutes) enables and starts every old
SMT unit that is installed, and every deploy copies the Node upload server's unit back and starts it. These
tests stand in for that droplet: systemd is ``tests/droplet/bin/systemctl`` (a real systemd cannot run here as
PID 1; the stand-in keeps unit files, masks, enablement and real processes under a temp root, see its
docstring), the droplet's scripts are ``tests/droplet/*.sh`` (stand-ins written from their behaviour), and the
old units run tiny stand-in programs: the old ingest posts every inbox CSV to the reference receiver with
``role=smt-ingest``, the Node server and the bridge hold their ports. smt-watch's own units run the real
``smt-watch watch`` and ``serve``. The operator guide's migration and rollback are run from its own fenced
blocks, with ``/etc``, ``/home`` and ``/opt`` mapped under the temp root.
"""

from __future__ import annotations

import collections
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from test_server_process import free_ports

from conftest import UPLOAD_TOKEN, wait_for, write_csv

ROOT = Path(__file__).resolve().parent.parent
STANDINS = Path(__file__).resolve().parent / "droplet"
GUIDE = ROOT / "docs" / "operator.md"  # the operator guide: its Install and Migrating blocks are run here
VENV_EXE = Path(sys.executable).parent / "smt-watch"
OLD_UNITS = ("smt-ingest.timer", "smt-ingest.service", "smt-upload-server.service")
HOST_CHECK = re.compile(r"^(ok|warn|FAIL)\s+(old unit \S+|port \d+|bridge|systemd): .*$", re.M)
START_TIMEOUT = 30.0  # seconds for a started process to bind its port or deliver, on a loaded 2-core machine
# A watchdog run is some twenty stand-in systemctl processes; a test runs several, plus real watch and serve
# processes. Under a load of 30 on 2 cores that exceeded the suite's 120 s, so these tests get more.
SLOW_TEST_TIMEOUT = 360


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def readme_block(contains: str) -> str:
    """The fenced ``bash`` block of the operator guide's "Migrating from fetch_and_post.sh" that contains
    ``contains``."""
    text = GUIDE.read_text()
    section = text[text.index("## Migrating from `fetch_and_post.sh`"):]
    section = section[:section.index("\n## ", 1)]
    blocks = [textwrap.dedent(m.group(2)) for m in re.finditer(r"^( *)```bash\n(.*?)^\1```", section, re.M | re.S)]
    found = [b for b in blocks if contains in b]
    assert len(found) == 1, f"docs/operator.md Migrating has {len(found)} bash blocks containing {contains!r}"
    return found[0]


@dataclass
class Droplet:
    root: Path
    inbox: Path
    env_file: Path
    upload_port: int  # the Node server's SMT_UPLOAD_PORT, then serve's (8081 on the droplet)
    webhook_port: int  # the bridge's PORT, then serve's webhook (8787 on the droplet)
    moved_port: int  # where the README moves the bridge (8788 on the droplet)
    receiver: Any

    def sh(self, script: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run bash with the stand-in systemctl and sudo first on PATH, from the repository root."""
        env = {"PATH": self.path, "SYSTEMCTL_STANDIN_ROOT": str(self.root), "HOME": str(self.root / "home/deploy"),
               "LANG": "C.UTF-8"}
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=SLOW_TEST_TIMEOUT / 2)
        if check:
            assert proc.returncode == 0, f"{script}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        return proc

    @property
    def path(self) -> str:
        """The stand-ins first, then this venv's python as ``python3`` (the stand-ins' ``#!/usr/bin/env python3``
        would otherwise find whatever wrapper PATH has, which may take a second a call on a loaded machine)."""
        return f"{STANDINS / 'bin'}:{self.root / 'usr/bin'}:{os.environ.get('PATH', '')}"

    def mapped(self, commands: str) -> str:
        """README commands with the droplet's paths under the temp root and its ports replaced by the test's."""
        commands = re.sub(r"(?<![\w.])/(etc|home|opt|var)/", lambda m: f"{self.root}/{m.group(1)}/", commands)
        return commands.replace("8788", str(self.moved_port))

    def active(self, *units: str) -> dict[str, bool]:
        """Each unit's ``systemctl is-active`` answer, from one call (it prints one state a line, in order):
        a stand-in call is a process start, which a loaded machine makes slow."""
        states = self.sh(f"systemctl is-active {' '.join(units)}", check=False).stdout.split()
        assert len(states) == len(units), states
        return {unit: state == "active" for unit, state in zip(units, states, strict=True)}

    def journal(self) -> list[str]:
        path = self.root / "run/systemd-standin/journal"
        return path.read_text().splitlines() if path.exists() else []

    def doctor(self) -> subprocess.CompletedProcess[str]:
        env = {"PATH": self.path, "SYSTEMCTL_STANDIN_ROOT": str(self.root), "HOME": str(self.root / "home/deploy"),
               "SMT_STATE_DIR": str(self.root / "var/lib/smt-watch")}
        return subprocess.run([str(VENV_EXE), "doctor", "--offline", "--env-file", str(self.env_file)], env=env,
                              capture_output=True, text=True, timeout=60)

    def deliveries(self) -> list[tuple[str | None, str | None]]:
        """(sha256, role) of every file request the receiver answered 2xx."""
        return [(r.sha256, r.fields.get("role")) for r in list(self.receiver.state.requests)
                if r.status is not None and 200 <= r.status < 300 and r.sha256]


def _unit(description: str, service: str = "", install: str = "WantedBy=multi-user.target") -> str:
    return f"[Unit]\nDescription={description}\n\n{service}\n[Install]\n{install}\n"


def _write_old_droplet(d: Droplet, receiver_url: str) -> None:
    """IntelliWatt's repository on the droplet: its unit files, shaped like the real ones (deploy/droplet/,
    deploy/smt/), each running a stand-in program; and the droplet's env file."""
    repo = d.root / "home/deploy/apps/intelliwatt/deploy"
    env = "EnvironmentFile=/etc/default/intelliwatt-smt\n"
    files = {
        "droplet/smt-upload-server.service": _unit("Node upload server stand-in", (
            f"[Service]\nType=simple\n{env}Environment=SMT_UPLOAD_PORT={d.upload_port}\n"
            "ExecStart=/usr/bin/python3 /opt/old/listener.py SMT_UPLOAD_PORT ::\nRestart=always\n")),
        "droplet/smt-webhook.service": _unit("webhook bridge stand-in (Python on 8787)", (
            f"[Service]\nType=simple\n{env}Environment=PORT={d.webhook_port}\n"
            "ExecStart=/usr/bin/python3 /opt/old/listener.py PORT 0.0.0.0\nRestart=always\n")),
        "droplet/systemd/smt-webhook.override.conf": f"[Service]\nEnvironmentFile=\n{env}Restart=always\n",
        "droplet/intelliwatt-ensure-services.service": (
            "[Unit]\nDescription=watchdog\n\n[Service]\nType=oneshot\n"
            "ExecStart=/usr/bin/env bash /home/deploy/apps/intelliwatt/deploy/droplet/ensure-services.sh\n"),
        "droplet/intelliwatt-ensure-services.timer": _unit(
            "watchdog every 2 minutes", "[Timer]\nOnUnitActiveSec=120\n", "WantedBy=timers.target"),
        "smt/smt-ingest.service": _unit("old ingest stand-in (fetch_and_post.sh)", (
            f"[Service]\nType=simple\n{env}Environment=OLD_INGEST_URL={receiver_url}/upload\n"
            "ExecStart=/usr/bin/python3 /opt/old/old_ingest.py\nRestart=always\nRestartSec=30\n")),
        "smt/smt-ingest.timer": _unit("old ingest every 30 minutes", "[Timer]\nOnUnitActiveSec=30m\n"
                                      "Unit=smt-ingest.service\n", "WantedBy=timers.target"),
    }
    for name, text in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text)
    for link, target in {"usr/bin/python3": Path(sys.executable), "opt/smt-watch/bin/smt-watch": VENV_EXE,
                         "opt/old/old_ingest.py": STANDINS / "old_ingest.py",
                         "opt/old/listener.py": STANDINS / "listener.py"}.items():
        (d.root / link).parent.mkdir(parents=True, exist_ok=True)
        (d.root / link).symlink_to(target)
    d.env_file.parent.mkdir(parents=True, exist_ok=True)
    d.env_file.write_text(
        f"SMT_LOCAL_DIR={d.inbox}\nSTATE_FILE={d.inbox}/.posted_sha256\nSMT_UPLOAD_URL={receiver_url}/upload\n"
        f"SMT_UPLOAD_TOKEN={UPLOAD_TOKEN}\nSMT_UPLOAD_PORT={d.upload_port}\nSMT_WEBHOOK_PORT={d.webhook_port}\n"
        "SMT_PATTERNS=*.csv\nSMT_SETTLE_SECONDS=0.2\nSMT_RETRY_BACKOFF_SECONDS=0.05\n")
    d.env_file.chmod(0o640)


@pytest.fixture
def droplet(tmp_path: Path, receiver: Any) -> Iterator[Droplet]:
    """The droplet as it runs today: old units installed, enabled and running, the watchdog timer on, and
    smt-watch's units copied in by the README's Install command (not enabled yet)."""
    upload, webhook, moved = free_ports(3)
    root = tmp_path / "root"
    d = Droplet(root=root, inbox=tmp_path / "inbox", env_file=root / "etc/default/intelliwatt-smt",
                upload_port=upload, webhook_port=webhook, moved_port=moved, receiver=receiver)
    d.inbox.mkdir()
    (d.root / "etc/systemd/system").mkdir(parents=True)
    _write_old_droplet(d, receiver.url)
    try:
        repo = d.root / "home/deploy/apps/intelliwatt/deploy"
        d.sh(f"sudo cp {repo}/smt/smt-ingest.service {repo}/smt/smt-ingest.timer {d.root}/etc/systemd/system/")
        d.sh(f"sudo bash {STANDINS}/apply_services.sh")  # installs and starts the Node server, bridge, watchdog
        d.sh("sudo systemctl enable --now smt-ingest.timer smt-ingest.service")
        install = re.search(r"^sudo cp systemd/.*?/etc/systemd/system/$", GUIDE.read_text(), re.M | re.S)
        assert install is not None and "smt-watch-serve.service" in install.group(0)
        d.sh(d.mapped(install.group(0)))
        active = d.active(*OLD_UNITS, "smt-webhook.service", "intelliwatt-ensure-services.timer")
        assert all(active.values()), active
        wait_for(lambda: listening(upload) and listening(webhook), START_TIMEOUT, "the old servers' ports")
        yield d
    finally:
        _stop_everything(d.root / "run/systemd-standin")


def _stop_everything(run: Path) -> None:
    """Stop every process the stand-in systemctl started in this test (by the pids it recorded)."""
    pids = []
    for pidfile in run.glob("*.pid"):
        pid = int(pidfile.read_text())
        try:
            os.killpg(pid, signal.SIGTERM)
            pids.append(pid)
        except ProcessLookupError:
            pass

    def gone(pid: int) -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return True
        return state in ("Z", "X")

    try:
        wait_for(lambda: all(gone(p) for p in pids), 20, "stand-in processes to stop")
    except AssertionError:
        for pid in pids:
            if not gone(pid):
                os.killpg(pid, signal.SIGKILL)


@pytest.mark.timeout(SLOW_TEST_TIMEOUT)
def test_without_the_migration_the_tooling_restarts_the_old_units_and_doctor_names_each(droplet: Droplet) -> None:
    d = droplet
    # What "stop the old timer" alone does on this droplet: undone by the watchdog's next run.
    d.sh("sudo systemctl disable --now smt-ingest.timer smt-ingest.service smt-upload-server.service")
    assert not any(d.active("smt-ingest.service", "smt-upload-server.service").values())
    stopped = d.doctor().stdout  # stopped and disabled is not enough while the watchdog timer is on
    for unit in OLD_UNITS:
        assert re.search(rf"^FAIL  old unit {re.escape(unit)}: installed and not masked: "
                         r"intelliwatt-ensure-services.timer enables and starts it within 2 minutes  -> "
                         rf".*sudo systemctl mask {re.escape(unit)}", stopped, re.M), stopped
    d.sh(f"bash {STANDINS}/ensure_services.sh")
    active = d.active(*OLD_UNITS)
    assert all(active.values()), f"the watchdog did not bring every old unit back: {active}"
    # ...and the old ingest delivers (this harness sees an old unit deliver when one runs).
    csv = write_csv(d.inbox / "adhocusage" / "before.csv", seed=99)
    digest = hashlib.sha256(csv.read_bytes()).hexdigest()
    wait_for(lambda: (digest, "smt-ingest") in d.deliveries(), START_TIMEOUT, "the old ingest's post")
    wait_for(lambda: listening(d.upload_port), START_TIMEOUT, "the Node stand-in's port")

    proc = d.doctor()
    assert proc.returncode == 1, proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    out = proc.stdout
    for unit in OLD_UNITS:
        line = re.search(rf"^FAIL  old unit {re.escape(unit)}: active: it runs beside smt-watch  -> (.*)$", out, re.M)
        assert line, out
        assert f"sudo rm -f /etc/systemd/system/{unit} && sudo systemctl mask {unit}" in line.group(1)
    nodes = d.sh("systemctl show -p MainPID smt-upload-server.service smt-webhook.service").stdout.split()
    node_pid, bridge_pid = (int(p.split("=")[1]) for p in nodes)
    assert re.search(rf"^FAIL  port {d.upload_port}: SMT_UPLOAD_PORT {d.upload_port} is held by pid {node_pid} "
                     r"\(smt-upload-server.service\): .*listener.py SMT_UPLOAD_PORT.*systemctl mask", out, re.M), out
    assert re.search(rf"^FAIL  port {d.webhook_port}: SMT_WEBHOOK_PORT {d.webhook_port} is held by pid {bridge_pid} "
                     r"\(smt-webhook.service\): .*smt-watch-port.conf", out, re.M), out
    assert re.search(rf"^FAIL  bridge: smt-webhook.service \(the old webhook bridge\) listens on PORT={d.webhook_port}"
                     r".*Environment=PORT=8788.*smt-watch-port.conf", out, re.M), out


@pytest.mark.timeout(SLOW_TEST_TIMEOUT)
def test_the_readme_migration_survives_the_watchdog_and_deploys(droplet: Droplet) -> None:
    d = droplet
    proc = d.sh(d.mapped(readme_block("systemctl mask")))
    assert "already exists" not in proc.stderr  # the unit files were removed before the masks
    mark = len(d.journal())
    wait_for(lambda: listening(d.upload_port) and listening(d.webhook_port) and listening(d.moved_port),
             START_TIMEOUT, "serve on the upload and webhook ports, the bridge on its new one")

    sent: list[str] = []
    for round_ in range(3):
        csv = write_csv(d.inbox / "adhocusage" / f"round{round_}.csv", seed=round_)
        sent.append(hashlib.sha256(csv.read_bytes()).hexdigest())
        assert d.sh(f"bash {STANDINS}/ensure_services.sh").returncode == 0  # the 2-minute watchdog
        if round_ == 1:  # a deploy: the Node unit copied back (through the mask), enable --now on it
            d.sh(f"sudo bash {STANDINS}/apply_services.sh")
        if round_ == 2:  # a full post_pull: documented in the README as stopping at the first masked unit
            pull = d.sh(f"bash {STANDINS}/post_pull.sh", check=False)
            assert pull.returncode == 1 and "Unit smt-ingest.service is masked." in pull.stderr, pull.stderr
        active = d.active(*OLD_UNITS)
        assert not any(active.values()), f"an old unit runs again after round {round_}: {active}"
        assert (d.root / "etc/systemd/system/smt-upload-server.service").is_symlink()  # still the mask
        wait_for(lambda: all((s, "admin") in d.deliveries() for s in sent), START_TIMEOUT,
                 f"smt-watch to deliver round {round_}")

    started = [line for line in d.journal()[mark:] if line.startswith("start ")]
    assert not [line for line in started if line.split()[1] in OLD_UNITS], started
    deliveries = d.deliveries()
    assert not [r for r in deliveries if r[1] != "admin"], deliveries  # no smt-ingest post, ever
    assert collections.Counter(sha for sha, _ in deliveries) == dict.fromkeys(sent, 1)  # each file once

    proc = d.doctor()
    host = HOST_CHECK.findall(proc.stdout)
    assert host and all(status == "ok" for status, _ in host), proc.stdout
    for unit in OLD_UNITS:
        assert f"ok    old unit {unit}: masked" in proc.stdout
    assert re.search(rf"^ok    port {d.upload_port}: held by smt-watch serve", proc.stdout, re.M), proc.stdout
    assert re.search(rf"^ok    port {d.webhook_port}: held by smt-watch serve", proc.stdout, re.M), proc.stdout
    assert re.search(rf"^ok    bridge: smt-webhook.service on PORT={d.moved_port}", proc.stdout, re.M), proc.stdout
    assert proc.returncode == 0, proc.stdout

    # The README's rollback undoes it: the watchdog brings the old units back, smt-watch is off.
    d.sh(d.mapped(readme_block("systemctl unmask")))
    d.sh(f"bash {STANDINS}/ensure_services.sh")
    active = d.active(*OLD_UNITS, "smt-webhook.service", "smt-watch.service", "smt-watch-serve.service")
    assert all(active[u] for u in (*OLD_UNITS, "smt-webhook.service")), active
    assert not active["smt-watch.service"] and not active["smt-watch-serve.service"], active
    assert "SMT_WEBHOOK_FORWARD_URL" not in d.env_file.read_text()
    wait_for(lambda: listening(d.webhook_port) and listening(d.upload_port), START_TIMEOUT,
             "the bridge and the Node server back on their ports")


@pytest.mark.parametrize("standin", [False, True], ids=["no-systemctl", "systemd-not-running"])
def test_without_systemd_the_unit_checks_say_so_and_the_port_checks_run(
        standin: bool, tmp_path: Path, unused_port: int) -> None:
    """A container or CI: no systemctl on PATH, or one that cannot reach systemd (the stand-in without its root
    prints what systemctl prints then). One ok line says so; no traceback; the ports are still checked."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("python3",) + (("systemctl",) if standin else ()):
        (bin_dir / tool).symlink_to(Path(sys.executable) if tool == "python3" else STANDINS / "bin" / tool)
    (tmp_path / "inbox").mkdir()
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "SMT_LOCAL_DIR": str(tmp_path / "inbox"),
           "SMT_STATE_DIR": str(tmp_path / "state"), "SMT_UPLOAD_PORT": str(unused_port), "SMT_PATTERNS": "*.csv"}
    proc = subprocess.run([str(VENV_EXE), "doctor", "--offline"], env=env, capture_output=True, text=True, timeout=60)
    reason = "System has not been booted with systemd" if standin else "systemctl is not installed"
    assert re.search(rf"^ok    systemd: not running here \({reason}.*\): old-unit and bridge checks skipped$",
                     proc.stdout, re.M), proc.stdout
    assert re.search(rf"^ok    port {unused_port}: free for serve \(SMT_UPLOAD_PORT, 127.0.0.1\)$", proc.stdout, re.M)
    assert "old unit" not in proc.stdout and "Traceback" not in proc.stdout + proc.stderr


def test_where_systemd_runs_but_cannot_be_asked_doctor_warns_and_says_run_it_as_root(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Some droplets refuse a non-root systemctl the system bus: that is not "systemd is not running"."""
    from smt_watch import host
    from smt_watch.config import load_settings

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    (bin_dir / "systemctl").symlink_to(STANDINS / "bin" / "systemctl")
    monkeypatch.setenv("PATH", str(bin_dir))  # the stand-in without its root fails as systemctl does there
    monkeypatch.delenv("SYSTEMCTL_STANDIN_ROOT", raising=False)
    booted = tmp_path / "run-systemd-system"
    booted.mkdir()
    settings = load_settings({"SMT_LOCAL_DIR": str(tmp_path), "SMT_UPLOAD_PORT": "0"})
    findings = list(host.checks(settings, booted=booted))
    assert findings[0][:2] == ("warn", "systemd"), findings
    assert "cannot ask systemd (System has not been booted with systemd" in findings[0][2]
    assert "sudo /opt/smt-watch/bin/smt-watch doctor" in findings[0][3]
    assert not [f for f in findings if f[1].startswith(("old unit", "bridge"))]


@pytest.mark.parametrize(("forward", "status", "detail"), [
    (None, "warn", "SMT_WEBHOOK_FORWARD_URL is not set"),
    ("http://127.0.0.1:9999", "FAIL", "points at port 9999, but smt-webhook.service listens on PORT=8788"),
    ("http://127.0.0.1/", "FAIL", "points at port 80, but smt-webhook.service listens on PORT=8788"),
    ("http://127.0.0.1:8788/", "ok", "smt-webhook.service on PORT=8788, serve's webhook on 8787, forwarding to it"),
])
def test_doctor_checks_the_forward_url_against_the_bridges_port(forward: str | None, status: str, detail: str,
                                                                tmp_path: Path) -> None:
    """``systemctl show`` output as systemd prints it (quoted Environment=), parsed and judged."""
    from smt_watch import host
    from smt_watch.config import load_settings

    shown = ("Id=smt-webhook.service\nLoadState=loaded\nUnitFileState=enabled\nActiveState=active\nMainPID=42\n"
             'Environment=PORT=8788 "GREETING=a b"\n\nId=intelliwatt-ensure-services.timer\nLoadState=not-found\n'
             "UnitFileState=\nActiveState=inactive\nMainPID=0\nEnvironment=\n")
    units = {u.name: u for u in host.parse_show(shown)}
    assert units["smt-webhook.service"].environment == {"PORT": "8788", "GREETING": "a b"}
    env = {"SMT_LOCAL_DIR": str(tmp_path), "SMT_WEBHOOK_PORT": "8787"}
    if forward:
        env["SMT_WEBHOOK_FORWARD_URL"] = forward
    (finding,) = host.bridge_findings(load_settings(env), units)
    assert finding[:2] == (status, "bridge") and detail in finding[2], finding
