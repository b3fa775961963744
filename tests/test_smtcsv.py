"""The SMT CSV parser (docs/contract.md §6) on hand-written, real-shaped fixtures.

Fixtures are spelled out here from docs/contract.md §6 (header, apostrophe ESIIDs, both date styles,
``H:MM`` labels with and without a leading space, the day's last interval ending ``0:00``), never produced by
``smt_watch.reference.sample``: the expected UTC instants are worked out by hand, not by the code under test.

America/Chicago in 2025: CST (UTC-6) until 2025-03-09 02:00, CDT (UTC-5) until 2025-11-02 02:00 (when
1:00–1:59 happens twice), then CST again.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from smt_watch.reference import sample
from smt_watch.smtcsv import classify, header_fields, sniff, summarize, summarize_bytes, summarize_file

HEADER = (
    "ESIID,USAGE_DATE,REVISION_DATE,USAGE_START_TIME,USAGE_END_TIME,USAGE_KWH,ESTIMATED_ACTUAL,"
    "CONSUMPTION_SURPLUSGENERATION"
)
ESIID = "10443720000000001"
OTHER_ESIID = "10443720000000002"
JSON_KEYS = [
    "file", "kind", "esiids", "meter", "first_date", "last_date", "rows", "intervals", "blanks", "estimated",
    "gaps", "kwh_consumption", "kwh_generation", "first_start_utc", "last_end_utc",
]

# The 96 start labels of an ordinary day, as SMT writes them: 0:00, 0:15, ... 23:45 (no leading zero).
DAY_LABELS = [f"{h}:{m:02d}" for h in range(24) for m in (0, 15, 30, 45)]
REPEATED = ["1:00", "1:15", "1:30", "1:45"]
# Fall back (2025-11-02): 1:00–1:45 twice, in that order: 100 rows.
FALL_LABELS = DAY_LABELS[:8] + REPEATED + DAY_LABELS[8:]
# Spring forward (2025-03-09): still 96 labels; 2:00–2:45 do not exist and carry a blank kWh.
SPRING_MISSING = ["2:00", "2:15", "2:30", "2:45"]


def rows_for(day: str, labels: list[str], *, esiid: str = ESIID, kwh: str = "0.250", flag: str = "A",
             direction: str = "Consumption", blank: tuple[str, ...] = (), revision: str = "01/02/2026",
             space: bool = False) -> list[str]:
    """One data row per start label; the end label is the next one, the day's last ending ``0:00``."""
    out = []
    for i, start in enumerate(labels):
        end = labels[i + 1] if i + 1 < len(labels) else "0:00"
        value, mark = ("", "") if start in blank else (kwh, flag)
        if space:
            start, end = f" {start}", f" {end}"
        out.append(f"'{esiid},{day},{revision},{start},{end},{value},{mark},{direction}")
    return out


def csv_text(rows: list[str], *, header: str = HEADER, newline: str = "\n") -> str:
    return newline.join([header, *rows]) + newline


def summary_of(rows: list[str], name: str = "IntervalMeterUsage.csv") -> dict[str, Any]:
    return summarize(csv_text(rows).splitlines(keepends=True), name).to_json()


def z(year: int, month: int, day: int, hour: int, minute: int = 0) -> str:
    return f"{year:04d}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:00Z"


def plus(instant: str, slots: int) -> str:
    t = datetime.strptime(instant, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC) + timedelta(minutes=15 * slots)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


# --- a literal file: both date styles, leading-space labels ------------------------------------------

LITERAL = """\
ESIID,USAGE_DATE,REVISION_DATE,USAGE_START_TIME,USAGE_END_TIME,USAGE_KWH,ESTIMATED_ACTUAL,CONSUMPTION_SURPLUSGENERATION
'10443720000000001,1/5/2025,1/6/2025,0:00,0:15,0.100,A,Consumption
'10443720000000001,1/5/2025,1/6/2025, 0:15, 0:30,0.200,A,Consumption
'10443720000000001,1/5/2025,1/6/2025, 0:30, 0:45,0.300,E,Consumption
'10443720000000001,1/5/2025,1/6/2025, 0:45, 1:00,0.400,A,Consumption
'10443720000000001,01/06/2025,01/07/2025,23:30,23:45,1.000,A,Consumption
'10443720000000001,01/06/2025,01/07/2025,23:45,0:00,2.000,A,Consumption
"""


