"""`smt-watch sync` against a real SFTP server on 127.0.0.1 (asyncssh in-process; OpenSSH sshd when installed).

Most behaviour goes through the real CLI (`python -m smt_watch sync`) for exit codes and messages; fault and
concurrency cases call `run_sync` in-process where the test must act while a pass is running. The server
counts every file byte it serves, so "fetched nothing" and "fetched only the rest" are exact assertions,
and it refuses (and records) any change to the remote tree. Every wait is a condition with a deadline.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paramiko
import pytest
from sftp_server import (
    KEY_KINDS,
    SftpTestServer,
    SshdServer,
    fingerprint,
    generate_key,
    host_pattern,
    public_line,
    running_sftp_server,
    running_sshd,
    sftp_env,
    shared_key,
    write_private_key,
)

from conftest import UPLOAD_TOKEN, wait_for, watching, write_csv
from smt_watch import sftp, sshfast, sync
from smt_watch.config import Settings
from smt_watch.errors import SftpError
from smt_watch.sftp import Connection
from smt_watch.sync import ATTEMPTS, SyncReport, run_sync

Make = Callable[..., Settings]
RunCli = Callable[..., subprocess.CompletedProcess[str]]

SUMMARY = re.compile(
    r"^sync: (?P<new>\d+) new \((?P<size>\d+ B|\d+\.\d (?:KB|MB|GB)) in (?P<secs>\d+\.\d) s\), "
    r"(?P<already>\d+) already fetched, (?P<failed>\d+) failed$"
)
MiB = 1024 * 1024


# --- fixtures and helpers --------------------------------------------------------------------------------


@pytest.fixture
def server(sftp: SftpTestServer) -> SftpTestServer:
    """This module's name for conftest's ``sftp`` (a real SFTP server on loopback, one per test)."""
    return sftp


@pytest.fixture
def known_hosts(tmp_path: Path) -> Path:
    return tmp_path / "ssh" / "known_hosts"


@pytest.fixture
def env(server: SftpTestServer, known_hosts: Path) -> dict[str, str]:
    """SMT_* for the asyncssh server, its host key already trusted."""
    return sftp_env(server, known_hosts)


@pytest.fixture
def inbox(base_env: dict[str, str]) -> Path:
    return Path(base_env["SMT_LOCAL_DIR"])


def sync_once(make_settings: Make, env: dict[str, str], **kw: Any) -> SyncReport:
    report = run_sync(make_settings(**env), **kw)
    assert report is not None, "the lock was taken by nobody else, yet run_sync said a sync is running"
    return report


def summary(result: subprocess.CompletedProcess[str]) -> re.Match[str]:
    lines = result.stdout.strip().splitlines()
    assert lines, f"no output; stderr: {result.stderr}"
    match = SUMMARY.match(lines[-1])
    assert match, f"last line is not a sync summary: {lines[-1]!r}"
    return match


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a refused run prints: exactly one non-empty stderr line, no traceback, nothing on stdout."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{result.stderr}"
    assert lines[0].startswith("smt-watch: "), lines[0]
    assert "internal error" not in lines[0], lines[0]
    return lines[0]


def visible(inbox: Path) -> dict[str, bytes]:
    """Every regular file in the inbox with no hidden path part: what `watch` could pick up."""
    out = {}
    for path in inbox.rglob("*"):
        rel = path.relative_to(inbox)
        if path.is_file() and not any(p.startswith(".") for p in rel.parts):
            out[rel.as_posix()] = path.read_bytes()
    return out


def parts(inbox: Path) -> list[Path]:
    return sorted(p for p in inbox.rglob(".*.part") if p.is_file())


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sessions_for(server: SftpTestServer, path: str) -> dict[int, list[tuple[int, int]]]:
    """session -> the byte ranges of ``path`` it read."""
    return {r.session: server.ranges(path, r.session) for r in server.reads if r.path == path}


def blocked_flock_waiter(pid: int) -> bool:
    """True when ``pid`` is queued on an flock (a ``->`` entry in /proc/locks)."""
    try:
        text = Path("/proc/locks").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[1] == "->" and fields[2] == "FLOCK" and fields[5] == str(pid):
            return True
    return False


def subprocess_env(base_env: dict[str, str], tmp_path: Path, env: dict[str, str]) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path / "home"), **base_env, **env}


# --- what gets fetched -----------------------------------------------------------------------------------


def test_new_files_fetched_byte_identical_at_their_remote_path(
    server: SftpTestServer, env: dict[str, str], run_cli: RunCli, inbox: Path
) -> None:
    files = {
        "adhocusage/2026/a.CSV": os.urandom(300_000),
        "adhocusage/2026/11/b.csv": os.urandom(70_000),
        "c.zip": os.urandom(1234),
        "empty.csv": b"",
    }
    for rel, data in files.items():
        server.put(rel, data)
    result = run_cli("sync", env=env)
    assert result.returncode == 0, result.stderr
    m = summary(result)
    assert (m["new"], m["already"], m["failed"]) == ("4", "0", "0"), result.stderr
    assert m["size"] == "371.2 KB"
    assert "Retrying" not in result.stderr, result.stderr
    assert visible(inbox) == files
    assert parts(inbox) == []
    assert server.read_ranges() == {f"/{rel}": [(0, len(data))] for rel, data in files.items() if data}
    assert server.mutations == []  # remote files are never modified or deleted
    assert all((server.root / rel).read_bytes() == data for rel, data in files.items())


def test_second_run_fetches_nothing(
    server: SftpTestServer, env: dict[str, str], run_cli: RunCli, inbox: Path
) -> None:
    server.put("adhocusage/2026/a.CSV", os.urandom(200_000))
    server.put("b.csv", os.urandom(10_000))
    assert run_cli("sync", env=env).returncode == 0
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in inbox.rglob("*") if p.is_file()}
    server.reset_counters()
    result = run_cli("sync", env=env)
    assert result.returncode == 0, result.stderr
    m = summary(result)
    assert (m["new"], m["size"], m["already"], m["failed"]) == ("0", "0 B", "2", "0")
    assert server.served() == 0
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in inbox.rglob("*") if p.is_file()} == before


def test_locally_deleted_file_is_not_fetched_again(
    server: SftpTestServer, env: dict[str, str], make_settings: Make, inbox: Path
) -> None:
    server.put("adhocusage/a.CSV", os.urandom(50_000))
    assert len(sync_once(make_settings, env).fetched) == 1
    (inbox / "adhocusage" / "a.CSV").unlink()  # e.g. watch with SMT_AFTER_SEND=delete
    server.reset_counters()
    report = sync_once(make_settings, env)
    assert (len(report.fetched), report.already, report.failed) == (0, 1, [])
    assert server.served() == 0
    assert visible(inbox) == {}


def test_changed_remote_file_is_fetched_again(
    server: SftpTestServer, env: dict[str, str], make_settings: Make, inbox: Path
) -> None:
    t0 = time.time() - 3600
    old = {name: os.urandom(40_000) for name in ("grown.csv", "touched.csv", "rewritten.csv", "same.csv")}
    for name, data in old.items():
        server.put(f"d/{name}", data, mtime=t0)
    assert len(sync_once(make_settings, env).fetched) == 4
    (inbox / "d" / "grown.csv").unlink()  # delivered and deleted by watch
    grown = old["grown.csv"] + b"more rows\n"
    server.put("d/grown.csv", grown, mtime=t0)  # new size, same mtime
    os.utime(server.root / "d" / "touched.csv", (t0 + 60, t0 + 60))  # same bytes, new mtime
    rewritten = os.urandom(40_000)
    server.put("d/rewritten.csv", rewritten, mtime=t0 + 60)  # same size, new bytes and mtime
    server.reset_counters()

    report = sync_once(make_settings, env)
    assert (len(report.fetched), report.already, report.failed) == (3, 1, [])
    assert server.read_ranges() == {"/d/grown.csv": [(0, len(grown))], "/d/rewritten.csv": [(0, 40_000)],
                                    "/d/touched.csv": [(0, 40_000)]}
    files = visible(inbox)
    assert files["d/grown.csv"] == grown
    # The same bytes again are not a second local copy.
    assert [k for k, v in files.items() if v == old["touched.csv"]] == ["d/touched.csv"]
    # The new version is in the inbox under a name watch takes; the old one was not clobbered unseen.
    assert rewritten in files.values()
    assert old["rewritten.csv"] in files.values()
    assert all(re.fullmatch(r"d/[^/]+\.csv", k) for k in files)
    assert parts(inbox) == []
    # And a third pass is quiet again.
    server.reset_counters()
    assert len(sync_once(make_settings, env).fetched) == 0
    assert server.served() == 0


def test_nested_dirs_and_several_remote_dirs(
    server: SftpTestServer, known_hosts: Path, run_cli: RunCli, inbox: Path
) -> None:
    files = {
        "adhocusage/2026/11/27/deep.csv": b"a" * 1000,
        "adhocusage/top.csv": b"b" * 1000,
        "billing/2026/bill.CSV": b"c" * 1000,
    }
    for rel, data in files.items():
        server.put(rel, data)
    server.put("other/not-listed.csv", b"d" * 1000)
    # Comma-separated, with spaces and a trailing slash, and one dir inside another (listed once).
    env = sftp_env(server, known_hosts, remote_dirs=["/adhocusage", " /billing/", "/adhocusage/2026"])
    result = run_cli("sync", env=env)
    assert result.returncode == 0, result.stderr
    assert summary(result)["new"] == "3"
    assert visible(inbox) == files
    assert server.read_ranges() == {f"/{rel}": [(0, 1000)] for rel in files}


def test_patterns_case_insensitive_hidden_and_temporary_names_skipped(
    server: SftpTestServer, env: dict[str, str], make_settings: Make, inbox: Path
) -> None:
    # l.csv.bak: *.csv.* is a default pattern, as the old script's find took it
    wanted = ["A.CSV", "b.Csv", "X.CSV.1.asc", "d.ZIP", "sub/e.csv", "l.csv.bak"]
    skipped = ["notes.txt", ".hidden.csv", ".hiddendir/x.csv", "sub/.y.csv", "f.csv.part", "F.CSV.PART",
               "g.partial", "h.tmp", "i.csv.filepart", "j.csv.crdownload", "k.csv~", "csv", "l.csvx"]
    for i, rel in enumerate(wanted + skipped):
        server.put(rel, f"{i}\n".encode())
    report = sync_once(make_settings, env)
    assert sorted(report.fetched) == sorted(inbox / rel for rel in wanted)
    assert sorted(visible(inbox)) == sorted(wanted)
    assert sorted(server.bytes_served()) == sorted(f"/{rel}" for rel in wanted)

    # SMT_PATTERNS is case-insensitive too (and a narrower list takes only what it names).
    server.put("later/Z.CSV", b"z\n")
    server.put("later/z.zip", b"zz\n")
    report = sync_once(make_settings, {**env, "SMT_PATTERNS": "*.csv"})
    assert report.fetched == [inbox / "later" / "Z.CSV"]


def test_dry_run_lists_and_fetches_nothing(
    server: SftpTestServer, env: dict[str, str], run_cli: RunCli, inbox: Path, base_env: dict[str, str]
) -> None:
    server.put("adhocusage/2026/a.CSV", os.urandom(5000))
    server.put("b.csv", os.urandom(3000))
    result = run_cli("sync", "--dry-run", env=env)
    assert result.returncode == 0, result.stderr
    assert "/adhocusage/2026/a.CSV" in result.stdout
    assert "/b.csv" in result.stdout
    assert "2 to fetch" in result.stdout.splitlines()[-1]
    assert server.served() == 0
    assert list(inbox.rglob("*")) == []
    # Nothing was recorded either: a real run fetches both.
    result = run_cli("sync", env=env)
    assert summary(result)["new"] == "2"
    assert len(visible(inbox)) == 2


def test_missing_remote_dir_is_one_line(server: SftpTestServer, known_hosts: Path, run_cli: RunCli) -> None:
    env = sftp_env(server, known_hosts, remote_dirs=["/does-not-exist"])
    result = run_cli("sync", env=env)
    assert result.returncode != 0
    assert "/does-not-exist" in error_line(result)


def test_local_path_blocked_is_reported_failed_and_others_fetched(
    server: SftpTestServer, env: dict[str, str], run_cli: RunCli, inbox: Path
) -> None:
    """A file that cannot be written locally must count as failed (exit 1) while the rest still go on."""
    (inbox / "adhocusage").write_text("a file where sync needs a directory\n")
    server.put("adhocusage/2026/a.CSV", b"a\n" * 100)
    server.put("b.csv", b"b\n" * 100)
    result = run_cli("sync", env=env)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1, result.stdout + result.stderr
    m = summary(result)
    assert (m["new"], m["failed"]) == ("1", "1")
    assert (inbox / "b.csv").read_bytes() == b"b\n" * 100


# --- host keys --------------------------------------------------------------------------------------------


def test_unknown_host_key_is_refused(
    server: SftpTestServer, known_hosts: Path, run_cli: RunCli, inbox: Path
) -> None:
    server.put("a.csv", b"data\n")
    env = sftp_env(server, known_hosts, trust=False)
    known_hosts.parent.mkdir(parents=True)
    other = f"smt.example.com {public_line(generate_key())}\n"
    known_hosts.write_text(other)
    result = run_cli("sync", env=env)
    assert result.returncode == 2
    line = error_line(result)
    assert fingerprint(server.host_key) in line
    assert "ssh-keyscan" in line
    assert result.stdout == ""
    assert server.logins == 0 and server.served() == 0
    assert list(inbox.rglob("*")) == []
    assert known_hosts.read_text() == other


def test_missing_known_hosts_file_is_an_unknown_key(
    server: SftpTestServer, known_hosts: Path, run_cli: RunCli, inbox: Path
) -> None:
    server.put("a.csv", b"data\n")
    result = run_cli("sync", env=sftp_env(server, known_hosts, trust=False))
    assert result.returncode == 2
    assert "SHA256:" in error_line(result)
    assert not known_hosts.exists()
    assert list(inbox.rglob("*")) == []


def test_accept_new_host_key_appends_it_then_plain_runs_work(
    server: SftpTestServer, known_hosts: Path, run_cli: RunCli, inbox: Path
) -> None:
    server.put("a.csv", b"data\n")
    env = sftp_env(server, known_hosts, trust=False)
    known_hosts.parent.mkdir(parents=True)
    other = f"smt.example.com {public_line(generate_key())}\n"
    known_hosts.write_text(other)
    result = run_cli("sync", "--accept-new-host-key", env=env)
    assert result.returncode == 0, result.stderr
    assert summary(result)["new"] == "1"
    assert fingerprint(server.host_key) in result.stderr  # the operator sees what was trusted
    text = known_hosts.read_text()
    assert text.startswith(other)
    keys = paramiko.HostKeys(str(known_hosts))
    entry = keys.lookup(host_pattern(server.host, server.port))
    assert entry is not None
    assert entry["ssh-ed25519"].get_base64() == public_line(server.host_key).split()[1]
    result = run_cli("sync", env=env)
    assert result.returncode == 0, result.stderr
    assert summary(result)["already"] == "1"
    assert known_hosts.read_text() == text  # nothing appended twice


def test_accept_new_host_key_when_known_hosts_lacks_final_newline(
    server: SftpTestServer, known_hosts: Path, run_cli: RunCli
) -> None:
    server.put("a.csv", b"data\n")
    env = sftp_env(server, known_hosts, trust=False)
    known_hosts.parent.mkdir(parents=True)
    other = f"smt.example.com {public_line(generate_key())}"  # no trailing newline, as editors may leave it
    known_hosts.write_text(other)
    result = run_cli("sync", "--accept-new-host-key", env=env)
    assert result.returncode == 0, result.stderr
    assert summary(result)["new"] == "1", result.stderr
    assert known_hosts.read_text().splitlines() == [other, server.known_hosts_line]


@pytest.mark.parametrize("flag", [[], ["--accept-new-host-key"]], ids=["plain", "accept-new"])
@pytest.mark.parametrize("recorded", ["other-ed25519", "other-type-only"])
def test_changed_host_key_is_refused_even_with_accept_new(
    server: SftpTestServer, known_hosts: Path, run_cli: RunCli, inbox: Path, flag: list[str], recorded: str
) -> None:
    server.put("a.csv", b"data\n")
    env = sftp_env(server, known_hosts, trust=False)
    known_hosts.parent.mkdir(parents=True)
    kind = "ed25519" if recorded == "other-ed25519" else "ecdsa"
    stale = f"{host_pattern(server.host, server.port)} {public_line(generate_key(kind))}\n"
    known_hosts.write_text(stale)
    result = run_cli("sync", *flag, env=env)
    assert result.returncode == 2
    line = error_line(result)
    assert fingerprint(server.host_key) in line
    assert known_hosts.read_text() == stale  # never replaced, never appended
    assert server.logins == 0 and server.served() == 0
    assert list(inbox.rglob("*")) == []


def test_hashed_known_hosts_entry_is_trusted(server: SftpTestServer, known_hosts: Path, run_cli: RunCli) -> None:
    """`ssh-keyscan -H` / HashKnownHosts entries (|1|salt|hash) are what many servers' files hold."""
    server.put("a.csv", b"data\n")
    env = sftp_env(server, known_hosts, trust=False)
    known_hosts.parent.mkdir(parents=True)
    hashed = paramiko.HostKeys.hash_host(host_pattern(server.host, server.port))
    known_hosts.write_text(f"{hashed} {public_line(server.host_key)}\n")
    result = run_cli("sync", env=env)
    assert result.returncode == 0, result.stderr
    assert summary(result)["new"] == "1"


