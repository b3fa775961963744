"""Operations: the systemd units as installed, the env example, `doctor`, and JSON logs."""

from __future__ import annotations

import configparser
import http.server
import json
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import ADMIN_TOKEN, UPLOAD_TOKEN, write_csv
from smt_watch.config import SETTINGS, load_settings, parse_env_file

ROOT = Path(__file__).resolve().parent.parent
UNITS = sorted((ROOT / "systemd").glob("*.service")) + sorted((ROOT / "systemd").glob("*.timer"))
VENV_EXE = Path(sys.executable).parent / "smt-watch"
Run = Callable[..., subprocess.CompletedProcess[str]]


def unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    return parser


def test_units_exist() -> None:
    names = {p.name for p in UNITS}
    assert names == {"smt-watch.service", "smt-sync.service", "smt-sync.timer", "smt-watch-serve.service"}


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed here (Debian package systemd; .ci/run installs it)")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    for path in UNITS:
        # Installed as-is except the ExecStart path, which points into this test's venv.
        (tmp_path / path.name).write_text(path.read_text().replace("/opt/smt-watch/bin/smt-watch", str(VENV_EXE)))
    proc = subprocess.run(["systemd-analyze", "verify", *[str(tmp_path / p.name) for p in UNITS]],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "smt-watch" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("path", [p for p in UNITS if p.suffix == ".service"], ids=lambda p: p.name)
def test_exec_start_runs_in_the_venv(path: Path) -> None:
    exec_start = unit(path)["Service"]["ExecStart"].split()
    assert exec_start[0] == "/opt/smt-watch/bin/smt-watch"
    proc = subprocess.run([str(VENV_EXE), *exec_start[1:], "--help"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("path", [p for p in UNITS if p.suffix == ".service"], ids=lambda p: p.name)
def test_services_are_hardened(path: Path) -> None:
    text = path.read_text()
    for directive in ("NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=read-only",
                      "ReadWritePaths=/home/deploy/smt_inbox", "PrivateTmp=yes", "PrivateDevices=yes",
                      "ProtectKernelTunables=yes", "ProtectKernelModules=yes", "ProtectControlGroups=yes",
                      "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6", "RestrictNamespaces=yes",
                      "LockPersonality=yes", "SystemCallFilter=@system-service", "CapabilityBoundingSet=\n",
                      "UMask=0027", "User=deploy", "EnvironmentFile=-/etc/default/intelliwatt-smt",
                      "StateDirectory=smt-watch"):
        assert directive in text, f"{path.name} lacks {directive.strip()}"


def test_watch_unit_is_notify_with_watchdog() -> None:
    service = unit(ROOT / "systemd" / "smt-watch.service")["Service"]
    assert service["Type"] == "notify" and service["Restart"] == "always" and service["WatchdogSec"]
    timer = unit(ROOT / "systemd" / "smt-sync.timer")["Timer"]
    assert timer["OnCalendar"] == "*:0/30" and timer["Persistent"] == "true" and timer["RandomizedDelaySec"]
    assert unit(ROOT / "systemd" / "smt-sync.service")["Service"]["Type"] == "oneshot"


def test_env_example_documents_only_real_settings() -> None:
    example = ROOT / "systemd" / "intelliwatt-smt.env.example"
    values = parse_env_file(example)
    load_settings(values)  # the active lines are valid as they stand
    mentioned = set(re.findall(r"^#?([A-Z][A-Z0-9_]+)=", example.read_text(), flags=re.M))
    known = {name for s in SETTINGS.values() for name in (s.name, *s.aliases)}  # config.py's table of settings
    assert mentioned <= known, mentioned - known
    operator_facing = set(SETTINGS) - {"NOTIFY_SOCKET", "WATCHDOG_USEC", "DROPLET_WEBHOOK_SECRET", "SMT_STATE_DIR",
                               "SMT_SERVICE_STATE_DIR"}  # the units set it / a hook for tests
    assert operator_facing <= mentioned, operator_facing - mentioned


def test_every_line_of_the_env_example_works_uncommented_alone(tmp_path: Path) -> None:
    """An operator uncomments one line: its value must be the value (a trailing `# a | b` comment would
    become part of it) and the settings must load. Every commented `NAME=` line, one at a time."""
    example = ROOT / "systemd" / "intelliwatt-smt.env.example"
    lines = example.read_text().splitlines()
    tried = 0
    for i, line in enumerate(lines):
        m = re.match(r"^#([A-Z][A-Z0-9_]+)=(.*)$", line)
        if m is None:
            continue
        name, written = m[1], m[2]
        assert "#" not in written or "://" in written, f"line {i + 1}: a comment after the value: {line!r}"
        one = tmp_path / f"line{i + 1}"
        one.write_text("\n".join([*lines[:i], line[1:], *lines[i + 1:]]) + "\n")
        values = parse_env_file(one)
        assert values.get(name, "") == written.strip().strip("'\""), (i + 1, line, values.get(name))
        load_settings(values)  # raises a one-line ConfigError naming the line's variable if its value is bad
        tried += 1
    assert tried >= 40, tried


def test_doctor_good_setup(run_cli: Run, receiver: Any, tmp_path: Path) -> None:
    env_file = tmp_path / "intelliwatt-smt"
    env_file.write_text(f"SMT_UPLOAD_URL={receiver.url}/upload\nSMT_UPLOAD_TOKEN={UPLOAD_TOKEN}\nSMT_PATTERNS=*.csv\n")
    env_file.chmod(0o640)
    (tmp_path / "state").mkdir()
    proc = run_cli("doctor", "--env-file", str(env_file))
    assert proc.returncode == 0, proc.stdout
    lines = proc.stdout.splitlines()
    assert all(re.match(r"^(ok|warn|FAIL)\s+\S", line) for line in lines), lines
    assert any(line.startswith("ok    endpoint:") and "answers HTTP" in line for line in lines)
    assert any(line.startswith("warn  sftp:") for line in lines)  # SMT_HOST unset: sync not configured
    assert UPLOAD_TOKEN not in proc.stdout + proc.stderr


def test_doctor_broken_setup(run_cli: Run, tmp_path: Path, unused_port: int) -> None:
    env_file = tmp_path / "intelliwatt-smt"
    key = tmp_path / "id_ed25519"
    key.write_text("not really a key\n")
    key.chmod(0o644)
    env_file.write_text(
        f"SMT_UPLOAD_URL=http://127.0.0.1:{unused_port}/upload\nADMIN_TOKEN={ADMIN_TOKEN}\n"
        f"SMT_LOCAL_DIR={tmp_path / 'missing-inbox'}\nSMT_HOST=127.0.0.1\nSMT_USER=u\nSMT_KEY={key}\n"
        f"SMT_KNOWN_HOSTS={tmp_path / 'known_hosts'}\nSMT_PATTERNS=*.csv\n"
    )
    env_file.chmod(0o644)
    proc = run_cli("doctor", "--env-file", str(env_file), "--offline", env={"SMT_LOCAL_DIR": ""})
    assert proc.returncode == 1
    out = proc.stdout
    assert re.search(r"^FAIL  env file: .* world-readable", out, re.M)
    assert re.search(r"^FAIL  inbox: .*missing-inbox does not exist", out, re.M)
    assert re.search(r"^FAIL  ssh key: .* mode 644 .*chmod 600", out, re.M)
    assert re.search(r"^FAIL  known_hosts: 127.0.0.1 is not in .*ssh-keyscan", out, re.M)
    assert "endpoint" not in out  # --offline
    online = run_cli("doctor", "--env-file", str(env_file), env={"SMT_LOCAL_DIR": ""})
    assert re.search(r"^FAIL  endpoint: .*connection refused", online.stdout, re.M)
    gone = run_cli("doctor", "--env-file", str(env_file), "--offline",
                   env={"SMT_LOCAL_DIR": "", "SMT_KEY": str(tmp_path / "no-such-key")})
    assert re.search(r"^FAIL  ssh key: .*no-such-key does not exist  -> copy SMT's private key there", gone.stdout,
                     re.M), gone.stdout
    for text in (proc.stdout + proc.stderr, online.stdout + online.stderr):
        assert ADMIN_TOKEN not in text and "Traceback" not in text


@pytest.fixture
def head_recorder() -> Iterator[tuple[str, list[str]]]:
    """A real HTTP server on loopback that answers every HEAD with 204 and records the path asked for."""
    paths: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            paths.append(self.path)
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", paths
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.parametrize(("mode", "path", "token"), [
    ("raw-upload", "/api/admin/smt/raw-upload", "ADMIN_TOKEN"),
    ("inline", "/api/admin/smt/pull", "ADMIN_TOKEN"),
    ("multipart", "/upload", "SMT_UPLOAD_TOKEN"),
])
def test_doctor_reports_and_checks_the_url_the_mode_posts_to(
    run_cli: Run, head_recorder: tuple[str, list[str]], mode: str, path: str, token: str
) -> None:
    """With SMT_DELIVERY=raw-upload doctor names and HEAD-checks /api/admin/smt/raw-upload (it used to
    check the inline route, /api/admin/smt/pull); each mode reports its own token variable."""
    url, paths = head_recorder
    env = {"SMT_DELIVERY": mode, "INTELLIWATT_BASE_URL": url, "ADMIN_TOKEN": ADMIN_TOKEN, "SMT_PATTERNS": "*.csv"}
    if mode == "multipart":
        env = {**env, "SMT_UPLOAD_URL": f"{url}/upload", "SMT_UPLOAD_TOKEN": UPLOAD_TOKEN}
    proc = run_cli("doctor", env=env)
    lines = proc.stdout.splitlines()
    assert f"ok    delivery: {mode} to {url}{path} ({token} set)" in lines, proc.stdout
    assert f"ok    endpoint: {url}{path} answers HTTP 204" in lines, proc.stdout
    assert paths == [path]
    assert ADMIN_TOKEN not in proc.stdout + proc.stderr and UPLOAD_TOKEN not in proc.stdout + proc.stderr


def test_doctor_reports_a_bad_config_without_traceback(run_cli: Run) -> None:
    proc = run_cli("doctor", env={"SMT_WORKERS": "-3"})
    assert proc.returncode == 1
    assert proc.stdout.startswith("FAIL  config: SMT_WORKERS") and "Traceback" not in proc.stderr


def test_json_logs_parse_line_by_line(run_cli: Run, receiver: Any, tmp_path: Path) -> None:
    f = write_csv(tmp_path / "j.csv")
    proc = run_cli("--log-format", "json", "post", str(f),
                   env={"SMT_UPLOAD_URL": f"{receiver.url}/upload", "SMT_UPLOAD_TOKEN": UPLOAD_TOKEN})
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stderr.splitlines()]
    assert records and all(set(r) >= {"ts", "level", "logger", "msg"} for r in records)
    assert any(r["msg"].startswith("Droplet upload success (200)") for r in records)
    assert UPLOAD_TOKEN not in proc.stderr


def test_doctor_proves_the_token_and_the_url_with_the_target_itself(run_cli: Run, tmp_path: Path) -> None:
    """A base URL holding the route path answers 404, a wrong ADMIN_TOKEN 401, a placeholder is no token: each
    a FAIL (it used to be "ok (set)" and the first delivery got the refusal). The right token: ok, and the
    probe stored nothing."""
    from smt_watch.reference.receiver import running_receiver

    with running_receiver(tmp_path / "app", admin_token=ADMIN_TOKEN, upload_token=UPLOAD_TOKEN) as app:
        def doctor(**env: str) -> tuple[int, list[str]]:
            proc = run_cli("doctor", env={"SMT_PATTERNS": "*.csv", **env})
            assert "Traceback" not in proc.stderr and ADMIN_TOKEN not in proc.stdout + proc.stderr
            return proc.returncode, proc.stdout.splitlines()

        code, lines = doctor(INTELLIWATT_BASE_URL=app.url, ADMIN_TOKEN=ADMIN_TOKEN)
        assert any(line.startswith("ok    token: ADMIN_TOKEN accepted by") for line in lines), lines
        code, lines = doctor(INTELLIWATT_BASE_URL=app.url, ADMIN_TOKEN="wrong-token-0123456789")
        assert code == 1 and any(line.startswith("FAIL  token:") and "refuses ADMIN_TOKEN (HTTP 401)" in line
                                 for line in lines), lines
        code, lines = doctor(INTELLIWATT_BASE_URL=f"{app.url}/api/admin/smt/raw-upload", ADMIN_TOKEN=ADMIN_TOKEN)
        assert code == 1 and any(line.startswith("FAIL  token:") and "answers 404" in line
                                 and "without /api/" in line for line in lines), lines
        code, lines = doctor(INTELLIWATT_BASE_URL=app.url, ADMIN_TOKEN="REPLACE_WITH_64_CHAR_TOKEN")
        assert code == 1 and any(line.startswith("FAIL  delivery: ADMIN_TOKEN is still the example's placeholder")
                                 for line in lines), lines
        code, lines = doctor(SMT_UPLOAD_URL=f"{app.url}/upload", SMT_UPLOAD_TOKEN="wrong-upload-token-0123")
        assert code == 1 and any(line.startswith("FAIL  token:") and "refuses SMT_UPLOAD_TOKEN" in line
                                 for line in lines), lines
        code, lines = doctor(SMT_UPLOAD_URL=f"{app.url}/upload", SMT_UPLOAD_TOKEN=UPLOAD_TOKEN)
        assert any(line.startswith("ok    token: SMT_UPLOAD_TOKEN accepted") for line in lines), lines
        assert app.stored() == [], "the probes stored nothing"
