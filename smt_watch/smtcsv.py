"""What an SMT CSV holds (docs/contract.md §6): its kind, ESIIDs, dates, interval counts, kWh totals, gaps, UTC span.

Streaming: one pass in 64 KiB blocks (the ordinary days of an interval file proven a piece at a time, see
:class:`_IntervalReader`), memory bounded by the number of series and of distinct texts, not by rows.

Time: SMT labels intervals in America/Chicago wall time, ``USAGE_START_TIME`` like ``0:15`` (sometimes with
a leading space). A fall-back day has 100 rows: the four labels of 1:00–1:45 appear twice; row order
decides, so the first occurrence is daylight time (fold 0) and the second standard time (fold 1). A
spring-forward day keeps 96 rows, and the four 2:00–2:45 labels, which name no real instant, carry a
blank kWh; they are counted as blanks and get no instant. Gaps are 15-minute UTC slots missing between
consecutive rows of a series.
"""

from __future__ import annotations

import codecs
import csv
import functools
import io
import itertools
import operator
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO, Final
from zoneinfo import ZoneInfo

from smt_watch.clock import utc_stamp
from smt_watch.errors import LineTooLong

CHICAGO: Final = ZoneInfo("America/Chicago")
SLOT: Final = 900  # seconds in a 15-minute interval
INTERVAL_HEADER: Final = (
    "ESIID", "USAGE_DATE", "REVISION_DATE", "USAGE_START_TIME", "USAGE_END_TIME", "USAGE_KWH",
    "ESTIMATED_ACTUAL", "CONSUMPTION_SURPLUSGENERATION",
)
METER_RE: Final = re.compile(r"M\d+")  # the one meter pattern: inspect's summary and delivery's ``meter``
# The years a USAGE_DATE may name; a row dated outside is read as a row whose date cannot be read. Before
# 1970 an instant is negative (the summary uses -1 as "none yet"); 12/31/9999 has no following midnight
# (date arithmetic overflows). SMT's data starts in the 2000s.
MIN_YEAR: Final = 1970
MAX_YEAR: Final = 9998
_DATE_RE: Final = re.compile(r"^(\d{1,2})/(\d{1,2})/(\d{4})$")
_TIME_RE: Final = re.compile(r"^(\d{1,2}):(\d{2})$")


def header_fields(line: str) -> list[str]:
    """Header names normalised: BOM, quotes and spaces removed, upper case."""
    return [f.strip().strip('"').strip().upper() for f in line.lstrip("\ufeff").rstrip("\r\n").split(",")]


def classify(header: list[str]) -> str:
    """``interval`` (the docs/contract.md §6 header), ``smt-other`` (an SMT CSV with an ESIID column), or ``other``."""
    if tuple(header[: len(INTERVAL_HEADER)]) == INTERVAL_HEADER:
        return "interval"
    return "smt-other" if "ESIID" in header else "other"


def clean_esiid(value: str) -> str:
    return value.strip().lstrip("'").strip()


def meter_in(name: str) -> str | None:
    match = METER_RE.search(name)
    return match.group(0) if match else None


def meter_for(name: str, default: str) -> str:
    """docs/contract.md §4: the first ``M<digits>`` in the file name, else ``METER_DEFAULT``."""
    return meter_in(name) or default


@dataclass
class _Series:
    """One (ESIID, direction) stream of rows: the labels seen on its current day."""

    day: date | None = None
    seen_labels: dict[tuple[int, int], int] = field(default_factory=dict)


@dataclass
class Summary:
    """``inspect --json`` keys (docs/contract.md §6)."""

    file: str
    kind: str
    esiids: list[str] = field(default_factory=list)
    meter: str | None = None
    first_date: str | None = None
    last_date: str | None = None
    rows: int = 0
    intervals: int = 0
    blanks: int = 0
    estimated: int = 0
    gaps: int = 0
    kwh_consumption: float = 0.0
    kwh_generation: float = 0.0
    first_start_utc: str | None = None
    last_end_utc: str | None = None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["kwh_consumption"] = round(self.kwh_consumption, 6)
        out["kwh_generation"] = round(self.kwh_generation, 6)
        return out


class _Clock:
    """Local label → UTC epoch seconds, with a fast path for the 363 days a year without a transition."""

    def __init__(self) -> None:
        self._days: dict[date, tuple[bool, int]] = {}

    def day(self, d: date) -> tuple[bool, int]:
        known = self._days.get(d)
        if known is None:
            midnight = datetime(d.year, d.month, d.day, tzinfo=CHICAGO)
            following = datetime.combine(d + timedelta(days=1), datetime.min.time(), tzinfo=CHICAGO)
            regular = following.utcoffset() == midnight.utcoffset()
            known = (regular, int(midnight.timestamp()))
            self._days[d] = known
        return known

    def instant(self, d: date, hour: int, minute: int, fold: int) -> int | None:
        """UTC epoch of the label, or None when that wall time does not exist (spring forward)."""
        regular, midnight = self.day(d)
        if regular:
            return midnight + (hour * 60 + minute) * 60
        local = datetime(d.year, d.month, d.day, hour, minute, fold=fold, tzinfo=CHICAGO)
        epoch = int(local.timestamp())
        back = datetime.fromtimestamp(epoch, CHICAGO)
        if (back.hour, back.minute) != (hour, minute):
            return None
        return epoch


