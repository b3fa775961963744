"""SFTP to Smart Meter Texas with paramiko: verified host keys, key auth, listing, resumable downloads.

Host keys are checked against ``SMT_KNOWN_HOSTS`` ourselves (paramiko's ``RejectPolicy`` semantics): an
unknown or changed key refuses the connection with one line that shows the offered key's SHA256
fingerprint and how to trust it. ``accept_new`` appends an unknown key (OpenSSH's ``accept-new``), never a
changed one.

Downloads keep a sliding window of READ requests in flight (see ``Connection._pipelined_read``): no round
trip per read, memory bounded by the window. paramiko's whole-file ``prefetch`` buffers the entire file
when the network outruns the disk, its ``max_concurrent_prefetch_requests`` throttle busy-waits (measured
on 2 cores: 164 s and 1 GB RSS for 1 GiB, where OpenSSH's sftp takes 4–7 s), and ``readv`` races its
helper thread (paramiko PR #2519).

Requests are queued and sent together, several SFTP requests in one channel write (one SSH packet, one
encryption, one syscall), just before this thread waits for an answer: paramiko sends each request as its
own packet, and on a 2-core machine that per-packet work, not the network, limits a pass of small files.
The next file's OPEN can go out with the current file's READs (``download(..., ahead=...)``), so a stream
of small files costs about one round trip each instead of two.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import hashlib
import itertools
import logging
import os
import re
import socket
import stat as stat_mod
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import paramiko
from paramiko.buffered_pipe import BufferedPipe, PipeTimeout
from paramiko.sftp import (
    CMD_CLOSE,
    CMD_DATA,
    CMD_HANDLE,
    CMD_NAME,
    CMD_OPEN,
    CMD_OPENDIR,
    CMD_READ,
    CMD_READDIR,
    CMD_STATUS,
    SFTP_EOF,
    SFTP_FLAG_READ,
)

from smt_watch.config import Settings
from smt_watch.errors import ConfigError, HostKeyError, SftpError, SizeMismatch
from smt_watch.inbox import is_candidate
from smt_watch.names import shown
from smt_watch.sshfast import LeanPacketizer, ReadAheadSocket

log = logging.getLogger("smt_watch.sftp")

REQUEST = 255 * 1024  # bytes per READ request at first: what OpenSSH serves; a server serving less sets less
MIN_REQUEST = 4 * 1024
WINDOW_BYTES = 2 * 1024 * 1024  # READ bytes in flight: the pipeline depth and the memory bound
TRANSPORT_WINDOW = 8 * 1024 * 1024
MAX_PACKET = 128 * 1024  # what we accept per SSH packet (OpenSSH 9.2's sshd sends 32 KiB ones regardless)
WAKE_BYTES = 512 * 1024  # a reader waiting for more than this is woken when this much is buffered
NOBODY_WAITS = 1 << 62
MAX_ANSWER = 16 * 1024 * 1024  # longer SFTP answers are garbage (paramiko's own check)
CLOSE_JOIN_SECONDS = 2.0  # at most this long for paramiko's thread to end once its socket is shut down


@dataclass(frozen=True)
class RemoteFile:
    path: str  # absolute remote path, e.g. /adhocusage/2026/a.CSV
    size: int
    mtime: int

    @property
    def relative(self) -> PurePosixPath:
        """Where it goes under the inbox: its remote path without the leading slash (docs/contract.md §2)."""
        return PurePosixPath(self.path.lstrip("/"))


def fingerprint(key: paramiko.PKey) -> str:
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def host_entry(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


def load_key(settings: Settings) -> paramiko.PKey:
    path = settings.smt_key
    if path is None:
        raise ConfigError("SMT_KEY is not set: the path of the private key for SFTP")
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"SMT_KEY {path}: {exc.strerror}") from exc
    if not stat_mod.S_ISREG(mode):
        raise ConfigError(f"SMT_KEY {path} is not a regular file")
    if mode & 0o077:
        log.warning("SMT_KEY %s is readable by group or others (mode %o); run: chmod 600 %s",
                    path, mode & 0o777, path)
    passphrase = settings.smt_key_passphrase.reveal().encode() if settings.smt_key_passphrase else None
    try:
        return paramiko.PKey.from_path(path, passphrase)  # type: ignore[arg-type]  # cryptography wants bytes
    except paramiko.PasswordRequiredException as exc:
        raise ConfigError(f"SMT_KEY {path} is encrypted: set SMT_KEY_PASSPHRASE") from exc
    except TypeError as exc:
        # cryptography: "Password was given but private key is not encrypted" / "...is password-protected".
        if passphrase is None or "not encrypted" not in str(exc):
            raise ConfigError(f"SMT_KEY {path} is encrypted: set SMT_KEY_PASSPHRASE") from exc
        return load_key_without_passphrase(path)
    except (paramiko.SSHException, ValueError, OSError) as exc:
        fallback = _ecdsa_fallback(path, passphrase)
        if fallback is not None:
            return fallback
        reason = _not_a_key(path) or ("wrong SMT_KEY_PASSPHRASE?" if passphrase else type(exc).__name__)
        raise ConfigError(f"SMT_KEY {path} cannot be loaded ({reason})") from exc


_ARMOUR = re.compile(rb"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----(.*?)(?:-----END|\Z)", re.DOTALL)


def _not_a_key(path: Path) -> str | None:
    """Why ``path`` is not a private key at all, if it is not: a wrong file is not blamed on the passphrase."""
    try:
        with path.open("rb") as fh:
            found = _ARMOUR.search(fh.read(64 * 1024))
    except OSError as exc:
        return exc.strerror
    if not found:
        return "not an OpenSSH or PEM private key"
    lines = [line.strip() for line in found.group(2).splitlines() if line.strip() and b":" not in line]
    try:
        raw = base64.b64decode(b"".join(lines), validate=True)
    except ValueError:
        return "not a valid private key: its body is not base64"
    if found.group(1) == b"OPENSSH " and not raw.startswith(b"openssh-key-v1\0"):
        return "not a valid OpenSSH private key"
    return None


def load_key_without_passphrase(path: Path) -> paramiko.PKey:
    try:
        return paramiko.PKey.from_path(path)
    except (paramiko.SSHException, ValueError, OSError, TypeError) as exc:
        raise ConfigError(f"SMT_KEY {path} cannot be loaded ({type(exc).__name__})") from exc


def _ecdsa_fallback(path: Path, passphrase: bytes | None) -> paramiko.PKey | None:
    """paramiko 5.1 misreads some OpenSSH-format ECDSA keys (paramiko#2445); cryptography reads them."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    try:
        key = load_ssh_private_key(path.read_bytes(), passphrase)
    except (ValueError, TypeError, OSError):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return paramiko.ECDSAKey(vals=(key, key.public_key()))
    return None


def known_host_keys(path: Path) -> paramiko.HostKeys:
    """Parse known_hosts line by line; a line paramiko cannot read is skipped with a warning, as OpenSSH
    does, instead of making the whole file unusable."""
    keys = paramiko.HostKeys()
    if not path.exists():
        return keys
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        raise ConfigError(f"SMT_KNOWN_HOSTS {path} cannot be read: {exc.strerror}") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            entry = paramiko.hostkeys.HostKeyEntry.from_line(line, number)
        except Exception as exc:  # InvalidHostKey, binascii errors, unknown key types: skip this line
            log.warning("Ignoring line %d of %s: %s", number, path, exc)
            continue
        if entry is not None:
            for name in entry.hostnames:
                keys.add(name, entry.key.get_name(), entry.key)
    return keys


def check_host_key(settings: Settings, offered: paramiko.PKey, accept_new: bool) -> None:
    assert settings.smt_host is not None
    entry = host_entry(settings.smt_host, settings.smt_port)
    known_path = settings.known_hosts
    keys = known_host_keys(known_path).lookup(entry)
    kind, fp = offered.get_name(), fingerprint(offered)
    if keys is not None and kind in keys:
        if keys[kind] == offered:
            return
        raise HostKeyError(
            f"host key for {entry} CHANGED: offered {kind} {fp}, {known_path} has {fingerprint(keys[kind])}; "
            f"refusing (possible man-in-the-middle). If SMT really rotated its key: "
            f"ssh-keygen -R '{entry}' -f {known_path}, then verify and add the new one"
        )
    if keys is not None and len(keys):
        raise HostKeyError(
            f"host key for {entry} CHANGED: offered {kind} {fp}, but {known_path} lists only "
            f"{', '.join(keys.keys())} for it; refusing"
        )
    if accept_new:
        known_path.parent.mkdir(parents=True, exist_ok=True)
        needs_newline = known_path.exists() and known_path.stat().st_size > 0 and \
            not known_path.read_bytes().endswith(b"\n")
        with known_path.open("a") as fh:
            fh.write(("\n" if needs_newline else "") + f"{entry} {kind} {offered.get_base64()}\n")
        log.warning("Added new host key for %s to %s: %s %s", entry, known_path, kind, fp)
        return
    port = f"-p {settings.smt_port} " if settings.smt_port != 22 else ""
    raise HostKeyError(
        f"host key for {entry} is unknown ({kind} {fp}); verify it with SMT, then trust it: "
        f"ssh-keyscan {port}{settings.smt_host} >> {known_path} (or run sync once with --accept-new-host-key)"
    )


def prefer_known_key_types(transport: paramiko.Transport, settings: Settings) -> None:
    """Ask first for the host-key types known_hosts holds (as OpenSSH and paramiko's SSHClient do), so a
    server with several host keys is not refused for offering one we have never seen."""
    assert settings.smt_host is not None
    known = known_host_keys(settings.known_hosts).lookup(host_entry(settings.smt_host, settings.smt_port))
    if not known:
        return
    wanted: list[str] = []
    for kind in known:
        wanted += ["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"] if kind == "ssh-rsa" else [kind]
    options = transport.get_security_options()
    supported = list(options.key_types)
    first = [k for k in wanted if k in supported]
    if first:
        options.key_types = first + [k for k in supported if k not in first]


def prefer_aead_ciphers(transport: paramiko.Transport) -> None:
    """AES-GCM first (paramiko lists it last): no per-packet HMAC in Python, a quarter less CPU per byte
    on a fetch. Only the order changes; a server without GCM still gets CTR with HMAC-SHA2."""
    options = transport.get_security_options()
    first = [c for c in ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com") if c in options.ciphers]
    options.ciphers = tuple(first) + tuple(c for c in options.ciphers if c not in first)


def drop_handshake_timer(transport: paramiko.Transport) -> None:
    """Forget paramiko's handshake timer once the handshake is done: paramiko keeps it and "cancels" it
    again after every packet it receives (an ``Event.set`` under a lock, ~10 % of a download's CPU at
    32 KiB packets). Without it ``handshake_timed_out`` answers False, as it already does after the
    handshake; paramiko starts that timer only once per transport, so a rekey is not affected."""
    packetizer = transport.packetizer
    if getattr(packetizer, "_Packetizer__handshake_complete", False):
        packetizer._Packetizer__timer = None  # type: ignore[attr-defined]  # paramiko-internal, pinned <6


class Connection:
    """One SSH connection with one SFTP channel; each sync worker owns one."""

    def __init__(self, settings: Settings, *, accept_new_host_key: bool = False) -> None:
        if not settings.smt_host or not settings.smt_user:
            raise ConfigError("sync needs SMT_HOST, SMT_USER and SMT_KEY")
        self.settings = settings
        key = load_key(settings)
        where = f"{settings.smt_user}@{host_entry(settings.smt_host, settings.smt_port)}"
        try:
            sock = socket.create_connection((settings.smt_host, settings.smt_port), timeout=settings.sftp_timeout)
        except OSError as exc:
            raise SftpError(f"cannot connect to {where}: {exc.strerror or exc}") from exc
        try:
            # SFTP is request and answer: with Nagle, requests written (by _flush) just after paramiko's window
            # adjustment wait for the server's ACK of that adjustment, which it delays because it has nothing
            # to send until those very requests arrive (1,000 files of 100 KB, --workers 1: 11.4 s with
            # Nagle, 4.5 s without)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.transport = paramiko.Transport(ReadAheadSocket(sock),  # type: ignore[arg-type]  # socket-like
                                                default_window_size=TRANSPORT_WINDOW,
                                                default_max_packet_size=MAX_PACKET,
                                                packetizer_class=LeanPacketizer)
        except (paramiko.SSHException, OSError) as exc:
            sock.close()
            raise SftpError(f"SSH to {where} failed: {exc}") from exc
        except BaseException:
            sock.close()
            raise
        try:
            prefer_known_key_types(self.transport, settings)
            prefer_aead_ciphers(self.transport)
            self.transport.start_client(timeout=settings.sftp_timeout)
            check_host_key(settings, self.transport.get_remote_server_key(), accept_new_host_key)
            self.transport.auth_publickey(settings.smt_user, key)
            drop_handshake_timer(self.transport)
            channel = self.transport.open_session(window_size=TRANSPORT_WINDOW, max_packet_size=MAX_PACKET)
            channel.in_buffer = _ChannelBuffer()  # before any data can arrive
            channel.invoke_subsystem("sftp")
            channel.settimeout(settings.sftp_timeout)  # a stalled server fails the transfer, not hangs it
            self.sftp: paramiko.SFTPClient = paramiko.SFTPClient(channel)
            self._out: list[bytes] = []  # SFTP requests queued, sent by _flush
            self.request = REQUEST  # bytes per READ: lowered to what this server serves (see _pipelined_read)
            self._ahead: tuple[str, _Opened] | None = None  # an OPEN sent before its file's turn
        except paramiko.AuthenticationException as exc:
            self.close()
            raise ConfigError(f"SFTP login to {where} refused: check SMT_USER and SMT_KEY") from exc
        except (paramiko.SSHException, OSError, EOFError) as exc:
            self.close()
            raise SftpError(f"SSH to {where} failed: {exc}") from exc
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close, and let paramiko's thread end before returning: a sync pass forks its worker processes
        only while it runs no other thread (``sync._process_context``). The socket is shut down first, so
        that thread's read returns now rather than at its next 0.1 s timeout."""
        with contextlib.suppress(OSError):
            self.transport.sock.shutdown(socket.SHUT_RDWR)
        self.transport.close()
        if self.transport.is_alive() and self.transport is not threading.current_thread():
            self.transport.join(CLOSE_JOIN_SECONDS)

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def walk(self, top: str, patterns: tuple[str, ...]) -> Iterator[RemoteFile]:
        """Every candidate file under ``top`` (recursively; hidden and temporary names skipped)."""
        stack = [top.rstrip("/") or "/"]
        while stack:
            directory = stack.pop()
            try:
                entries = self._listdir(directory)
            except (OSError, paramiko.SFTPError) as exc:
                raise SftpError(f"cannot list {shown(directory)}: {exc}") from exc
            for entry in sorted(entries, key=lambda e: e.filename):
                path = f"{directory.rstrip('/')}/{entry.filename}"
                mode = entry.st_mode or 0
                if stat_mod.S_ISDIR(mode):
                    if not entry.filename.startswith("."):
                        stack.append(path)
                elif stat_mod.S_ISREG(mode) and is_candidate(PurePosixPath(path.lstrip("/")), patterns):
                    yield RemoteFile(path, int(entry.st_size or 0), int(entry.st_mtime or 0))

    def _listdir(self, directory: str) -> list[paramiko.SFTPAttributes]:
        """``listdir_attr`` that never fails on a name: paramiko decodes names as strict UTF-8 and one name
        that is not fails the whole listing (every pass). Names are read as bytes; one that is not UTF-8,
        or holds ``/`` or a control character (which would become extra local directories or forged log
        lines), is skipped with one warning, and the pass goes on."""
        sftp = self.sftp
        _, msg = sftp._request(CMD_OPENDIR, directory)  # type: ignore[attr-defined]  # paramiko-internal, pinned <6
        handle = msg.get_binary()
        entries: list[paramiko.SFTPAttributes] = []
        try:
            while True:
                try:
                    kind, msg = sftp._request(CMD_READDIR, handle)  # type: ignore[attr-defined]
                except EOFError:
                    return entries
                if kind != CMD_NAME:
                    raise paramiko.SFTPError("expected a name list")
                for _ in range(msg.get_int()):
                    raw, longname = msg.get_string(), msg.get_string()
                    name = raw.decode("utf-8", "surrogateescape")
                    attr = paramiko.SFTPAttributes._from_msg(  # type: ignore[attr-defined]
                        msg, name, longname.decode("utf-8", "replace"))
                    if name in (".", ".."):
                        continue
                    if not (name.isprintable() and "/" not in name):
                        log.warning("Skipping remote %s/%s: its name is not UTF-8, or holds / or a control "
                                    "character", shown(directory.rstrip("/")), shown(name))
                        continue
                    entries.append(attr)
        finally:
            sftp._request(CMD_CLOSE, handle)  # type: ignore[attr-defined]

    def download(
        self, remote: RemoteFile, part: Path, progress: Callable[[int], None] | None = None,
        ahead: RemoteFile | None = None, durable: bool = True,
    ) -> str:
        """Append the rest of ``remote`` to ``part`` (resuming), fsync it, and return the SHA-256.
        ``durable`` off: not fsynced; the caller fsyncs the part before anything counts on it (a sync
        worker does that in threads of its own, four, while this connection fetches the next file).

        The part grows only by what the server sent: nothing is allocated ahead. When the server serves a
        different number of bytes than it listed (fewer: EOF early; more: data past the listed end), the
        part is removed and :class:`SizeMismatch` says so; a dropped connection keeps it for resuming.
        ``ahead``: the file this connection fetches next; its OPEN goes out with this file's READs."""
        digest = hashlib.sha256()
        offset = part.stat().st_size if part.exists() else 0
        if offset > remote.size:
            part.unlink()
            offset = 0
        if offset:
            with part.open("rb") as fh:
                while data := fh.read(1024 * 1024):
                    digest.update(data)
            log.info("Resuming %s at %d of %d bytes", remote.path, offset, remote.size)
        try:
            handle = self._open(remote)
            if ahead is not None:
                self._open_ahead(ahead)
            try:
                with part.open("ab") as out:
                    for data in self._pipelined_read(handle, remote, offset, remote.size, to_the_end=True):
                        out.write(data)
                        digest.update(data)
                        if progress:
                            progress(len(data))
                    out.flush()
                    if durable:
                        os.fsync(out.fileno())
            finally:
                self._close_handle(handle)
        except SizeMismatch:
            part.unlink(missing_ok=True)
            raise
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise SftpError(f"{remote.path}: transfer failed: {exc or type(exc).__name__}") from exc
        size = part.stat().st_size
        if size != remote.size:
            part.unlink(missing_ok=True)
            raise SizeMismatch(f"{remote.path}: got {size} bytes, the server listed {remote.size}; part removed")
        return digest.hexdigest()

    def fetch_range(
        self, remote: RemoteFile, fd: int, start: int, end: int, progress: Callable[[int], None] | None = None
    ) -> None:
        """Write bytes ``[start, end)`` of ``remote`` at the same offsets of ``fd`` (``os.pwrite``), in order:
        ``progress`` is told each piece once written, so what it counted is a complete prefix of the range.
        Only bytes received are written; the range that ends the file also checks the server has no more."""
        try:
            handle = self._open(remote)
            try:
                at = start
                for data in self._pipelined_read(handle, remote, start, end, to_the_end=end == remote.size):
                    view = memoryview(data)
                    while view:
                        written = os.pwrite(fd, view, at)
                        view, at = view[written:], at + written
                    if progress:
                        progress(len(data))
            finally:
                self._close_handle(handle)
                self._flush()  # a ranged worker may wait a while for its next piece: close now
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise SftpError(f"{remote.path}: transfer failed: {exc or type(exc).__name__}") from exc

    def _pipelined_read(
        self, handle: bytes, remote: RemoteFile, offset: int, end: int, to_the_end: bool = False
    ) -> Iterator[bytes]:
        """Bytes ``[offset, end)`` of the file in order, with up to ``WINDOW_BYTES`` of reads in flight.

        An early end of file is :class:`SizeMismatch` (the server lists more than it serves). ``to_the_end``:
        ``end`` is the listed size, and one more read, sent with the others, must find the end of file there
        (else the server serves more than it lists).

        paramiko's own ``readv``/``prefetch`` race their helper thread (paramiko PR #2519: a batch may be
        read twice, the late copies held in memory) and its ``max_concurrent_requests`` throttle
        busy-waits. This sliding window uses the same request/response calls paramiko's prefetch does,
        from this thread only: memory is bounded by the window, and responses may arrive in any order.
        The window is topped up a quarter at a time, those requests sent as one packet. Reads ask for
        ``self.request`` bytes (255 KiB, what OpenSSH serves: a quarter of the answers paramiko would
        parse with 64 KiB); a server that serves less per read (short reads) lowers it for the connection.
        """
        collector = _Responses()
        pending: collections.deque[tuple[int, int, int]] = collections.deque()
        size = end
        while offset < size or pending:
            window = max(4, WINDOW_BYTES // self.request)
            if len(pending) <= window - window // 4 or not pending:
                while offset < size and len(pending) < window:
                    length = min(self.request, size - offset)
                    num = self._queue(collector, CMD_READ, handle, struct.pack(">QI", offset, length))
                    pending.append((num, offset, length))
                    offset += length
            if to_the_end and offset == size:  # every read sent: the probe for the end of file goes with them
                num = self._queue(collector, CMD_READ, handle, struct.pack(">QI", end, 1))
                pending.append((num, end, 1))
                to_the_end = False
            num, at, length = pending.popleft()
            if num not in collector.data:
                self._flush()
            while num not in collector.data:
                self._read_answer()  # one answer, to its collector
            data = collector.take(num, remote.path)
            if at == end:  # the probe past the listed end
                if data:
                    raise SizeMismatch(f"{remote.path}: the server serves more than the {remote.size} bytes it "
                                       "listed")
                continue
            if not data:
                raise SizeMismatch(f"{remote.path}: the server served {at} bytes of the {remote.size} it listed")
            yield data
            if len(data) < length:  # a short read (a server with a smaller limit): fetch the rest now
                self.request = max(MIN_REQUEST, min(self.request, len(data)))
                rest = self._read_rest(handle, remote, at + len(data), length - len(data))
                if len(rest) != length - len(data):
                    raise SizeMismatch(f"{remote.path}: the server served {at + len(data) + len(rest)} bytes of "
                                       f"the {remote.size} it listed")
                yield rest

    def _read_rest(self, handle: bytes, remote: RemoteFile, at: int, n: int) -> bytes:
        """Up to ``n`` bytes at ``at``, one READ at a time, fewer only at the end of the file."""
        collector = _Responses()
        out: list[bytes] = []
        while n > 0:
            num = self._queue(collector, CMD_READ, handle, struct.pack(">QI", at, n))
            self._flush()
            while collector.data.get(num) is None:  # an answer is bytes or an exception, never None
                self._read_answer()
            data = collector.take(num, remote.path)
            if not data:
                break
            out.append(data)
            at, n = at + len(data), n - len(data)
        return b"".join(out)

    def _read_answer(self) -> None:
        """Read one SFTP answer and hand it to the collector of its request, as paramiko's
        ``_read_response()`` does, except that a READ's DATA goes to its :class:`_Responses` as the bytes
        taken off the channel: paramiko copies them three times (``data[1:]``, a ``Message``,
        ``get_string``) and parses them through a ``Message``, for every 255 KiB. An answer that cannot be
        framed is an ``SSHException``: the transfer fails as a broken connection does (and is retried)."""
        sftp, channel = self.sftp, self.sftp.sock
        try:
            size, t, num = struct.unpack(">IBI", _receive(channel, 9))
            if size < 5 or size > MAX_ANSWER:
                raise paramiko.SSHException(f"garbage SFTP answer (length {size})")
            with sftp._lock:  # type: ignore[attr-defined]  # paramiko-internal, pinned <6
                collector = sftp._expecting.pop(num, None)  # type: ignore[attr-defined]
            if t == CMD_DATA and size >= 9 and isinstance(collector, _Responses):
                (length,) = struct.unpack(">I", _receive(channel, 4))
                if length != size - 9:
                    raise paramiko.SSHException(f"malformed SFTP DATA answer ({length} bytes in {size})")
                collector.data[num] = _receive(channel, length) if length else b""
                return
            rest = _receive(channel, size - 5)
        except EOFError as exc:
            raise paramiko.SSHException(f"Server connection dropped: {exc}") from exc
        if collector is None:
            log.debug("Unexpected SFTP answer #%d", num)  # to a request whose answer nobody waits for
        elif collector is not type(None):
            collector._async_response(t, paramiko.Message(rest), num)

    # --- requests sent together -------------------------------------------------------------------------

    def _queue(self, collector: object, t: int, handle_or_path: bytes, tail: bytes = b"") -> int:
        """Queue one SFTP request (its answer goes to ``collector._async_response``, or is dropped for
        ``type(None)``): a string argument, then ``tail`` already packed. Sent by :meth:`_flush`."""
        sftp = self.sftp
        with sftp._lock:  # type: ignore[attr-defined]  # paramiko-internal, pinned <6
            num: int = sftp.request_number
            sftp._expecting[num] = collector  # type: ignore[attr-defined]
            sftp.request_number = num + 1
        body = struct.pack(">BII", t, num, len(handle_or_path)) + handle_or_path + tail
        self._out.append(struct.pack(">I", len(body)) + body)
        return num

    def _flush(self) -> None:
        """Send every queued request in one channel write."""
        if self._out:
            out, self._out = b"".join(self._out), []
            self.sftp._write_all(out)  # type: ignore[attr-defined]  # paramiko-internal, pinned <6

    def _open(self, remote: RemoteFile) -> bytes:
        """The handle of ``remote`` opened for reading: the one opened ahead, or a new one now."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] != remote.path:  # not the file opened ahead: close that one
            with contextlib.suppress(OSError, EOFError):
                self._close_handle(self._wait_open(ahead[1], ahead[0]))
            ahead = None
        if ahead is None:
            opened = _Opened()
            self._queue_open(remote.path, opened)
        else:
            opened = ahead[1]
        return self._wait_open(opened, remote.path)

    def _open_ahead(self, remote: RemoteFile) -> None:
        opened = _Opened()
        self._queue_open(remote.path, opened)
        self._ahead = (remote.path, opened)

    def _queue_open(self, path: str, opened: _Opened) -> None:
        self._queue(opened, CMD_OPEN, path.encode("utf-8", "surrogateescape"),
                    struct.pack(">II", SFTP_FLAG_READ, 0))  # pflags, attrs with no fields

    def _wait_open(self, opened: _Opened, path: str) -> bytes:
        if opened.answer is None:
            self._flush()
        while opened.answer is None:
            self._read_answer()
        t, msg = opened.answer
        if t == CMD_STATUS:
            self.sftp._convert_status(msg)  # type: ignore[attr-defined]  # raises IOError / EOFError
        if t != CMD_HANDLE:
            raise paramiko.SSHException(f"{path}: the server answered OPEN without a handle")
        handle: bytes = msg.get_binary()
        return handle

    def _close_handle(self, handle: bytes) -> None:
        """Close without waiting for the answer (as paramiko does in ``__del__``): the CLOSE goes out with the
        next requests, its answer is read and dropped with theirs. Nothing was written through it."""
        self._queue(type(None), CMD_CLOSE, handle)


def _receive(channel: paramiko.Channel, n: int) -> bytes:
    """Exactly ``n`` bytes from the channel (our :class:`_ChannelBuffer` hands them over in one piece)."""
    data = channel.recv(n)
    if len(data) == n:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        if not data:
            raise EOFError("the SFTP channel closed")
        data = channel.recv(n - got)
        parts.append(data)
        got += len(data)
    return b"".join(parts)


class _Opened:
    """Receives the answer to one OPEN (paramiko calls ``_async_response``)."""

    def __init__(self) -> None:
        self.answer: tuple[int, paramiko.Message] | None = None

    def _async_response(self, t: int, msg: paramiko.Message, num: int) -> None:
        self.answer = (t, msg)


class _Chunks:
    """The bytes a channel received, as the chunks they came in: appending and dropping a prefix never
    move what stays buffered. Supports just what :class:`BufferedPipe` does with its buffer."""

    def __init__(self) -> None:
        self._parts: collections.deque[bytes] = collections.deque()
        self._offset = 0  # bytes of _parts[0] already consumed
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def append(self, data: bytes) -> None:
        if data:
            self._parts.append(bytes(data))
            self._size += len(data)

    def peek(self, limit: int | None) -> bytes:
        """Up to ``limit`` bytes from the front (all with ``None``), left in place."""
        want = self._size if limit is None else min(limit, self._size)
        if not want:
            return b""
        first = self._parts[0]
        if len(first) - self._offset >= want:
            return first[self._offset:self._offset + want]
        out = [first[self._offset:]]
        got = len(out[0])
        for part in itertools.islice(self._parts, 1, None):
            take = part[: want - got] if got + len(part) > want else part
            out.append(take)
            got += len(take)
            if got >= want:
                break
        return b"".join(out)

    def __delitem__(self, key: slice) -> None:
        n = self._size if key.stop is None else min(key.stop, self._size)
        self._size -= n
        n += self._offset
        while self._parts and n >= len(self._parts[0]):
            n -= len(self._parts.popleft())
        self._offset = n if self._parts else 0


class _ChannelBuffer(BufferedPipe):  # type: ignore[type-arg]
    """paramiko's channel buffer holding :class:`_Chunks`, whose reader is woken once per SFTP message.

    paramiko keeps received channel data in an ``array('B')`` and removes what is read with
    ``del buf[:n]``, which moves everything still buffered (up to the read window, 2 MiB) on every read;
    SFTP reads in pieces of 4 bytes, 9 bytes and 64 KiB. That copying was about a third of sync's CPU.

    paramiko also wakes the reader for every SSH packet (OpenSSH sends 32 KiB ones), and paramiko's SFTP
    client gathers a 255 KiB answer with ``out += recv(rest)``, copying it again per packet: eight thread
    switches and ~1 MiB of copies for each READ answer. Here ``read(n)`` waits until all ``n`` bytes are
    buffered (up to ``WAKE_BYTES``), and ``feed`` wakes the reader only then. That is safe because this
    buffer serves only our SFTP channel, whose client asks for exactly the rest of a message the server is
    sending (its length came first), and the channel window (``TRANSPORT_WINDOW``) is far larger than
    ``WAKE_BYTES``. The read timeout keeps its meaning: it fires when nothing arrived for that long.
    Installed on our channel before the SFTP subsystem starts.
    """

    # BufferedPipe's own attributes, which its type stubs do not declare
    _lock: threading.Lock
    _cv: threading.Condition
    _event: threading.Event | None
    _closed: bool

    def __init__(self) -> None:
        super().__init__()
        self._buffer = _Chunks()
        self._want = NOBODY_WAITS  # bytes buffered before feed wakes the reader; none waiting: never

    def _buffer_frombytes(self, data: bytes) -> None:
        self._buffer.append(data)

    def _buffer_tobytes(self, limit: int | None = None) -> bytes:
        return self._buffer.peek(limit)

    def feed(self, data: bytes) -> None:
        with self._lock:
            if self._event is not None:
                self._event.set()
            self._buffer.append(data)
            if len(self._buffer) >= self._want:
                self._cv.notify_all()

    def read(self, nbytes: int, timeout: float | None = None) -> bytes:
        """Up to ``nbytes``, waiting until ``min(nbytes, WAKE_BYTES)`` are buffered or the channel closed;
        :class:`PipeTimeout` when nothing at all arrived within ``timeout`` seconds."""
        buffer = self._buffer
        with self._lock:
            want = min(nbytes, WAKE_BYTES)
            seen = len(buffer)
            deadline = None if timeout is None else time.monotonic() + timeout
            while len(buffer) < want and not self._closed:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    if len(buffer) > seen:  # it is coming, just slowly: the timeout counts from now
                        seen = len(buffer)
                        deadline = time.monotonic() + (timeout or 0.0)
                        continue
                    if len(buffer):
                        break
                    raise PipeTimeout()
                self._want = want
                try:
                    self._cv.wait(left)
                finally:
                    self._want = NOBODY_WAITS
            out = buffer.peek(nbytes)
            del buffer[:len(out)]
            if not len(buffer) and self._event is not None and not self._closed:
                self._event.clear()
            return out


class _Responses:
    """Collects asynchronous READ responses by request number (paramiko calls ``_async_response``)."""

    def __init__(self) -> None:
        self.data: dict[int, bytes | Exception] = {}

    def _async_response(self, t: int, msg: paramiko.Message, num: int) -> None:
        if t == CMD_DATA:
            self.data[num] = msg.get_string()
        elif t == CMD_STATUS and msg.get_int() == SFTP_EOF:
            self.data[num] = b""
        else:
            self.data[num] = OSError(f"SFTP read failed (response type {t})")

    def take(self, num: int, path: str) -> bytes:
        value = self.data.pop(num)
        if isinstance(value, Exception):
            raise SftpError(f"{path}: {value}")
        return value
