"""``inspect``'s fast path (work done once per distinct value and series-day) against the plain per-row
reading it replaced (:class:`smt_watch.smtcsv.Placer` on every row), on randomised hostile files: DST days
of both kinds, interleaved series, generation rows, blanks, estimates, unreadable dates and labels, blank
lines, rows out of order and repeated days. Any difference in any ``inspect --json`` key is a failure.
And the sniffer, fed in pieces of any size, against the plainest reading of the same bytes."""

from __future__ import annotations

import csv
import random
import re
from datetime import date, timedelta

import pytest

from smt_watch.clock import utc_stamp
from smt_watch.smtcsv import (
    MAX_LINE_BYTES,
    SLOT,
    LineTooLong,
    Placer,
    Sniffer,
    Summary,
    classify,
    clean_esiid,
    header_fields,
    summarize,
)

HEADER = ("ESIID,USAGE_DATE,REVISION_DATE,USAGE_START_TIME,USAGE_END_TIME,USAGE_KWH,ESTIMATED_ACTUAL,"
          "CONSUMPTION_SURPLUSGENERATION")
LABELS = [f"{h}:{m:02d}" for h in range(24) for m in (0, 15, 30, 45)]
FALL = LABELS[:8] + LABELS[4:8] + LABELS[8:]  # 1:00-1:45 twice
DAYS = [date(2025, 3, 8), date(2025, 3, 9), date(2025, 3, 10), date(2025, 11, 1), date(2025, 11, 2),
        date(2025, 11, 3), date(2025, 6, 30), date(2025, 7, 1)]


def reference(text: str) -> Summary:
    """The reading before the fast path: every row through Placer, as the code did then."""
    it = iter(text.splitlines(keepends=True))
    next(it)
    summary = Summary(file="x.csv", kind="interval")
    placer = Placer()
    esiids: set[str] = set()
    last: dict[tuple[str, bool], int] = {}
    first_day = last_day = None
    lo = hi = None
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


def hostile_file(rng: random.Random) -> str:
    lines = [HEADER]
    for _ in range(rng.randint(1, 6)):
        day = rng.choice(DAYS)
        labels = FALL if day == date(2025, 11, 2) else LABELS
        esiid = rng.choice(["'10443720000000001", "10443720000000002", " '10443720000000001 ", ""])
        kind = rng.choice(["Consumption", "Surplus Generation", " surplus", "", "Consumption"])
        style = rng.choice(["%m/%d/%Y", "%-m/%-d/%Y"])
        date_text = day.strftime(style) if rng.random() > 0.05 else rng.choice(["13/45/2025", "", "x"])
        start = rng.randint(0, len(labels) - 1)
        for label in labels[start: start + rng.randint(1, 100)]:
            if rng.random() < 0.03:
                lines.append(rng.choice(["", ",,,,,,,", " , , ,,,,,", "a,b"]))
            if rng.random() < 0.03:
                continue  # a gap
            kwh = rng.choice(["0.250", "1.5", "", " ", "abc", "1e3", " 0.1 "])
            est = rng.choice(["A", "E", " e", "", "A"])
            shown = rng.choice([label, f" {label}", label, "25:99" if rng.random() < 0.05 else label])
            cells = [esiid, date_text, f"{day + timedelta(days=1):%m/%d/%Y}", shown, "x", kwh, est, kind]
            if rng.random() < 0.05:  # a quoted cell: read by the csv module, as every line with a quote
                i = rng.randrange(8)
                cells[i] = '"' + cells[i] + '"'
            if rng.random() < 0.02:  # a quoted field holding a line break and a comma: one row of two lines
                cells[4] = '"x\r\n,y"'
            lines.append(",".join(cells))
        if rng.random() < 0.2:  # rows out of order
            body = lines[1:]
            rng.shuffle(body)
            lines[1:] = body
    eol = rng.choice(["\n", "\r\n"])
    return eol.join(lines) + eol


@pytest.mark.parametrize("seed", range(200))
def test_fast_path_reads_every_file_as_the_per_row_reading_did(seed: int) -> None:
    text = hostile_file(random.Random(seed))
    fast = summarize(text.splitlines(keepends=True), "x.csv").to_json()
    slow = reference(text).to_json()
    slow["meter"] = fast["meter"]
    assert fast == slow


def naive_sniff(data: bytes) -> tuple[str, frozenset[str]] | str:
    """The sniff by the plainest reading: every line on its own, any line over the limit an error."""
    lines = data.split(b"\n")
    if len(lines[0]) + (1 if len(lines) > 1 else 0) > MAX_LINE_BYTES:
        return "too long"
    header = header_fields(lines[0].decode("utf-8", "replace"))
    kind = classify(header)
    if kind == "other":
        return kind, frozenset()  # nothing past the header is read
    if any(len(line) + 1 > MAX_LINE_BYTES for line in lines[:-1]) or len(lines[-1]) > MAX_LINE_BYTES:
        return "too long"
    column = header.index("ESIID")
    raw = set()
    for line in lines[1:]:
        if column == 0:
            m = re.match(rb'[ \t]*"?\'?[ \t]*([^,\r\n"]*)', line)
            raw.add(m.group(1) if m else b"")
        elif line.strip():
            parts = line.strip().split(b",", column + 1)
            if len(parts) > column:
                raw.add(parts[column].strip().strip(b'"'))
    esiids = {clean_esiid(v.decode("utf-8", "replace")) for v in raw}
    esiids.discard("")
    return kind, frozenset(esiids)


def sniff_file(rng: random.Random) -> bytes:
    header = rng.choice([HEADER, "ESIID,NAME\n", "METER,ESIID,X", "a,b,c", HEADER + "\r"])
    out = [header if header.endswith(("\n", "\r")) else header + "\n"]
    for _ in range(rng.randint(0, 40)):
        esiid = rng.choice(["'10443720000000001", "10443720000000002", ' "10443720000000003"', "", "  "])
        filler = "9" * rng.choice([10, 10, 10, 300_000, 1_100_000]) if rng.random() < 0.1 else "x"
        out.append(rng.choice([f"{esiid},{filler},1\n", f"m,{esiid},{filler}\n", "\n", f"{esiid}\r\n"]))
    data = "".join(out).encode()
    return data if rng.random() < 0.8 else data.rstrip(b"\n")


@pytest.mark.parametrize("seed", range(120))
def test_sniffer_fed_in_any_pieces_agrees_with_the_plain_reading(seed: int) -> None:
    rng = random.Random(seed)
    data = sniff_file(rng)
    sniffer = Sniffer()
    i = 0
    while i < len(data):
        n = rng.choice([1, 7, 100, 4096, 1 << 20, 3 << 20])
        sniffer.feed(data[i : i + n])
        i += n
    try:
        got: tuple[str, frozenset[str]] | str = (lambda r: (r.kind, r.esiids))(sniffer.result())
    except LineTooLong:
        got = "too long"
    assert got == naive_sniff(data)
