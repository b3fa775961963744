"""systemd notification over ``$NOTIFY_SOCKET`` (``Type=notify``), by plain datagram: no package needed.

Does nothing when not run by systemd (no socket), so ``watch`` behaves the same in a terminal.
"""

from __future__ import annotations

import logging
import socket

log = logging.getLogger("smt_watch.notify")


class Notifier:
    def __init__(self, socket_path: str | None, watchdog_usec: int | None = None) -> None:
        self._address: str | None = None
        if socket_path:
            # A leading "@" names a socket in the abstract namespace.
            self._address = "\0" + socket_path[1:] if socket_path.startswith("@") else socket_path
        self.watchdog_interval = watchdog_usec / 2e6 if watchdog_usec else None

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, *lines: str) -> None:
        if self._address is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(lines).encode(), self._address)
        except OSError as exc:
            log.debug("sd_notify failed: %s", exc)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping")
