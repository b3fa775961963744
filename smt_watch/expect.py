"""What IntelliWatt keeps from a file: its own parser and overwrite rules, replayed, per ESIID, meter and day.

A 2xx from the raw-upload route does not mean the intervals are stored. The route (IntelliWatt
``app/api/admin/smt/raw-upload/route.ts``) parses each chunk on its own with ``normalizeSmtIntervals``
(``app/lib/smt/normalize.ts`` over ``lib/smt/parseCsv.ts``), keeps the intervals whose Chicago day is in the
coverage window (:mod:`smt_watch.window`), then per ESIID and meter deletes every stored interval between
the chunk's first and last kept instant and inserts the chunk's (``lib/usage/normalizeSmtIntervals.ts``
``replaceNormalizedSmtIntervals``). This module replays exactly that, so ``verify`` compares the app with
what the app itself would hold, not with what the file says. The collapses it reproduces:

- the app takes the meter from the request (the CSV has no meter column), and keys a slot by ESIID, meter
  and start instant only: a consumption row and a surplus-generation row for the same slot collide, and
  the later row in the chunk wins;
- local labels become instants by a fixed US rule, so the repeated 1:00–1:45 of a fall-back day map to
  the same (daylight-time) instants as the first ones: that day keeps 96 intervals, not 100, with the
  second occurrence's kWh; on a spring-forward day the non-existent 2:00–2:45 labels land on 1:00–1:45
  standard time (they normally carry no kWh and are skipped: 92 kept);
- a row whose kWh cell is blank or not a number is skipped;
- a later chunk overwrites (and deletes between its own first and last instant) what an earlier one stored;
- kWh are stored as ``Decimal(10, 5)``.

Memory: one entry per kept interval (a year is 35,040 per ESIID and meter), not per byte.
"""

from __future__ import annotations

import bisect
import functools
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Final

from smt_watch.window import CHICAGO, Place, Window

# JavaScript's \s and String.prototype.trim() set (Python's str.isspace differs: no U+FEFF, adds \x1c-\x1f).
_JS_WS: Final = "\t\n\v\f\r \u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a" \
    "\u2028\u2029\u202f\u205f\u3000\ufeff"
_WS_CLASS: Final = "[" + re.escape(_JS_WS) + "]"
_WS_RUN_RE: Final = re.compile(_WS_CLASS + "+")
_KEY_PUNCT_RE: Final = re.compile(r"[/_().\-]")
_STAMP_RE: Final = re.compile(
    r"^([0-9]{1,2})[/\-]([0-9]{1,2})[/\-]([0-9]{2,4})" + _WS_CLASS + r"+([0-9]{1,2}):([0-9]{2})(?::([0-9]{2}))?"
    + _WS_CLASS + r"*(AM|PM)?", re.IGNORECASE)
_TZ_SUFFIX_RE: Final = re.compile(r"(?<![A-Za-z0-9_])(CDT|CST|CT)(?![A-Za-z0-9_])", re.IGNORECASE)
_TZ_TAIL_RE: Final = re.compile(_WS_CLASS + r"+(CST|CDT|CT)$", re.IGNORECASE)
_CLOCK_RE: Final = re.compile(r"(?<![A-Za-z0-9_])[0-9]{1,2}:[0-9]{2}(?![A-Za-z0-9_])")
_ISO_LIKE_RE: Final = re.compile(
    r"^([0-9]{4})-([0-9]{2})-([0-9]{2})(?:[ T]([0-9]{2}):([0-9]{2})(?::([0-9]{2}))?)?(Z)?$")
_JS_NUMBER_RE: Final = re.compile(r"^[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$")
_LINE_RE: Final = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z")  # JavaScript's row ends only
SLOT_MS: Final = 900_000
KWH_PLACES: Final = Decimal("0.00001")  # SmtInterval.kwh is Decimal(10, 5)

_ESIID_FRAGMENTS: Final = ("esiid", "esi")
_METER_FRAGMENTS: Final = ("meter", "meternumber", "meterid", "meter_id")
_DATE_FRAGMENTS: Final = ("usagedate", "readdate", "readdt", "readingdate", "date")
_START_FRAGMENTS: Final = ("intervalstartdatetime", "startdatetime", "intervalstarttime", "starttime",
                           "intervalstart", "start", "intervalstartdate", "startdate")