def test_known_key_of_another_type_is_used(tmp_path: Path, known_hosts: Path, run_cli: RunCli) -> None:
    """The server offers ed25519 and ECDSA; known_hosts holds only its ECDSA key (e.g. from an older
    OpenSSH client). OpenSSH and paramiko's own SSHClient negotiate the known type and connect."""
    with running_sftp_server(tmp_path / "remote2", tmp_path / "keys2", host_key_kinds=("ed25519", "ecdsa")) as s:
        s.put("a.csv", b"data\n")
        env = sftp_env(s, known_hosts, trust=False)
        known_hosts.parent.mkdir(parents=True)
        known_hosts.write_text(s.known_hosts_lines()[1] + "\n")  # the ECDSA key only
        result = run_cli("sync", env=env)
        assert result.returncode == 0, result.stderr
        assert summary(result)["new"] == "1"


def test_corrupt_known_hosts_line_is_a_config_error_or_ignored(
    server: SftpTestServer, known_hosts: Path, run_cli: RunCli
) -> None:
    server.put("a.csv", b"data\n")
    env = sftp_env(server, known_hosts, trust=False)
    known_hosts.parent.mkdir(parents=True)
    known_hosts.write_text(f"smt.example.com ssh-ed25519 AAAA-not-base64\n{server.known_hosts_line}\n")
    result = run_cli("sync", env=env)
    # OpenSSH skips the bad line and connects; refusing with exit 2 naming the file is acceptable too.
    assert "internal error" not in result.stderr, result.stderr
    if result.returncode == 2:
        assert "SMT_KNOWN_HOSTS" in error_line(result) or str(known_hosts) in error_line(result)
    else:
        assert result.returncode == 0, result.stderr