def test_literal_file_both_date_styles_and_leading_space_times() -> None:
    got = summarize(LITERAL.splitlines(keepends=True), "IntervalMeterUsage_M7.csv").to_json()
    assert list(got) == JSON_KEYS
    assert got == {
        "file": "IntervalMeterUsage_M7.csv", "kind": "interval", "esiids": [ESIID], "meter": "M7",
        "first_date": "2025-01-05", "last_date": "2025-01-06", "rows": 6, "intervals": 6, "blanks": 0,
        "estimated": 1,
        # 1/5 0:45 CST (06:45Z) to 1/6 23:30 CST (1/7 05:30Z): 187 slots apart, so 186 missing between.
        "gaps": 186,
        "kwh_consumption": 4.0, "kwh_generation": 0.0,
        "first_start_utc": "2025-01-05T06:00:00Z", "last_end_utc": "2025-01-07T06:00:00Z",
    }


@pytest.mark.parametrize("day", ["7/4/2025", "07/04/2025"])
@pytest.mark.parametrize("space", [False, True])
def test_ordinary_summer_day(day: str, space: bool) -> None:
    got = summary_of(rows_for(day, DAY_LABELS, space=space))
    assert (got["rows"], got["intervals"], got["blanks"], got["gaps"]) == (96, 96, 0, 0)
    assert (got["first_date"], got["last_date"]) == ("2025-07-04", "2025-07-04")
    # CDT: local midnight is 05:00Z; the day ends at the next local midnight, 24 h later.
    assert (got["first_start_utc"], got["last_end_utc"]) == (z(2025, 7, 4, 5), z(2025, 7, 5, 5))
    assert got["kwh_consumption"] == pytest.approx(24.0)


@pytest.mark.parametrize("day", ["1/15/2025", "01/15/2025"])
def test_ordinary_winter_day(day: str) -> None:
    got = summary_of(rows_for(day, DAY_LABELS))
    assert (got["rows"], got["intervals"], got["gaps"]) == (96, 96, 0)
    assert (got["first_start_utc"], got["last_end_utc"]) == (z(2025, 1, 15, 6), z(2025, 1, 16, 6))


# --- DST ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("day", ["11/2/2025", "11/02/2025"])
def test_fall_back_day_is_100_consecutive_slots(day: str) -> None:
    rows = rows_for(day, FALL_LABELS, space=True)
    assert len(rows) == 100
    got = summary_of(rows)
    assert (got["rows"], got["intervals"], got["blanks"], got["gaps"]) == (100, 100, 0, 0)
    assert got["kwh_consumption"] == pytest.approx(25.0)
    # Midnight CDT = 05:00Z; the next midnight is CST = 06:00Z: 25 hours, 100 slots.
    assert (got["first_start_utc"], got["last_end_utc"]) == (z(2025, 11, 2, 5), z(2025, 11, 3, 6))


def test_fall_back_day_each_row_lands_on_its_own_utc_slot() -> None:
    """The first k rows end exactly k slots after 05:00Z, for every k: no collision, no loss."""
    rows = rows_for("11/2/2025", FALL_LABELS)
    for k in range(1, 101):
        got = summary_of(rows[:k])
        assert got["first_start_utc"] == z(2025, 11, 2, 5)
        assert got["last_end_utc"] == plus(z(2025, 11, 2, 5), k), f"first {k} rows ({rows[k - 1]})"
        assert got["gaps"] == 0


def test_fall_back_first_and_second_one_oclock() -> None:
    rows = rows_for("11/2/2025", FALL_LABELS)
    first_one, second_one = rows[4], rows[8]
    assert ",1:00," in first_one and ",1:00," in second_one
    # Row order decides: the first 1:00 is CDT (06:00Z), the second CST (07:00Z).
    assert summary_of(rows[:5])["last_end_utc"] == "2025-11-02T06:15:00Z"
    assert summary_of(rows[:9])["last_end_utc"] == "2025-11-02T07:15:00Z"
    assert summary_of(rows[8:])["first_start_utc"] == "2025-11-02T06:00:00Z"  # alone, a 1:00 is the first one
    # The last four labels of the repeated hour (second 1:45 = 07:45Z) then 2:00 CST = 08:00Z.
    assert summary_of(rows[:12])["last_end_utc"] == "2025-11-02T08:00:00Z"
    assert summary_of(rows[:13])["last_end_utc"] == "2025-11-02T08:15:00Z"


def test_fall_back_day_without_the_repeated_hour_has_four_gaps() -> None:
    got = summary_of(rows_for("11/2/2025", DAY_LABELS))  # 96 rows: SMT sent the hour only once
    assert (got["rows"], got["intervals"], got["gaps"]) == (96, 96, 4)
    assert got["last_end_utc"] == z(2025, 11, 3, 6)


