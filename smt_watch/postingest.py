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

Memory and time flat in file size (issue 27): a chunk's kept ESIIDs depend on that chunk alone (the route
parses each on its own), so nothing of a chunk is kept once it is judged (no :class:`~smt_watch.expect.AppModel`
whose tables grow with every interval and every hour of the file), and the window is tested on the instant
itself, two bounds fixed per file. The app's row-by-row parser runs only on the rows that can reach the window:
in a chunk of the usual shape (:class:`KeptEsiids`), a row whose date lies days away from the window cannot,
whatever its other cells say, so a file of ten years costs the parser about the window's year of rows.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Iterator
from datetime import date, datetime, time, timedelta
from itertools import repeat
from typing import Final

from smt_watch.expect import (
    SMT_LABEL_RE,
    RowParser,
    chicago_date,
    esiid_of_cell,
    js_trim,
    normalize_chunk,
    smt_instant_bounds,
    split_rows,
    text_lines,
)
from smt_watch.window import CHICAGO, Window, coverage_window

HOUR_MS: Final = 3_600_000
_FIRST_SLICE: Final = 96  # rows parsed first in a chunk inside the window: a day (then 4x as many each time)


def post_ingest_chunks(kept_esiids: Iterable[set[str]]) -> set[int]:
    """Indexes (from 0) of the chunks to send with ``postIngest: true``, given each chunk's ESIIDs with
    intervals inside the window, in order (read once: only each ESIID's last chunk is remembered)."""
    last_for: dict[str, int] = {}
    count = 0
    for index, esiids in enumerate(kept_esiids):
        count = index + 1
        for esiid in esiids:
            last_for[esiid] = index
    if not count:
        return set()
    return set(last_for.values()) or {count - 1}


def _first_hour(day: date) -> int:
    """The first whole UTC hour (epoch hours) whose Chicago date is ``day`` or later, as ``AppModel.day_of``
    dates an instant (by its hour): the window test on an instant is then two comparisons."""
    def day_of(hour: int) -> date:
        return chicago_date(hour * HOUR_MS)

    hour = int(datetime.combine(day, time(0), tzinfo=CHICAGO).timestamp()) // 3600
    while day_of(hour - 1) >= day:
        hour -= 1
    while day_of(hour) < day:
        hour += 1
    return hour


