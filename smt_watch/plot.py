"""``smt-watch inspect FILE --plot OUT``: a heatmap of an interval CSV's kWh, what an analyst looks at first.

Rows are days, columns the day's 15-minute slots by the America/Chicago wall clock, daily totals beside.
The grid has :data:`COLUMNS` = 100 columns so that both DST days are drawn where they belong:

- columns 0–7 are 0:00–1:45 and 12–99 are 2:00–23:45 on every day;
- columns 8–11 are the *repeated* 1:00–1:45 of a fall-back day (standard time, the second occurrence of
  those labels in the file); they hold no slot on any other day (:data:`ABSENT`);
- on a spring-forward day the columns of 2:00–2:45 (12–15) name no instant: :data:`ABSENT`, whatever
  SMT put in those rows (it sends them with a blank kWh).

So a fall-back day fills 100 cells, a spring-forward day 92 and any other day 96; the same wall time is in
the same column on every row. Estimated reads and blank readings are marked; a slot without a row is
:data:`MISSING`. :func:`heatmap` is the data behind the picture (tests read it); :func:`draw` needs
matplotlib, an optional extra (``pip install 'smt-watch[plot]'``). Consumption only: surplus-generation
rows are left out, and of a file with several ESIIDs the first (in sorted order) is drawn unless one is named.

Time and memory are bounded by the file, not by the dates it names: the grid holds at most
``SMT_PLOT_MAX_DAYS`` rows (default 800, two years and more: SMT keeps 24 months), the latest days of the
file; rows dated before that window are left out and the summary line says how many. A file dated 1970 and
2026 draws the last 800 days, not 20,000 empty ones. The image is written to a temporary file beside ``OUT``
and renamed over it, so ``OUT`` is never a half-written picture.
"""

from __future__ import annotations

import contextlib
import csv
import os
import tempfile
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Final

from smt_watch.errors import ConfigError, ContentError, SmtWatchError
from smt_watch.hashing import check_regular
from smt_watch.names import shown
from smt_watch.smtcsv import CHICAGO, Placer, classify, clean_esiid, header_fields, wall_slot

if TYPE_CHECKING:
    from smt_watch.config import Settings

COLUMNS: Final = 100
REPEAT_FIRST: Final = 8  # first column of the fall-back day's repeated 1:00–1:45
# What a cell holds.
READ: Final = "read"
ESTIMATED: Final = "estimated"  # a reading SMT marked E
BLANK: Final = "blank"  # a row for a real instant with no kWh
ABSENT: Final = "absent"  # this wall-clock slot does not exist on this day
MISSING: Final = "missing"  # the slot exists but the file has no row for it
FORMATS: Final = (".png", ".svg")
MAX_DAYS: Final = 800  # SMT_PLOT_MAX_DAYS's default: rows of the grid


def column(slot: int, repeated: bool = False) -> int:
    """The grid column of wall-clock ``slot`` (0–95); ``repeated``: the second 1:00–1:45 of a fall-back day."""
    if repeated:
        return REPEAT_FIRST + slot - 4
    return slot if slot < REPEAT_FIRST else slot + 4


def day_kind(day: date) -> str:
    """``regular``, ``fall-back`` (25 hours) or ``spring-forward`` (23 hours) in America/Chicago."""
    start = datetime(day.year, day.month, day.day, tzinfo=CHICAGO)
    end = datetime.combine(day + timedelta(days=1), datetime.min.time(), tzinfo=CHICAGO)
    hours = (end.timestamp() - start.timestamp()) / 3600
    return "regular" if hours == 24 else "fall-back" if hours > 24 else "spring-forward"


def _empty_row(kind: str) -> list[str]:
    cells = [MISSING] * COLUMNS
    if kind != "fall-back":
        cells[REPEAT_FIRST:REPEAT_FIRST + 4] = [ABSENT] * 4
    if kind == "spring-forward":
        cells[column(8):column(12)] = [ABSENT] * 4
    return cells


@dataclass
class Heatmap:
    """The picture's data: ``kwh[i][c]`` and ``cells[i][c]`` for ``days[i]`` and grid column ``c``."""

    file: str
    esiid: str
    days: list[date] = field(default_factory=list)
    kwh: list[list[float | None]] = field(default_factory=list)
    cells: list[list[str]] = field(default_factory=list)
    left_out: int = 0  # rows of the file dated before the drawn window (SMT_PLOT_MAX_DAYS)
    left_out_days: int = 0  # distinct days among them

    @property
    def totals(self) -> list[float]:
        return [sum(v for v in row if v is not None) for row in self.kwh]

    def count(self, kind: str) -> int:
        return sum(row.count(kind) for row in self.cells)


