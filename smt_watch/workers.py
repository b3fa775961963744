"""Worker processes, started the one way both pools need: ``watch``'s delivery workers (:mod:`smt_watch.jobs`)
and ``sync``'s download workers (:mod:`smt_watch.sync`).

A worker process is a daemon at the other end of a pipe. It repeats its parent's logging (level, text or
JSON, the secrets masked), ignores the signals its parent handles for it (the parent's stop sequence ends
it), and dies with its parent (``PR_SET_PDEATHSIG``), so none outlives the service. Written once here so
that a fix to any of that reaches both pools.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.context import ForkContext, ForkServerContext, SpawnContext
from multiprocessing.process import BaseProcess
from typing import Any

from smt_watch.clib import libc
from smt_watch.config import Settings

PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class WorkerLogging:
    """The level and format ``setup_logging`` gave the parent, for a worker process to repeat."""

    level: str
    fmt: str

    @classmethod
    def of_this_process(cls) -> WorkerLogging:
        from smt_watch.logs import JsonFormatter

        logger = logging.getLogger("smt_watch")
        level = logging.getLevelName(logger.getEffectiveLevel()).lower()
        json_out = any(isinstance(h.formatter, JsonFormatter) for h in logger.handlers)
        return cls(level if level in ("debug", "info", "warning", "error") else "info", "json" if json_out else "text")


def start_worker(ctx: SpawnContext | ForkServerContext | ForkContext, target: Callable[..., None],
                 args: tuple[Any, ...], name: str) -> tuple[Connection, BaseProcess]:
    """``target(*args, conn, logging)`` in a daemon process of ``ctx``; our end of its pipe, and the process."""
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(*args, child, WorkerLogging.of_this_process()),
                       name=name, daemon=True)
    proc.start()
    child.close()
    return parent, proc


def enter_worker(settings: Settings, logs: WorkerLogging, ignore: tuple[signal.Signals, ...]) -> None:
    """First thing in a worker process: ``ignore`` these signals (the parent decides when we stop), die
    with the parent, and log as it does with its secrets masked."""
    for sig in ignore:
        signal.signal(sig, signal.SIG_IGN)
    prctl = getattr(libc(), "prctl", None)
    if prctl is not None:  # not Linux: a closed pipe still ends an idle worker
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    _release_fork_server()
    from smt_watch.logs import add_secrets, setup_logging

    setup_logging(logs.level, logs.fmt)
    add_secrets(settings.secrets())


def _release_fork_server() -> None:
    """Our parent is multiprocessing's fork server, which exits when every holder of its "alive" pipe has
    closed it, and it hands that pipe to each child it forks. A worker holding it would keep the fork server
    alive after the process that started both was killed, so PR_SET_PDEATHSIG would never fire: the worker
    would write on (a killed sync pass's ranged part) until its reads time out. A worker starts no process
    of its own, so it lets go of the pipe."""
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    fd = getattr(server, "_forkserver_alive_fd", None)
    if isinstance(fd, int):
        with contextlib.suppress(OSError):
            os.close(fd)
        server._forkserver_alive_fd = None  # type: ignore[union-attr]


def stop_process(proc: BaseProcess, seconds: float) -> None:
    """Wait ``seconds`` for a worker process to end by itself (its pipe said stop), then kill it."""
    proc.join(timeout=seconds)
    if proc.is_alive():
        proc.kill()
        proc.join(timeout=seconds)

