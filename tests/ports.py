"""Loopback ports for tests: the one place a free port is found (sftp_server, pgcluster, serve, Chromium)."""

from __future__ import annotations

import socket


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports with nothing listening (bound together, then released)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    """A loopback port with nothing listening (bound then released)."""
    return free_ports(1)[0]
