"""``smt-watch inspect FILE --plot OUT``: the image is drawn, and the data behind it puts every row, DST days
included, in its wall-clock slot.

Files come from the real ``smt-watch sample`` (the DST days as SMT sends them: 100 rows on the fall-back day,
96 on the spring-forward day with blank kWh where the wall time does not exist). The expected cell of each
row is worked out here from the CSV's own labels and row order, independently of :mod:`smt_watch.plot`.
"""

from __future__ import annotations

import csv
import subprocess
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from smt_watch.plot import ABSENT, BLANK, COLUMNS, ESTIMATED, MISSING, READ, heatmap

FALL_BACK = date(2025, 11, 2)
SPRING_FORWARD = date(2025, 3, 9)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def sample(run_cli: Callable[..., subprocess.CompletedProcess[str]], out: Path, start: str, days: int) -> Path:
    r = run_cli("sample", "-o", str(out), "--days", str(days), "--start", start)
    assert r.returncode == 0, r.stderr
    return out


def rows_of(path: Path, day: date) -> list[list[str]]:
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        next(reader)
        return [r for r in reader if r[1] == f"{day:%m/%d/%Y}"]


def expected_column(label: str, second_time: bool) -> int:
    """100 columns: 0:00–1:45 in 0–7, the repeated 1:00–1:45 in 8–11, 2:00–23:45 in 12–99."""
    hour, minute = map(int, label.split(":"))
    slot = hour * 4 + minute // 15
    if second_time:
        return 8 + slot - 4
    return slot if slot < 8 else slot + 4


@pytest.mark.parametrize("fmt", ["png", "svg"])
def test_fall_back_file_plots_each_of_its_100_rows_in_its_own_slot(run_cli: Callable[..., Any], tmp_path: Path,
                                                                   fmt: str) -> None:
    src = sample(run_cli, tmp_path / "fall.csv", "2025-11-01", 3)
    out = tmp_path / f"fall.{fmt}"
    r = run_cli("inspect", str(src), "--plot", str(out))
    assert r.returncode == 0, r.stderr
    assert "plotted 3 day(s) of ESIID 10443720000000001" in r.stdout
    data = out.read_bytes()
    assert len(data) > 10_000
    assert data.startswith(PNG_MAGIC) if fmt == "png" else b"<svg" in data[:2000]

    grid = heatmap(src)
    assert grid.days == [date(2025, 11, 1), FALL_BACK, date(2025, 11, 3)]
    rows = rows_of(src, FALL_BACK)
    assert len(rows) == 100
    i = grid.days.index(FALL_BACK)
    seen: set[str] = set()
    for row in rows:
        label = row[3]
        col = expected_column(label, second_time=label in seen)
        seen.add(label)
        assert grid.kwh[i][col] == float(row[5]), (label, col)
        assert grid.cells[i][col] == (ESTIMATED if row[6] == "E" else READ)
    assert sum(c in (READ, ESTIMATED) for c in grid.cells[i]) == 100
    # the repeated hour: its own columns, holding the second occurrence of each 1:xx label
    repeats = [r for n, r in enumerate(rows) if r[3] in {x[3] for x in rows[:n]}]
    assert [r[3] for r in repeats] == ["1:00", "1:15", "1:30", "1:45"]
    assert grid.kwh[i][8:12] == [float(r[5]) for r in repeats]
    # the days around it have no such slots, and 96 readings each
    for other in (0, 2):
        assert grid.cells[other][8:12] == [ABSENT] * 4
        assert sum(c in (READ, ESTIMATED) for c in grid.cells[other]) == 96
    assert grid.totals[i] == pytest.approx(sum(float(r[5]) for r in rows))


