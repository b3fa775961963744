"""``inspect``'s block reading (``summarize_file``/``summarize_bytes``: whole pieces of a file proven at once by
``_IntervalReader._rest``, the rest read line by line) against the line-by-line reading alone (``summarize`` of
the text as ``open(encoding="utf-8-sig", errors="replace", newline="")`` gives it, the reading
tests/test_smtcsv_fast_path.py checks against the per-row Placer), on generated files: long runs of ordinary
days (so the block reading engages), series in turn day by day or row by row, broken by hostile lines. Every
key of the summary (the kWh totals unrounded) and every error must be the same; blocks and pieces are shrunk
so a few KB cross many of them."""

from __future__ import annotations

import csv
import io
import random
from dataclasses import asdict
from datetime import date, timedelta
from pathlib import Path

import pytest

from smt_watch import smtcsv
from smt_watch.smtcsv import summarize, summarize_bytes, summarize_file

HEADER = ("ESIID,USAGE_DATE,REVISION_DATE,USAGE_START_TIME,USAGE_END_TIME,USAGE_KWH,ESTIMATED_ACTUAL,"
          "CONSUMPTION_SURPLUSGENERATION")
LABELS = [f"{h}:{m:02d}" for h in range(24) for m in (0, 15, 30, 45)]
FALL = LABELS[:8] + LABELS[4:8] + LABELS[8:]  # 1:00-1:45 twice
# Runs start near both 2025 transitions (03/09 and 11/02), in midsummer and at a year's end
STARTS = [date(2025, 3, 6), date(2025, 10, 30), date(2025, 7, 1), date(2024, 12, 29)]


def day_lines(rng: random.Random, day: date, esiid: str, kind: str, style: str) -> list[str]:
    """One day of rows as SMT writes them: 96 (100 on a fall-back day, 2:00-2:45 blank on a spring-forward one)."""
    labels = FALL if day == date(2025, 11, 2) else LABELS
    spring = day == date(2025, 3, 9)
    out = []
    for i, label in enumerate(labels):
        end = labels[i + 1] if i + 1 < len(labels) else "0:00"
        blank = spring and label in ("2:00", "2:15", "2:30", "2:45")
        kwh = "" if blank else f"{rng.randrange(0, 3000) / 1000:.3f}"
        est = "" if blank else ("E" if rng.random() < 0.05 else "A")
        out.append(f"{esiid},{day.strftime(style)},{(day + timedelta(days=1)):%m/%d/%Y},{label},{end},{kwh},{est},"
                   f"{kind}")
    return out


HOSTILE_CELLS = ["", " ", "abc", " 1.5 ", "1_0", "1e3", "inf", "-0.0", "13/45/2025", "12/31/9999", "25:99", "0:07",
                 " 0:15", "00:15", "e", " E", "a", "\x00", "\x1c", "\u2028", "\x0b", "é", "x" * 200]


def mangle(rng: random.Random, line: str) -> list[str]:
    """A hostile change to one line: zero, one or two lines back."""
    cells = line.split(",")
    choice = rng.randrange(15)
    if choice == 14:  # a line end inside a cell: two short lines whose cells add up to eight
        commas = [i for i, c in enumerate(line) if c == ","]  # at a cell's edge, the cell still reads as one
        at = rng.choice(commas) + rng.choice([0, 1]) if commas and rng.random() < 0.7 else rng.randrange(len(line))
        return [line[:at], line[at:]]
    if choice == 0:
        return []  # a gap
    if choice == 1:
        return [line, line]  # a repeated row
    if choice == 2:
        cells[rng.randrange(8)] = rng.choice(HOSTILE_CELLS)
    elif choice == 3:
        cells = cells[: rng.choice([1, 7])] if rng.random() < 0.5 else [*cells, "extra"]
    elif choice == 4:
        return [rng.choice(["", ",,,,,,,", " , , ,,,,,", "a,b"]), line]
    elif choice == 5:
        i = rng.randrange(8)
        cells[i] = '"' + cells[i] + '"'
    elif choice == 6:  # a quoted field holding a line break and a comma: one row over two lines
        cells[4] = '"x\r\n,y"' if rng.random() < 0.5 else '"x\n,y'
    elif choice == 7:
        cells[rng.choice([2, 4, 5])] = "9" * rng.choice([1000, 140_000])  # past the csv module's field limit
    elif choice == 8:
        cells[7] = rng.choice(["Surplus Generation", " surplus", "consumption", ""])
    elif choice == 9:
        cells[0] = rng.choice(["10443720000000002", " '10443720000000001 ", "", "'10443720000000001\x00"])
    elif choice == 10:
        cells[1] = rng.choice([cells[1].lstrip("0").replace("/0", "/"), " " + cells[1], cells[1] + " "])
    elif choice == 11:
        at = rng.randrange(len(line) + 1)
        return [line[:at] + rng.choice(["\r", "\r\r"]) + line[at:]]  # a lone CR: a line end of its own
    elif choice == 12:
        cells[rng.randrange(8)] += rng.choice(["\x00", "\ufffd", "\x85"])
    else:
        cells[3] = rng.choice([" " + cells[3], "0" + cells[3] if len(cells[3]) == 4 else cells[3]])
    return [",".join(cells)]


