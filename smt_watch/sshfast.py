"""The SSH receive path below SFTP, made cheaper, and the allocator setting for processes that download.

paramiko's transport reads its TCP socket through :class:`ReadAheadSocket` (one ``recv`` for several SSH
packets) and, for an AES-GCM connection in its steady state, through :class:`LeanPacketizer`'s short path
(a packet decrypted straight from that buffer, its channel data handed over with one copy, as
:class:`ChannelData`); :func:`keep_freed_memory` keeps glibc from handing a download's freed memory back to
the kernel. :mod:`smt_watch.sftp` builds its connections with them; ``sync`` sets the allocator. Kept apart
from the SFTP client: this is SSH packet framing and process tuning, with paramiko's private packetizer state
(pinned <6) as its contract, checked by ``tests/test_sftp_lean.py``.
"""

from __future__ import annotations

import functools
import io
import socket
import struct
from typing import Any

import paramiko
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from paramiko.common import MSG_CHANNEL_DATA
from paramiko.packet import Packetizer

from smt_watch.clib import libc

READ_AHEAD = 256 * 1024  # bytes taken off the TCP socket per recv (eight of sshd's 32 KiB packets)
MAX_PACKET_LENGTH = READ_AHEAD + 64 * 1024  # longer encrypted packets are refused (OpenSSH's limit: 256 KiB)
MALLOC_MMAP_THRESHOLD = 4 * 1024 * 1024  # glibc: blocks up to this size come from the heap, not their own mmap
MALLOC_TRIM_THRESHOLD = 8 * 1024 * 1024  # glibc: free heap kept, not handed back, up to this much


