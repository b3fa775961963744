"""The C library, for the few calls Python's ``os`` lacks: ``mallopt`` (sshfast.py), ``sync_file_range`` and
``renameat2`` (sync.py), ``fstatfs`` (readlease.py), ``prctl`` (workers.py). Loaded once, on first use."""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def libc() -> ctypes.CDLL | None:
    """This process's C library (``errno`` kept for ``ctypes.get_errno``), or None where it cannot be loaded;
    a caller asks for its function with ``getattr(libc(), name, None)`` and does without it when missing."""
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
