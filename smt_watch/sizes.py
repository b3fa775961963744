"""Byte counts as an operator reads them, in one unit everywhere: decimal (KB, MB, GB).

Decimal, spelled so, because that is what the operator-facing text already says: ``sync``'s summary
(``312.4 MB in 4.1 s`` in docs/how-it-works.md, ``371.2 KB`` in its tests), ``status`` and its web page, the 4.5 MB
Vercel limit. A limit an operator set is shown with its exact figure first (``1,073,741,824 bytes
(1.1 GB)``), so a power of two is never rounded away.
"""

from __future__ import annotations

_UNITS = (("GB", 1e9), ("MB", 1e6), ("KB", 1e3))


def human_bytes(n: float) -> str:
    """``312.4 MB``; below 1,000 bytes ``999 B``."""
    for unit, size in _UNITS:
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def exact_bytes(n: int) -> str:
    """``1,073,741,824 bytes (1.1 GB)``: the exact figure an operator set, and a readable one."""
    return f"{n:,} bytes ({human_bytes(n)})" if n >= 1000 else f"{n:,} bytes"