def test_doctor_reads_known_hosts_as_sync_does(server: SftpTestServer, known_hosts: Path, run_cli: RunCli) -> None:
    """One reader for both: a line sync skips must not make doctor FAIL a file that sync connects with."""
    server.put("a.csv", b"data\n")
    env = sftp_env(server, known_hosts, trust=False)
    known_hosts.parent.mkdir(parents=True)
    known_hosts.write_text(f"smt.example.com ssh-ed25519 AAAA-not-base64\n{server.known_hosts_line}\n")
    doctor = run_cli("doctor", "--offline", env=env)
    lines = [line for line in doctor.stdout.splitlines() if " known_hosts: " in line]
    assert len(lines) == 1 and lines[0].startswith("ok    known_hosts: "), doctor.stdout
    result = run_cli("sync", env=env)
    assert result.returncode == 0, result.stderr
    assert summary(result)["new"] == "1"


# --- client keys ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KEY_KINDS)
def test_client_key_types(kind: str, tmp_path: Path, known_hosts: Path, make_settings: Make, inbox: Path) -> None:
    """Each client key type logs in and fetches; a key of that type shared in this test process proves it."""
    with running_sftp_server(tmp_path / "remote", tmp_path / "keys", key_kind=kind, client=shared_key(kind)) as s:
        data = os.urandom(100_000)
        s.put("adhocusage/a.CSV", data)
        report = sync_once(make_settings, sftp_env(s, known_hosts))
        assert report.failed == []
        assert (inbox / "adhocusage" / "a.CSV").read_bytes() == data


