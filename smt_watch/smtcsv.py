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
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO, Final
from zoneinfo import ZoneInfo

from smt_watch.clock import utc_stamp

CHICAGO: Final = ZoneInfo("America/Chicago")
SLOT: Final = 900  # seconds in a 15-minute interval
INTERVAL_HEADER: Final = (
    "ESIID", "USAGE_DATE", "REVISION_DATE", "USAGE_START_TIME", "USAGE_END_TIME", "USAGE_KWH",
    "ESTIMATED_ACTUAL", "CONSUMPTION_SURPLUSGENERATION",
)
METER_RE: Final = re.compile(r"M\d+")  # the one meter pattern: inspect's summary and delivery's ``meter``
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
        t = _TIME_RE.match(time_text.strip())
        if day is None or t is None:
            return day, None
        s = self._series.setdefault(series, _Series())
        if s.day != day:
            s.day, s.seen_labels = day, {}
        label = (int(t.group(1)), int(t.group(2)))
        fold = s.seen_labels.get(label, 0)
        s.seen_labels[label] = fold + 1
        return day, self._clock.instant(day, label[0], label[1], min(fold, 1))


def _parse_date(text: str, cache: dict[str, date]) -> date | None:
    d = cache.get(text)
    if d is None:
        m = _DATE_RE.match(text.strip())
        if not m:
            return None
        d = date(int(m.group(3)), int(m.group(1)), int(m.group(2)))
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
    placer = Placer()
    last: dict[tuple[str, bool], int] = {}
    first_day: date | None = None
    last_day: date | None = None
    lo: int | None = None
    hi: int | None = None
    for row in csv.reader(it):
        if len(row) < 8 or not any(cell.strip() for cell in row):
            continue
        summary.rows += 1
        esiid = clean_esiid(row[0])
        esiids.add(esiid)
        generation = row[7].strip().lower().startswith("surplus")
        kwh_text = row[5].strip()
        if kwh_text:
            summary.intervals += 1
            try:
                kwh = float(kwh_text)
            except ValueError:
                kwh = 0.0
            if generation:
                summary.kwh_generation += kwh
            else:
                summary.kwh_consumption += kwh
        else:
            summary.blanks += 1
        if row[6].strip().upper() == "E":
            summary.estimated += 1
        key = (esiid, generation)
        day, instant = placer.place(key, row[1], row[3])
        if day is None:
            continue
        first_day = day if first_day is None or day < first_day else first_day
        last_day = day if last_day is None or day > last_day else last_day
        if instant is None:
            continue
        previous = last.get(key)
        if previous is not None and instant > previous + SLOT:
            summary.gaps += (instant - previous) // SLOT - 1
        if previous is None or instant > previous:
            last[key] = instant
        lo = instant if lo is None or instant < lo else lo
        hi = instant if hi is None or instant > hi else hi
    summary.esiids = sorted(esiids)
    summary.first_date = first_day.isoformat() if first_day else None
    summary.last_date = last_day.isoformat() if last_day else None
    summary.first_start_utc = utc_stamp(lo) if lo is not None else None
    summary.last_end_utc = utc_stamp(hi + SLOT) if hi is not None else None
    return summary


def summarize_file(path: Path, name: str | None = None) -> Summary:
    with path.open(encoding="utf-8-sig", errors="replace", newline="") as fh:
        return summarize(fh, name or path.name)


def summarize_bytes(data: bytes, name: str) -> Summary:
    return summarize(io.StringIO(data.decode("utf-8-sig", "replace"), newline=""), name)


MAX_LINE_BYTES: Final = 1024 * 1024  # an SMT line is ~100 bytes; anything near this is not SMT data


class LineTooLong(ValueError):
    """A line past MAX_LINE_BYTES: refused before it is held in memory or scanned again and again."""

    def __init__(self, line: int) -> None:
        super().__init__(f"line {line} is longer than {MAX_LINE_BYTES:,} bytes (not SMT data)")


@dataclass(frozen=True)
class Sniff:
    """What delivery needs: the kind and the distinct ESIIDs, read fast (no time arithmetic)."""

    kind: str
    esiids: frozenset[str]


_FIRST_COLUMN: Final = re.compile(rb'(?m)^[ \t]*"?\'?[ \t]*([^,\r\n"]*)')
_SNIFF_BLOCK: Final = 1024 * 1024


def sniff(path: Path) -> Sniff:
    """One fast pass over the ESIID column: the payload's ``esiid`` comes from here (docs/contract.md §4).

    For the usual layout (ESIID first) a regex runs over 1 MiB blocks cut at line ends, so the work is in
    C and memory stays flat; another layout falls back to a line loop.
    """
    with path.open("rb") as fh:
        first = fh.readline(MAX_LINE_BYTES + 1)
        if len(first) > MAX_LINE_BYTES:
            raise LineTooLong(1)
        header = header_fields(first.decode("utf-8", "replace"))
        kind = classify(header)
        if kind == "other":
            return Sniff(kind, frozenset())
        column = header.index("ESIID")
        raw: set[bytes] = set()
        if column == 0:
            carry, read_lines = b"", 0
            while block := fh.read(_SNIFF_BLOCK):
                if carry and (end := block.find(b"\n")) >= 0 and len(carry) + end + 1 > MAX_LINE_BYTES:
                    raise LineTooLong(read_lines + 2)  # the line begun in the carry ends here, too long
                block = carry + block
                cut = block.rfind(b"\n") + 1
                carry, block = block[cut:], block[:cut]
                if len(carry) > MAX_LINE_BYTES:  # else carry + block is copied again for every block
                    raise LineTooLong(1 + read_lines + block.count(b"\n") + 1)
                read_lines += block.count(b"\n")
                raw.update(_first_column(block))
                if len(raw) > 1000:  # a pathological file: enough to know there are several
                    break
            raw.update(_first_column(carry))
        else:
            for line in _lines(fh):
                parts = line.split(b",", column + 1)
                if len(parts) > column:
                    raw.add(parts[column].strip().strip(b'"'))
                    if len(raw) > 1000:
                        break
    esiids = {clean_esiid(v.decode("utf-8", "replace")) for v in raw}
    esiids.discard("")
    return Sniff(kind, frozenset(esiids))


def _first_column(block: bytes) -> list[bytes]:
    """The first field of every line in ``block`` (whole lines). Nearly every SMT file has one ESIID, so
    two ``bytes.count`` calls first check that all lines share the first line's field; only a block with
    several (or blank lines) is run through the regex, which is several times slower."""
    comma, newline = block.find(b","), block.find(b"\n")
    if comma >= 0 and (newline < 0 or comma < newline):
        prefix = block[: comma + 1]
        lines = block.count(b"\n") + (0 if block.endswith(b"\n") else 1)
        if block.count(b"\n" + prefix) + 1 == lines:
            return _FIRST_COLUMN.findall(prefix)
    return _FIRST_COLUMN.findall(block)


def _lines(fh: BinaryIO) -> Iterator[bytes]:
    """Non-blank lines, none held past MAX_LINE_BYTES."""
    number = 1
    while line := fh.readline(MAX_LINE_BYTES + 1):
        number += 1
        if len(line) > MAX_LINE_BYTES:
            raise LineTooLong(number)
        stripped = line.strip()
        if stripped:
            yield stripped