class Placer:
    """Places rows, in file order, at UTC instants: a label seen again on the same day of the same series
    is the repeated (standard-time) hour of a fall-back day."""

    def __init__(self) -> None:
        self._clock = _Clock()
        self._series: dict[object, _Series] = {}
        self._dates: dict[str, date] = {}

    def place(self, series: object, date_text: str, time_text: str) -> tuple[date | None, int | None]:
        """(the day, the UTC epoch of the interval's start); the epoch is None for a label naming no
        instant (spring forward) or a row whose date or time cannot be read."""
        day = _parse_date(date_text, self._dates)
        label = _parse_label(time_text)
        if day is None or label is None:
            return day, None
        s = self._series.setdefault(series, _Series())
        if s.day != day:
            s.day, s.seen_labels = day, {}
        fold = s.seen_labels.get(label, 0)
        s.seen_labels[label] = fold + 1
        return day, self._clock.instant(day, label[0], label[1], min(fold, 1))


def wall_slot(text: str) -> int | None:
    """The wall-clock 15-minute slot (0–95) an ``H:MM`` label starts, or None when it names no time."""
    label = _parse_label(text)
    return None if label is None else label[0] * 4 + label[1] // 15


def _parse_label(text: str) -> tuple[int, int] | None:
    """``H:MM`` as (hour, minute), or None for anything else (``25:99`` included: it names no time)."""
    t = _TIME_RE.match(text.strip())
    if t is None or int(t.group(1)) > 23 or int(t.group(2)) > 59:
        return None
    return int(t.group(1)), int(t.group(2))


def _parse_date(text: str, cache: dict[str, date]) -> date | None:
    d = cache.get(text)
    if d is None:
        m = _DATE_RE.match(text.strip())
        if not m:
            return None
        try:
            d = date(int(m.group(3)), int(m.group(1)), int(m.group(2)))
        except ValueError:  # 13/45/2025: shaped like a date, names none
            return None
        if not MIN_YEAR <= d.year <= MAX_YEAR:
            return None
        cache[text] = d
    return d


def summarize(lines: Iterable[str], name: str) -> Summary:
    """Read an SMT CSV (text lines, header first) in one pass."""
    it = iter(lines)
    first = next(it, "")
    summary = Summary(file=name, kind=classify(header_fields(first)), meter=meter_in(name))
    esiids: set[str] = set()
    if summary.kind != "interval":
        if summary.kind == "smt-other":
            column = header_fields(first).index("ESIID")
            for row in csv.reader(it):
                if row and any(cell.strip() for cell in row):
                    summary.rows += 1
                    if len(row) > column and clean_esiid(row[column]):
                        esiids.add(clean_esiid(row[column]))
        summary.esiids = sorted(esiids)
        return summary
    _summarize_intervals(it, summary)
    return summary


def _summarize_intervals(lines: Iterator[str], summary: Summary) -> None:
    """The interval rows of a text source (``summarize``): every row by the exact reading."""
    reader = _IntervalReader()
    reader.exact(lines)
    reader.finish(summary)