def interleaved(rng: random.Random) -> list[str]:
    """Consumption and generation (or two meters) in turn: a day of each, or a row of each."""
    esiids = ["'10443720000000001", rng.choice(["'10443720000000001", "'10443720000000002"])]
    kinds = ["Consumption", rng.choice(["Surplus Generation", "Consumption"])]
    start = rng.choice(STARTS)
    days = [[day_lines(rng, start + timedelta(days=i), esiids[j], kinds[j], "%m/%d/%Y") for j in (0, 1)]
            for i in range(rng.randint(2, 8))]
    if rng.random() < 0.5:
        return [line for pair in days for day in pair for line in day]
    return [line for a, b in days for pair in zip(a, b, strict=False) for line in pair]


def hostile_file(rng: random.Random) -> bytes:
    lines = [HEADER]
    if rng.random() < 0.25:
        lines.extend(interleaved(rng))
    for _ in range(rng.randint(0 if len(lines) > 1 else 1, 3)):
        esiid = rng.choice(["'10443720000000001", "10443720000000001", "'10443720000000002"])
        kind = rng.choice(["Consumption", "Consumption", "Surplus Generation"])
        style = rng.choice(["%m/%d/%Y", "%-m/%-d/%Y"])
        start = rng.choice(STARTS) + timedelta(days=rng.randint(-2, 2))
        for i in range(rng.randint(1, 6)):
            lines.extend(day_lines(rng, start + timedelta(days=i), esiid, kind, style))
    for _ in range(rng.choice([0, 1, 3, 10])):
        i = rng.randrange(1, len(lines))
        lines[i : i + 1] = mangle(rng, lines[i])
    eol = rng.choice(["\n", "\n", "\r\n"])
    text = "".join(line + (eol if rng.random() < 0.98 else rng.choice(["\n", "\r\n"])) for line in lines)
    if rng.random() < 0.2:
        text = text.rstrip("\r\n")  # the last line without its end
    data = text.encode()
    if rng.random() < 0.2:
        data = b"\xef\xbb\xbf" + data
    if rng.random() < 0.2:  # bytes that are not UTF-8, whole or cut short, somewhere in the rows
        at = rng.randrange(len(HEADER) + 1, len(data))
        data = data[:at] + rng.choice([b"\xff", b"\xe2\x82", b"\xc3", b"\xed\xa0\x80"]) + data[at:]
    return data


def reading(read: object) -> str:
    """The whole summary (floats unrounded) or the error, as one comparable text."""
    try:
        summary = read()  # type: ignore[operator]
    except csv.Error as exc:
        return f"csv.Error: {exc}"
    return repr(asdict(summary))


def line_by_line(data: bytes) -> str:
    text = data.decode("utf-8-sig", "replace")
    return reading(lambda: summarize(io.StringIO(text, newline=""), "x.csv"))


@pytest.fixture(params=[(64 * 1024, 16 * 1024), (512, 128), (97, 1)], ids=["as-shipped", "small", "tiny"])
def block_sizes(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks read at once and the piece read exactly, shrunk so that rows fall across many of both."""
    monkeypatch.setattr(smtcsv, "_TEXT_BLOCK", request.param[0])
    monkeypatch.setattr(smtcsv, "_MIN_PIECE", request.param[1])


@pytest.mark.usefixtures("block_sizes")
@pytest.mark.parametrize("seed", range(150))
def test_block_reading_equals_line_by_line_reading(seed: int) -> None:
    data = hostile_file(random.Random(seed))
    assert reading(lambda: summarize_bytes(data, "x.csv")) == line_by_line(data)


@pytest.mark.usefixtures("block_sizes")
@pytest.mark.parametrize("seed", range(5))
def test_block_reading_of_a_file_equals_line_by_line_reading(seed: int, tmp_path: Path) -> None:
    data = hostile_file(random.Random(1000 + seed))
    path = tmp_path / "x.csv"
    path.write_bytes(data)
    assert reading(lambda: summarize_file(path)) == line_by_line(data)


def test_the_block_reading_engages_on_ordinary_days(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not a vacuous comparison: on clean days nearly every row is proven in blocks, not read line by line."""
    rng = random.Random(7)
    lines = [HEADER]
    for i in range(40):
        lines.extend(day_lines(rng, date(2025, 2, 1) + timedelta(days=i), "'10443720000000001", "Consumption",
                               "%m/%d/%Y"))
    data = ("\n".join(lines) + "\n").encode()
    exact_rows = 0
    exact = smtcsv._IntervalReader.exact

    def counting(self: smtcsv._IntervalReader, lines: object) -> None:
        nonlocal exact_rows
        before = self.n_rows
        exact(self, lines)  # type: ignore[arg-type]
        exact_rows += self.n_rows - before

    monkeypatch.setattr(smtcsv._IntervalReader, "exact", counting)
    summary = summarize_bytes(data, "x.csv")
    assert summary.rows == 40 * 96  # the spring-forward day (03/09) keeps 96 rows
    assert exact_rows < 500  # the first rows (no series yet) and the transition day, not the other 38 days
    assert repr(asdict(summary)) == line_by_line(data)