@pytest.mark.parametrize("day", ["3/9/2025", "03/09/2025"])
def test_spring_forward_day_keeps_96_rows_with_four_blanks(day: str) -> None:
    rows = rows_for(day, DAY_LABELS, blank=tuple(SPRING_MISSING), space=True)
    assert len(rows) == 96
    got = summary_of(rows)
    assert (got["rows"], got["intervals"], got["blanks"], got["gaps"], got["estimated"]) == (96, 92, 4, 0, 0)
    assert got["kwh_consumption"] == pytest.approx(23.0)
    # Midnight CST = 06:00Z; the next midnight is CDT = 05:00Z: 23 hours, 92 slots.
    assert (got["first_start_utc"], got["last_end_utc"]) == (z(2025, 3, 9, 6), z(2025, 3, 10, 5))


def test_spring_forward_day_each_row_lands_on_its_own_utc_slot() -> None:
    rows = rows_for("3/9/2025", DAY_LABELS, blank=tuple(SPRING_MISSING))
    start = z(2025, 3, 9, 6)
    for k in range(1, 97):
        got = summary_of(rows[:k])
        # 0:00–1:45 CST are slots 0..7; the four blank 2:xx rows have no instant; 3:00 CDT = 08:00Z follows.
        expected = plus(start, min(k, 8) if k <= 12 else k - 4)
        assert got["last_end_utc"] == expected, f"first {k} rows ({rows[k - 1]})"
        assert got["gaps"] == 0
    assert summary_of(rows[:13])["last_end_utc"] == "2025-03-09T08:15:00Z"  # 3:00 CDT starts at 08:00Z


def test_days_around_both_transitions_are_contiguous() -> None:
    fall = (rows_for("11/1/2025", DAY_LABELS) + rows_for("11/2/2025", FALL_LABELS)
            + rows_for("11/3/2025", DAY_LABELS))
    got = summary_of(fall)
    assert (got["rows"], got["intervals"], got["gaps"]) == (292, 292, 0)
    assert (got["first_start_utc"], got["last_end_utc"]) == (z(2025, 11, 1, 5), z(2025, 11, 4, 6))
    assert plus(got["first_start_utc"], 292) == got["last_end_utc"]

    spring = (rows_for("03/08/2025", DAY_LABELS) + rows_for("03/09/2025", DAY_LABELS, blank=tuple(SPRING_MISSING))
              + rows_for("03/10/2025", DAY_LABELS))
    got = summary_of(spring)
    assert (got["rows"], got["intervals"], got["blanks"], got["gaps"]) == (288, 284, 4, 0)
    assert (got["first_start_utc"], got["last_end_utc"]) == (z(2025, 3, 8, 6), z(2025, 3, 11, 5))
    assert plus(got["first_start_utc"], 284) == got["last_end_utc"]


# --- generation, encodings, gaps, estimates, several ESIIDs ------------------------------------------


def test_surplus_generation_rows_are_totalled_apart() -> None:
    rows = []
    for i, (cons, gen) in enumerate(zip(rows_for("11/2/2025", FALL_LABELS, kwh="0.500"),
                                        rows_for("11/2/2025", FALL_LABELS, kwh="0.125",
                                                 direction="Surplus Generation"), strict=True)):
        rows += [cons, gen] if i % 2 else [gen, cons]  # interleaved, in either order
    got = summary_of(rows)
    assert (got["rows"], got["intervals"], got["gaps"]) == (200, 200, 0)
    assert got["kwh_consumption"] == pytest.approx(50.0)
    assert got["kwh_generation"] == pytest.approx(12.5)
    assert (got["first_start_utc"], got["last_end_utc"]) == (z(2025, 11, 2, 5), z(2025, 11, 3, 6))


def test_crlf_bom_and_untidy_header(tmp_path: Path) -> None:
    header = '\ufeffesiid , Usage_Date,revision_date ,"usage_start_time", USAGE_END_TIME,usage_kwh,' \
             'Estimated_Actual ,consumption_surplusgeneration  '
    rows = rows_for("3/9/2025", DAY_LABELS, blank=tuple(SPRING_MISSING), space=True)
    path = tmp_path / "IntervalMeterUsage_M12.csv"
    path.write_bytes(csv_text(rows, header=header, newline="\r\n").encode())
    assert path.read_bytes().startswith(b"\xef\xbb\xbfesiid ,")
    got = summarize_file(path).to_json()
    assert got["kind"] == "interval" and got["meter"] == "M12" and got["esiids"] == [ESIID]
    assert (got["rows"], got["intervals"], got["blanks"], got["gaps"]) == (96, 92, 4, 0)
    assert (got["first_start_utc"], got["last_end_utc"]) == (z(2025, 3, 9, 6), z(2025, 3, 10, 5))
    assert summarize_bytes(path.read_bytes(), path.name).to_json() == got
    found = sniff(path)
    assert (found.kind, found.esiids) == ("interval", frozenset({ESIID}))


