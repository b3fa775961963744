"""Keeping ``watch``'s threads on one CPU (``SMT_ONE_CPU``, on by default with ``SMT_WORKER_MODE=thread``).

Why: in thread mode the watcher's threads (watchdog's three, the intake loop, the delivery workers) hand
each file along from one to the next, and only one of them runs Python at a time (the interpreter lock).
Left to the kernel, on an idle machine each hand-over wakes the next thread on the OTHER CPU: a cross-CPU
wake-up, the lock handed between CPUs, and every object the file touched pulled into the other CPU's cache.
On the 2-core bench machine a drain of 10,000 small files cost 1.1-1.2 ms of watch CPU a file that way
when nothing else ran, 0.6-0.7 ms on one CPU (bench/RESULTS.md, issue 27). What one CPU costs: the few
things that do run beside Python (a big file's SHA-256 in a helper thread beside its send, a second
worker's socket or SQLite wait) share that CPU; the other CPUs stay free for the rest of the droplet.
Process mode is left alone (its point is several CPUs), and so is a process already limited to one CPU.
What else follows from it: a process watch starts (gpg decrypting an ``.asc``) inherits the one CPU; two
``watch`` processes started on the same CPU stay on it together (one watcher per inbox is the rule, so two
are rare; ``SMT_ONE_CPU=0`` for them).
"""

from __future__ import annotations

import logging
import os
import threading

from smt_watch.clib import libc

log = logging.getLogger(__name__)


def current_cpu() -> int | None:
    """The CPU the calling thread runs on (the C library's ``sched_getcpu``), or None."""
    getcpu = getattr(libc(), "sched_getcpu", None)
    cpu = getcpu() if getcpu is not None else -1
    return cpu if cpu >= 0 else None


def keep_on_one_cpu() -> int | None:
    """Bind every thread of this process to one of the CPUs it may use (the one it runs on now), and
    return that CPU; None when it may use one CPU only, or the kernel refuses (nothing changes then).

    Every thread: affinity is per thread on Linux and a new thread inherits its creator's, so threads
    started before this call are bound one by one and those started after inherit the binding."""
    try:
        allowed = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return None
    if len(allowed) < 2:
        return None
    here = current_cpu()
    cpu = here if here in allowed else min(allowed)
    return cpu if bind_threads({cpu}) else None


def bind_threads(cpus: set[int]) -> bool:
    """Let every thread of this process run on ``cpus`` only (the calling thread first); False when the
    kernel refuses the calling thread (a seccomp filter, a cpuset that moved under us): then nothing changed."""
    me = threading.get_native_id()
    try:
        tids = [int(tid) for tid in os.listdir("/proc/self/task")]
    except (OSError, ValueError):
        tids = [me]
    for tid in sorted(tids, key=lambda t: t != me):  # this thread first: if the kernel refuses it, stop there
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError as exc:
            if tid == me:
                log.debug("Could not bind this process's threads to CPUs %s: %s", sorted(cpus), exc)
                return False
            continue  # a thread that ended meanwhile
    return True