def test_spring_forward_file_leaves_the_hour_that_does_not_exist_empty(run_cli: Callable[..., Any],
                                                                        tmp_path: Path) -> None:
    src = sample(run_cli, tmp_path / "spring.csv", "2025-03-08", 3)
    out = tmp_path / "spring.png"
    r = run_cli("inspect", str(src), "--plot", str(out), "--json")
    assert r.returncode == 0, r.stderr
    assert out.read_bytes().startswith(PNG_MAGIC) and out.stat().st_size > 10_000
    assert r.stdout.lstrip().startswith("{")  # --json stays parseable: the plot line went to stderr

    grid = heatmap(src)
    i = grid.days.index(SPRING_FORWARD)
    rows = rows_of(src, SPRING_FORWARD)
    assert len(rows) == 96
    for row in rows:
        col = expected_column(row[3], second_time=False)
        if row[3].startswith("2:"):  # 2:00–2:45 name no instant: SMT sends them blank
            assert row[5] == ""
            assert grid.cells[i][col] == ABSENT and grid.kwh[i][col] is None
        else:
            assert grid.kwh[i][col] == float(row[5]), row[3]
    assert grid.cells[i][12:16] == [ABSENT] * 4 and grid.cells[i][8:12] == [ABSENT] * 4
    assert sum(c in (READ, ESTIMATED) for c in grid.cells[i]) == 92
    assert len(grid.cells[i]) == COLUMNS


def test_blank_readings_and_missing_rows_are_marked(tmp_path: Path) -> None:
    src = tmp_path / "holes.csv"
    lines = ["ESIID,USAGE_DATE,REVISION_DATE,USAGE_START_TIME,USAGE_END_TIME,USAGE_KWH,ESTIMATED_ACTUAL,"
             "CONSUMPTION_SURPLUSGENERATION"]
    for slot in range(96):
        if slot == 50:
            continue  # no row at all for 12:30
        h, m = divmod(slot * 15, 60)
        kwh = "" if slot == 40 else f"{slot / 100:.2f}"
        kind = "E" if slot == 60 else "A"
        lines.append(f"'1044,01/05/2026,01/06/2026,{h}:{m:02d},0:00,{kwh},{kind},Consumption")
        lines.append(f"'1044,01/05/2026,01/06/2026,{h}:{m:02d},0:00,9.99,A,Surplus Generation")
    src.write_text("\n".join(lines) + "\n")
    grid = heatmap(src)
    row = grid.cells[0]
    assert row[40 + 4] == BLANK and grid.kwh[0][44] is None
    assert row[50 + 4] == MISSING
    assert row[60 + 4] == ESTIMATED and grid.kwh[0][64] == 0.60
    assert grid.totals[0] == pytest.approx(sum(s / 100 for s in range(96) if s not in (40, 50)))  # no generation


def test_without_matplotlib_it_says_so_in_one_line(
    run_cli: Callable[..., Any], run_cli_process: Callable[..., Any], tmp_path: Path
) -> None:
    """A matplotlib that cannot be imported (a package on PYTHONPATH that raises ImportError, as a missing one
    does): one line naming the extra, exit 2, nothing written. A process: PYTHONPATH is read at its start."""
    fake = tmp_path / "nomatplotlib" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    src = sample(run_cli, tmp_path / "a.csv", "2025-01-01", 1)
    out = tmp_path / "a.png"
    r = run_cli_process("inspect", str(src), "--plot", str(out), env={"PYTHONPATH": str(fake.parent)})
    assert r.returncode == 2
    assert r.stderr == "smt-watch: inspect --plot needs matplotlib: pip install 'smt-watch[plot]'\n"
    assert not out.exists()


def test_a_file_that_is_not_interval_data_is_refused(run_cli: Callable[..., Any], tmp_path: Path) -> None:
    src = tmp_path / "x.csv"
    src.write_text("a,b\n1,2\n")
    r = run_cli("inspect", str(src), "--plot", str(tmp_path / "x.png"))
    assert r.returncode == 1 and "not an SMT interval CSV" in r.stderr
    r = run_cli("inspect", str(src), "--plot", str(tmp_path / "x.jpg"))
    assert r.returncode == 2 and "must end in .png or .svg" in r.stderr
