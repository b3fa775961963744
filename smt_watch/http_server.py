"""How ``serve`` runs: uvicorn on sockets bound up front, two listeners stopped together, and uvicorn's h11
protocol with a deadline for each request head (a subclass of uvicorn's internal ``H11Protocol``).

Apart from the routes (:mod:`smt_watch.server`) because it is the one place that leans on uvicorn's
internals: when uvicorn changes, this is the module to read.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Generator
from contextlib import contextmanager

import h11
import uvicorn
from starlette.applications import Starlette
from uvicorn.protocols.http.h11_impl import H11Protocol

from smt_watch.config import Settings
from smt_watch.errors import ConfigError, SmtWatchError
from smt_watch.ledger import Ledger
from smt_watch.linger import LingeringH11Protocol
from smt_watch.server import Server, build

log = logging.getLogger("smt_watch.server")  # the name operators grep for everything serve says


def head_deadline_protocol(settings: Settings) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a deadline for each request head (SMT_UPLOAD_IDLE_SECONDS). uvicorn has
    none: a client that opens a connection and never finishes its headers (slowloris) holds it forever. The
    deadline runs from the connection (or the first byte of a later request's head) to the end of the head,
    so dribbling bytes does not extend it; once the head is complete, the body's own idle timeout takes
    over. Its lingering close has the SMT_LINGER_* bounds, the idle one at most SMT_UPLOAD_IDLE_SECONDS."""
    seconds = settings.upload_idle_seconds

    class HeadDeadline(LingeringH11Protocol):
        _head_timer: asyncio.TimerHandle | None = None
        linger_idle_seconds = min(settings.linger_idle_seconds, seconds)
        linger_seconds = settings.linger_seconds
        linger_max_bytes = settings.linger_max_bytes

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._watch_head()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch_head()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

        def _watch_head(self) -> None:
            if self.conn.their_state is h11.IDLE:  # no complete request head yet
                if self._head_timer is None:
                    self._head_timer = self.loop.call_later(seconds, self._head_expired)
            else:
                self._cancel_head_timer()

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_expired(self) -> None:
            self._head_timer = None
            if not self.transport.is_closing():
                log.warning("Closing a connection from %s: no complete request head in %g s",
                            self.client[0] if self.client else "?", seconds)
                self.transport.close()

    return HeadDeadline


def uvicorn_config(app: Starlette, settings: Settings) -> uvicorn.Config:
    """How ``serve`` runs uvicorn: the head deadline, and proxy headers believed only from
    SMT_TRUSTED_PROXIES (uvicorn's default trusts X-Forwarded-For from 127.0.0.1, so any local client could
    pick its own rate-limit account)."""
    trusted = list(settings.trusted_proxies)
    return uvicorn.Config(app, log_config=None, lifespan="off", timeout_graceful_shutdown=30,
                          http=head_deadline_protocol(settings),
                          proxy_headers=bool(trusted), forwarded_allow_ips=trusted or None)


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: ``serve`` runs two of them and stops both together."""

    @contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _listen(host: str, port: int) -> socket.socket:
    """Bind before serving, so a port in use is one clear error instead of uvicorn exiting a task."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        raise SmtWatchError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


async def serve_forever(server: Server) -> None:
    """Listen on SMT_UPLOAD_HOST:SMT_UPLOAD_PORT, and on SMT_WEBHOOK_HOST:SMT_WEBHOOK_PORT for the trigger,
    health and pass-through routes only (the web app calls the trigger there directly, as the old bridge on
    0.0.0.0:8787). SMT_WEBHOOK_PORT=0: the upload port alone, which serves the trigger too."""
    s = server.settings
    if s.webhook_port is not None and s.webhook_port == s.upload_port:
        raise ConfigError(f"SMT_WEBHOOK_PORT {s.webhook_port} is SMT_UPLOAD_PORT too: give the trigger another "
                          "port, or set SMT_WEBHOOK_PORT=0 to serve it on the upload port alone")
    apps = [(server.app(), s.upload_host, s.upload_port)]
    if s.webhook_port:
        apps.append((server.app(uploads=False), s.webhook_host, s.webhook_port))
    sockets: list[socket.socket] = []
    try:
        for _, host, port in apps:
            sockets.append(_listen(host, port))
    except SmtWatchError:
        for sock in sockets:
            sock.close()
        raise
    servers = [_Uvicorn(uvicorn_config(app, s)) for app, _, _ in apps]
    loop = asyncio.get_running_loop()

    def stop() -> None:
        for srv in servers:
            srv.force_exit = srv.should_exit
            srv.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    ports = [sock.getsockname()[1] for sock in sockets]
    log.info("Serving uploads on http://%s:%d/upload%s", s.upload_host, ports[0],
             f" and the webhook on http://{s.webhook_host}:{ports[1]}/trigger/smt-now" if len(ports) > 1 else "")
    if server.bridge is not None:
        log.info("Passing what serve does not handle to the webhook bridge at %s", server.bridge.shown)
    try:
        await asyncio.gather(*(srv.serve(sockets=[sock]) for srv, sock in zip(servers, sockets, strict=True)))
    finally:
        if server.bridge is not None:
            await server.bridge.aclose()


def run(settings: Settings, ledger: Ledger) -> None:
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uv = logging.getLogger(name)
        uv.handlers = list(logging.getLogger("smt_watch").handlers)  # a copy: one shared list would make any
        # handler added to uvicorn's loggers (a library, an embedding process) a handler of smt_watch's too
        uv.setLevel(logging.INFO)
        uv.propagate = False
    asyncio.run(serve_forever(build(settings, ledger)))