def heatmap(path: Path, esiid: str | None = None, name: str | None = None, max_days: int = MAX_DAYS) -> Heatmap:
    """Read an interval CSV into the grid (see the module docstring): at most ``max_days`` rows, the
    latest; what is dated before them is counted in ``left_out``."""
    name = name or path.name
    with path.open(encoding="utf-8-sig", errors="replace", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, [])
        if classify(header_fields(",".join(header))) != "interval":
            raise ContentError(f"{shown(name)}: not an SMT interval CSV; nothing to plot")
        rows = [r for r in reader if len(r) >= 8 and not r[7].strip().lower().startswith("surplus")]
    esiids = sorted({clean_esiid(r[0]) for r in rows if clean_esiid(r[0])})
    if not esiids:
        raise ContentError(f"{shown(name)}: no consumption reads to plot")
    chosen = esiid or esiids[0]
    if chosen not in esiids:
        raise ContentError(f"{shown(name)}: no ESIID {chosen} (it has {', '.join(esiids)})")
    placer = Placer()
    placed: list[tuple[date, int, float | None, bool]] = []  # day, column, kWh, estimated
    for r in rows:
        if clean_esiid(r[0]) != chosen:
            continue
        day, epoch = placer.place(chosen, r[1], r[3])
        slot = wall_slot(r[3])
        if day is None or slot is None:
            continue
        if epoch is None:
            continue  # a label naming no instant (spring forward): its column stays ABSENT
        repeated = datetime.fromtimestamp(epoch, CHICAGO).fold == 1
        try:
            kwh: float | None = float(r[5])
        except ValueError:
            kwh = None
        placed.append((day, column(slot, repeated), kwh, r[6].strip().upper() == "E"))
    if not placed:
        raise ContentError(f"{shown(name)}: no readable dated rows to plot")
    last = max(p[0] for p in placed)
    first = max(min(p[0] for p in placed), last - timedelta(days=max_days - 1))
    out = Heatmap(file=name, esiid=chosen)
    before = [p for p in placed if p[0] < first]
    if before:
        out.left_out, out.left_out_days = len(before), len({p[0] for p in before})
        placed = [p for p in placed if p[0] >= first]
    index: dict[date, int] = {}
    for n in range((last - first).days + 1):
        day = first + timedelta(days=n)
        index[day] = n
        out.days.append(day)
        out.kwh.append([None] * COLUMNS)
        out.cells.append(_empty_row(day_kind(day)))
    for day, col, kwh, estimated in placed:
        i = index[day]
        out.kwh[i][col] = kwh
        out.cells[i][col] = BLANK if kwh is None else ESTIMATED if estimated else READ
    return out