class _IntervalReader:
    """The interval rows in one pass, placed as :class:`Placer` places them, but with its work done once per
    distinct value (an ESIID, a date, a time label) and once per series-day rather than once per row: a
    year of 15-minute reads is 35,040 rows of a few hundred distinct strings.

    Two readings share one state. :meth:`exact` reads line by line: the rows are those ``csv.reader(lines)``
    gives, at a third of its cost (a line without a quote is split on commas, what the csv module does with
    it; a line with a quote, or longer than the csv module's field limit so that it still refuses it, is
    read by a csv reader, which takes the continuation lines of a quoted field from the same source).
    :meth:`block` reads a 64 KiB block of lines in pieces, each proven at once when it can be proven that the
    result is the one :meth:`exact` would reach (:meth:`_rest`): one ``str.split`` and C-level passes over
    column slices, dates and readings looked up once per distinct text, every label checked to be the slot
    after the one before. Why: a per-row Python loop, however lean, costs more than a bare ``csv.reader`` pass;
    this costs about half of one. A piece it cannot prove (a second series, a gap, a blank or odd reading, a
    lone CR, the file's first rows) is halved and tried again down to a few days' rows, a transition day is
    cut out by its date, and what is left goes to :meth:`exact`, so the two readings cannot disagree:
    ``tests/test_smtcsv_differential.py`` runs both over generated hostile files."""

    def __init__(self) -> None:
        self.limit = csv.field_size_limit()
        self.clock = _Clock()
        self.dates: dict[str, date | None] = {}
        self.labels: dict[str, int | None] = {}  # label -> seconds after midnight
        self.midnights: dict[str, int | None] = {}  # date text -> its midnight, None unless a regular day
        # reading text -> float(text): a meter's readings are a few thousand distinct texts (kWh to 3 decimals)
        self.numbers: dict[str, float] = {}
        self.slots: dict[str, int] = {}  # label text (no LF) -> the 15-minute slot it starts
        # the label texts of the slots as the last proven day spelled them, days in a row: a block whose labels
        # equal a slice of it needs no look-up per row
        self.cycle: list[str] = []
        self.odd_day: str | None = None  # the date text that made :meth:`_rest` fail, when one did
        self.others: set[str] | None = None  # the ``kind LF esiid`` joins of a piece of several series
        self.joins: set[str] | None = None  # those of every such piece so far: blocks are cut by them first
        self.in_runs = False
        self.proven = 0  # rows :meth:`_rest` read
        self.misses = 0  # blocks in a row mostly read exactly
        self.skip = 0  # blocks to read exactly without trying :meth:`_rest` (its attempts would be wasted)
        self.esiids: set[str] = set()
        self.series_day: dict[tuple[str, bool], date] = {}
        self.folds: dict[tuple[str, bool], dict[int, int]] = {}
        self.last: dict[tuple[str, bool], int] = {}
        self.n_rows = self.intervals = self.blanks = self.estimated = self.gaps = 0
        self.kwh_consumption = self.kwh_generation = 0.0
        self.lo = -1
        self.first_day: date | None = None
        self.last_day: date | None = None
        self.e_prev: str | None = None  # the raw cells of the previous row that decide its series and day
        self.k_prev: str | None = None
        self.d_prev: str | None = None
        self.e_blank = True  # the previous row had no ESIID: each such row is checked for being blank
        self.esiid, self.generation = "", False
        self.day: date | None = None
        self.key: tuple[str, bool] = ("", False)
        self.regular, self.midnight = True, 0
        self.previous = -1  # the last instant of the current series (-1: none yet)
        self.pending: Iterator[str] | None = None  # lines left of a block a quoted field ran into
        self.texts: Iterator[str] = iter(())
        # the lines after the current text, for a quoted field that runs on (one generator: it follows pending)
        self.more: Iterator[str] = iter(())

    # --- the whole file, block by block --------------------------------------------------------------

    def run(self, texts: Iterator[str]) -> None:
        """Every text of ``texts`` (whole lines, in file order) through :meth:`block`; a quoted field that
        runs past the end of one continues into the next (:meth:`_more`), whose rest is then read exactly."""
        self.texts = texts
        self.more = self._more()
        for text in texts:
            self.block(text)
            while self.pending is not None:
                lines, self.pending = self.pending, None
                self.exact(lines)

    def _more(self) -> Iterator[str]:
        """The lines after those being read, for a csv reader inside a quoted field: the rest of the text it
        last opened (:attr:`pending`, which :meth:`run` reads next, so both take lines from one iterator), then
        the texts after it."""
        for text in self.texts:
            self.pending = lines = iter(io.StringIO(text, newline=""))
            for line in lines:  # noqa: UP028 (``yield from`` would close the lines left when this generator is)
                yield line

    def block(self, text: str) -> None:
        """One text of whole lines, in pieces :meth:`_rest` proves or, failing that, exactly."""
        if '"' in text or not text.endswith("\n") or self.skip > 0:
            self.skip = max(self.skip - 1, 0)
            self.exact(iter(io.StringIO(text, newline="")))
            return
        rows, proven = self.n_rows, self.proven
        if self.joins is not None and "\r" not in text:  # several series so far: cut at their changes first
            self._runs(text, self.joins)
        else:
            self._pieces(text)
        if (self.proven - proven) * 2 < self.n_rows - rows:  # mostly read exactly: a file of another shape
            self.misses += 1  # (several series interleaved, all quoted, …): try again later, less and less often
            self.skip = min(1 << self.misses, _MAX_SKIP)
        else:
            self.misses = 0

    def _pieces(self, text: str) -> None:
        """``text`` by :meth:`_rest` if it proves it, else halved at a line end and each half tried again, down
        to a few days' rows, which are read exactly: a transition day, a gap, a blank reading or the first
        rows of the file (no series yet) cost the exact reading of the rows near them, not of the block."""
        if not text:
            return
        self.odd_day, self.others = None, None
        plain = text
        if "\r" in text:
            plain = text.replace("\r\n", "\n")
            if "\r" in plain:  # a lone CR ends a line too: the block reading knows only LF
                self.exact(iter(io.StringIO(text, newline="")))
                return
        if len(text) <= self.limit and self._rest(plain):
            return  # no line in it is longer than the csv field limit (exact() reads those by a csv reader)
        if self.odd_day is not None and self.e_prev is not None:  # the rows of that date exactly, the rest again
            head = "\n" + self.e_prev + "," + self.odd_day + ","
            begin = 0 if text.startswith(head[1:]) else text.find(head) + 1
            last = text.rfind(head)
            end = text.find("\n", last + 1 if last >= 0 else begin) + 1
            if 0 < begin < end or (begin == 0 and end > 0 and end < len(text)):
                self._pieces(text[:begin])
                self.exact(iter(io.StringIO(text[begin:end], newline="")))
                self._pieces(text[end:])
                return
        if self.others is not None and plain is text and not self.in_runs:  # several series: runs of one each
            self.joins = self.others if self.joins is None else self.joins | self.others
            if len(self.joins) > _MAX_JOINS:
                self.joins = None
            else:
                self._runs(text, self.joins)
                return
        self._halves(text)

    def _runs(self, text: str, others: set[str]) -> None:
        """``text`` (LF only) cut where a line of another series starts, found by searching for the kinds and
        ESIIDs of the other series in the failed piece (``others``: its ``kind LF esiid`` joins); each run by
        :meth:`_halves`, the first line of each next run exactly (it switches the series). A few dozen runs
        at most: rows of several series interleaved one by one are read exactly."""
        self.in_runs = True  # the pieces it hands on are halved if they fail, never cut into runs again
        try:
            self._cut_runs(text, others)
        finally:
            self.in_runs = False

    def _cut_runs(self, text: str, others: set[str]) -> None:
        patterns: dict[str, int] = {}  # pattern -> where it next occurs (-2: not looked for yet, -1: nowhere)
        for join in others:
            kind, lf, esiid = join.partition("\n")
            if lf and "\n" not in esiid:
                patterns["," + kind + "\n"] = patterns["\n" + esiid + ","] = -2
        pos, end = 0, len(text)
        for _ in range(_MAX_RUNS):
            if pos >= end:
                return
            e, k = self.e_prev, self.k_prev
            cut = end
            if e is not None and k is not None:
                if not text.startswith(e + ",", pos):
                    cut = pos
                mine = ("," + k + "\n", "\n" + e + ",")
                for pattern, at in patterns.items():
                    if pattern in mine:
                        continue
                    tail = pattern[0] == ","  # a line's last cell, else a line's first
                    if at == -2 or 0 <= at < pos:
                        at = patterns[pattern] = text.find(pattern, pos if tail or pos == 0 else pos - 1, end)
                    if at >= 0:
                        cut = min(cut, text.rfind("\n", 0, at) + 1 if tail else at + 1)
            if cut == pos:  # the first line starts another series: read exactly, it sets the series
                first = text.find("\n", pos) + 1 or end
                self.exact(iter((text[pos:first],)))
                pos = first
            elif cut < end:  # a run of one series, unless some other series was not among ``others``
                self._pieces(text[pos:cut])
                pos = cut
            else:
                break
        self._halves(text[pos:])

    def _halves(self, text: str) -> None:
        """``text`` halved at a line end and each half through :meth:`_pieces`, or read exactly when short."""
        if not text:
            return
        half = text.find("\n", len(text) // 2) + 1
        if len(text) < _MIN_PIECE or half in (0, len(text)):
            self.exact(iter(io.StringIO(text, newline="")))
            return
        self._pieces(text[:half])
        self._pieces(text[half:])

    def _rest(self, text: str) -> bool:
        """``text`` (lines ending in LF, no quote, no CR) read at once if every line continues the current
        series by one slot on days without a transition, with a number for a reading and ``A`` or ``E`` for
        its estimate; the state moves as :meth:`exact` would move it. False, with nothing changed, if not.

        One ``str.split`` on commas gives every cell; a line's last cell and the next line's first share
        one piece (``kind LF esiid``), so piece ``7i + c`` is cell ``c`` of line ``i``, and the columns are
        slices of one list. What is proven, in C passes over those slices: every line has eight cells (the
        only LFs are the joins: no cell holds one), this ESIID first and this kind last; the labels are the
        slots that follow the last instant, in order; each day's rows share one date text, a day without a
        transition, the day after the one before; every reading is a number; every estimate ``A`` or ``E``."""
        e, k = self.e_prev, self.k_prev
        previous = self.previous
        if (e is None or k is None or self.e_blank or self.day is None or previous < 0
                or "," in e or "," in k or "\n" in e or "\n" in k):
            return False
        cells = text.split(",")
        n, odd = divmod(len(cells) - 1, 7)
        if odd or n == 0 or cells[0] != e or cells[-1] != k + "\n" or cells[7:-1:7].count(k + "\n" + e) != n - 1:
            joins = set(cells[7::7])  # a few series interleaved? :meth:`_runs` cuts the piece at their changes
            self.others = joins if not odd and len(joins) <= _MAX_JOINS else None
            return False
        ests, dates = cells[6::7], cells[1::7]
        estimated = ests.count("E")
        if estimated + ests.count("A") != n or "\n" in "".join(cells[2::7]) or "\n" in "".join(cells[4::7]):
            return self._odd(dates)
        labels = cells[3::7]
        slot = self._slot(labels[0])
        if slot is None:
            return self._odd(dates)
        if labels != self.cycle[slot : slot + n]:  # other spellings than the last proven: each looked up
            try:
                seen = list(map(self.slots.__getitem__, labels))
            except KeyError:
                for t_raw in set(labels):
                    self._slot(t_raw)
                try:
                    seen = list(map(self.slots.__getitem__, labels))
                except KeyError:
                    return self._odd(dates)
            if seen != _SLOTS[slot : slot + n]:
                return self._odd(dates)
            if n >= _DAY_SLOTS:
                day_start = _DAY_SLOTS - slot
                self.cycle = labels[day_start : day_start + _DAY_SLOTS] * (len(_SLOTS) // _DAY_SLOTS)
        # the days: rows [start, end) of each share a date text, one day after the day before
        midnights = self.midnights
        start, end, midnight, first_midnight = 0, min(n, _DAY_SLOTS - slot), -1, -1
        texts: list[str] = []
        while start < n:
            d_raw = dates[start]
            at = midnights.get(d_raw, -1)
            if at == -1:
                at = midnights[d_raw] = self._midnight(d_raw)
            if at is None:
                self.odd_day = d_raw  # a transition day (or no date): :meth:`_pieces` reads its rows exactly
                return False
            if midnight >= 0 and at != midnight + 86400:
                return False
            if end - start > 1 and dates[start:end].count(d_raw) != end - start:
                return False
            midnight = at
            if first_midnight < 0:
                first_midnight = at
            texts.append(d_raw)
            start, end = end, min(n, end + _DAY_SLOTS)
        if first_midnight + slot * SLOT != previous + SLOT:
            return False
        readings = cells[5::7]
        numbers = self.numbers
        before = self.kwh_generation if self.generation else self.kwh_consumption
        try:
            kwh = _add_all(map(numbers.__getitem__, readings), before)
        except KeyError:
            if len(numbers) > _MAX_NUMBERS:
                numbers.clear()
            for r_raw in set(readings).difference(numbers):
                if "\n" in r_raw:
                    return False
                try:
                    numbers[r_raw] = float(r_raw)
                except ValueError:
                    return False
            kwh = _add_all(map(numbers.__getitem__, readings), before)
        # proven: every row is counted, read as a number, placed one slot after the one before
        if self.generation:
            self.kwh_generation = kwh
        else:
            self.kwh_consumption = kwh
        self.n_rows += n
        self.proven += n
        self.intervals += n
        self.estimated += estimated
        self.previous = previous + n * SLOT
        d_last = texts[-1]
        if d_last != self.d_prev:  # new days of this series: each one its own series-day, as exact() notes it
            days = [known for t in texts if (known := self.dates[t]) is not None]  # all are
            if self.first_day is None or self.last_day is None or (last_day := self.dates[d_last]) is None:
                raise AssertionError("a proven block has readable dates after a readable one")
            self.first_day = min(self.first_day, *days)
            self.last_day = max(self.last_day, *days)
            key = self.key
            self.last[key] = self.previous
            self.series_day[key] = self.day = last_day
            self.folds.pop(key, None)
            self.d_prev = d_last
            self.regular, self.midnight = True, midnight
        return True

    def _odd(self, dates: list[str]) -> bool:
        """False, noting in :attr:`odd_day` a date among ``dates`` (one a half day apart) that is a transition
        day or no date: the likely reason the labels did not follow on (a fall-back day has 100 rows)."""
        midnights = self.midnights
        for d_raw in dates[:: _DAY_SLOTS // 2]:
            if d_raw not in midnights:
                midnights[d_raw] = self._midnight(d_raw)
            if midnights[d_raw] is None:
                self.odd_day = d_raw
                break
        return False

    def _slot(self, t_raw: str) -> int | None:
        """The 15-minute slot (0-95) a label without LF starts, remembered; None for anything else."""
        slot = self.slots.get(t_raw)
        if slot is None and "\n" not in t_raw and (label := _parse_label(t_raw)) is not None and not label[1] % 15:
            slot = self.slots[t_raw] = label[0] * 4 + label[1] // 15
        return slot

    def _midnight(self, d_raw: str) -> int | None:
        """The midnight of a readable date (a text without LF) on a day without a transition, else None."""
        if "\n" in d_raw:
            return None
        day = self.dates.get(d_raw)
        if day is None and d_raw not in self.dates:
            day = self.dates[d_raw] = _parse_date(d_raw, {})
        if day is None:
            return None
        regular, midnight = self.clock.day(day)
        return midnight if regular else None

    # --- line by line ----------------------------------------------------------------------------------

    def exact(self, lines: Iterator[str]) -> None:
        """Every row of ``lines`` by the exact reading (the state in locals for the loop, stored back after)."""
        limit, clock, dates, labels = self.limit, self.clock, self.dates, self.labels
        esiids, series_day, folds, last = self.esiids, self.series_day, self.folds, self.last
        n_rows, intervals, blanks, estimated, gaps = self.n_rows, self.intervals, self.blanks, self.estimated, self.gaps
        kwh_consumption, kwh_generation = self.kwh_consumption, self.kwh_generation
        lo, first_day, last_day = self.lo, self.first_day, self.last_day
        e_prev, k_prev, d_prev, e_blank = self.e_prev, self.k_prev, self.d_prev, self.e_blank
        esiid, generation, day, key = self.esiid, self.generation, self.day, self.key
        regular, midnight, previous = self.regular, self.midnight, self.previous
        more = self.more
        for line in lines:
            if '"' in line or len(line) > limit:
                row = next(csv.reader(itertools.chain((line,), lines, more)), [])
            else:
                row = line.rstrip("\r\n").split(",")
            try:  # one unpacking instead of six look-ups; SMT rows have exactly eight cells
                e_raw, d_raw, _, t_raw, _, kwh_text, est, kind = row
            except ValueError:
                if len(row) < 8:
                    continue
                e_raw, d_raw, _, t_raw, _, kwh_text, est, kind = row[:8]
            if e_blank or e_raw != e_prev or kind != k_prev or d_raw != d_prev:
                e_blank = not e_raw or e_raw.isspace()
                if e_blank and not "".join(row).strip():
                    continue  # a blank line, or one of empty cells
                if key in last or previous >= 0:
                    last[key] = previous
                e_prev, k_prev, d_prev = e_raw, kind, d_raw
                esiid = clean_esiid(e_raw)
                esiids.add(esiid)
                generation = kind.strip().lower().startswith("surplus")
                day = dates.get(d_raw)
                if day is None and d_raw not in dates:
                    day = dates[d_raw] = _parse_date(d_raw, {})
                if day is not None:
                    first_day = day if first_day is None or day < first_day else first_day
                    last_day = day if last_day is None or day > last_day else last_day
                    key = (esiid, generation)
                    if series_day.get(key) != day:  # a new day of this series: its labels start again
                        series_day[key] = day
                        folds.pop(key, None)
                    regular, midnight = clock.day(day)
                previous = last.get(key, -1)
            n_rows += 1
            try:
                kwh = float(kwh_text)
            except ValueError:
                if kwh_text.strip():
                    intervals += 1  # a reading that is not a number counts, as 0 kWh
                else:
                    blanks += 1
            else:
                intervals += 1
                if generation:
                    kwh_generation += kwh
                else:
                    kwh_consumption += kwh
            if est == "E" or (est != "A" and est.strip().upper() == "E"):
                estimated += 1
            if day is None:
                continue
            offset = labels.get(t_raw)  # seconds after midnight, on a day without a transition
            if offset is None:
                if t_raw in labels:
                    continue
                label = _parse_label(t_raw)
                offset = labels[t_raw] = None if label is None else (label[0] * 60 + label[1]) * 60
                if offset is None:
                    continue
            if regular:
                instant = midnight + offset
            else:  # a transition day: a label seen again in this series-day is the repeated hour
                seen = folds.setdefault(key, {})
                fold = seen.get(offset, 0)
                seen[offset] = fold + 1
                at = clock.instant(day, offset // 3600, offset // 60 % 60, min(fold, 1))
                if at is None:
                    continue
                instant = at
            # ``previous`` only moves forward, so it is the series' latest instant (``hi`` is the latest of
            # those, taken at the end); an instant can be a new earliest (``lo``) only when it does not move
            # its series forward, or is the series' first.
            if instant > previous:
                if previous < 0:
                    if lo < 0 or instant < lo:
                        lo = instant
                elif instant > previous + SLOT:
                    gaps += (instant - previous) // SLOT - 1
                previous = instant
            elif instant < lo:
                lo = instant
        self.n_rows, self.intervals, self.blanks, self.estimated, self.gaps = n_rows, intervals, blanks, estimated, gaps
        self.kwh_consumption, self.kwh_generation = kwh_consumption, kwh_generation
        self.lo, self.first_day, self.last_day = lo, first_day, last_day
        self.e_prev, self.k_prev, self.d_prev, self.e_blank = e_prev, k_prev, d_prev, e_blank
        self.esiid, self.generation, self.day, self.key = esiid, generation, day, key
        self.regular, self.midnight, self.previous = regular, midnight, previous

    def finish(self, summary: Summary) -> None:
        """The summary's keys from the state after the last row."""
        last = self.last
        if self.previous >= 0:
            last[self.key] = self.previous
        hi = max(last.values(), default=-1)
        summary.rows, summary.intervals, summary.blanks = self.n_rows, self.intervals, self.blanks
        summary.estimated, summary.gaps = self.estimated, self.gaps
        summary.kwh_consumption, summary.kwh_generation = self.kwh_consumption, self.kwh_generation
        summary.esiids = sorted(self.esiids)
        summary.first_date = self.first_day.isoformat() if self.first_day else None
        summary.last_date = self.last_day.isoformat() if self.last_day else None
        summary.first_start_utc = utc_stamp(self.lo) if self.lo >= 0 else None
        summary.last_end_utc = utc_stamp(hi + SLOT) if hi >= 0 else None


_DAY_SLOTS: Final = 86400 // SLOT
# The slots of days in a row: compared with a block's
# labels in one list comparison: 100 days of slots, more rows than a piece no longer than the csv field
# limit (128 KiB) can hold (a longer piece fails the comparison and is read exactly)
_SLOTS: Final = list(range(_DAY_SLOTS)) * 100
_MAX_NUMBERS: Final = 20_000  # distinct reading texts remembered (~2 MB; the cache starts again past this)
# The sum of a column of floats, added in order one by one as ``+=`` adds them; ``sum`` does that in C up to
# Python 3.11 (3.12 compensates the rounding, which would change the last digits)
_add_all: Final = sum if sys.version_info < (3, 12) else (lambda it, start: functools.reduce(operator.add, it, start))


_TEXT_BLOCK: Final = 64 * 1024  # bytes read at once: a text and its cells stay in the CPU's caches
_MAX_RUNS: Final = 64  # runs of one series a piece is cut into, at most (then halved)
_MAX_JOINS: Final = 8  # distinct ``kind LF esiid`` joins a piece may hold for :meth:`_IntervalReader._runs`
_MAX_SKIP: Final = 64  # blocks read exactly, at most, before the block reading is tried again
_MIN_PIECE: Final = 16 * 1024  # bytes of a piece read exactly rather than halved again: ~2 days of rows


def _texts(fh: BinaryIO) -> Iterator[str]:
    """The file decoded as ``open(encoding="utf-8-sig", errors="replace", newline="")`` decodes it, in texts of
    whole lines (about a block each; a line is never split, a CR LF never parted); the last text may lack a
    line end. Cut in bytes after an LF (or a CR not last), where no UTF-8 sequence is open, so each text is
    decoded on its own, once; a line longer than a block is gathered in pieces and joined once."""
    carry: list[bytes] = []
    bom = True
    while True:
        raw = fh.read(_TEXT_BLOCK)
        if bom:  # utf-8-sig drops one BOM at the very start (a file shorter than one waits for more bytes)
            while len(raw) < 3 and (more := fh.read(_TEXT_BLOCK)):
                raw += more
            raw, bom = raw[3:] if raw.startswith(codecs.BOM_UTF8) else raw, False
        if not raw:
            tail = b"".join(carry)
            if tail:
                yield tail.decode("utf-8", "replace")
            return
        # a CR as the last byte may be the first half of a CR LF: it waits for the next block
        cut = max(raw.rfind(b"\n"), raw.rfind(b"\r", 0, len(raw) - 1)) + 1
        if cut == 0:
            carry.append(raw)
            continue
        carry.append(raw[:cut] if cut < len(raw) else raw)
        yield b"".join(carry).decode("utf-8", "replace")
        carry = [raw[cut:]] if cut < len(raw) else []


def summarize_file(path: Path, name: str | None = None) -> Summary:
    """:func:`summarize` of a file, an interval CSV read block by block (:class:`_IntervalReader`)."""
    with path.open("rb") as fh:
        summary = _summarize_binary(fh, name or path.name)
    if summary is not None:
        return summary
    with path.open(encoding="utf-8-sig", errors="replace", newline="") as text:
        return summarize(text, name or path.name)


def summarize_bytes(data: bytes, name: str) -> Summary:
    summary = _summarize_binary(io.BytesIO(data), name)
    if summary is not None:
        return summary
    return summarize(io.StringIO(data.decode("utf-8-sig", "replace"), newline=""), name)


def _summarize_binary(fh: BinaryIO, name: str) -> Summary | None:
    """An interval CSV's summary, decoded and read in blocks; None for another kind (read by :func:`summarize`)."""
    texts = _texts(fh)
    first = next(texts, "")
    header = io.StringIO(first, newline="").readline()
    if classify(header_fields(header)) != "interval":
        return None
    summary = Summary(file=name, kind="interval", meter=meter_in(name))
    reader = _IntervalReader()
    reader.run(itertools.chain((first[len(header) :],), texts))
    reader.finish(summary)
    return summary


MAX_LINE_BYTES: Final = 1024 * 1024  # an SMT line is ~100 bytes; anything near this is not SMT data


@dataclass(frozen=True)
class Sniff:
    """What delivery needs: the kind and the distinct ESIIDs, read fast (no time arithmetic)."""

    kind: str
    esiids: frozenset[str]


_FIRST_COLUMN: Final = re.compile(rb'(?m)^[ \t]*"?\'?[ \t]*([^,\r\n"]*)')
_SNIFF_BLOCK: Final = 1024 * 1024  # == MAX_LINE_BYTES: a longer line always spans two blocks
_ENOUGH_ESIIDS: Final = 1000  # a pathological file: enough to know there are several


class Sniffer:
    """:func:`sniff` fed block by block, so the pass that hashes a file can sniff it too (``post`` and
    ``watch`` then read a file once before sending it, not twice).

    For the usual layout (ESIID first) each block is checked with two ``bytes.count`` calls over the block
    in place (no copies: a 1 GiB file costs two C scans); only a block whose lines do not all share the first
    line's ESIID is run through the regex. Another layout falls back to a line loop. Memory stays at one
    block: a line past MAX_LINE_BYTES is refused the moment it is known (:class:`LineTooLong` from
    :meth:`result`), never accumulated."""

    def __init__(self) -> None:
        self._head = b""
        self._header: list[str] | None = None
        self._kind = ""
        self._column = 0
        self._raw: set[bytes] = set()
        self._carry = b""
        self._lines = 0  # complete lines seen after the header
        self._error: LineTooLong | None = None
        self._done = False  # kind known to be "other", enough ESIIDs seen, or an error

    def feed(self, data: bytes) -> None:
        for i in range(0, len(data), _SNIFF_BLOCK):
            if self._done:
                return
            self._feed(data[i : i + _SNIFF_BLOCK] if len(data) > _SNIFF_BLOCK else data)

    def _feed(self, block: bytes) -> None:
        if self._header is None:
            block = self._take_header(block)
            if self._header is None or not block:
                return
        if self._column != 0:
            self._feed_lines(block)
            return
        carry = self._carry
        first = block.find(b"\n")
        if carry and first >= 0 and len(carry) + first + 1 > MAX_LINE_BYTES:
            self._fail(self._lines + 2)  # the line begun in the carry ends here, too long
            return
        if first < 0:  # no line ends in this block
            self._carry = carry + block
            if len(self._carry) > MAX_LINE_BYTES:  # never accumulate a line's tail past the limit
                self._fail(self._lines + 2)
            return
        start = 0
        if carry:  # the line begun in the last block: on its own, so the block is never copied
            self._raw.update(_first_column(carry + block[: first + 1], 0, len(carry) + first + 1)[0])
            self._lines += 1
            start = first + 1
        cut = block.rfind(b"\n") + 1
        if cut > start:
            found, lines = _first_column(block, start, cut)
            self._raw.update(found)
            self._lines += lines
        self._carry = block[cut:]
        if len(self._carry) > MAX_LINE_BYTES:  # else carry + block is copied again for every block
            self._fail(self._lines + 2)
        elif len(self._raw) > _ENOUGH_ESIIDS:
            self._done = True

    def _take_header(self, block: bytes) -> bytes:
        end = block.find(b"\n")
        if end < 0:
            self._head += block
            if len(self._head) > MAX_LINE_BYTES:
                self._fail(1)
            return b""
        line, rest = self._head + block[: end + 1], block[end + 1 :]
        self._head = b""
        if len(line) > MAX_LINE_BYTES:
            self._fail(1)
            return b""
        self._start(line)
        return rest

    def _start(self, first: bytes) -> None:
        self._header = header_fields(first.decode("utf-8", "replace"))
        self._kind = classify(self._header)
        if self._kind == "other":
            self._done = True
        else:
            self._column = self._header.index("ESIID")

    def _feed_lines(self, block: bytes) -> None:
        data = self._carry + block
        cut = data.rfind(b"\n") + 1
        self._carry = data[cut:]
        for line in data[:cut].split(b"\n"):
            self._lines += 1
            if len(line) + 1 > MAX_LINE_BYTES:
                self._fail(self._lines + 1)
                return
            self._take_field(line)
        if len(self._carry) > MAX_LINE_BYTES:
            self._fail(self._lines + 2)

    def _take_field(self, line: bytes) -> None:
        stripped = line.strip()
        if stripped:
            parts = stripped.split(b",", self._column + 1)
            if len(parts) > self._column:
                self._raw.add(parts[self._column].strip().strip(b'"'))
                if len(self._raw) > _ENOUGH_ESIIDS:
                    self._done = True

    def _fail(self, line: int) -> None:
        self._error, self._done = LineTooLong(line, MAX_LINE_BYTES), True

    def result(self) -> Sniff:
        """The sniff of everything fed; raises :class:`LineTooLong` for a line past the limit."""
        if self._error is not None:
            raise self._error
        if self._header is None:  # the whole file is one line without an end
            self._start(self._head)
        if not self._done and self._carry:
            if self._column == 0:
                self._raw.update(_first_column(self._carry, 0, len(self._carry))[0])
            else:
                self._take_field(self._carry)
        if self._kind == "other":
            return Sniff("other", frozenset())
        esiids = {clean_esiid(v.decode("utf-8", "replace")) for v in self._raw}
        esiids.discard("")
        return Sniff(self._kind, frozenset(esiids))


def sniff(path: Path) -> Sniff:
    """One fast pass over the ESIID column: the payload's ``esiid`` comes from here (docs/contract.md §4)."""
    sniffer = Sniffer()
    with path.open("rb") as fh:
        while not sniffer._done and (block := fh.read(_SNIFF_BLOCK)):
            sniffer.feed(block)
    return sniffer.result()


def _first_column(block: bytes, start: int, end: int) -> tuple[list[bytes], int]:
    """The first field of every line in ``block[start:end]`` (whole lines), and how many lines end there.
    Nearly every SMT file has one ESIID, so two ``bytes.count`` calls first check that every line shares
    the first line's field; only a region with several (or blank lines) goes through the regex, several
    times slower."""
    lines = block.count(b"\n", start, end)
    comma, newline = block.find(b",", start, end), block.find(b"\n", start, end)
    if comma >= 0 and (newline < 0 or comma < newline):
        prefix = block[start : comma + 1]
        if block.count(b"\n" + prefix, start, end) + 1 == lines + (0 if block.endswith(b"\n", start, end) else 1):
            return _FIRST_COLUMN.findall(prefix), lines
    return _FIRST_COLUMN.findall(block, start, end), lines


def _lines(fh: BinaryIO) -> Iterator[bytes]:
    """Non-blank lines, none held past MAX_LINE_BYTES."""
    number = 1
    while line := fh.readline(MAX_LINE_BYTES + 1):
        number += 1
        if len(line) > MAX_LINE_BYTES:
            raise LineTooLong(number, MAX_LINE_BYTES)
        stripped = line.strip()
        if stripped:
            yield stripped