_END_FRAGMENTS: Final = ("intervalenddatetime", "enddatetime", "intervalendtime", "endtime", "intervalend",
                         "end", "intervalenddate", "enddate")
_SINGLE_FRAGMENTS: Final = ("datetimecst", "datetimecdt", "datetimect", "datetime", "date/time", "datetimestamp")
_KWH_FRAGMENTS: Final = ("usagekwh", "consumptionkwh", "kwh", "kwhusage", "usage")


_JS_WS_SET: Final = frozenset(_JS_WS)
_SMT_STAMP_RE: Final = re.compile(r"^([0-9]{1,2})/([0-9]{1,2})/([0-9]{4}) ([0-9]{1,2}):([0-9]{2})$")
# its two halves, a row's date cell and its time label (trimmed) as SMT writes them
SMT_DATE_RE: Final = re.compile(r"([0-9]{1,2})/([0-9]{1,2})/([0-9]{4})")
SMT_LABEL_RE: Final = re.compile(r"[0-9]{1,2}:[0-9]{2}")
_HOUR_MS: Final = 3_600_000
_EARLIEST_MS: Final = 5 * _HOUR_MS
_LATEST_MS: Final = 107 * _HOUR_MS


def js_trim(text: str) -> str:
    if not text or (text[0] not in _JS_WS_SET and text[-1] not in _JS_WS_SET):
        return text
    return text.strip(_JS_WS)


def sanitize_key(key: str) -> str:
    """``parseCsv.ts`` ``sanitizeKey``."""
    return js_trim(_KEY_PUNCT_RE.sub("", _WS_RUN_RE.sub("", key.lower())).replace(":", "").replace("\u00a0", ""))


def js_number(text: str) -> float | None:
    """``Number(text)`` for the strings a CSV cell holds, or None when it is not a finite number."""
    t = js_trim(text)
    if t == "":
        return 0.0  # Number("") is 0; callers reject empty cells before this
    if _JS_NUMBER_RE.match(t):
        value = float(t)
        return value if value not in (float("inf"), float("-inf")) else None
    low = t.lower()
    for prefix, base in (("0x", 16), ("0o", 8), ("0b", 2)):
        if low.startswith(prefix):
            try:
                return float(int(t[2:], base))
            except ValueError:
                return None
    return None


def split_rows(lines: Iterable[str]) -> Iterator[list[str]]:
    """``parseCsv.ts`` ``splitCsvRows`` over text lines: quotes toggle anywhere in a field, ``""`` inside
    quotes is a quote, CR, LF and CRLF end a row outside quotes, rows of blank cells are dropped."""
    field_chars: list[str] = []
    row: list[str] = []
    in_quotes = False
    for line in lines:
        if not in_quotes and '"' not in line and "\r" not in line.rstrip("\r\n"):
            body = line.rstrip("\r\n") if line.endswith(("\n", "\r")) else line
            cells = body.split(",")
            if field_chars:
                cells[0] = "".join(field_chars) + cells[0]
                field_chars = []
            if line.endswith(("\n", "\r")):
                full = row + cells
                row = []
                if js_trim("".join(full)):
                    yield full
            else:
                row.extend(cells[:-1])
                field_chars = [cells[-1]]
            continue
        i, n = 0, len(line)
        while i < n:
            ch = line[i]
            if ch == '"':
                if in_quotes and i + 1 < n and line[i + 1] == '"':
                    field_chars.append('"')
                    i += 1
                else:
                    in_quotes = not in_quotes
            elif ch == "," and not in_quotes:
                row.append("".join(field_chars))
                field_chars = []
            elif ch in "\r\n" and not in_quotes:
                if ch == "\r" and i + 1 < n and line[i + 1] == "\n":
                    i += 1
                row.append("".join(field_chars))
                field_chars = []
                if any(js_trim(c) for c in row):
                    yield row
                row = []
            else:
                field_chars.append(ch)
            i += 1
    row.append("".join(field_chars))
    if any(js_trim(c) for c in row):
        yield row


@dataclass(frozen=True)
class ParsedRow:
    """``ParsedInterval``: what ``parseSmtCsvFlexible`` keeps of a row with a numeric kWh."""

    esiid: str | None
    meter: str | None
    start_local: str | None
    end_local: str | None
    date_time_local: str | None
    kwh: float


