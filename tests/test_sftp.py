"""smt_watch.sftp against the in-process asyncssh server: keys, host keys, walk, resumable download, timeouts.

Also checks the test server itself (its known_hosts line, keys and fault knobs), so a green test_sync.py
means what it says.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import asyncssh
import paramiko
import pytest
from paramiko.buffered_pipe import PipeTimeout
from sftp_server import (
    KEY_KINDS,
    SftpTestServer,
    fingerprint,
    host_pattern,
    public_line,
    running_sftp_server,
    sftp_env,
    shared_key,
    write_private_key,
)

from conftest import wait_for
from smt_watch.config import Settings
from smt_watch.errors import ConfigError, SftpError
from smt_watch.sftp import NOBODY_WAITS, Connection, RemoteFile, _ChannelBuffer, _Chunks, load_key
from smt_watch.sftp import fingerprint as smt_fingerprint

Make = Callable[..., Settings]
MiB = 1024 * 1024


@pytest.fixture
def server(sftp: SftpTestServer) -> SftpTestServer:
    """This module's name for conftest's ``sftp`` (a real SFTP server on loopback, one per test)."""
    return sftp


@pytest.fixture
def settings(server: SftpTestServer, make_settings: Make, tmp_path: Path) -> Settings:
    return make_settings(**sftp_env(server, tmp_path / "known_hosts"))


def raw_client(server: SftpTestServer) -> tuple[paramiko.Transport, paramiko.SFTPClient]:
    transport = paramiko.Transport((server.host, server.port))
    transport.connect(username="test", pkey=paramiko.PKey.from_path(server.client_key))
    sftp = paramiko.SFTPClient.from_transport(transport)
    assert sftp is not None
    return transport, sftp


def remote_file(server: SftpTestServer, rel: str) -> RemoteFile:
    st = (server.root / rel.lstrip("/")).stat()
    return RemoteFile(server.remote(rel), st.st_size, int(st.st_mtime))


# --- the test server itself -------------------------------------------------------------------------------


def test_server_known_hosts_line_matches_the_offered_key(server: SftpTestServer) -> None:
    entry = paramiko.hostkeys.HostKeyEntry.from_line(server.known_hosts_line)
    assert entry is not None
    assert entry.hostnames == [f"[127.0.0.1]:{server.port}"]
    transport, _ = raw_client(server)
    try:
        offered = transport.get_remote_server_key()
    finally:
        transport.close()
    assert offered == entry.key
    assert smt_fingerprint(offered) == fingerprint(server.host_key)


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen (openssh-client) not installed")
def test_fingerprint_matches_ssh_keygen(server: SftpTestServer, tmp_path: Path) -> None:
    pub = tmp_path / "host.pub"
    pub.write_text(public_line(server.host_key) + "\n")
    out = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(pub)], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    key = paramiko.hostkeys.HostKeyEntry.from_line(server.known_hosts_line)
    assert key is not None
    assert smt_fingerprint(key.key) in out.split()


@pytest.mark.parametrize("kind", KEY_KINDS)
def test_server_client_keys_are_openssh_0600_and_load_in_paramiko(kind: str, tmp_path: Path) -> None:
    """The key file the server writes (here for a key of ``kind`` shared in this test process) is one
    OpenSSH and paramiko read."""
    with running_sftp_server(tmp_path / "remote", tmp_path / "keys", key_kind=kind, client=shared_key(kind)) as s:
        assert s.client_key.stat().st_mode & 0o777 == 0o600
        assert s.client_key.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
        key = paramiko.PKey.from_path(s.client_key)
        assert key.get_base64() == public_line(s.client_public).split()[1]
        if kind == "rsa4096":
            assert key.get_bits() == 4096
        transport, _ = raw_client(s)
        transport.close()


def test_server_drop_knob_drops_once_then_serves(server: SftpTestServer) -> None:
    data = os.urandom(2 * MiB)
    server.put("a.csv", data)
    server.drop_after_bytes = 512 * 1024
    transport, sftp = raw_client(server)
    try:
        with pytest.raises((OSError, EOFError, paramiko.SSHException)), sftp.open("/a.csv", "rb") as fh:
            fh.read()
    finally:
        transport.close()
    assert server.drops == 1 and server.drop_after_bytes is None
    assert 512 * 1024 <= server.served("/a.csv") < len(data)
    transport, sftp = raw_client(server)
    try:
        with sftp.open("/a.csv", "rb") as fh:
            assert fh.read() == data
    finally:
        transport.close()


def test_server_stall_knob_blocks_reads_until_released(server: SftpTestServer) -> None:
    server.put("a.csv", b"x" * 1000)
    server.stall()
    transport, sftp = raw_client(server)
    got: list[bytes] = []
    try:
        reader = threading.Thread(target=lambda: got.append(sftp.open("/a.csv", "rb").read()), daemon=True)
        reader.start()
        wait_for(server.read_blocked.is_set, 10, "a read to block")
        assert got == [] and server.served() == 0
        server.release()
        reader.join(10)
        assert got == [b"x" * 1000]
    finally:
        transport.close()


def test_server_is_read_only_and_records_attempts(server: SftpTestServer) -> None:
    server.put("a.csv", b"keep\n")
    transport, sftp = raw_client(server)
    try:
        for attempt in (lambda: sftp.remove("/a.csv"), lambda: sftp.rename("/a.csv", "/b.csv"),
                        lambda: sftp.open("/new.csv", "wb"), lambda: sftp.mkdir("/d")):
            with pytest.raises(OSError):
                attempt()
    finally:
        transport.close()
    assert len(server.mutations) == 4
    assert (server.root / "a.csv").read_bytes() == b"keep\n"


# --- keys ---------------------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen (openssh-client) not installed")
def test_legacy_pem_rsa_key_loads(make_settings: Make, tmp_path: Path) -> None:
    """Keys handed out years ago are often PEM ("BEGIN RSA PRIVATE KEY"), not the OpenSSH format.

    ssh-keygen writes the PEM file (``-p -m PEM`` rewrites an RSA-4096 key shared in this test process:
    generating a new one costs seconds of CPU and proves nothing more about loading PEM)."""
    path = tmp_path / "id_rsa"
    write_private_key(path, "rsa4096", key=shared_key("rsa4096"))
    subprocess.run(["ssh-keygen", "-q", "-p", "-m", "PEM", "-P", "", "-N", "", "-f", str(path)],
                   check=True, timeout=60, capture_output=True)
    assert path.read_text().startswith("-----BEGIN RSA PRIVATE KEY-----")
    key = load_key(make_settings(SMT_KEY=str(path)))
    assert key.get_bits() == 4096


def test_load_key_errors_are_config_errors(make_settings: Make, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="SMT_KEY"):
        load_key(make_settings(SMT_KEY=str(tmp_path / "missing")))
    junk = tmp_path / "junk"
    junk.write_text("not a key\n")
    junk.chmod(0o600)
    with pytest.raises(ConfigError, match="SMT_KEY"):
        load_key(make_settings(SMT_KEY=str(junk)))


def test_ecdsa_key_that_paramiko_misreads_still_loads(make_settings: Make, tmp_path: Path) -> None:
    """paramiko 5.1 mis-unpads about half of OpenSSH-format ECDSA keys with an empty comment
    (paramiko#2445); load_key falls back to cryptography for those."""
    path = tmp_path / "id_ecdsa"
    for _ in range(200):  # each try is rejected by paramiko with probability ~1/2
        key = asyncssh.generate_private_key("ecdsa-sha2-nistp256")  # no comment
        path.write_bytes(key.export_private_key("openssh"))
        path.chmod(0o600)
        try:
            paramiko.PKey.from_path(path)
        except paramiko.SSHException:
            break
    else:
        pytest.skip("no ECDSA key that paramiko rejects in 200 tries: paramiko#2445 is fixed")
    loaded = load_key(make_settings(SMT_KEY=str(path)))
    assert loaded.get_base64() == public_line(key).split()[1]


# --- Connection ----------------------------------------------------------------------------------------------


def test_walk_lists_candidates_with_size_and_mtime(server: SftpTestServer, settings: Settings) -> None:
    server.put("adhocusage/2026/a.CSV", b"a" * 10, mtime=1_700_000_000)
    server.put("adhocusage/b.csv", b"b" * 20, mtime=1_700_000_100)
    server.put("adhocusage/.hidden/c.csv", b"c")
    server.put("adhocusage/d.csv.part", b"d")
    server.put("e.txt", b"e")
    with Connection(settings) as conn:
        files = sorted(conn.walk("/", settings.patterns), key=lambda f: f.path)
        assert files == [
            RemoteFile("/adhocusage/2026/a.CSV", 10, 1_700_000_000),
            RemoteFile("/adhocusage/b.csv", 20, 1_700_000_100),
        ]
        assert str(files[0].relative) == "adhocusage/2026/a.CSV"
        assert sorted(f.path for f in conn.walk("/adhocusage/2026/", settings.patterns)) == [
            "/adhocusage/2026/a.CSV"]
        with pytest.raises(SftpError, match="/nope"):
            list(conn.walk("/nope", settings.patterns))
    assert server.served() == 0


def test_download_resumes_an_existing_part(server: SftpTestServer, settings: Settings, tmp_path: Path) -> None:
    data = os.urandom(3 * MiB + 123)
    server.put("a.csv", data)
    part = tmp_path / ".a.csv.part"
    have = MiB + 7
    part.write_bytes(data[:have])
    progress: list[int] = []
    with Connection(settings) as conn:
        digest = conn.download(remote_file(server, "a.csv"), part, progress.append)
    assert digest == hashlib.sha256(data).hexdigest()
    assert part.read_bytes() == data
    assert server.read_ranges() == {"/a.csv": [(have, len(data))]}
    assert sum(progress) == len(data) - have


def test_download_of_a_complete_part_reads_nothing(
    server: SftpTestServer, settings: Settings, tmp_path: Path
) -> None:
    data = os.urandom(100_000)
    server.put("a.csv", data)
    part = tmp_path / ".a.csv.part"
    part.write_bytes(data)
    with Connection(settings) as conn:
        assert conn.download(remote_file(server, "a.csv"), part) == hashlib.sha256(data).hexdigest()
    assert server.served() == 0


def test_download_restarts_when_the_part_is_longer(
    server: SftpTestServer, settings: Settings, tmp_path: Path
) -> None:
    data = os.urandom(200_000)
    server.put("a.csv", data)
    part = tmp_path / ".a.csv.part"
    part.write_bytes(os.urandom(300_000))
    with Connection(settings) as conn:
        assert conn.download(remote_file(server, "a.csv"), part) == hashlib.sha256(data).hexdigest()
    assert part.read_bytes() == data
    assert server.read_ranges() == {"/a.csv": [(0, len(data))]}


def test_download_of_a_file_that_shrank_fails(server: SftpTestServer, settings: Settings, tmp_path: Path) -> None:
    data = os.urandom(500_000)
    server.put("a.csv", data)
    listed = remote_file(server, "a.csv")
    server.put("a.csv", data[:100_000])  # truncated on the server after the listing
    part = tmp_path / ".a.csv.part"
    started = time.monotonic()
    with Connection(settings) as conn, pytest.raises(SftpError, match=r"/a\.csv"):
        conn.download(listed, part)
    assert time.monotonic() - started < 30


def test_connection_refused_is_an_sftp_error(make_settings: Make, server: SftpTestServer, tmp_path: Path,
                                             unused_port: int) -> None:
    env = sftp_env(server, tmp_path / "known_hosts", SMT_PORT=str(unused_port))
    with pytest.raises(SftpError, match="cannot connect"):
        Connection(make_settings(**env))


def test_silent_server_times_out(make_settings: Make, server: SftpTestServer, tmp_path: Path) -> None:
    """Something accepts the TCP connection and never speaks SSH: fail within SMT_SFTP_TIMEOUT-ish, not hang."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    try:
        env = sftp_env(server, tmp_path / "known_hosts", timeout=1, SMT_PORT=str(port))
        started = time.monotonic()
        with pytest.raises(SftpError):
            Connection(make_settings(**env))
        assert time.monotonic() - started < 10
    finally:
        listener.close()


def test_host_key_entry_for_port_22_is_bare_host() -> None:
    assert host_pattern("sftp.smartmetertexas.com", 22) == "sftp.smartmetertexas.com"
    from smt_watch.sftp import host_entry

    assert host_entry("sftp.smartmetertexas.com", 22) == "sftp.smartmetertexas.com"
    assert host_entry("127.0.0.1", 2222) == "[127.0.0.1]:2222"


def test_download_reads_each_byte_once_when_responses_lag(server: SftpTestServer, settings: Settings,
                                                         tmp_path: Path) -> None:
    """A busy server answers READs out of order (SFTP allows it): every 4th response comes after the three
    behind it. ``download`` keeps its own window of requests, so the bytes must still be written in order,
    each asked for once. Checked against the mutant sync-responses-out-of-order (tests/mutants/headline.toml),
    which waits for one response instead of the right one."""
    server.lag_reads = 4
    data = os.urandom(2 * MiB)
    server.put("a.csv", data)
    part = tmp_path / ".a.csv.part"
    with Connection(settings) as conn:
        try:
            digest = conn.download(remote_file(server, "a.csv"), part)
        except Exception as exc:  # no traceback: on 3.11, rendering one races the server thread's (pytest exit 3)
            pytest.fail(f"download failed on out-of-order responses: {type(exc).__name__}: {exc}", pytrace=False)
    assert digest == hashlib.sha256(data).hexdigest()
    assert server.lagged > 0, "no response was answered out of order: the case under test did not happen"
    assert part.read_bytes() == data
    assert server.served("/a.csv") == len(data)  # no byte asked for twice


def test_download_from_a_server_serving_less_per_read_asks_for_less(server: SftpTestServer, settings: Settings,
                                                                     tmp_path: Path) -> None:
    """READs ask for 255 KiB (what OpenSSH serves). A server that serves at most 20,000 bytes a READ answers
    each with a short read: the rest of that one is fetched at once, and the connection asks for 20,000
    bytes from then on, so the file still takes about one READ per 20,000 bytes, all of them pipelined,
    not two per request (the short one and a round trip for its rest)."""
    server.max_read = 20_000
    data = os.urandom(MiB)
    server.put("a.csv", data)
    part = tmp_path / ".a.csv.part"
    with Connection(settings) as conn:
        assert conn.request > server.max_read  # the case under test: it asks for more than is served
        digest = conn.download(remote_file(server, "a.csv"), part)
        assert conn.request == server.max_read
    assert digest == hashlib.sha256(data).hexdigest() and part.read_bytes() == data
    assert server.served("/a.csv") == len(data)  # each byte once
    reads = [r for r in server.reads if r.path == "/a.csv"]
    assert len(reads) <= len(data) // 20_000 + 12, len(reads)  # the first window's short reads, then full ones


def test_connection_prefers_aes_gcm(server: SftpTestServer, settings: Settings) -> None:
    """GCM (no per-packet HMAC in Python) is what a server that offers it gets; paramiko lists it last."""
    with Connection(settings) as conn:
        assert conn.transport.remote_cipher == "aes128-gcm@openssh.com"  # type: ignore[attr-defined]
        assert conn.transport.local_cipher == "aes128-gcm@openssh.com"


def test_channel_chunks_behave_like_a_byte_buffer() -> None:
    """The channel buffer that replaces paramiko's array: every peek/drop agrees with a plain bytearray."""
    rng = random.Random(7)
    for _ in range(300):
        chunks, ref = _Chunks(), bytearray()
        for _ in range(40):
            if rng.random() < 0.5:
                data = rng.randbytes(rng.randrange(0, 20))
                chunks.append(data)
                ref += data
            else:
                limit = rng.choice([None, rng.randrange(0, 40)])
                assert chunks.peek(limit) == bytes(ref[:limit])
                key = rng.choice([slice(None, rng.randrange(0, 40)), slice(None, None)])
                del chunks[key]
                del ref[key]
            assert len(chunks) == len(ref)


def _reading(buf: _ChannelBuffer, n: int, timeout: float | None) -> tuple[threading.Thread, list[object]]:
    """``buf.read(n, timeout)`` in a thread; its result (bytes or the exception) lands in the list."""
    got: list[object] = []

    def read() -> None:
        try:
            got.append(buf.read(n, timeout))
        except PipeTimeout as exc:
            got.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return reader, got


def test_channel_buffer_read_waits_for_the_whole_message() -> None:
    """A read of n bytes fed as several SSH packets returns all n at once: the reader is woken once per SFTP
    message (paramiko's pipe returns the first packet, and its SFTP client copies the message once a packet)."""
    buf = _ChannelBuffer()
    pieces = [bytes([i]) * 1000 for i in range(8)]
    reader, got = _reading(buf, 8000, 30)
    wait_for(lambda: buf._want == 8000, what="the reader waiting for 8000 bytes")
    for piece in pieces:
        buf.feed(piece)
    reader.join(30)
    assert got == [b"".join(pieces)]
    assert buf._want == NOBODY_WAITS and len(buf) == 0


TRICKLE_SECONDS = 0.05  # one byte this often: 20 times inside the read timeout, slower than it in all


def test_channel_buffer_read_times_out_only_without_progress() -> None:
    """The read timeout means "nothing arrived for that long": a message trickling in slower than one
    timeout in all still arrives whole; silence raises PipeTimeout (the caller's socket.timeout)."""
    buf = _ChannelBuffer()
    with pytest.raises(PipeTimeout):
        buf.read(10, 0.2)
    reader, got = _reading(buf, 40, 1.0)
    wait_for(lambda: buf._want == 40, what="the reader waiting for 40 bytes")
    for i in range(40):  # 2 s in all against a 1 s timeout
        buf.feed(bytes([i]))
        time.sleep(TRICKLE_SECONDS)  # the behaviour under test: a server that keeps sending, slowly
    reader.join(30)
    assert got == [bytes(range(40))]


def test_channel_buffer_returns_what_came_when_the_channel_closes() -> None:
    buf = _ChannelBuffer()
    reader, got = _reading(buf, 100, 30)
    wait_for(lambda: buf._want == 100, what="the reader waiting")
    buf.feed(b"x" * 10)
    buf.close()
    reader.join(30)
    assert got == [b"x" * 10]
    assert buf.read(100, 1) == b""  # closed and empty: end of stream, not a timeout


def test_connection_forgets_the_handshake_timer(server: SftpTestServer, settings: Settings) -> None:
    """paramiko cancels its handshake timer again after every packet; a connected transport has none."""
    with Connection(settings) as conn:
        assert conn.transport.packetizer._Packetizer__timer is None  # type: ignore[attr-defined]
        assert not conn.transport.packetizer.handshake_timed_out()
