"""What an SMT CSV holds (docs/contract.md §6): its kind, ESIIDs, dates, interval counts, kWh totals, gaps, UTC span.

Streaming: one pass, memory bounded by the number of (ESIID, direction) series, not by rows.

Time: SMT labels intervals in America/Chicago wall time, ``USAGE_START_TIME`` like ``0:15`` (sometimes with
a leading space). A fall-back day has 100 rows: the four labels of 1:00–1:45 appear twice; row order
decides, so the first occurrence is daylight time (fold 0) and the second standard time (fold 1). A
spring-forward day keeps 96 rows, and the four 2:00–2:45 labels, which name no real instant, carry a
blank kWh; they are counted as blanks and get no instant. Gaps are 15-minute UTC slots missing between
consecutive rows of a series.
"""

from __future__ import annotations

import csv
import io
import itertools
import re
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
    """The interval rows in one pass, placed as :class:`Placer` places them, but with its work done once per
    distinct value (an ESIID, a date, a time label) and once per series-day rather than once per row: a
    year of 15-minute reads is 35,040 rows of a few hundred distinct strings, and ``inspect`` keeps up with
    a good fraction of a bare ``csv.reader`` pass only if a row costs a few comparisons and look-ups.

    The rows are those ``csv.reader(lines)`` gives, at a third of its cost: a line without a quote is
    split on commas (what the csv module does with it); a line with a quote, or longer than the csv
    module's field limit (so that it still refuses it), is read by a csv reader, which takes the
    continuation lines of a quoted field from the same iterator. SMT's interval rows hold no quotes."""
    limit = csv.field_size_limit()
    clock = _Clock()
    dates: dict[str, date | None] = {}
    labels: dict[str, int | None] = {}  # label -> minutes after midnight
    esiids: set[str] = set()
    series_day: dict[tuple[str, bool], date] = {}
    folds: dict[tuple[str, bool], dict[int, int]] = {}
    last: dict[tuple[str, bool], int] = {}
    n_rows = intervals = blanks = estimated = gaps = 0
    kwh_consumption = kwh_generation = 0.0
    lo = -1
    first_day: date | None = None
    last_day: date | None = None
    e_prev = k_prev = d_prev = None  # the raw cells of the previous row that decide its series and day
    e_blank = True  # the previous row had no ESIID: each such row is checked for being blank
    esiid, generation, day = "", False, None
    key: tuple[str, bool] = ("", False)
    regular, midnight = True, 0
    previous = -1  # the last instant of the current series (-1: none yet)
    for line in lines:
        if '"' in line or len(line) > limit:
            row = next(csv.reader(itertools.chain((line,), lines)), [])
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
    if previous >= 0:
        last[key] = previous
    hi = max(last.values(), default=-1)
    summary.rows, summary.intervals, summary.blanks = n_rows, intervals, blanks
    summary.estimated, summary.gaps = estimated, gaps
    summary.kwh_consumption, summary.kwh_generation = kwh_consumption, kwh_generation
    summary.esiids = sorted(esiids)
    summary.first_date = first_day.isoformat() if first_day else None
    summary.last_date = last_day.isoformat() if last_day else None
    summary.first_start_utc = utc_stamp(lo) if lo >= 0 else None
    summary.last_end_utc = utc_stamp(hi + SLOT) if hi >= 0 else None


def summarize_file(path: Path, name: str | None = None) -> Summary:
    with path.open(encoding="utf-8-sig", errors="replace", newline="") as fh:
        return summarize(fh, name or path.name)


def summarize_bytes(data: bytes, name: str) -> Summary:
    return summarize(io.StringIO(data.decode("utf-8-sig", "replace"), newline=""), name)


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
