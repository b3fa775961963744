"""Which raw-upload chunk carries ``postIngest: true``, so the app's post-ingest work takes effect (issue 26).

The app queues its post-ingest work (usage buckets, plans) only for the ESIIDs whose intervals survive its
coverage window *in the chunk that says* ``postIngest: true`` (IntelliWatt
``app/api/admin/smt/raw-upload/route.ts``: ``distinctEsiids`` of the window-bounded intervals). Marking the
last chunk, as the Node upload server does, queues nothing when that chunk holds only days newer than the
window (a file reaching into yesterday), or only another ESIID's rows.

:func:`post_ingest_chunks` picks, for every ESIID that has kept intervals anywhere in the file, the last chunk
that keeps some of its intervals, so the work is queued for every ESIID, as late as possible (after most of
its data is in). Nothing kept anywhere: the last chunk, as before (the app then queues nothing either way).
:func:`plan_post_ingest` computes the chunks' kept ESIIDs with the app's own parser and window.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

from smt_watch.expect import AppModel, chunk_lines
from smt_watch.window import coverage_window


def post_ingest_chunks(kept_esiids: Sequence[set[str]]) -> set[int]:
    """Indexes (from 0) of the chunks to send with ``postIngest: true``, given each chunk's ESIIDs with
    intervals inside the window."""
    if not kept_esiids:
        return set()
    last_for: dict[str, int] = {}
    for index, esiids in enumerate(kept_esiids):
        for esiid in esiids:
            last_for[esiid] = index
    return set(last_for.values()) or {len(kept_esiids) - 1}


def kept_esiids_per_chunk(chunks: Iterable[bytes], *, esiid: str | None, meter: str | None,
                          now: datetime) -> list[set[str]]:
    """Per chunk, the ESIIDs the app keeps intervals of (its parser, the window at ``now``)."""
    window = coverage_window(now)
    model = AppModel()
    out = []
    for chunk in chunks:
        kept, _ = model.ingest(chunk_lines(chunk), esiid, meter, window)
        out.append(kept)
    return out


def plan_post_ingest(chunks: Iterable[bytes], *, esiid: str | None, meter: str | None, now: datetime) -> set[int]:
    """The sink's one call: which chunk numbers (from 1) carry ``postIngest: true``."""
    return {i + 1 for i in post_ingest_chunks(kept_esiids_per_chunk(chunks, esiid=esiid, meter=meter, now=now))}