def test_header_normalisation_and_kinds() -> None:
    assert classify(header_fields(HEADER + "\r\n")) == "interval"
    assert classify(header_fields("\ufeff" + HEADER.lower().replace(",", " , "))) == "interval"
    assert classify(header_fields(HEADER + ",EXTRA_COLUMN")) == "interval"
    assert classify(header_fields("ESIID,USAGE_DATE,ACTUAL_KWH")) == "smt-other"
    assert classify(header_fields("METER_ID, esiid ,READ")) == "smt-other"
    assert classify(header_fields("date,kwh")) == "other"
    assert classify(header_fields("")) == "other"


def test_a_missing_hour_is_four_gaps() -> None:
    labels = [label for label in DAY_LABELS if not label.startswith("13:")]
    got = summary_of(rows_for("7/4/2025", labels))
    assert (got["rows"], got["intervals"], got["gaps"]) == (92, 92, 4)
    assert (got["first_start_utc"], got["last_end_utc"]) == (z(2025, 7, 4, 5), z(2025, 7, 5, 5))


def test_gaps_single_slot_and_across_midnight() -> None:
    one = [label for label in DAY_LABELS if label != "9:15"]
    got = summary_of(rows_for("7/4/2025", one))
    assert got["gaps"] == 1
    # 7/4 ends at 23:00 (four slots short), 7/5 starts at 0:30 (two slots late): six missing slots.
    got = summary_of(rows_for("7/4/2025", DAY_LABELS[:-4]) + rows_for("7/5/2025", DAY_LABELS[2:]))
    assert (got["rows"], got["gaps"]) == (186, 6)


def test_estimated_and_blank_counts() -> None:
    rows = rows_for("7/4/2025", DAY_LABELS[:10]) + rows_for("7/4/2025", DAY_LABELS[10:13], flag="E")
    rows += rows_for("7/4/2025", DAY_LABELS[13:15], blank=tuple(DAY_LABELS[13:15]))
    got = summary_of(rows)
    assert (got["rows"], got["intervals"], got["blanks"], got["estimated"], got["gaps"]) == (15, 13, 2, 3, 0)
    assert got["kwh_consumption"] == pytest.approx(13 * 0.25)


def test_several_esiids_are_separate_series(tmp_path: Path) -> None:
    a = rows_for("11/2/2025", FALL_LABELS, esiid=ESIID)
    b = rows_for("11/2/2025", FALL_LABELS, esiid=OTHER_ESIID)
    interleaved = [row for pair in zip(a, b, strict=True) for row in pair]
    got = summary_of(interleaved)
    assert got["esiids"] == [ESIID, OTHER_ESIID]
    assert (got["rows"], got["intervals"], got["gaps"]) == (200, 200, 0)
    path = tmp_path / "two.csv"
    path.write_text(csv_text(interleaved))
    assert sniff(path).esiids == frozenset({ESIID, OTHER_ESIID})


def test_smt_other_billing_file(tmp_path: Path) -> None:
    text = (
        "ESIID,USAGE_DATE,REVISION_DATE,ACTUAL_KWH,ESTIMATED_KWH,METER_START,METER_END\r\n"
        "'10443720000000001,11/01/2025,11/02/2025,21.5,0,1000,1021.5\r\n"
        "'10443720000000001,11/02/2025,11/03/2025,23.0,0,1021.5,1044.5\r\n"
        "\r\n"
    )
    path = tmp_path / "DailyMeterUsage_M3.csv"
    path.write_bytes(text.encode())
    got = summarize_file(path).to_json()
    assert list(got) == JSON_KEYS
    assert (got["kind"], got["esiids"], got["rows"], got["meter"]) == ("smt-other", [ESIID], 2, "M3")
    assert got["intervals"] == 0 and got["first_start_utc"] is None
    assert (sniff(path).kind, sniff(path).esiids) == ("smt-other", frozenset({ESIID}))