def test_key_not_authorized_is_one_line(
    server: SftpTestServer, env: dict[str, str], run_cli: RunCli, tmp_path: Path, inbox: Path
) -> None:
    server.put("a.csv", b"data\n")
    stranger = tmp_path / "keys" / "stranger"
    write_private_key(stranger, "ed25519")
    result = run_cli("sync", env={**env, "SMT_KEY": str(stranger)})
    assert result.returncode == 2
    line = error_line(result)
    assert "SMT_KEY" in line
    assert result.stdout == ""
    assert list(inbox.rglob("*")) == []


def test_missing_key_file_is_one_line(server: SftpTestServer, env: dict[str, str], run_cli: RunCli,
                                      tmp_path: Path) -> None:
    result = run_cli("sync", env={**env, "SMT_KEY": str(tmp_path / "nope")})
    assert result.returncode == 2
    assert "SMT_KEY" in error_line(result)


PASSPHRASE = "correct horse battery staple 4711"


@pytest.fixture
def encrypted_env(server: SftpTestServer, env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """``env`` with SMT_KEY replaced by the same authorized key, encrypted with ``PASSPHRASE``."""
    server.put("a.csv", b"data\n")
    encrypted = tmp_path / "keys" / "encrypted"
    write_private_key(encrypted, key=server.client_public, passphrase=PASSPHRASE)
    return {**env, "SMT_KEY": str(encrypted)}


def test_encrypted_key_without_passphrase_names_the_variable(
    encrypted_env: dict[str, str], run_cli: RunCli, inbox: Path
) -> None:
    result = run_cli("sync", env=encrypted_env)
    assert result.returncode == 2, result.stderr
    assert "SMT_KEY_PASSPHRASE" in error_line(result)
    assert list(inbox.rglob("*")) == []


def test_encrypted_key_with_wrong_passphrase_is_one_line(
    encrypted_env: dict[str, str], run_cli: RunCli, inbox: Path
) -> None:
    result = run_cli("sync", env={**encrypted_env, "SMT_KEY_PASSPHRASE": "wrong passphrase"})
    assert result.returncode == 2, result.stderr
    line = error_line(result)
    assert "SMT_KEY_PASSPHRASE" in line
    assert "wrong passphrase" not in line
    assert list(inbox.rglob("*")) == []


def test_encrypted_key_with_passphrase_works(
    encrypted_env: dict[str, str], run_cli: RunCli, inbox: Path
) -> None:
    result = run_cli("sync", env={**encrypted_env, "SMT_KEY_PASSPHRASE": PASSPHRASE})
    assert result.returncode == 0, result.stderr
    assert summary(result)["new"] == "1"
    assert PASSPHRASE not in result.stdout + result.stderr
    assert (inbox / "a.csv").read_bytes() == b"data\n"


def test_key_readable_by_others_warns(
    server: SftpTestServer, env: dict[str, str], run_cli: RunCli
) -> None:
    server.put("a.csv", b"data\n")
    os.chmod(env["SMT_KEY"], 0o644)
    result = run_cli("sync", env=env)
    assert result.returncode == 0, result.stderr  # a warning, not a refusal
    assert "chmod 600" in result.stderr
    assert summary(result)["new"] == "1"


# --- faults: drops, stalls, resume ------------------------------------------------------------------------


def test_every_connection_of_a_pass_sends_without_nagle_delay(
    server: SftpTestServer, env: dict[str, str], make_settings: Make, inbox: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The listing connection and each worker's have TCP_NODELAY: a worker's small requests written just
    after paramiko's window adjustment would otherwise wait for the server's delayed ACK (measured: 1,000
    files of 100 KB, one worker, 11.4 s with Nagle, 4.5 s without). Checked against mutant sync-nagle."""
    for i in range(2 * sync.DEPTH_WHOLE):  # enough for both workers: each is handed DEPTH_WHOLE files at first
        server.put(f"f{i}.csv", b"x" * (1000 + i))
    monkeypatch.setattr(sync, "DEPTH_SMALL", sync.DEPTH_WHOLE)
    flags: list[int] = []
    real = sync.Connection

    def connect(settings: Settings, **kw: Any) -> Connection:
        conn = real(settings, **kw)
        flags.append(conn.transport.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        return conn

    monkeypatch.setattr(sync, "Connection", connect)
    report = sync_once(make_settings, env, workers=2)
    assert report.failed == [] and len(report.fetched) == 2 * sync.DEPTH_WHOLE
    assert len(flags) == 3 and all(flags), flags  # the listing, then one per worker


def test_a_pass_in_threads_leaves_the_processs_allocator_alone(
    server: SftpTestServer, env: dict[str, str], make_settings: Make, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """glibc's allocator setting (``keep_freed_memory``) holds for a whole process: it is set by the sync
    command and by sync's worker processes, never by a Connection, so ``serve`` (which runs a small pass's
    workers as threads of its own) and ``doctor`` keep glibc's defaults."""
    called: list[str] = []
    sshfast.keep_freed_memory.cache_clear()  # set once a process: forget an earlier test's call
    monkeypatch.setattr(sshfast, "libc", lambda: called.append("mallopt looked up"))  # what a call would do
    server.put("a.csv", b"x" * 1000)
    report = sync_once(make_settings, env, workers=2)  # one small file: threads, in this process
    assert report.failed == [] and len(report.fetched) == 1
    assert called == []


def test_a_transport_that_cannot_start_closes_its_socket(
    server: SftpTestServer, env: dict[str, str], make_settings: Make, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """paramiko refusing to make its transport is the connection's failure (SftpError, one line), and the
    TCP socket already connected is closed, not left open. Checked against mutant sync-connect-socket-leaks."""
    socks: list[Any] = []

    def transport(sock: Any, **kw: Any) -> paramiko.Transport:
        socks.append(sock)
        raise paramiko.SSHException("no transport today")

    monkeypatch.setattr(sftp.paramiko, "Transport", transport)
    with pytest.raises(SftpError, match="no transport today"):
        Connection(make_settings(**env))
    assert len(socks) == 1 and socks[0].fileno() == -1  # closed


def test_connection_drop_mid_transfer_is_retried_and_resumed(
    server: SftpTestServer, env: dict[str, str], make_settings: Make, inbox: Path
) -> None:
    data = os.urandom(3 * MiB)
    server.put("adhocusage/big.CSV", data)
    server.drop_after_bytes = MiB  # once: the first transfer session dies after ~1 MiB
    report = sync_once(make_settings, env)
    assert report.failed == [] and len(report.fetched) == 1
    assert server.drops == 1
    assert (inbox / "adhocusage" / "big.CSV").read_bytes() == data
    assert parts(inbox) == []
    sessions = sessions_for(server, "/adhocusage/big.CSV")
    assert len(sessions) == 2, sessions
    first, resumed = (sessions[k] for k in sorted(sessions))
    assert first[0][0] == 0 and first[0][1] >= MiB
    resume_offset = resumed[0][0]
    assert 0 < resume_offset <= first[-1][1]  # resumed where the part ended, not from 0
    assert resumed == [(resume_offset, len(data))]  # and fetched only the rest
    assert server.mutations == []


def test_third_attempt_after_two_drops_completes_the_file(
    server: SftpTestServer, env: dict[str, str], make_settings: Make, inbox: Path
) -> None:
    """README: dropped connections are retried, 3 attempts, resuming. Two drops in a row still end with the
    whole file, each attempt starting where the part ended (checked against mutant sync-two-attempts)."""
    data = os.urandom(2 * MiB)
    server.put("adhocusage/a.CSV", data)
    server.drop_after_bytes = 256 * 1024
    server.drop_times = 2
    report = sync_once(make_settings, env)
    assert report.failed == [] and report.fetched == [inbox / "adhocusage" / "a.CSV"]
    assert server.drops == 2
    assert (inbox / "adhocusage" / "a.CSV").read_bytes() == data
    assert parts(inbox) == []
    sessions = sessions_for(server, "/adhocusage/a.CSV")
    assert len(sessions) == 3, sessions
    starts = [sessions[k][0][0] for k in sorted(sessions)]
    # Each attempt starts where the part ended (0 again when a drop lost every reply still in flight).
    assert starts[0] == 0 and starts == sorted(starts), starts


def test_failed_run_leaves_only_a_hidden_part_and_next_run_fetches_the_rest(
    server: SftpTestServer, env: dict[str, str], run_cli: RunCli, inbox: Path
) -> None:
    data = os.urandom(2 * MiB)
    server.put("adhocusage/2026/a.CSV", data)
    server.put("small.csv", b"small\n")
    server.drop_after_bytes = 256 * 1024
    # README: "3 attempts". A literal, not sync.ATTEMPTS: with a fourth attempt this run would succeed
    # (checked against mutant sync-four-attempts).
    server.drop_times = 3  # every attempt of this run dies
    result = run_cli("sync", env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    m = summary(result)
    assert (m["new"], m["failed"]) == ("1", "1")  # the other file still went on
    assert "Traceback" not in result.stderr
    assert "/adhocusage/2026/a.CSV" in result.stderr  # which file failed is said
    assert server.drops == 3
    assert visible(inbox) == {"small.csv": b"small\n"}  # no visible partial file
    [part] = parts(inbox)
    assert part.parent == inbox / "adhocusage" / "2026"
    have = part.stat().st_size
    assert 0 < have < len(data)
    assert part.read_bytes() == data[:have]

    server.reset_counters()
    result = run_cli("sync", env=env)
    assert result.returncode == 0, result.stderr
    m = summary(result)
    assert (m["new"], m["already"], m["failed"]) == ("1", "1", "0")
    assert (inbox / "adhocusage" / "2026" / "a.CSV").read_bytes() == data
    assert parts(inbox) == []
    assert server.read_ranges() == {"/adhocusage/2026/a.CSV": [(have, len(data))]}  # only the rest
    assert min(r.offset for r in server.reads) == have


def test_part_of_an_older_remote_version_is_not_resumed(
    server: SftpTestServer, env: dict[str, str], make_settings: Make, inbox: Path
) -> None:
    t0 = time.time() - 3600
    old = os.urandom(MiB)
    server.put("a.csv", old, mtime=t0)
    server.drop_after_bytes = 128 * 1024
    server.drop_times = ATTEMPTS
    report = sync_once(make_settings, env)
    assert report.failed == ["/a.csv"]
    assert len(parts(inbox)) == 1
    new = os.urandom(MiB)  # same size, new bytes, new mtime: the part belongs to the old version
    server.put("a.csv", new, mtime=t0 + 60)
    server.reset_counters()
    report = sync_once(make_settings, env)
    assert report.failed == [] and len(report.fetched) == 1
    assert (inbox / "a.csv").read_bytes() == new
    assert server.read_ranges() == {"/a.csv": [(0, len(new))]}
    assert parts(inbox) == []  # the stale part was cleaned up too


def test_stalled_server_fails_the_file_within_the_timeout(
    server: SftpTestServer, known_hosts: Path, run_cli: RunCli, inbox: Path
) -> None:
    server.put("a.csv", os.urandom(100_000))
    server.stall()
    env = sftp_env(server, known_hosts, timeout=2)
    started = time.monotonic()
    result = run_cli("sync", env=env, timeout=90)
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stdout + result.stderr
    assert summary(result)["failed"] == "1"
    assert visible(inbox) == {}
    assert elapsed < 60, f"a stalled server held sync for {elapsed:.0f}s with SMT_SFTP_TIMEOUT=2"
    server.release()


# --- one at a time ----------------------------------------------------------------------------------------


@contextmanager
def sync_in_background(settings: Settings) -> Iterator[dict[str, Any]]:
    """run_sync in a thread; yields a dict that gets ``report`` or ``error`` when it ends."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["report"] = run_sync(settings)
        except BaseException as exc:  # surfaced by the test
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        thread.join(60)
        assert not thread.is_alive(), "background sync did not finish"
    if "error" in out:
        raise out["error"]


def test_second_sync_while_one_runs_exits_0(
    server: SftpTestServer, known_hosts: Path, make_settings: Make, run_cli: RunCli, inbox: Path
) -> None:
    data = os.urandom(500_000)
    server.put("a.csv", data)
    env = sftp_env(server, known_hosts, timeout=60)  # the stall below must not time out the first pass
    server.stall()
    with sync_in_background(make_settings(**env)) as first:
        wait_for(server.read_blocked.is_set, 30, "the first sync to be transferring")
        logins = server.logins
        # its own timeout short: with the lock it never connects; a pass that wrongly ran (mutant sync-no-lock)
        # meets the stall and gives up in seconds instead of after the first pass's 60 s, several times over
        result = run_cli("sync", env={**env, "SMT_SFTP_TIMEOUT": "2"})
        assert result.returncode == 0, result.stderr
        assert "another sync is running" in result.stdout + result.stderr
        assert server.logins == logins  # the second one did not even connect
        server.release()
    report = first["report"]
    assert report is not None and len(report.fetched) == 1
    assert (inbox / "a.csv").read_bytes() == data
    assert server.read_ranges() == {"/a.csv": [(0, len(data))]}


def test_wait_flag_waits_for_the_running_sync(
    server: SftpTestServer, known_hosts: Path, make_settings: Make, base_env: dict[str, str], tmp_path: Path,
    inbox: Path,
) -> None:
    server.put("a.csv", os.urandom(200_000))
    env = sftp_env(server, known_hosts, timeout=60)
    server.stall()
    with sync_in_background(make_settings(**env)) as first:
        wait_for(server.read_blocked.is_set, 30, "the first sync to be transferring")
        proc = subprocess.Popen(
            [sys.executable, "-m", "smt_watch", "sync", "--wait"], env=subprocess_env(base_env, tmp_path, env),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        )
        try:
            wait_for(lambda: blocked_flock_waiter(proc.pid) or proc.poll() is not None, 30,
                     "the second sync to queue on the lock")
            assert proc.poll() is None, "sync --wait did not wait"
            server.release()
            stdout, stderr = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=10)
    assert first["report"] is not None and len(first["report"].fetched) == 1
    assert proc.returncode == 0, stderr
    m = SUMMARY.match(stdout.strip().splitlines()[-1])
    assert m and (m["new"], m["already"]) == ("0", "1"), stdout
    assert server.read_ranges() == {"/a.csv": [(0, 200_000)]}


# --- with watch running -----------------------------------------------------------------------------------


def test_synced_file_is_delivered_exactly_once_by_watch(
    server: SftpTestServer, env: dict[str, str], make_settings: Make, receiver: Any, tmp_path: Path,
) -> None:
    settings = make_settings(**env, SMT_UPLOAD_URL=f"{receiver.url}/upload", SMT_UPLOAD_TOKEN=UPLOAD_TOKEN,
                             SMT_SETTLE_SECONDS="0.2", SMT_RESCAN_SECONDS="1")
    big = write_csv(tmp_path / "src" / "a.CSV", rows=20_000, seed=1).read_bytes()
    server.put("adhocusage/2026/a.CSV", big)
    server.drop_after_bytes = 256 * 1024  # a .part sits in the watched tree while the pass recovers

    def uploads_of(digest: str) -> int:
        return sum(1 for r in receiver.state.requests if r.sha256 == digest)

    with watching(settings) as service:
        report = run_sync(settings)
        assert report is not None and report.failed == [] and server.drops == 1
        wait_for(lambda: [r["filename"] for r in receiver.stored()] == ["a.CSV"], 20, "a.CSV delivered")
        assert receiver.stored()[0]["sha256"] == sha(big)

        report = run_sync(settings)  # nothing new: nothing written, nothing delivered
        assert report is not None and report.fetched == []

        sentinel = write_csv(tmp_path / "src" / "b.csv", rows=10, seed=2).read_bytes()
        server.put("adhocusage/2026/b.csv", sentinel)
        report = run_sync(settings)
        assert report is not None and len(report.fetched) == 1
        wait_for(lambda: uploads_of(sha(sentinel)) == 1, 20, "sentinel b.csv delivered")
        assert service.counts.failed == 0
    assert uploads_of(sha(big)) == 1
    assert sorted(r["filename"] for r in receiver.stored()) == ["a.CSV", "b.csv"]


# --- OpenSSH sshd -----------------------------------------------------------------------------------------


@pytest.fixture
def sshd_server(tmp_path: Path) -> Iterator[SshdServer]:
    """OpenSSH sshd on a spare port; the test is skipped when /usr/sbin/sshd is not installed."""
    with running_sshd(tmp_path / "sshd") as s:
        yield s


def test_against_openssh_sshd(
    sshd_server: SshdServer, known_hosts: Path, run_cli: RunCli, inbox: Path
) -> None:
    files = {"adhocusage/2026/a.CSV": os.urandom(3 * MiB), "adhocusage/b.csv": b"b\n" * 10}
    for rel, data in files.items():
        sshd_server.put(rel, data)
    env = sftp_env(sshd_server, known_hosts, trust=False, remote_dirs=["/adhocusage"])

    result = run_cli("sync", env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "SHA256:" in error_line(result)
    assert list(inbox.rglob("*")) == []

    result = run_cli("sync", "--accept-new-host-key", env=env)
    assert result.returncode == 0, result.stderr + sshd_server.log()
    assert summary(result)["new"] == "2"
    prefix = sshd_server.remote_prefix.lstrip("/")
    assert visible(inbox) == {f"{prefix}/{rel}": data for rel, data in files.items()}

    result = run_cli("sync", env=env)
    assert result.returncode == 0, result.stderr
    m = summary(result)
    assert (m["new"], m["already"]) == ("0", "2")
    assert all((sshd_server.root / rel).read_bytes() == data for rel, data in files.items())


@pytest.mark.parametrize("kind", ["rsa4096", "ecdsa"])
def test_openssh_sshd_key_types(kind: str, tmp_path: Path, known_hosts: Path, make_settings: Make,
                                inbox: Path) -> None:
    """OpenSSH accepts each client key type; a key of that type shared in this test process proves it."""
    with running_sshd(tmp_path / "sshd", key_kind=kind, client=shared_key(kind)) as sshd:
        data = os.urandom(50_000)
        sshd.put("a.csv", data)
        report = sync_once(make_settings, sftp_env(sshd, known_hosts))
        assert report.failed == [], sshd.log()
        assert (inbox / sshd.remote_prefix.lstrip("/") / "a.csv").read_bytes() == data


def test_openssh_sshd_wrong_key_is_one_line(
    sshd_server: SshdServer, known_hosts: Path, run_cli: RunCli, tmp_path: Path
) -> None:
    sshd_server.put("a.csv", b"a\n")
    stranger = tmp_path / "stranger"
    write_private_key(stranger)
    result = run_cli("sync", env=sftp_env(sshd_server, known_hosts, key=stranger))
    assert result.returncode == 2
    assert "SMT_KEY" in error_line(result)
