"""Real SFTP servers for the ``sync`` tests: asyncssh in-process (always) and OpenSSH ``sshd`` (when installed).

``running_sftp_server`` starts an asyncssh server on 127.0.0.1 (ephemeral port) in a background thread with
its own event loop. It serves a temp directory as ``/`` (asyncssh's virtual chroot), accepts only the
generated client key, and offers generated host keys. Its SFTP handler counts every file byte it serves
(per remote path, per session, with the offset of every read), refuses any change to the remote tree (and
records the attempt in ``mutations``), and has fault knobs:

- ``drop_after_bytes`` / ``drop_times``: once a session has served that many file bytes, the next read
  aborts the whole SSH connection (``drop_times`` times in total, then the knob switches itself off);
- ``stall()`` / ``release()``: file reads block until released; ``read_blocked`` is set while one waits;
- ``lag_reads = N``: READ requests of sessions started from then on are served concurrently, and every
  N-th one is answered only after the N-1 that follow it (or after ``LAG_LIMIT`` seconds), so responses
  reach the client out of order, as SFTP allows a busy server to answer; ``lagged`` counts those answered
  behind a later one (a test asserts it, so the case it names really ran);
- ``listed_sizes = {"/remote/path": n}``: the listing and every stat of that file claim ``n`` bytes, while
  reads serve what the file holds (a server whose sizes lie).

``running_sshd`` starts ``/usr/sbin/sshd -D -e`` on a spare loopback port with a temp host key and
``AuthorizedKeysFile``, or skips the test when sshd is not installed (test_sync.py's ``sshd_server`` fixture).

``sftp_env`` builds the ``SMT_*`` variables for either server. Every wait here has a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import pwd
import socket
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paramiko
import pytest
from cryptography.utils import CryptographyDeprecationWarning

with warnings.catch_warnings():  # asyncssh 2.24 names cryptography's deprecated DSA classes in its annotations
    warnings.filterwarnings("ignore", category=CryptographyDeprecationWarning, module=r"asyncssh\.")
    import asyncssh
from ports import free_port

SSHD = Path("/usr/sbin/sshd")
KEY_KINDS = ("ed25519", "rsa4096", "ecdsa")
START_TIMEOUT = 30.0

BANNER_POLL_SECONDS = 0.05
KDF_ROUNDS = 2  # bcrypt rounds of an encrypted test key (ssh-keygen: 16; asyncssh: 128 = seconds per load)
FEW_ROUNDS_WARNING = r".*bcrypt\.kdf\(\) called with only"  # bcrypt's UserWarning for fewer than 50 rounds
LAG_LIMIT = 2.0  # longest a lagging READ waits for the ones behind it (the last READs of a file have none)


def generate_key(kind: str = "ed25519") -> asyncssh.SSHKey:
    """A new private key: ``ed25519``, ``rsa4096``, ``ecdsa`` (nistp256) or an asyncssh algorithm name."""
    if kind == "ed25519":
        return asyncssh.generate_private_key("ssh-ed25519")
    if kind == "rsa4096":
        return asyncssh.generate_private_key("ssh-rsa", key_size=4096)
    if kind == "ecdsa":
        return asyncssh.generate_private_key("ecdsa-sha2-nistp256")
    return asyncssh.generate_private_key(kind)


# (fingerprint, encrypted, rounds) -> the comment length paramiko reads (write_private_key; per test process)
_READABLE_COMMENT: dict[tuple[str, bool, int], int] = {}


@functools.cache
def shared_key(kind: str) -> asyncssh.SSHKey:
    """One key of ``kind`` per test process, for tests whose promise is "a key of this type works" rather
    than "a key nobody else holds": an RSA-4096 key costs seconds of CPU to generate on a busy machine.
    (Tests that need a stranger's key call :func:`generate_key`.)"""
    return generate_key(kind)


def write_private_key(
    path: Path, kind: str = "ed25519", *, passphrase: str | None = None, key: asyncssh.SSHKey | None = None,
    rounds: int = KDF_ROUNDS,
) -> asyncssh.SSHKey:
    """Write a private key in OpenSSH format with mode 0600 (encrypted when ``passphrase``); return it.

    An encrypted key uses ``rounds`` bcrypt-KDF rounds (``KDF_ROUNDS``): the file format, cipher and
    passphrase check are those of ``ssh-keygen``'s default (16 rounds), but each load (the check here, every
    load in sync) costs milliseconds instead of seconds of CPU on a shared 2-core machine.

    The file is checked with ``paramiko.PKey.from_path``: paramiko (5.1) cannot unpad some OpenSSH key
    files whose padding length depends on the comment (paramiko/paramiko#2445), so the comment is varied
    until paramiko reads the file. Tests get keys that OpenSSH and paramiko both accept. Whether paramiko
    reads it depends only on the key, the comment and the encryption (the padding of the same plaintext), so
    the comment found for a key is remembered (``_READABLE_COMMENT``) and used without a check the next time
    it is written (a :func:`shared_key`): checking an RSA-4096 key costs paramiko seconds of CPU.
    """
    key = key or generate_key(kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    known = _READABLE_COMMENT.get((fingerprint(key), passphrase is not None, rounds))
    for n in ([known] if known is not None else range(64)):
        key.set_comment(f"smt-watch-test{'-' * n}")
        with warnings.catch_warnings():  # bcrypt warns below 50 rounds: deliberate here (see above)
            warnings.filterwarnings("ignore", message=FEW_ROUNDS_WARNING, category=UserWarning)
            data = key.export_private_key("openssh", passphrase=passphrase, rounds=rounds)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.chmod(path, 0o600)
            if known is not None:
                return key
            try:
                paramiko.PKey.from_path(path, passphrase.encode() if passphrase else None)  # type: ignore[arg-type]
            except paramiko.SSHException:
                continue
        _READABLE_COMMENT[(fingerprint(key), passphrase is not None, rounds)] = n
        return key
    raise AssertionError(f"paramiko cannot load any variant of the {kind} key written to {path}")


def public_line(key: asyncssh.SSHKey) -> str:
    """``ssh-ed25519 AAAA…`` (no comment)."""
    return " ".join(key.export_public_key("openssh").decode().split()[:2])


def fingerprint(key: asyncssh.SSHKey) -> str:
    """``SHA256:…`` as OpenSSH prints it."""
    return str(key.get_fingerprint("sha256"))


def host_pattern(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


def put_file(root: Path, remote_path: str, data: bytes, mtime: float | None = None) -> Path:
    """Create ``remote_path`` (absolute, as the client sees it) under the served ``root``."""
    local = root / remote_path.lstrip("/")
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_bytes(data)
    if mtime is not None:
        os.utime(local, (mtime, mtime))
    return local


@dataclass(frozen=True)
class Read:
    session: int
    path: str  # remote path, e.g. /adhocusage/2026/a.CSV
    offset: int
    length: int


@dataclass
class _Stats:
    lock: threading.Lock = field(default_factory=threading.Lock)
    reads: list[Read] = field(default_factory=list)
    mutations: list[str] = field(default_factory=list)
    sessions: int = 0
    logins: int = 0
    drops: int = 0
    lagged: int = 0


class SftpTestServer:
    """The running asyncssh server: connection details, counters and fault knobs (thread-safe)."""

    host = "127.0.0.1"
    remote_prefix = "/"  # the served root is the client's "/"

    def __init__(self, root: Path, keys_dir: Path, key_kind: str, host_key_kinds: tuple[str, ...],
                 client: asyncssh.SSHKey | None = None) -> None:
        self.root = root
        self.port = 0
        self.client_key = keys_dir / f"client_{key_kind}"
        self.client_public = write_private_key(self.client_key, key_kind, key=client)
        self.host_keys = [generate_key(k) for k in host_key_kinds]
        self.drop_after_bytes: int | None = None
        self.drop_times = 1
        self.read_blocked = threading.Event()
        self.lag_reads = 0
        self.max_read: int | None = None  # serve at most this many bytes per READ (a server with a lower limit)
        self.listed_sizes: dict[str, int] = {}
        self._stats = _Stats()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sftp-test-server", daemon=True)
        self._acceptor: asyncssh.SSHAcceptor | None = None
        self._connections: set[asyncssh.SSHServerConnection] = set()
        self._go: asyncio.Event | None = None
        self._stopped = False

    # --- what tests use -------------------------------------------------------------------------------

    @property
    def host_key(self) -> asyncssh.SSHKey:
        return self.host_keys[0]

    @property
    def known_hosts_line(self) -> str:
        """``[127.0.0.1]:PORT ssh-ed25519 AAAA…`` for the first host key."""
        return f"{host_pattern(self.host, self.port)} {public_line(self.host_key)}"

    def known_hosts_lines(self) -> list[str]:
        return [f"{host_pattern(self.host, self.port)} {public_line(k)}" for k in self.host_keys]

    def remote(self, rel: str) -> str:
        """The client's path for ``rel`` under the served root."""
        return "/" + rel.lstrip("/")

    def put(self, rel: str, data: bytes, mtime: float | None = None) -> Path:
        return put_file(self.root, rel, data, mtime)

    @property
    def reads(self) -> list[Read]:
        with self._stats.lock:
            return list(self._stats.reads)

    @property
    def mutations(self) -> list[str]:
        with self._stats.lock:
            return list(self._stats.mutations)

    @property
    def logins(self) -> int:
        """SFTP sessions started (each after a successful key login)."""
        with self._stats.lock:
            return self._stats.sessions

    @property
    def drops(self) -> int:
        with self._stats.lock:
            return self._stats.drops

    @property
    def lagged(self) -> int:
        """READ responses sent after the response to a later request."""
        with self._stats.lock:
            return self._stats.lagged

    def served(self, path: str | None = None) -> int:
        """File bytes served so far, for one remote path or in total."""
        return sum(r.length for r in self.reads if path is None or r.path == path)

    def ranges(self, path: str, session: int | None = None) -> list[tuple[int, int]]:
        """The distinct byte ranges of ``path`` read so far, merged: ``[(0, size)]`` for one whole file.

        A client that asks for the same bytes twice (paramiko's readv can, see test_sftp.py) still covers
        the same ranges; ``served`` counts every byte sent.
        """
        spans = sorted((r.offset, r.offset + r.length) for r in self.reads
                       if r.path == path and (session is None or r.session == session))
        merged: list[tuple[int, int]] = []
        for start, end in spans:
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            else:
                merged.append((start, end))
        return merged

    def read_ranges(self) -> dict[str, list[tuple[int, int]]]:
        """Every path read so far -> its merged byte ranges."""
        return {path: self.ranges(path) for path in sorted({r.path for r in self.reads})}

    def bytes_served(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.reads:
            out[r.path] = out.get(r.path, 0) + r.length
        return out

    def reset_counters(self) -> None:
        with self._stats.lock:
            self._stats.reads.clear()

    def stall(self) -> None:
        """From now on file reads block until ``release()`` (or ``stop()``)."""
        self.read_blocked.clear()
        self._run(self._set_go(False))

    def release(self) -> None:
        self._run(self._set_go(True))

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._loop.is_running():
            try:
                self._run(self._shutdown())
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(START_TIMEOUT)
        if not self._loop.is_running():
            self._loop.close()

    # --- plumbing -------------------------------------------------------------------------------------

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(START_TIMEOUT)

    async def _set_go(self, go: bool) -> None:
        assert self._go is not None
        if go:
            self._go.set()
        else:
            self._go.clear()

    def start(self) -> None:
        self._thread.start()
        self._run(self._start())

    async def _start(self) -> None:
        _serve_reads_concurrently_when_lagging()
        self._go = asyncio.Event()
        self._go.set()
        owner = self

        class Server(asyncssh.SSHServer):
            def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
                self._conn = conn
                owner._connections.add(conn)

            def connection_lost(self, exc: Exception | None) -> None:
                owner._connections.discard(self._conn)

            def begin_auth(self, username: str) -> bool:
                return True  # any user name; only the authorized key gets in

            def public_key_auth_supported(self) -> bool:
                return True

            def password_auth_supported(self) -> bool:
                return False

        authorized = asyncssh.import_authorized_keys(public_line(self.client_public) + "\n")
        self._acceptor = await asyncssh.listen(
            self.host, 0,
            server_factory=Server,
            server_host_keys=self.host_keys,
            authorized_client_keys=authorized,
            sftp_factory=lambda chan: _FaultySFTPServer(chan, owner),
            allow_scp=False,
            login_timeout=30,
        )
        self.port = int(self._acceptor.sockets[0].getsockname()[1])

    async def _shutdown(self) -> None:
        if self._go is not None:
            self._go.set()
        for conn in list(self._connections):
            conn.abort()
        if self._acceptor is not None:
            self._acceptor.close()
            await asyncio.wait_for(self._acceptor.wait_closed(), START_TIMEOUT)

    def _remote_path(self, local: str | bytes) -> str:
        text = os.fsdecode(local)
        rel = os.path.relpath(os.path.realpath(text), os.path.realpath(self.root))
        return "/" + rel.replace(os.sep, "/")


class _FaultySFTPServer(asyncssh.SFTPServer):
    """asyncssh's SFTP server on the test root, counting reads, read-only, with the owner's fault knobs."""

    def __init__(self, chan: asyncssh.SSHServerChannel[bytes], owner: SftpTestServer) -> None:
        super().__init__(chan, chroot=os.fsencode(owner.root))
        self._owner = owner
        self._served = 0  # file bytes served in this session
        self._dropped = False  # once dropped, requests still queued in this session get nothing
        self._lag_every = owner.lag_reads  # fixed for the session: its handler reads concurrently or not
        self._read_seq = 0  # READ requests seen (lagging sessions)
        self._answered = 0  # READ requests answered (lagging sessions)
        self._progress = asyncio.Condition()
        with owner._stats.lock:
            owner._stats.sessions += 1
            self._session = owner._stats.sessions

    async def _lag(self) -> None:
        """Hold every N-th READ until the N-1 after it were answered (bounded), then count it if it lagged."""
        seq, self._read_seq = self._read_seq, self._read_seq + 1
        if seq % self._lag_every == 0:
            async with self._progress:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._progress.wait_for(
                        lambda: self._answered >= seq + self._lag_every - 1), LAG_LIMIT)
                if self._answered > seq:
                    with self._owner._stats.lock:
                        self._owner._stats.lagged += 1
        async with self._progress:
            self._answered += 1
            self._progress.notify_all()

    def _lie(self, local: bytes, st: object) -> object:
        """The attributes of the file at ``local`` (a path on this machine), its size as listed_sizes says."""
        size = self._owner.listed_sizes.get(self._owner._remote_path(local))
        if size is None:
            return st
        attrs = st if isinstance(st, asyncssh.SFTPAttrs) else asyncssh.SFTPAttrs.from_local(st)  # type: ignore[arg-type]
        attrs.size = size
        return attrs

    async def scandir(self, path: bytes) -> Any:
        local = self.map_path(path)
        async for entry in super().scandir(path):
            if entry.filename not in (b".", b".."):
                entry.attrs = self._lie(os.path.join(local, entry.filename), entry.attrs)  # type: ignore[assignment]
            yield entry

    def stat(self, path: bytes) -> Any:
        return self._lie(self.map_path(path), super().stat(path))

    def lstat(self, path: bytes) -> Any:
        return self._lie(self.map_path(path), super().lstat(path))

    def fstat(self, file_obj: object) -> Any:
        return self._lie(os.fsencode(getattr(file_obj, "name", b"?")), super().fstat(file_obj))

    def _refuse(self, what: str, path: bytes) -> None:
        with self._owner._stats.lock:
            self._owner._stats.mutations.append(f"{what} {os.fsdecode(path)}")
        raise asyncssh.SFTPPermissionDenied(f"test server is read-only ({what})")

    def open(self, path: bytes, pflags: int, attrs: asyncssh.SFTPAttrs) -> object:
        if pflags & (asyncssh.FXF_WRITE | asyncssh.FXF_APPEND | asyncssh.FXF_CREAT | asyncssh.FXF_TRUNC):
            self._refuse("open-for-write", path)
        return super().open(path, pflags, attrs)

    def open56(self, path: bytes, desired_access: int, flags: int, attrs: asyncssh.SFTPAttrs) -> object:
        if desired_access & (asyncssh.ACE4_WRITE_DATA | asyncssh.ACE4_APPEND_DATA):
            self._refuse("open-for-write", path)
        return super().open56(path, desired_access, flags, attrs)

    def remove(self, path: bytes) -> None:
        self._refuse("remove", path)

    def rename(self, oldpath: bytes, newpath: bytes) -> None:
        self._refuse("rename", oldpath)

    def posix_rename(self, oldpath: bytes, newpath: bytes) -> None:
        self._refuse("rename", oldpath)

    def setstat(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        self._refuse("setstat", path)

    def lsetstat(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        self._refuse("setstat", path)

    def fsetstat(self, file_obj: object, attrs: asyncssh.SFTPAttrs) -> None:
        self._refuse("setstat", b"<handle>")

    def mkdir(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        self._refuse("mkdir", path)

    def rmdir(self, path: bytes) -> None:
        self._refuse("rmdir", path)

    def symlink(self, oldpath: bytes, newpath: bytes) -> None:
        self._refuse("symlink", newpath)

    def link(self, oldpath: bytes, newpath: bytes) -> None:
        self._refuse("link", newpath)

    async def read(self, file_obj: object, offset: int, size: int) -> bytes:
        owner = self._owner
        assert owner._go is not None
        if not owner._go.is_set():
            owner.read_blocked.set()
            await owner._go.wait()
        if self._dropped:
            raise asyncssh.SFTPConnectionLost("connection dropped by the test server")
        if owner.drop_after_bytes is not None and self._served >= owner.drop_after_bytes:
            self._dropped = True
            with owner._stats.lock:
                owner.drop_times -= 1
                if owner.drop_times <= 0:
                    owner.drop_after_bytes = None
                owner._stats.drops += 1
            self.connection.abort()  # like a server crash: no goodbye, the socket just closes
            raise asyncssh.SFTPConnectionLost("connection dropped by the test server")
        if self._lag_every:
            await self._lag()
        if owner.max_read is not None:
            size = min(size, owner.max_read)
        data = super().read(file_obj, offset, size)
        assert isinstance(data, bytes)
        self._served += len(data)
        if data:
            path = owner._remote_path(getattr(file_obj, "name", b"?"))
            with owner._stats.lock:
                owner._stats.reads.append(Read(self._session, path, offset, len(data)))
        return data


_original_recv_packets = asyncssh.sftp.SFTPServerHandler.recv_packets


async def _recv_packets(self: Any) -> None:
    """asyncssh's server loop (``SFTPServerHandler.recv_packets``, which answers one request before reading
    the next), except that for a lagging ``_FaultySFTPServer`` session each READ is handled in a task of its
    own, so a held READ does not hold the ones behind it."""
    if not getattr(self._server, "_lag_every", 0):
        return await _original_recv_packets(self)  # type: ignore[no-any-return]
    tasks: set[asyncio.Task[None]] = set()
    try:
        while self._reader:
            packet = await self.recv_packet()
            pkttype = packet.get_byte()
            pktid = packet.get_uint32()
            self.log_received_packet(pkttype, pktid, packet)
            if pkttype == asyncssh.sftp.FXP_READ:
                task = asyncio.ensure_future(self._process_packet(pkttype, pktid, packet))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            else:
                await self._process_packet(pkttype, pktid, packet)
    except asyncssh.sftp.PacketDecodeError as exc:
        await self._cleanup(asyncssh.SFTPBadMessage(str(exc)))
    except EOFError:
        await self._cleanup(None)
    except (OSError, asyncssh.Error) as exc:
        await self._cleanup(exc)


def _serve_reads_concurrently_when_lagging() -> None:
    """Install :func:`_recv_packets` (in this test process only; idempotent)."""
    asyncssh.sftp.SFTPServerHandler.recv_packets = _recv_packets


@contextmanager
def running_sftp_server(
    root: Path, keys_dir: Path | None = None, *, key_kind: str = "ed25519",
    host_key_kinds: tuple[str, ...] = ("ed25519",), client: asyncssh.SSHKey | None = None,
) -> Iterator[SftpTestServer]:
    """An asyncssh SFTP server serving ``root`` (created) on 127.0.0.1; stopped on exit. It authorizes
    ``client`` (e.g. a :func:`shared_key`) or a new key of ``key_kind``."""
    root.mkdir(parents=True, exist_ok=True)
    keys_dir = keys_dir or root.parent / f"{root.name}-keys"
    server = SftpTestServer(root, keys_dir, key_kind, host_key_kinds, client)
    try:
        server.start()
        yield server
    finally:
        server.stop()


# --- OpenSSH sshd ---------------------------------------------------------------------------------------


@dataclass
class SshdServer:
    """A running OpenSSH sshd (no chroot: ``remote_prefix`` is the served directory's absolute path)."""

    host: str
    port: int
    root: Path
    client_key: Path
    user: str
    host_public: str  # "ssh-ed25519 AAAA…"
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def remote_prefix(self) -> str:
        return str(self.root)

    @property
    def known_hosts_line(self) -> str:
        return f"{host_pattern(self.host, self.port)} {self.host_public}"

    def remote(self, rel: str) -> str:
        return f"{self.root}/{rel.lstrip('/')}"

    def put(self, rel: str, data: bytes, mtime: float | None = None) -> Path:
        return put_file(self.root, rel, data, mtime)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def _banner(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.settimeout(2)
            return s.recv(64).startswith(b"SSH-")
    except OSError:
        return False


@contextmanager
def running_sshd(
    base: Path, *, key_kind: str = "ed25519", client: asyncssh.SSHKey | None = None
) -> Iterator[SshdServer]:
    """OpenSSH ``sshd -D -e`` on a spare 127.0.0.1 port as the current user; ``pytest.skip`` without sshd.
    It authorizes ``client`` (e.g. a :func:`shared_key`) or a new key of ``key_kind``."""
    if not SSHD.exists():
        pytest.skip(f"{SSHD} is not installed (apt-get install openssh-server): OpenSSH interop not tested")
    base.mkdir(parents=True, exist_ok=True)
    root = base / "remote"
    root.mkdir(exist_ok=True)
    host_key_path = base / "ssh_host_ed25519_key"
    host_key = write_private_key(host_key_path, "ed25519")
    client_key = base / f"client_{key_kind}"
    client = write_private_key(client_key, key_kind, key=client)
    authorized = base / "authorized_keys"
    authorized.write_text(public_line(client) + "\n")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)  # privilege separation dir
    user = pwd.getpwuid(os.getuid()).pw_name
    log_path = base / "sshd.log"
    for _attempt in range(3):  # the spare port may be taken between probe and bind: try another
        port = free_port()
        config = base / "sshd_config"
        config.write_text(
            "\n".join([
                f"Port {port}",
                "ListenAddress 127.0.0.1",
                f"HostKey {host_key_path}",
                f"AuthorizedKeysFile {authorized}",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PermitRootLogin prohibit-password",
                "StrictModes no",
                "UsePAM no",
                "PidFile none",
                "Subsystem sftp internal-sftp",
                "LogLevel VERBOSE",
                "",
            ])
        )
        with log_path.open("ab") as log_fh:
            proc = subprocess.Popen(
                [str(SSHD), "-D", "-e", "-f", str(config), "-p", str(port)],
                stdout=log_fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while proc.poll() is None and not _banner(port):
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait(10)
                raise AssertionError(f"sshd did not accept on port {port} within {START_TIMEOUT}s:\n"
                                     + log_path.read_text(errors="replace"))
            time.sleep(BANNER_POLL_SECONDS)  # poll interval while waiting (with a deadline) for sshd
        if proc.poll() is None:
            break
    else:
        raise AssertionError("sshd did not start:\n" + log_path.read_text(errors="replace"))
    server = SshdServer("127.0.0.1", port, root, client_key, user, public_line(host_key), proc, log_path)
    try:
        yield server
    finally:
        server.stop()


# --- settings -------------------------------------------------------------------------------------------


def sftp_env(
    server: SftpTestServer | SshdServer,
    known_hosts: Path,
    *,
    trust: bool = True,
    user: str | None = None,
    key: Path | None = None,
    remote_dirs: list[str] | None = None,
    timeout: float = 5,
    **extra: str,
) -> dict[str, str]:
    """``SMT_*`` for ``server``; with ``trust`` the server's key is written to ``known_hosts`` first.

    ``remote_dirs`` are relative to the served root ("/" by default) and become ``SMT_REMOTE_DIR``.
    """
    if trust:
        known_hosts.parent.mkdir(parents=True, exist_ok=True)
        known_hosts.write_text(server.known_hosts_line + "\n")
    dirs = remote_dirs if remote_dirs is not None else ["/"]
    if isinstance(server, SshdServer):
        user = user or server.user
        remote = ",".join(server.remote(d).rstrip("/") or "/" for d in dirs)
    else:
        user = user or "smt"
        remote = ",".join(dirs)
    return {
        "SMT_HOST": server.host,
        "SMT_PORT": str(server.port),
        "SMT_USER": user,
        "SMT_KEY": str(key or server.client_key),
        "SMT_KNOWN_HOSTS": str(known_hosts),
        "SMT_REMOTE_DIR": remote,
        "SMT_SFTP_TIMEOUT": str(timeout),
        **extra,
    }