def test_smt_other_with_esiid_not_first(tmp_path: Path) -> None:
    path = tmp_path / "billing.csv"
    path.write_text('METER,ESIID,KWH\nM1,"\'10443720000000002",5\nM1,\'10443720000000002,6\n')
    assert (sniff(path).kind, sniff(path).esiids) == ("smt-other", frozenset({OTHER_ESIID}))
    assert summarize_file(path).esiids == [OTHER_ESIID]


def test_other_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.csv"
    path.write_text("date,kwh\n2025-01-01,3\n")
    got = summarize_file(path).to_json()
    assert (got["kind"], got["esiids"], got["meter"]) == ("other", [], None)
    assert (sniff(path).kind, sniff(path).esiids) == ("other", frozenset())
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    assert summarize_file(empty).kind == "other" and sniff(empty).kind == "other"


def test_header_only_interval_file() -> None:
    got = summary_of([])
    assert got["kind"] == "interval"
    assert (got["rows"], got["intervals"], got["first_date"], got["first_start_utc"]) == (0, 0, None, None)


def test_meter_comes_from_the_name() -> None:
    rows = rows_for("7/4/2025", DAY_LABELS[:2])
    assert summary_of(rows, "IntervalMeterUsage_M42_x_M7.csv")["meter"] == "M42"
    assert summary_of(rows, "IntervalMeterUsage.csv")["meter"] is None


def test_summarize_streams_from_any_iterable() -> None:
    """One pass over a generator: nothing needs the whole file in memory or a second look."""
    def lines() -> Iterator[str]:
        yield HEADER + "\n"
        for n in range(30):
            day = date(2025, 10, 20) + timedelta(days=n)
            labels = FALL_LABELS if day == date(2025, 11, 2) else DAY_LABELS
            for row in rows_for(f"{day.month}/{day.day}/{day.year}", labels):
                yield row + "\n"

    got = summarize(lines(), "x.csv")
    assert (got.rows, got.intervals, got.gaps) == (30 * 96 + 4, 30 * 96 + 4, 0)
    assert (got.first_start_utc, got.last_end_utc) == (z(2025, 10, 20, 5), z(2025, 11, 19, 6))


# --- the sample generator ----------------------------------------------------------------------------


def _day_of(data: bytes, mmddyyyy: str) -> list[str]:
    return [line for line in data.decode().splitlines()[1:] if line.split(",")[1] == mmddyyyy]


def test_sample_year_is_35040_intervals_without_gaps() -> None:
    data = sample.interval_csv(365)
    assert data == sample.interval_csv(365)  # seeded: same arguments, same bytes
    got = summarize_bytes(data, "IntervalMeterUsage.csv").to_json()
    assert got["kind"] == "interval" and got["esiids"] == [sample.DEFAULT_ESIID]
    assert (got["rows"], got["intervals"], got["blanks"], got["gaps"]) == (35044, 35040, 4, 0)
    assert (got["first_date"], got["last_date"]) == ("2025-01-01", "2025-12-31")
    assert (got["first_start_utc"], got["last_end_utc"]) == (z(2025, 1, 1, 6), z(2026, 1, 1, 6))
    assert 0 < got["estimated"] < 35040 * 0.05

    spring = _day_of(data, "03/09/2025")
    assert len(spring) == 96
    assert [r.split(",")[3] for r in spring if r.split(",")[5] == ""] == SPRING_MISSING
    fall = _day_of(data, "11/02/2025")
    assert [r.split(",")[3] for r in fall] == FALL_LABELS
    assert len(_day_of(data, "07/04/2025")) == 96
    header = HEADER + "\n"
    s = summarize_bytes((header + "\n".join(spring) + "\n").encode(), "s.csv")
    assert (s.rows, s.intervals, s.blanks, s.gaps) == (96, 92, 4, 0)
    assert (s.first_start_utc, s.last_end_utc) == (z(2025, 3, 9, 6), z(2025, 3, 10, 5))
    f = summarize_bytes((header + "\n".join(fall) + "\n").encode(), "f.csv")
    assert (f.rows, f.intervals, f.gaps) == (100, 100, 0)
    assert (f.first_start_utc, f.last_end_utc) == (z(2025, 11, 2, 5), z(2025, 11, 3, 6))


def test_sample_rows_look_like_smt() -> None:
    lines = sample.interval_csv(2, esiid="10400000000000077", start=date(2025, 6, 1)).decode().splitlines()
    assert lines[0] == HEADER
    assert lines[1].startswith("'10400000000000077,06/01/2025,06/02/2025,0:00,0:15,")
    assert lines[96].split(",")[3:5] == ["23:45", "0:00"]
    assert len(lines) == 1 + 2 * 96
