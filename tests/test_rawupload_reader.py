"""raw-upload's block reading (issue 27: memory flat in file size, a fraction of the CPU) against the line-by-line
readings it replaced, on generated hostile files and chunks.

- ``iter_chunks`` reads 256 KiB blocks and takes a clean run's lines in slices; its chunks and its errors must
  be those of the Node server's transcription (``node_chunks``) and of the per-line cut by bytes
  (:func:`per_line_chunks`, the loop it replaced), with reads shrunk to a few bytes so lines, CR LFs and
  UTF-8 sequences straddle them.
- ``KeptEsiids`` leaves out the rows dated days away from the window before the app's parser runs, and the
  rows of an ESIID it already found kept; its kept ESIIDs must be those of the route replayed on the whole
  chunk (``AppModel.ingest``), with windows at both edges of the rows' dates and around both transitions.
- Planning a 4-year file's post-ingest holds no more memory than planning a 1-year file's (``tracemalloc``):
  the old replay kept a date per hour of the file and every kept interval.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import re
import tracemalloc
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from node_server import JS_TRIM, node_chunks

from smt_watch import expect, postingest
from smt_watch.delivery import rawupload
from smt_watch.delivery.base import MAX_REQUEST_BYTES
from smt_watch.delivery.rawupload import iter_chunks, plan_chunks
from smt_watch.errors import FileChanged, PermanentDelivery
from smt_watch.expect import AppModel, chunk_lines
from smt_watch.postingest import KeptEsiids, plan_post_ingest
from smt_watch.reference.sample import interval_csv
from smt_watch.window import coverage_window

ROW = b"'10443720000000001,01/01/2025,01/02/2025,0:15,0:30,0.512,A,Consumption"
ODD_LINES = [b"", b"   ", b"\t", b"\xc2\xa0", b"\xef\xbb\xbf", b"caf\xc3\xa9,1", b"\xff\xfe bad", b"a\rb", b"x" * 300,
             b"\x0b", b" lead,1", b"\xe2\x80\xa8", b"\xe2\x82", b"\x01,2"]
HEADERS = [b"H,1", b"", b" H", b"\xef\xbb\xbfH", b"\xff"]


def per_line_chunks(data: bytes, lines_per_chunk: int, budget: int) -> list[bytes] | str:
    """The chunks the per-line loop cut (the Node server's lines, cut also by ``budget``), or its error text."""
    text = data.decode("utf-8", "replace")
    lines = re.split(r"\r?\n", text)
    header = lines[0].encode()
    out: list[bytes] = []
    batch: list[bytes] = []
    size = len(header)
    for number, raw in enumerate(lines[1:], start=2):
        if not raw.strip(JS_TRIM):
            continue
        line = raw.encode()
        if batch and (len(batch) == lines_per_chunk or size + 1 + len(line) > budget):
            out.append(b"\n".join([header, *batch]))
            batch, size = [], len(header)
        if size + 1 + len(line) > budget:
            return f"line {number} is {len(line)} bytes"
        batch.append(line)
        size += 1 + len(line)
    if batch:
        out.append(b"\n".join([header, *batch]))
    elif len(text.encode()) > budget:
        return f"{len(data)} bytes without a data line"
    else:
        out.append(text.encode())
    return out


def hostile_file(rng: random.Random) -> bytes:
    lines = [rng.choice(HEADERS)] + [rng.choice(ODD_LINES) if rng.random() < 0.3 else ROW
                                     for _ in range(rng.randrange(0, 60))]
    data = b"".join(line + rng.choice([b"\n", b"\n", b"\r\n", b"\r\r\n"]) for line in lines)
    if rng.random() < 0.3:
        data = data.rstrip(b"\n")
    if rng.random() < 0.1:
        data += b"\r"
    return data


@pytest.mark.parametrize("seed", range(4))
def test_block_reading_cuts_the_chunks_the_line_loop_cut(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          seed: int) -> None:
    rng = random.Random(seed)
    path = tmp_path / "f.csv"
    for _ in range(400):
        data = hostile_file(rng)
        path.write_bytes(data)
        monkeypatch.setattr(rawupload, "_READ", rng.choice([1, 2, 7, 64, 1 << 20]))
        lines_per_chunk = rng.choice([1, 2, 3, 5, 96])
        budget = rng.choice([10**7, 400, 200, 120, 60])
        want = per_line_chunks(data, lines_per_chunk, budget)
        if budget == 10**7:
            assert want == node_chunks(data, lines_per_chunk)
        digest = hashlib.sha256()
        try:
            got: list[bytes] | str = list(iter_chunks(path, lines_per_chunk, budget, digest))
        except PermanentDelivery as exc:
            assert isinstance(want, str), (data, lines_per_chunk, budget, str(exc))
            over = re.search(r"line (\d+) is over (\d+) bytes", str(exc))
            if over:  # stopped once past the budget: the per-line loop failed on that line, for its length
                assert want.startswith(f"line {over[1]} is ") and int(want.split()[3]) > budget, (want, str(exc))
            else:
                assert want in str(exc), (data, lines_per_chunk, budget, str(exc))
            continue
        assert got == want, (data, lines_per_chunk, budget)
        assert digest.hexdigest() == hashlib.sha256(data).hexdigest()


def test_a_year_in_small_reads_is_the_node_servers_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Clean runs (the slices) across reads that cut lines and CR LFs anywhere."""
    path = tmp_path / "year.csv"
    data = interval_csv(40).replace(b"\n", b"\r\n")
    path.write_bytes(data)
    for size in (1, 3, 4096, 65_537):
        monkeypatch.setattr(rawupload, "_READ", size)
        assert list(iter_chunks(path, 96)) == node_chunks(data, 96)
        assert list(iter_chunks(path, 5000, 50_000)) == per_line_chunks(data, 5000, 50_000)


def _write(path: Path, *parts: bytes | tuple[bytes, int]) -> None:
    """``path`` made of ``parts``: bytes, or (bytes, n) for the bytes n times, written a MiB at a time."""
    with path.open("wb") as fh:
        for part in parts:
            data, times = part if isinstance(part, tuple) else (part, 1)
            for _ in range(times):
                fh.write(data)


def _peak(run: Callable[[], object]) -> tuple[int, object]:
    tracemalloc.start()
    try:
        result = run()
        return tracemalloc.get_traced_memory()[1], result
    finally:
        tracemalloc.stop()


def _failure(path: Path, budget: int = MAX_REQUEST_BYTES) -> str:
    try:
        list(iter_chunks(path, 5000, budget))
    except PermanentDelivery as exc:
        return str(exc)
    raise AssertionError("no failure")


# The long-line tests run under a budget of 1 MiB (iter_chunks' own ``budget``, MAX_REQUEST_BYTES in the field)
# with 16 MiB lines: 16 budgets long, as 64 MiB is 15 of the field's; what they prove (held: the budget and a
# block, never the line) is the same at a quarter of the bytes to write and read.
LONG_BUDGET = 1 << 20
LONG_MIB = 16


def test_a_long_line_without_a_newline_fails_once_past_the_budget(tmp_path: Path) -> None:
    """The line was held whole and copied with every read (quadratic; 2 GiB for a 1 GiB line): it now
    fails as soon as it is past the request budget, holding about the budget."""
    path = tmp_path / "long.csv"
    _write(path, b"ESIID,USAGE_DATE\n", ROW + b"\n", (b"x" * (1 << 20), LONG_MIB))
    peak, message = _peak(lambda: _failure(path, LONG_BUDGET))
    assert re.search(rf"long\.csv: line 3 is over {LONG_BUDGET} bytes; it cannot fit a raw-upload request",
                     str(message))
    assert peak < 3 * LONG_BUDGET, peak


def test_a_long_blank_line_is_counted_not_kept(tmp_path: Path) -> None:
    """A whitespace-only line (the Node server drops it) may be any length: it is read to its end but not
    kept, and the chunks are those of the file without it; a non-blank byte at its very end fails the file."""
    path, without = tmp_path / "blank.csv", tmp_path / "without.csv"
    head = interval_csv(1, start=date(2026, 12, 3))
    _write(path, head, (b" \t\xc2\xa0" * (1 << 18), LONG_MIB), b"\r\n", ROW + b"\n")
    _write(without, head, ROW + b"\n")
    peak, got = _peak(lambda: list(iter_chunks(path, 5000, LONG_BUDGET)))
    assert got == list(iter_chunks(without, 5000, LONG_BUDGET))
    assert peak < 3 * LONG_BUDGET, peak
    _write(path, head, (b" " * (1 << 20), LONG_MIB), b"\xff\n", ROW + b"\n")
    assert "blank.csv: line 98 is over" in _failure(path, LONG_BUDGET)


class _RewrittenOnceRead:
    """A digest that rewrites ``path`` as soon as it has been fed its first block: the file changes between
    the pass that hashes it and what comes after."""

    def __init__(self, path: Path, new: bytes) -> None:
        self.path, self.new, self.sha = path, new, hashlib.sha256()

    def update(self, data: bytes) -> None:
        self.sha.update(data)
        if self.new:
            self.path.write_bytes(self.new)
            self.new = b""

    def hexdigest(self) -> str:
        return self.sha.hexdigest()


def test_a_file_without_data_lines_is_sent_only_as_the_bytes_hashed(tmp_path: Path) -> None:
    """Such a file goes whole, read a second time: a change in between was sent (and acknowledged) under the
    old file's hash. The second read is checked against the first's hash."""
    path = tmp_path / "empty.csv"
    path.write_bytes(b"ESIID,USAGE_DATE\n  \n")
    assert list(iter_chunks(path, 5000, digest=hashlib.sha256())) == [b"ESIID,USAGE_DATE\n  \n"]
    digest = _RewrittenOnceRead(path, b"ESIID,USAGE_DATX\n  \n")
    with pytest.raises(FileChanged, match=r"empty\.csv: changed while its chunks were being read"):
        list(iter_chunks(path, 5000, digest=digest))  # type: ignore[arg-type]


def test_planning_reads_every_chunk_whatever_see_reads(tmp_path: Path) -> None:
    """``see`` (the post-ingest judge) may stop early: the plan still has every chunk, and the file's hash
    is still checked on all of its bytes."""
    path = tmp_path / "year.csv"
    data = interval_csv(20)
    path.write_bytes(data)
    sha256 = hashlib.sha256(data).hexdigest()
    whole = plan_chunks(path, sha256, 96)
    assert len(whole) == 20  # 20 days of 96 rows
    assert plan_chunks(path, sha256, 96, see=lambda chunks: next(iter(chunks))) == whole


HEADER_LINES = [
    "ESIID,USAGE_DATE,REVISION_DATE,USAGE_START_TIME,USAGE_END_TIME,USAGE_KWH,ESTIMATED_ACTUAL,"
    "CONSUMPTION_SURPLUSGENERATION",
    "ESIID,USAGE_DATE,USAGE_START_TIME,USAGE_KWH", "USAGE_DATE,ESIID,USAGE_START_TIME,USAGE_KWH",
    "ESIID,USAGE_END_TIME,USAGE_KWH,X", "ESIID,DATE,START,END,KWH,Y", ",,,",
]
ODD_DATES = ["", " 12/05/2026 ", "12/31/9999", "13/45/2025", "1/1/0001", "00/00/2026", "2026-12-05", "99/99/2026"]
ODD_LABELS = [" 0:15", "99:99", "", "x", "12:00 PM", "0:00:00", "23:45"]
ESIIDS = ["'10443720000000001", "'10443720000000001", "10443720000000002"]  # two, rows mixed
ODD_ESIIDS = ["10443720000000002", "", "  ", "'", "'1044 "]
ODD_KWH = ["", "x", "1,5", "1e400", " 2 ", "0x10"]


def hostile_chunk(rng: random.Random, edge: date, odd: float) -> bytes:
    """A header and up to 40 rows dated within two days of ``edge``; ``odd``: how often a cell is hostile."""
    header = rng.choice(HEADER_LINES)
    names = header.split(",")
    lines = []
    for _ in range(rng.randrange(0, 40)):
        d = edge + timedelta(days=rng.randrange(-2, 3))
        day = rng.choice([*ODD_DATES, f"{d.month}/{d.day}/{d.year}"]) if rng.random() < odd else d.strftime("%m/%d/%Y")
        label = rng.choice(ODD_LABELS) if rng.random() < odd else f"{rng.randrange(24)}:{rng.choice(('00', '45'))}"
        cells = {"ESIID": rng.choice(ODD_ESIIDS if rng.random() < odd else ESIIDS),
                 "USAGE_KWH": rng.choice(ODD_KWH) if rng.random() < odd else "0.25", "USAGE_DATE": day,
                 "USAGE_START_TIME": label, "USAGE_END_TIME": label}
        cells |= {"DATE": day, "START": label, "END": label, "KWH": cells["USAGE_KWH"]}
        row = [cells.get(name, "A") for name in names]
        if rng.random() < odd / 4:
            row = row[:-1] if rng.random() < 0.5 else [*row, "extra"]
        line = ",".join(row)
        if rng.random() < odd / 10:
            line = rng.choice(['"', ""]) + line + rng.choice(["\r", ""])
        lines.append(line)
    return "\n".join([header, *lines]).encode()


@pytest.mark.parametrize("odd", [0.4, 0.03, 0.005])
def test_rows_left_out_change_no_chunks_kept_esiids(monkeypatch: pytest.MonkeyPatch, odd: float) -> None:
    rng = random.Random(int(odd * 1000))
    compared = 0
    for _ in range(1500):
        monkeypatch.setattr(postingest, "_FIRST_SLICE", rng.choice([1, 2, 5, 96]))  # rows of a kept ESIID skipped
        now = datetime(2026, 12, 7, rng.randrange(24), tzinfo=UTC) + timedelta(days=rng.randrange(-400, 400))
        window = coverage_window(now)
        edge = rng.choice([window.start, window.end, window.start - timedelta(days=1), window.end + timedelta(days=1),
                           window.start - timedelta(days=5), window.end + timedelta(days=5), date(1999, 1, 1),
                           date(2026, 3, 8), date(2026, 11, 1)])
        chunk = hostile_chunk(rng, edge, odd)
        esiid, meter = rng.choice([None, "'10443720000000009"]), rng.choice(["M1", None, " "])
        want = AppModel().ingest(chunk_lines(chunk), esiid, meter, window)[0]
        assert KeptEsiids(esiid=esiid, meter=meter, window=window).kept(chunk) == want, chunk
        compared += 1
    assert compared > 1000


def test_a_far_rows_end_time_still_decides_the_end_columns_role() -> None:
    """A row without a start time takes its instant from its end time, read as a start or an end by the
    chunk's earliest end time: a far row's. Such a chunk is parsed whole, or Y's 0:00 of 12/06 (an end, so
    12/05 23:45 without the far row) would count as kept."""
    window = coverage_window(datetime(2026, 12, 7, 18, tzinfo=UTC))  # to 2026-12-05
    chunk = "\n".join([HEADER_LINES[0], "'10443720000000001,01/01/2020,,,0:00,1,A,C",
                       "'10443720000000001,12/05/2026,,,0:15,1,A,C", "'10443720000000002,12/06/2026,,,0:00,1,A,C",
                       ]).encode()
    want = AppModel().ingest(chunk_lines(chunk), None, "M1", window)[0]
    assert want == {"10443720000000001"}
    assert KeptEsiids(esiid=None, meter="M1", window=window).kept(chunk) == want


def test_an_instant_past_year_9999_is_outside_the_window_not_an_error(tmp_path: Path) -> None:
    """The replay dated every instant (``internal error: ValueError: year 10000 is out of range``); the
    window test compares instants."""
    path = tmp_path / "far_M1.csv"
    path.write_bytes(interval_csv(2, start=date(2026, 12, 3)) + b"'10443720000000001,12/31/9999,,99:00,,1,A,C\n")
    now = datetime(2026, 12, 7, 18, tzinfo=UTC)
    assert plan_post_ingest(iter_chunks(path, 96), esiid=None, meter="M1", now=now) == {2}


def test_an_end_time_past_year_9999_in_a_chunk_without_start_times_is_not_an_error(tmp_path: Path) -> None:
    """Rows without a start time take their instant from the end time, read as a start or an end by the
    chunk's earliest end time's Chicago clock: one in year 10000 raised ValueError (an internal error). It is
    read 400 years earlier (same calendar, same DST rule); the replay dates it ``date.max``, out of any window."""
    path = tmp_path / "far_M1.csv"
    path.write_bytes(b"ESIID,USAGE_DATE,USAGE_END_TIME,USAGE_KWH\n'10443720000000001,12/31/9999,99:00,1\n"
                     b"'10443720000000001,12/05/2026,0:15,1\n")
    now = datetime(2026, 12, 7, 18, tzinfo=UTC)
    assert plan_post_ingest(iter_chunks(path, 96), esiid=None, meter="M1", now=now) == {1}
    window = coverage_window(now)
    assert AppModel().ingest(chunk_lines(path.read_bytes()), None, "M1", window)[0] == {"10443720000000001"}
    far = expect.js_date_utc(9999, 11, 31, 99)
    assert expect.chicago_local(far)[0].strftime("%m-%d %H:%M") == "01-03 21:00"  # 01-04 03:00 UTC, CST
    assert expect.chicago_local(far)[1] == 400
    assert AppModel().day_of(far) == date.max
    assert expect.chicago_date(expect.js_date_utc(10400, 6, 4, 12)) == date.max
    assert expect._chicago_hm(expect.js_date_utc(10400, 6, 4, 12)) == (7, 0)  # CDT, as on 2000-07-04


def _peak_planning(path: Path, now: datetime) -> tuple[int, set[int]]:
    """tracemalloc's peak while one pass plans ``path``'s chunks and their post-ingest chunk."""
    post: set[int] = set()
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    tracemalloc.start()
    try:
        plan_chunks(path, sha256, 5000,
                    see=lambda chunks: post.update(plan_post_ingest(chunks, esiid=None, meter="M1", now=now)))
        return tracemalloc.get_traced_memory()[1], post
    finally:
        tracemalloc.stop()


def test_planning_holds_as_much_for_four_years_as_for_one(tmp_path: Path) -> None:
    now = datetime(2026, 12, 7, 18, tzinfo=UTC)  # the window: 2025-12-06 .. 2026-12-05
    one, four = tmp_path / "one_M1.csv", tmp_path / "four_M1.csv"
    one.write_bytes(interval_csv(365, start=date(2025, 12, 1)))
    four.write_bytes(interval_csv(4 * 365, start=date(2022, 12, 2)))
    peak_one, post_one = _peak_planning(one, now)
    peak_four, post_four = _peak_planning(four, now)
    assert post_one == {8} and post_four == {29}  # each file's last chunk: it keeps days up to 11/30
    assert peak_four - peak_one < 1 << 20, (peak_one, peak_four)


@pytest.mark.parametrize("name", ["a.csv", 'x", "contentBase64": "', "caf\u00e9\u2028.csv", '"contentBase64": ""'])
def test_a_chunks_json_is_json_dumps_byte_for_byte(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """The base64 is put in place without json.dumps scanning it: the bytes must be the same, whatever the
    names hold (a quote in a JSON string is escaped, so the placeholder is found only as the key itself)."""
    monkeypatch.setattr(rawupload, "utc_stamp", lambda: "2026-12-07T18:00:00.000Z")
    rng = random.Random(name)
    for esiid in ("", "10443720000000001", '"contentBase64": ""'):
        meta = rawupload.ChunkMeta(name, esiid, "M1")
        content = rng.randbytes(rng.randrange(0, 3000))
        fields = meta.fields(2, 3, len(content), "ab" * 32, "2026-12-07T18:00:00.000Z", True)
        fields["contentBase64"] = base64.b64encode(content).decode()
        assert meta.json(2, 3, content, "ab" * 32, post=True) == json.dumps(fields).encode()