@functools.cache
def keep_freed_memory() -> None:
    """Tell glibc's allocator to reuse the memory a download frees instead of handing it back to the kernel.

    A download allocates a 255 KiB ``bytes`` per READ answer and 32 KiB ones per SSH packet, and frees them
    moments later; a ranged fetch hashes its part in 1 MiB reads (``sync.HASH_BLOCK``). With glibc's
    defaults such blocks come from mmap at first, and the heaps are trimmed (``madvise``/``brk``) whenever
    their free top grows past a few hundred KiB, so the same memory is faulted in again and zeroed by the
    kernel, page by page: ~100,000 page faults and about a quarter of the kernel CPU of a GiB fetched by one
    stream. Fixed thresholds keep blocks up to ``MALLOC_MMAP_THRESHOLD`` on the heap and up to
    ``MALLOC_TRIM_THRESHOLD`` of free heap: RSS stays bounded by what is live at once (the channel and read
    windows, a hash block). Measured: ~2,000 page faults a GiB for one stream; ``sync --workers 4`` of
    1 GiB, A/B in one run, 29,000 in all (start-up included) against 127,000–148,000. A 1 MiB mmap threshold
    was worse than none: every 1 MiB hash read became its own mmap (512 MiB: 160,000 against 70,000).
    Process-wide and set once (cached), so only the processes that sync call it (a sync worker process,
    ``smt-watch sync``), not ``serve`` or ``doctor``, whose allocations it would change too; where
    ``mallopt`` is missing (not glibc) nothing changes."""
    mallopt = getattr(libc(), "mallopt", None)
    if mallopt is None:
        return
    mallopt(-3, MALLOC_MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    mallopt(-1, MALLOC_TRIM_THRESHOLD)  # M_TRIM_THRESHOLD


class ReadAheadSocket:
    """The TCP socket handed to paramiko's transport, whose ``recv`` is served from one ``recv_into`` of up
    to ``READ_AHEAD`` bytes.

    paramiko reads each SSH packet with two or three ``recv`` calls (its first block, then the rest, in
    pieces when the kernel has less), and with a socket timeout set CPython polls before each: at sshd's
    32 KiB packets that is ~100,000 syscalls a GiB. Here one ``recv_into`` takes whatever the kernel has
    (typically several packets) and paramiko's reads are copied out of it. A socket-like object is what
    ``paramiko.Transport`` accepts; everything but ``recv`` goes to the socket itself (timeouts, send,
    shutdown, close), and ``recv`` keeps the socket's semantics: it waits only when nothing is buffered,
    raises what the socket raises (``socket.timeout`` included), and returns ``b""`` at end of stream."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray(READ_AHEAD)
        self._view = memoryview(self._buffer)
        self._start = 0
        self._end = 0
        self._error: OSError | None = None  # what gather met, raised by recv once the buffer is empty

    def gather(self, n: int) -> bool:
        """Whether ``n`` bytes are buffered in one piece, receiving what is missing if the socket has it
        now: False (nothing lost, all stays buffered for ``recv``) on a timeout, an error or end of stream,
        which paramiko's own reading then meets and handles. An error other than a timeout (ECONNRESET) is
        kept and raised by ``recv`` after the bytes before it: paramiko then reports that error, not just
        "EOF in transport thread"."""
        if self._end - self._start >= n:
            return True
        if n > len(self._buffer) or self._error is not None:
            return False
        if self._start:
            kept = self._end - self._start
            self._buffer[:kept] = self._view[self._start:self._end]
            self._start, self._end = 0, kept
        try:
            while self._end < n:
                got = self._sock.recv_into(self._view[self._end:])
                if not got:
                    return False
                self._end += got
        except (TimeoutError, BlockingIOError):  # nothing more yet: paramiko's own read waits for it
            return False
        except OSError as exc:
            self._error = exc
            return False
        return True

    def recv(self, n: int) -> bytes:
        if self._start == self._end:
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            got = self._sock.recv_into(self._buffer)
            if not got:
                return b""
            self._start, self._end = 0, got
        at = self._start
        self._start = stop = min(self._end, at + n)
        return bytes(self._view[at:stop])

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


PACKETIZER_STATE = (  # paramiko-internal attributes LeanPacketizer reads and keeps up to date
    "__socket", "__remainder", "__closed", "__need_rekey", "__dump_packets",
    "__aead_in", "__etm_in", "__compress_engine_in", "__block_engine_in", "__block_size_in", "__mac_size_in",
    "__iv_in", "__sequence_number_in", "__received_bytes", "__received_packets",
)


class LeanPacketizer(Packetizer):
    """paramiko's packet reader with a short path for the steady state of an AES-GCM connection.

    paramiko reads a packet as its first block and then the rest, joins the two (a copy), decrypts, slices
    out the payload (a copy) and the message body (a copy), and walks through its rekey, logging and naming
    code: per 32 KiB packet of sshd's, ~32,768 a GiB, that Python and those three copies were the largest
    share of a download's CPU after SHA-256 itself. When the whole packet already sits in the read-ahead
    buffer of :class:`ReadAheadSocket`, :meth:`read_message` decrypts it straight from that buffer into
    another one, reused (``decrypt_into``: no new, zeroed 32 KiB object a packet), and hands paramiko's
    transport a CHANNEL_DATA message already taken apart (:class:`ChannelData`): one copy of the data.
    In instructions (callgrind, 32 KiB packets through read_message and the channel's feed): ~237,000 a
    packet against paramiko's ~328,000.

    Everything else goes to paramiko's own ``read_message``, unchanged: before and during a key exchange
    (``need_rekey``), the packet that reaches a rekey limit, ciphers other than AES-GCM, compression,
    packet dumps, a packet not yet fully received (paramiko waits for it, with its timeouts and keepalives),
    a packet longer than the buffer. A packet claiming more than ``MAX_PACKET_LENGTH`` is refused
    (:meth:`read_all`, which every path reads a packet's rest through): paramiko would wait for and hold
    whatever length a peer claims before its tag or MAC can be checked. The short path keeps paramiko's
    bookkeeping exactly: the sequence number, the nonce, the received bytes and packets that trigger a
    rekey. It depends on paramiko's private attributes (``PACKETIZER_STATE``, pinned <6 in pyproject.toml);
    if one is missing it is never taken, and ``tests/test_sftp_lean.py`` fails.
    ``Transport(packetizer_class=...)`` is paramiko's public hook (since 3.4)."""

    def __init__(self, sock: ReadAheadSocket) -> None:
        super().__init__(sock)  # type: ignore[arg-type]  # socket-like, as Transport's
        self.lean = all(hasattr(self, "_Packetizer" + name) for name in PACKETIZER_STATE) and \
            isinstance(sock, ReadAheadSocket)
        self.lean_packets = 0  # packets read by the short path (tests check it is taken)
        self._plain = memoryview(bytearray(READ_AHEAD))
        self._into = hasattr(AESGCM, "decrypt_into")  # cryptography >= 45: no new bytes (zeroed first) a packet

    def read_all(self, n: int, check_rekey: bool = False) -> bytes:
        """paramiko's read of ``n`` bytes, refused past :data:`MAX_PACKET_LENGTH`: every packet it reads
        (whatever the cipher, and a length that arrived in pieces the short path did not wait for) asks for
        its rest here, and paramiko would otherwise wait for, and hold, whatever length a peer claims."""
        if n > MAX_PACKET_LENGTH + 4:  # a packet's rest: its length less the block read, + the tag or MAC
            raise paramiko.SSHException(f"Invalid packet length {n}")
        return super().read_all(n, check_rekey)

    def read_message(self) -> tuple[int, paramiko.Message]:
        if not self.lean:
            return super().read_message()
        state = self.__dict__
        if not state["_Packetizer__aead_in"] or state["_Packetizer__remainder"] or state["_Packetizer__closed"]:
            return super().read_message()
        sock: ReadAheadSocket = state["_Packetizer__socket"]
        if not sock.gather(4):
            return super().read_message()
        view, at = sock._view, sock._start
        size = int.from_bytes(view[at:at + 4], "big")
        if state["_Packetizer__need_rekey"] or state["_Packetizer__dump_packets"] or \
                state["_Packetizer__etm_in"] or state["_Packetizer__compress_engine_in"] is not None or \
                state["_Packetizer__block_size_in"] != 16:
            return super().read_message()
        tag = state["_Packetizer__mac_size_in"]
        raw = 4 + size + tag
        received_bytes = state["_Packetizer__received_bytes"] + raw
        received_packets = state["_Packetizer__received_packets"] + 1
        if raw > READ_AHEAD or size < 16 or size % 16 or received_bytes >= self.REKEY_BYTES or \
                received_packets >= self.REKEY_PACKETS or not sock.gather(raw):
            return super().read_message()
        view, at = sock._view, sock._start
        iv = state["_Packetizer__iv_in"]
        engine = state["_Packetizer__block_engine_in"]
        if self._into:
            plain = self._plain[:size]  # a view of one buffer, reused: the message takes copies of its parts
            engine.decrypt_into(iv, view[at + 4:at + raw], view[at:at + 4], plain)
        else:
            plain = memoryview(engine.decrypt(iv, view[at + 4:at + raw], view[at:at + 4]))
        sock._start = at + raw
        state["_Packetizer__iv_in"] = iv[:4] + (int.from_bytes(iv[4:], "big") + 1).to_bytes(8, "big")  # RFC 5647
        seqno = state["_Packetizer__sequence_number_in"]
        state["_Packetizer__sequence_number_in"] = (seqno + 1) & 0xFFFFFFFF
        state["_Packetizer__received_bytes"] = received_bytes
        state["_Packetizer__received_packets"] = received_packets
        self.lean_packets += 1
        end = size - plain[0]  # the payload is plain[1:end]: type byte, then the message body
        if end < 2:
            raise paramiko.SSHException("Invalid packet padding")
        ptype = plain[1]
        msg: paramiko.Message
        if ptype == MSG_CHANNEL_DATA and end >= 10 and int.from_bytes(plain[6:10], "big") == end - 10:
            msg = ChannelData(int.from_bytes(plain[2:6], "big"), bytes(plain[10:end]))
        else:
            msg = paramiko.Message(bytes(plain[2:end]))
        msg.seqno = seqno  # as paramiko sets it
        return ptype, msg


class ChannelData(paramiko.Message):
    """A CHANNEL_DATA message already taken apart, for :class:`LeanPacketizer`.

    paramiko's transport reads its channel number (``get_int``), then the channel its data
    (``get_binary``): those two calls answer from the fields, without a ``BytesIO`` per packet or another
    copy of the data. Anything else (another order, ``asbytes``, ``get_remainder``...) reads the message
    as paramiko would have built it, rebuilt on first use."""

    def __init__(self, channel: int, data: bytes) -> None:  # not Message's: its BytesIO is made on demand
        self._channel = channel
        self._data = data
        self._step = 0  # 0: nothing read; 1: the channel number read; 2: the data read too
        self._io: io.BytesIO | None = None

    @property  # Message's plain attribute, made on demand here
    def packet(self) -> io.BytesIO:
        if self._io is None:
            body = struct.pack(">II", self._channel, len(self._data)) + self._data
            self._io = io.BytesIO(body)
            self._io.seek((0, 4, len(body))[self._step])
        return self._io

    @packet.setter
    def packet(self, value: io.BytesIO) -> None:
        self._io = value

    def get_int(self) -> int:
        if self._step == 0 and self._io is None:
            self._step = 1
            return self._channel
        return super().get_int()

    def get_binary(self) -> bytes:
        if self._step == 1 and self._io is None:
            self._step = 2
            return self._data
        return super().get_binary()
