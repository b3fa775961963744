"""What the app's parser keeps (IntelliWatt app/lib/smt/normalize.ts over lib/smt/parseCsv.ts), replayed."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal

from smt_watch.expect import (
    chunk_lines,
    expect,
    expect_inline,
    inline_points,
    js_number,
    normalize_chunk,
    parse_central,
    split_rows,
)
from smt_watch.window import Window

HEADER = "ESIID,USAGE_DATE,REVISION_DATE,USAGE_START_TIME,USAGE_END_TIME,USAGE_KWH,ESTIMATED_ACTUAL," \
    "CONSUMPTION_SURPLUSGENERATION\n"
E = "10443720000000001"
WIDE = Window(date(2020, 1, 1), date(2030, 1, 1))


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


def chunk(*rows: str, header: str = HEADER) -> bytes:
    return (header + "".join(r + "\n" for r in rows)).encode()


def test_labels_become_instants_by_the_fixed_us_rule() -> None:
    assert parse_central("11/02/2025 0:45") == ms("2025-11-02T05:45")  # CDT
    assert parse_central("11/02/2025 1:15") == ms("2025-11-02T06:15")  # the repeated hour: CDT both times
    assert parse_central("11/02/2025 2:00") == ms("2025-11-02T08:00")  # CST
    assert parse_central("03/09/2025 2:15") == ms("2025-03-09T07:15")  # does not exist: same as 1:15 CST
    assert parse_central("3/9/25 1:15 PM") == ms("2025-03-09T18:15")
    assert parse_central("11/02/2025 1:15 CST") == ms("2025-11-02T07:15")  # an explicit zone wins
    assert parse_central("nonsense") is None


def test_numbers_as_javascript_reads_them() -> None:
    assert js_number("0.25") == 0.25 and js_number(" 1e3 ") == 1000.0 and js_number("0x10") == 16.0
    assert js_number("11/02/2025") is None and js_number("Infinity") is None and js_number("1,5") is None


def test_csv_rows_as_the_apps_splitter_cuts_them() -> None:
    assert list(split_rows(['a,"b,c"\r\n', ',\n', '"x""y",z'])) == [["a", "b,c"], ['x"y', "z"]]


def test_consumption_and_surplus_rows_of_a_slot_collide_the_later_wins() -> None:
    out = normalize_chunk([HEADER, f"'{E},01/05/2026,,0:00,0:15,0.5,A,Consumption\n",
                           f"'{E},01/05/2026,,0:00,0:15,0.2,A,SurplusGeneration\n"], None, "M1")
    assert out == {(E, "M1"): {ms("2026-01-05T06:00"): 0.2}}


def test_blank_kwh_is_skipped_and_the_meter_comes_from_the_request() -> None:
    out = normalize_chunk([HEADER, f"'{E},01/05/2026,,0:00,0:15,,,Consumption\n",
                           f"'{E},01/05/2026,,0:15,0:30,0.1,A,Consumption\n"], None, None)
    assert out == {(E, "unknown"): {ms("2026-01-05T06:15"): 0.1}}


def test_a_bom_header_and_the_esiid_fallback() -> None:
    out = normalize_chunk(["\ufeff" + HEADER, ",01/05/2026,,0:00,0:15,0.3,A,Consumption\n"], "'999", "M2")
    assert out == {("999", "M2"): {ms("2026-01-05T06:00"): 0.3}}


def test_an_end_column_alone_is_read_as_interval_ends() -> None:
    header = "ESIID,USAGE_DATE,USAGE_END_TIME,USAGE_KWH\n"
    out = normalize_chunk([header, f"{E},01/05/2026,0:15,0.1\n", f"{E},01/05/2026,0:30,0.2\n"], None, "M1")
    assert sorted(out[(E, "M1")]) == [ms("2026-01-05T06:00"), ms("2026-01-05T06:15")]


def test_a_later_chunk_deletes_its_whole_range_before_inserting() -> None:
    first = chunk(*(f"'{E},01/05/2026,,{h}:00,{h}:15,1.0,A,Consumption" for h in range(6)))
    second = chunk(f"'{E},01/05/2026,,1:00,1:15,2.0,A,Consumption", f"'{E},01/05/2026,,4:00,4:15,2.0,A,Consumption")
    got = expect([first, second], esiid=None, meter="M1", window=WIDE)
    total = got.stored[(E, "M1", date(2026, 1, 5))]
    assert total.count == 4  # 0:00, 1:00 (new), 4:00 (new), 5:00; 2:00 and 3:00 deleted with the range
    assert total.kwh == Decimal("6.00000")


def test_kwh_is_stored_with_five_decimals() -> None:
    got = expect([chunk(f"'{E},01/05/2026,,0:00,0:15,0.123456,A,Consumption")], esiid=None, meter="M1",
                 window=WIDE)
    assert got.stored[(E, "M1", date(2026, 1, 5))].kwh == Decimal("0.12346")


def test_the_window_splits_days_into_stored_newer_and_older() -> None:
    rows = [f"'{E},{d},,12:00,12:15,1,A,Consumption" for d in ("01/04/2026", "01/05/2026", "01/06/2026")]
    got = expect([chunk(*rows)], esiid=None, meter="M1", window=Window(date(2026, 1, 5), date(2026, 1, 5)))
    assert [k[2] for k in got.stored] == [date(2026, 1, 5)]
    assert [k[2] for k in got.newer] == [date(2026, 1, 6)] and [k[2] for k in got.older] == [date(2026, 1, 4)]
    assert got.chunk_esiids == [{E}]


def test_an_inline_file_keeps_every_day_under_one_meter_per_esiid() -> None:
    """The inline route: no window (a file reaching into today is kept whole), one parse of the whole file
    (the later row of a slot wins), then one canonical meter per ESIID (the first that is not ``unknown``)
    and, across meters, the first row of a slot."""
    content = chunk(f"'{E},01/05/2026,,0:00,0:15,0.5,A,Consumption",
                    f"'{E},01/05/2026,,0:00,0:15,0.7,A,Consumption",  # same pair, same slot: later wins
                    f"'{E},01/06/2026,,0:00,0:15,0.1,A,Consumption")
    points = inline_points(chunk_lines(content), None, None)
    assert points == {(E, "unknown"): {ms("2026-01-05T06:00"): Decimal("0.70000"),
                                       ms("2026-01-06T06:00"): Decimal("0.10000")}}
    header = HEADER.replace("ESTIMATED_ACTUAL", "METER")
    two = chunk(f"'{E},01/05/2026,,0:00,0:15,0.5,,Consumption", f"'{E},01/05/2026,,0:00,0:15,0.9,MX,Consumption",
                f"'{E},01/05/2026,,0:15,0:30,0.4,MX,Consumption", header=header)
    assert inline_points(chunk_lines(two), None, None) == {
        (E, "MX"): {ms("2026-01-05T06:00"): Decimal("0.50000"), ms("2026-01-05T06:15"): Decimal("0.40000")}}
    exp = expect_inline(content, esiid=None, meter="M1")
    assert exp.chunks == 1 and not exp.newer and not exp.older and exp.chunk_esiids == [{E}]
    assert {k: (v.count, v.kwh) for k, v in exp.stored.items()} == {
        (E, "M1", date(2026, 1, 5)): (1, Decimal("0.70000")), (E, "M1", date(2026, 1, 6)): (1, Decimal("0.10000"))}