class KeptEsiids:
    """A chunk's ESIIDs whose intervals the app keeps (its parser, ``window``): ``kept(chunk)``.

    The route's result for a chunk is the union of its rows' when every row's start label holds a clock time
    (only a row without one makes the parser look at the other rows: the end column's role). In such a chunk
    of plain lines (no quote, no CR, as many cells as the header, the date and start columns one each and
    inside the line), a row whose date cell is SMT's ``M/D/YYYY`` and whose every possible instant lies outside
    the window keeps nothing, so only the other rows go through the parser (:func:`normalize_chunk`), and of
    those not the rows of an ESIID already found kept (:meth:`_parse_until_kept`). Anything else: the whole
    chunk goes through it."""

    def __init__(self, *, esiid: str | None, meter: str | None, window: Window) -> None:
        self.esiid, self.meter = esiid, meter
        self.lo_hour = _first_hour(window.start)
        self.hi_hour = _first_hour(window.end + timedelta(days=1))
        # header text, commas, date cell, start cell, ESIID cell (-1: not one column)
        self._columns: tuple[str, int, int, int, int] | None = None

    def kept(self, chunk: bytes) -> set[str]:
        text = chunk.decode("utf-8", errors="replace")
        near = self._near_lines(text)
        if near is None:
            return self._parse(text_lines(text))
        if not near:
            return set()
        header = text[: text.find("\n") + 1]
        assert self._columns is not None
        if self._columns[4] < 0:
            return self._parse(text_lines(header + "\n".join(near)))
        return self._parse_until_kept(header, near, self._columns[4])

    def _parse_until_kept(self, header: str, lines: list[str], cell: int) -> set[str]:
        """:meth:`_parse` of ``lines`` (rows independent of each other, :meth:`_near_lines`) in growing slices,
        each without the rows whose ESIID cell names an ESIID already kept: they could add nothing. A chunk
        of one ESIID inside the window costs the parser a day of rows, not 5,000."""
        kept: set[str] = set()
        done: set[str] = set()  # ESIID cells whose ESIID is kept
        start, step = 0, _FIRST_SLICE
        while start < len(lines):
            part = [(line, line.split(",", cell + 1)[cell]) for line in lines[start : start + step]]
            start, step = start + step, step * 4
            if done:
                part = [(line, raw) for line, raw in part if raw not in done]
            if not part:
                continue
            found = self._parse(text_lines(header + "\n".join(line for line, _ in part)))
            if not found <= kept:
                kept |= found
                done.update(raw for raw in {raw for _, raw in part} if esiid_of_cell(raw, self.esiid) in kept)
        return kept

    def _parse(self, lines: list[str]) -> set[str]:
        """The app's parser over ``lines``: the ESIIDs of the pairs with an instant in the window."""
        lo, hi = self.lo_hour, self.hi_hour
        kept: set[str] = set()
        for (esiid, meter), slots in normalize_chunk(lines, self.esiid, self.meter).items():
            if esiid.strip() and meter.strip() and any(lo <= ms // HOUR_MS < hi for ms in slots):
                kept.add(esiid)
        return kept

    def _near_lines(self, text: str) -> list[str] | None:
        """The data lines of ``text`` whose date may reach the window, or None when the chunk is not of the
        shape that lets the others be left out."""
        header, lf, body = text.partition("\n")
        if not lf or '"' in text or "\r" in text:
            return None
        columns = self._shape(header)
        if columns is None:
            return None
        commas, date_cell, start_cell = columns
        # each line has ``commas`` commas when every n-1 line ends falls in a cell that joins two lines, so
        # that a line's cell j (0 < j < commas) is cells[line * commas + j]
        n = body.count("\n") + 1
        cells = body.split(",")
        if len(cells) != commas * n + 1 or not all(map(operator.contains, cells[commas:-1:commas], repeat("\n"))):
            return None
        if not all(SMT_LABEL_RE.fullmatch(js_trim(label)) for label in set(cells[start_cell::commas])):
            return None  # a start label without a clock time: the route's end-column rule spans rows
        dates = cells[date_cell::commas]
        distinct = set(dates)
        near = {d for d in distinct if not self._far(d)}
        if not near:
            return []
        lines = body.split("\n")
        if len(near) == len(distinct):
            return lines
        return [line for line, d in zip(lines, dates, strict=True) if d in near]

    def _shape(self, header: str) -> tuple[int, int, int] | None:
        """(commas per line, date cell, start cell) of a header the row skipping applies to, else None."""
        if self._columns is None or self._columns[0] != header:
            row = next(split_rows([header + "\n"]), None)
            parser = RowParser(row) if row else None
            if (parser is None or len(set(parser.c_date)) != 1 or len(set(parser.c_start)) != 1
                    or header.count(",") + 1 != parser.width):
                self._columns = (header, 0, 0, 0, -1)
            else:
                esiid_cell = parser.c_esiid[0] if len(set(parser.c_esiid)) == 1 else -1
                self._columns = (header, parser.width - 1, parser.c_date[0], parser.c_start[0], esiid_cell)
        _, commas, date_cell, start_cell, _ = self._columns
        if not (0 < date_cell < commas and 0 < start_cell < commas and date_cell != start_cell):
            return None
        return commas, date_cell, start_cell

    def _far(self, cell: str) -> bool:
        """Whether every instant a row dated ``cell`` can have (with an ``H:MM`` label) is outside the window."""
        bounds = smt_instant_bounds(cell)
        if bounds is None:
            return False
        earliest, latest = bounds
        return earliest // HOUR_MS >= self.hi_hour or latest // HOUR_MS < self.lo_hour


def kept_esiids_per_chunk(chunks: Iterable[bytes], *, esiid: str | None, meter: str | None,
                          now: datetime) -> Iterator[set[str]]:
    """Per chunk, in order, the ESIIDs the app keeps intervals of (its parser, the window at ``now``)."""
    judge = KeptEsiids(esiid=esiid, meter=meter, window=coverage_window(now))
    for chunk in chunks:
        yield judge.kept(chunk)


def plan_post_ingest(chunks: Iterable[bytes], *, esiid: str | None, meter: str | None, now: datetime) -> set[int]:
    """The sink's one call: which chunk numbers (from 1) carry ``postIngest: true``."""
    return {i + 1 for i in post_ingest_chunks(kept_esiids_per_chunk(chunks, esiid=esiid, meter=meter, now=now))}