class _Columns:
    """``findValueByFragments`` with the column look-ups done once per header instead of once per row."""

    def __init__(self, header: list[str]) -> None:
        self.keys = [sanitize_key(h) for h in header]
        self.width = len(header)

    def candidates(self, fragments: tuple[str, ...], reject: tuple[str, ...] = ()) -> list[int]:
        """Column indexes in the order the real lookup tries them (exact matches first, then the first key
        that includes each fragment); the first non-blank cell among them wins."""
        out: list[int] = []
        for fragment in fragments:
            if fragment in self.keys:
                out.append(self.keys.index(fragment))
        for fragment in fragments:
            for idx, key in enumerate(self.keys):
                if fragment in key and not any(bad and bad in key for bad in reject):
                    out.append(idx)
                    break
        return out


def _first(row: list[str], indexes: list[int]) -> str | None:
    for idx in indexes:
        if idx < len(row):
            value = js_trim(row[idx])
            if value:
                return value
    return None


class RowParser:
    """``parseSmtCsvFlexible`` for one header: :meth:`parse` reads a data row, None when its kWh is not a number."""

    def __init__(self, header: list[str]) -> None:
        cols = _Columns(header)
        self.width = cols.width
        self.c_esiid = cols.candidates(_ESIID_FRAGMENTS)
        self.c_meter = cols.candidates(_METER_FRAGMENTS)
        self.c_date = cols.candidates(_DATE_FRAGMENTS)
        self.c_start = cols.candidates(_START_FRAGMENTS)
        self.c_end = cols.candidates(_END_FRAGMENTS)
        self.c_single = cols.candidates(_SINGLE_FRAGMENTS)
        self.c_kwh = cols.candidates(_KWH_FRAGMENTS, ("type",))

    def parse(self, row: list[str]) -> ParsedRow | None:
        if not js_trim("".join(row)):
            return None
        if len(row) < self.width:
            row = row + [""] * (self.width - len(row))
        kwh_raw = _first(row, self.c_kwh)
        kwh = js_number(kwh_raw.replace(",", "")) if kwh_raw is not None else None
        if kwh is None:
            return None
        usage_date = _first(row, self.c_date)
        start = _first(row, self.c_start)
        end = _first(row, self.c_end)
        single = _first(row, self.c_single)
        start_with = f"{usage_date} {start}" if start and usage_date else start
        end_with = f"{usage_date} {end}" if end and usage_date else end
        single_with = single or (f"{usage_date} {start or end}" if usage_date and (start or end) else None)
        return ParsedRow(_first(row, self.c_esiid), _first(row, self.c_meter), start_with, end_with, single_with,
                         kwh)


def parse_csv_flexible(rows: Iterator[list[str]]) -> Iterator[ParsedRow]:
    """``parseSmtCsvFlexible``: the first row is the header; rows whose kWh is not a number are skipped."""
    header = next(rows, None)
    if not header:
        return
    parser = RowParser(header)
    for row in rows:
        parsed = parser.parse(row)
        if parsed is not None:
            yield parsed