def draw(data: Heatmap, out: Path) -> None:
    """The heatmap with daily totals beside it, as PNG or SVG (by ``out``'s suffix)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap
        from matplotlib.patches import Patch
    except ImportError as exc:
        raise ConfigError("inspect --plot needs matplotlib: pip install 'smt-watch[plot]'") from exc
    import numpy as np

    n = len(data.days)
    values = np.array([[np.nan if v is None else v for v in row] for row in data.kwh], dtype=float)
    codes = {BLANK: 1, ABSENT: 2, MISSING: 3}
    marks = np.array([[codes.get(c, 0) for c in row] for row in data.cells], dtype=float)
    marks[marks == 0] = np.nan
    height = min(40.0, max(3.0, 1.6 + n * 0.12))
    fig, (ax, bars) = plt.subplots(1, 2, figsize=(12, height), sharey=True,
                                   gridspec_kw={"width_ratios": [5, 1], "wspace": 0.04})
    image = ax.imshow(values, aspect="auto", interpolation="nearest", cmap="viridis")
    # blank: red; absent (no such time that day): light grey; missing row: white with a grey edge
    ax.imshow(marks, aspect="auto", interpolation="nearest",
              cmap=ListedColormap(["#d62728", "#d9d9d9", "#ffffff"]), vmin=1, vmax=3)
    est = [(c, i) for i, row in enumerate(data.cells) for c, kind in enumerate(row) if kind == ESTIMATED]
    if est:
        ax.scatter([c for c, _ in est], [i for _, i in est], marker="x", s=14, c="#ff7f0e", linewidths=1.2)
    ticks = [column(h * 4) for h in range(0, 24, 3)] + [REPEAT_FIRST]
    labels = [f"{h:02d}:00" for h in range(0, 24, 3)] + ["01:00*"]
    ax.set_xticks(ticks, labels, fontsize=8)
    step = max(1, n // 30)
    ax.set_yticks(range(0, n, step), [data.days[i].isoformat() for i in range(0, n, step)], fontsize=8)
    ax.set_xlabel("America/Chicago wall time, 15-minute slots (01:00*: the repeated hour of a fall-back day)")
    # the file's name and ESIID are the sender's: escaped (an ESC is no XML character, an SVG with one does
    # not open) and never mathtext (a "$" in an ESIID made matplotlib raise)
    ax.set_title(shown(f"{data.file}: ESIID {data.esiid}, kWh per 15 minutes"), fontsize=10, loc="left",
                 parse_math=False, usetex=False)
    fig.colorbar(image, ax=bars, fraction=0.25, pad=0.1, label="kWh")
    bars.barh(range(n), data.totals, color="#4c72b0", height=0.8)
    bars.set_xlabel("kWh per day", fontsize=8)
    bars.tick_params(labelsize=8)
    ax.legend(handles=[Patch(color="#ff7f0e", label=f"estimated ({data.count(ESTIMATED)})"),
                       Patch(color="#d62728", label=f"blank ({data.count(BLANK)})"),
                       Patch(color="#d9d9d9", label="no such time that day"),
                       Patch(facecolor="#ffffff", edgecolor="#999999", label=f"no row ({data.count(MISSING)})")],
              loc="upper center", bbox_to_anchor=(0.5, -0.12 if n > 10 else -0.3), ncol=4, fontsize=8, frameon=False)
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)


def draw_atomically(data: Heatmap, out: Path) -> None:
    """:func:`draw` to a temporary file in ``out``'s directory, then rename it over ``out``: a reader never
    sees half a picture, and a failure leaves ``out`` as it was (and no temporary file)."""
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=out.suffix.lower())
    tmp = Path(tmp_name)
    try:
        mask = os.umask(0o022)  # the mode an ordinary open() would give (mkstemp's is 0600); a CLI, one thread
        os.umask(mask)
        os.fchmod(fd, 0o666 & ~mask)
        os.close(fd)
        draw(data, tmp)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def plot_file(settings: Settings, path: Path, out: Path, esiid: str | None = None) -> str:
    """Draw ``path`` (a .csv, or the first interval CSV in a .zip/.asc) to ``out``; returns what was drawn.

    ``path`` must be a regular file, as for ``inspect``: ``/dev/zero`` would be read until memory runs out
    and a FIFO would block for ever."""
    from smt_watch.content import is_container, open_container

    if out.suffix.lower() not in FORMATS:
        raise ConfigError(f"--plot {shown(str(out))}: the file name must end in .png or .svg")
    try:
        check_regular(path)
    except SmtWatchError as exc:
        raise ContentError(shown(str(exc))) from exc
    max_days = settings.plot_max_days
    try:
        if not is_container(path.name):
            data = heatmap(path, esiid, max_days=max_days)
        else:
            with tempfile.TemporaryDirectory(prefix="smt-watch-plot-") as tmp:
                found = None
                for csv_path in open_container(settings, path, Path(tmp)):
                    try:
                        found = heatmap(csv_path, esiid, max_days=max_days)
                        break
                    except ContentError:
                        continue
                if found is None:
                    raise ContentError(f"{shown(path.name)}: no interval CSV inside to plot")
                data = found
    except OSError as exc:
        raise ContentError(f"{shown(str(path))}: cannot read: {exc.strerror}") from exc
    except csv.Error as exc:
        raise ContentError(f"{shown(path.name)}: not a readable CSV: {exc}") from exc
    try:
        draw_atomically(data, out)
    except OSError as exc:
        raise ContentError(f"{shown(str(out))}: cannot write: {exc.strerror}") from exc
    drawn = f"{len(data.days)} day(s) of ESIID {shown(data.esiid)}"
    if data.left_out:
        drawn += (f" (the latest {max_days} days; {data.left_out} row(s) on {data.left_out_days} earlier day(s) "
                  f"left out: SMT_PLOT_MAX_DAYS={max_days})")
    return drawn