def _days_from_civil(y: int, m: int, d: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (any year), as JavaScript's Date.UTC counts."""
    y -= m <= 2
    era = (y if y >= 0 else y - 399) // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def js_date_utc(year: int, month0: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> int:
    """``Date.UTC``: fields out of range roll over; a year 0–99 means 1900–1999."""
    if 0 <= year <= 99:
        year += 1900
    y, m0 = divmod(year * 12 + month0, 12)
    days = _days_from_civil(y, m0 + 1, 1) + (day - 1)
    return (((days * 24 + hour) * 60 + minute) * 60 + second) * 1000


def _nth_weekday(year: int, month0: int, weekday0: int, n: int) -> int:
    first_dow = (_days_from_civil(year, month0 + 1, 1) + 4) % 7  # 1970-01-01 was a Thursday (4)
    return 1 + (weekday0 - first_dow + 7) % 7 + (n - 1) * 7


def _chicago_dst_for_local(year: int, month0: int, day: int, hour: int, minute: int) -> bool:
    """``normalize.ts`` ``isChicagoDstForLocal``: the fixed US rule, on the label's own fields."""
    if month0 < 2 or month0 > 10:
        return False
    if 2 < month0 < 10:
        return True
    minutes = hour * 60 + minute
    if month0 == 2:
        start = _nth_weekday(year, 2, 0, 2)
        return day > start or (day == start and minutes >= 120)
    end = _nth_weekday(year, 10, 0, 1)
    return day < end or (day == end and minutes < 120)


@functools.lru_cache(maxsize=4096)
def _date_base(m_s: str, d_s: str, y_s: str) -> tuple[int, int, int, int]:
    """(``Date.UTC`` of the date's midnight, month0, day, year) for the fast path of :func:`parse_central`."""
    year, month0, day = int(y_s), int(m_s) - 1, int(d_s)
    return js_date_utc(year, month0, day), month0, day, year


def parse_central(raw: str | None) -> int | None:
    """``normalize.ts`` ``parseCentralIso`` as epoch milliseconds (None: no instant).

    Its last resort, ``new Date(value)``, is V8's lenient parser; only the ISO shapes it reads the same way
    on every server (a UTC process, as Vercel runs) are reproduced, anything else counts as unreadable.
    """
    if not raw:
        return None
    value = js_trim(raw)
    if not value:
        return None
    fast = _SMT_STAMP_RE.match(value)  # SMT's own shape, ``M/D/YYYY H:MM``: the same rules, cached per date
    if fast:
        base, month0, day, year = _date_base(fast.group(1), fast.group(2), fast.group(3))
        hour, minute = int(fast.group(4)), int(fast.group(5))
        dst = (2 < month0 < 10) if month0 not in (2, 10) else _chicago_dst_for_local(year, month0, day, hour, minute)
        return base + (hour * 60 + minute) * 60_000 + (300 if dst else 360) * 60_000
    suffix_m = _TZ_SUFFIX_RE.search(value)
    suffix = suffix_m.group(1).upper() if suffix_m else None
    normalized = js_trim(_TZ_TAIL_RE.sub("", value).replace("T", " "))
    m = _STAMP_RE.match(normalized)
    if m:
        m_s, d_s, y_s, h_s, min_s, s_s, ampm = m.groups()
        year = int("20" + y_s) if len(y_s) == 2 else int(y_s)
        month0, day, hour, minute, second = int(m_s) - 1, int(d_s), int(h_s), int(min_s), int(s_s or 0)
        if ampm:
            if ampm.upper() == "PM" and hour < 12:
                hour += 12
            if ampm.upper() == "AM" and hour == 12:
                hour = 0
        initial = js_date_utc(year, month0, day, hour, minute, second)
        dst = True if suffix == "CDT" else False if suffix == "CST" else _chicago_dst_for_local(
            year, month0, day, hour, minute)
        return initial + (300 if dst else 360) * 60_000
    iso = _ISO_LIKE_RE.match(value)
    if iso:
        y, mo, d, h, mi, s, _z = iso.groups()
        if not (1 <= int(mo) <= 12 and 1 <= int(d) <= 31 and int(h or 0) <= 24 and int(mi or 0) <= 59):
            return None
        return js_date_utc(int(y), int(mo) - 1, int(d), int(h or 0), int(mi or 0), int(s or 0))
    return None


def smt_instant_bounds(date_cell: str) -> tuple[int, int] | None:
    """[earliest, latest) epoch ms of any instant :func:`parse_central` gives a row dated ``date_cell`` with an
    ``H:MM`` label (:data:`SMT_LABEL_RE`), or None when the cell is not SMT's ``M/D/YYYY``. Its fast path
    (``_SMT_STAMP_RE``): the date's Date.UTC midnight + H h + MM min (each at most 99) + 5 or 6 h, so within
    [midnight + 5 h, midnight + 107 h)."""
    m = SMT_DATE_RE.fullmatch(js_trim(date_cell))
    if m is None:
        return None
    midnight = js_date_utc(int(m.group(3)), int(m.group(1)) - 1, int(m.group(2)))
    return midnight + _EARLIEST_MS, midnight + _LATEST_MS


def text_lines(text: str) -> list[str]:
    """``text`` cut at JavaScript's row ends (``\\r\\n``, ``\\r``, ``\\n``), each line with its end, as the
    route's parser reads a chunk."""
    return _LINE_RE.findall(text)


def esiid_of_cell(raw: str, fallback: str | None) -> str | None:
    """The ESIID the route files a row under whose ESIID cell is ``raw`` (trimmed, leading quotes dropped;
    an empty cell: ``fallback``)."""
    return _esiid(_first([raw], [0]), fallback)


def _has_clock(value: str) -> bool:
    return bool(_CLOCK_RE.search(value))


_CYCLE_MS: Final = 146_097 * 86_400_000  # 400 Gregorian years: the calendar, the weekdays and the US DST rule repeat
_LOW_MS: Final = _days_from_civil(1, 1, 2) * 86_400_000  # instants datetime dates in Chicago (a day's margin)
_HIGH_MS: Final = _days_from_civil(9999, 12, 30) * 86_400_000


def chicago_local(ms: int) -> tuple[datetime, int]:
    """The Chicago wall time of an instant, and the years to add to its year: an instant outside datetime's
    years 1-9999 (a hostile ``12/31/9999 99:00`` is in year 10000) is moved by whole 400-year cycles into
    them, where its wall time is the same, instead of raising ValueError (an internal error)."""
    cycles = 0
    if ms < _LOW_MS:
        cycles = -(-(_LOW_MS - ms) // _CYCLE_MS)
        ms += cycles * _CYCLE_MS
        cycles = -cycles
    elif ms > _HIGH_MS:
        cycles = -(-(ms - _HIGH_MS) // _CYCLE_MS)
        ms -= cycles * _CYCLE_MS
    return datetime.fromtimestamp(ms / 1000, UTC).astimezone(CHICAGO), 400 * cycles


def chicago_date(ms: int) -> date:
    """``smtCoverageDateKey``: the Chicago date of an instant; past datetime's years, ``date.max`` (or
    ``date.min``), which no window holds."""
    local, years = chicago_local(ms)
    year = local.year + years
    if year > 9999:
        return date.max
    if year < 1:
        return date.min
    return local.date().replace(year=year)


def _chicago_hm(ms: int) -> tuple[int, int]:
    local, _ = chicago_local(ms)
    return local.hour, local.minute


def _end_role(end_locals: list[str]) -> str:
    """``classifyEndColumnTimestampRole``: an end column whose earliest instant is local 0:00 holds starts."""
    parsed = [ms for ms in (parse_central(v) for v in end_locals) if ms is not None]
    if not parsed:
        return "period_end"
    return "period_start" if _chicago_hm(min(parsed)) == (0, 0) else "period_end"


def _start_ms(row: ParsedRow, end_role: str) -> int | None:
    """``deriveIntervalStartIso``."""
    start = js_trim(row.start_local or "")
    if start and _has_clock(start):
        return parse_central(start)
    end = js_trim(row.end_local or "")
    if end and _has_clock(end):
        end_ms = parse_central(end)
        if end_ms is None:
            return None
        return end_ms if end_role == "period_start" else end_ms - SLOT_MS
    single = js_trim(row.date_time_local or "")
    if single and _has_clock(single):
        return parse_central(single)
    for candidate in (start, end, single):
        if candidate:
            ms = parse_central(candidate)
            if ms is not None:
                return ms
    return None


def _esiid(raw: str | None, fallback: str | None) -> str | None:
    candidate = js_trim(raw if raw is not None else (fallback or ""))
    stripped = candidate.lstrip("'")
    return stripped or None


def _meter(raw: str | None, fallback: str | None) -> str:
    return js_trim(raw if raw is not None else (fallback or "")) or "unknown"


Pair = tuple[str, str]  # (esiid, meter)


def normalize_chunk(text_lines: Iterable[str], esiid: str | None, meter: str | None) -> dict[Pair, dict[int, float]]:
    """``normalizeSmtIntervals`` on one chunk: start instant → kWh per (ESIID, meter); a later row for the
    same slot replaces an earlier one."""
    parsed = list(parse_csv_flexible(split_rows(text_lines)))
    role: str | None = None  # decided from the whole chunk's end column, and only needed without a start time
    out: dict[Pair, dict[int, float]] = {}
    for row in parsed:
        start = row.start_local
        if start is not None and _has_clock(start):
            ms = parse_central(start)
        else:
            if role is None:
                end_locals = [js_trim(r.end_local or "") for r in parsed]
                end_locals = [v for v in end_locals if v and _has_clock(v)]
                role = _end_role(end_locals) if end_locals else "period_end"
            ms = _start_ms(row, role)
        if ms is None:
            continue
        e = _esiid(row.esiid, esiid)
        if e is None:
            continue
        out.setdefault((e, _meter(row.meter, meter)), {})[ms] = row.kwh
    return out


def stored_kwh(kwh: float) -> Decimal:
    """A kWh as ``Decimal(10, 5)`` keeps it (PostgreSQL rounds half away from zero)."""
    try:
        return Decimal(repr(kwh)).quantize(KWH_PLACES, rounding=ROUND_HALF_UP)
    except InvalidOperation:
        return Decimal(0)


class _Series:
    """One (ESIID, meter)'s stored intervals: sorted instants and their kWh."""

    __slots__ = ("kwh", "order")

    def __init__(self) -> None:
        self.order: list[int] = []
        self.kwh: dict[int, Decimal] = {}

    def replace(self, points: dict[int, Decimal]) -> None:
        """``replaceNormalizedSmtIntervals`` for one pair: delete [min, max], then insert."""
        lo, hi = min(points), max(points)
        i, j = bisect.bisect_left(self.order, lo), bisect.bisect_right(self.order, hi)
        for ts in self.order[i:j]:
            del self.kwh[ts]
        new = sorted(points)
        self.order[i:j] = new  # everything in [lo, hi] was deleted, so the list stays sorted
        self.kwh.update(points)


@dataclass
class DayTotal:
    """One (ESIID, meter, Chicago day): how many intervals, and their kWh total."""

    count: int = 0
    kwh: Decimal = field(default_factory=lambda: Decimal(0))

    def to_json(self) -> dict[str, object]:
        return {"count": self.count, "kwh": float(self.kwh)}


DayKey = tuple[str, str, date]  # (esiid, meter, Chicago day)


@dataclass
class Expectation:
    """What the app holds after a file's chunks, and what the window kept out of it."""

    stored: dict[DayKey, DayTotal] = field(default_factory=dict)
    newer: dict[DayKey, DayTotal] = field(default_factory=dict)  # after the window's end: dropped for now
    older: dict[DayKey, DayTotal] = field(default_factory=dict)  # before its start: dropped for good
    chunk_esiids: list[set[str]] = field(default_factory=list)  # per chunk: ESIIDs with kept intervals
    chunks: int = 0

    @property
    def esiids(self) -> set[str]:
        return {k[0] for k in (*self.stored, *self.newer, *self.older)}


class AppModel:
    """The app's SmtInterval table as the raw-upload route changes it, in memory: feed it chunks in order."""

    def __init__(self) -> None:
        self.series: dict[Pair, _Series] = {}
        self._day_cache: dict[int, date] = {}

    def day_of(self, ms: int) -> date:
        """``smtCoverageDateKey``: the Chicago date of an instant (cached per hour: offsets are whole hours)."""
        hour = ms // 3_600_000
        d = self._day_cache.get(hour)
        if d is None:
            d = chicago_date(hour * 3_600_000)
            self._day_cache[hour] = d
        return d

    def ingest(self, text_lines: Iterable[str], esiid: str | None, meter: str | None,
               window: Window | None) -> tuple[set[str], dict[DayKey, DayTotal]]:
        """One chunk through the route; returns the ESIIDs whose intervals were kept (what post-ingest is
        queued for when the chunk says ``postIngest``) and, per day, what the window dropped."""
        dropped: dict[DayKey, DayTotal] = {}
        kept_esiids: set[str] = set()
        for pair, slots in normalize_chunk(text_lines, esiid, meter).items():
            if not pair[0].strip() or not pair[1].strip():
                continue
            kept: dict[int, Decimal] = {}
            for ms, kwh in slots.items():
                day = self.day_of(ms)
                if window is None or day in window:
                    kept[ms] = stored_kwh(kwh)
                else:
                    total = dropped.setdefault((pair[0], pair[1], day), DayTotal())
                    total.count += 1
                    total.kwh += stored_kwh(kwh)
            if kept:
                kept_esiids.add(pair[0])
                self.series.setdefault((pair[0].strip(), pair[1].strip()), _Series()).replace(kept)
        return kept_esiids, dropped

    def days(self) -> dict[DayKey, DayTotal]:
        out: dict[DayKey, DayTotal] = {}
        for (e, m), s in self.series.items():
            for ts in s.order:
                total = out.setdefault((e, m, self.day_of(ts)), DayTotal())
                total.count += 1
                total.kwh += s.kwh[ts]
        return out


def chunk_lines(chunk: bytes) -> list[str]:
    """A chunk's text as the route decodes it (UTF-8, bad bytes replaced), split keeping line ends."""
    return text_lines(chunk.decode("utf-8", errors="replace"))


def expect(chunks: Iterable[bytes], *, esiid: str | None, meter: str | None, window: Window) -> Expectation:
    """Replay ``chunks`` (as sent, header in each) through the app with ``window`` applied to every chunk."""
    model = AppModel()
    out = Expectation()
    for chunk in chunks:
        kept, dropped = model.ingest(chunk_lines(chunk), esiid, meter, window)
        out.chunk_esiids.append(kept)
        out.chunks += 1
        for key, total in dropped.items():
            target = out.older if window.place(key[2]) is Place.OLDER else out.newer
            acc = target.setdefault(key, DayTotal())
            acc.count += total.count
            acc.kwh += total.kwh
    out.stored = model.days()
    # a day dropped in one chunk but stored by another (or overwritten later) is judged by what is stored
    for key in list(out.newer):
        if key in out.stored:
            del out.newer[key]
    return out


def line_days(lines: Iterable[bytes], esiid: str | None, meter: str | None) -> Iterator[tuple[bytes, DayKey | None]]:
    """Each raw line after the header with the (ESIID, meter, Chicago day) the app files its interval under,
    or None for a line it keeps nothing from (blank kWh, no instant, no ESIID). Lines are read one by one:
    an SMT file has no quoted line breaks. The first item is the header line, with None."""
    it = iter(lines)
    header_line = next(it, b"")
    yield header_line, None
    header = next(split_rows(chunk_lines(header_line)), None)
    if not header:
        return
    parser = RowParser(header)
    model = AppModel()
    for line in it:
        row = next(split_rows(chunk_lines(line)), None)
        parsed = parser.parse(row) if row else None
        key: DayKey | None = None
        if parsed is not None:
            ms = _start_ms(parsed, "period_end")
            e = _esiid(parsed.esiid, esiid)
            if ms is not None and e is not None:
                key = (e.strip(), _meter(parsed.meter, meter).strip(), model.day_of(ms))
        yield line, key


def inline_points(text_lines: Iterable[str], esiid: str | None, meter: str | None) -> dict[Pair, dict[int, Decimal]]:
    """What the inline route keeps of a whole file (IntelliWatt ``app/api/admin/smt/pull/route.ts``
    ``normalizeInlineSmtCsv`` → ``lib/usage/normalizeSmtIntervals.ts`` ``persistParsedNormalizedSmtIntervals``
    → ``lib/usage/dualWriteUsageIntervals.ts``), for an ESIID the app holds nothing of yet.

    Unlike raw-upload there is no coverage window and nothing is deleted: the file is parsed once, whole
    (a later row for a slot wins, as in every chunk), then per ESIID every row goes under one canonical meter
    (the first meter other than ``unknown``, else ``unknown``), the first row of each slot wins across
    meters, and ``createMany(skipDuplicates)`` leaves a slot the app already holds as it was."""
    by_esiid: dict[str, list[tuple[str, dict[int, float]]]] = {}
    for (e, m), slots in normalize_chunk(text_lines, esiid, meter).items():
        e, m = e.strip(), m.strip() or "unknown"
        if e:
            by_esiid.setdefault(e, []).append((m, slots))
    out: dict[Pair, dict[int, Decimal]] = {}
    for e, items in by_esiid.items():
        known = [m for m, _ in items if m != "unknown"]
        series = out.setdefault((e, known[0] if known else "unknown"), {})
        for _meter_seen, slots in items:
            for ms in sorted(slots):  # each pair's points in time order, as the route emits them
                series.setdefault(ms, stored_kwh(slots[ms]))
    return out


def expect_inline(content: bytes, *, esiid: str | None, meter: str | None) -> Expectation:
    """Replay a file delivered inline (``mode: "inline"``, the app in development): one parse of the whole
    file, no window (:func:`inline_points`)."""
    model = AppModel()
    out = Expectation(chunks=1)
    points = inline_points(chunk_lines(content), esiid, meter)
    for pair, slots in points.items():
        if slots:
            model.series.setdefault(pair, _Series()).replace(slots)
    out.chunk_esiids.append({pair[0] for pair, slots in points.items() if slots})
    out.stored = model.days()
    return out
