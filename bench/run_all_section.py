"""Write the ``## run_all and plot`` section of bench/RESULTS.md: when ``bench/run_all`` ran, how long each
step took (the issue-8 budget is 15 minutes on 2 cores), and what ``bench/plot.png`` shows.

Called by ``bench/run_all`` with the timeline it recorded (``<seconds so far>\\t<step name>`` per line).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

from bench_post import machine, update_markdown
from benchlib import revision

SECTION = "## run_all and plot"
BUDGET_S = 15 * 60


def render(steps: list[tuple[int, str]]) -> str:
    total = steps[-1][0]
    lines = [SECTION, ""]
    lines += [
        f"- finished: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}; smt-watch at {revision()}",
        f"- machine: {machine()}",
        "- command: `make bench` (installs `.[test,bench]`, then `bench/run_all`)",
        f"- total: {total // 60} min {total % 60:02d} s for every step below, one after another "
        f"({'within' if total <= BUDGET_S else '**over**'} the 15-minute budget)",
        "",
        "| step | took (s) |",
        "|---|---:|",
    ]
    for (at, name), (after, _) in itertools.pairwise(steps):
        lines.append(f"| {name} | {after - at} |")
    lines += [
        "",
        "![latency and RSS](plot.png)",
        "",
        "`bench/plot.png`, left: land → 2xx latency of `watch` (the latency runs of the watch section, settle",
        "subtracted). Right: peak RSS of `smt-watch post` against file size, 1 MiB … 1 GiB, per mode (raw-upload",
        "included: see `bench/rss_sweep.py`), SMT interval CSVs to `bench/sink.py`, from the same run.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--steps", type=Path, required=True, help="the timeline bench/run_all wrote")
    parser.add_argument("--out", type=Path, required=True, help="RESULTS.md to update")
    args = parser.parse_args(argv)
    steps = []
    for line in args.steps.read_text().splitlines():
        at, _, name = line.partition("\t")
        steps.append((int(at), name))
    if len(steps) < 2:
        raise SystemExit("run_all_section: the timeline has fewer than two steps")
    update_markdown(args.out, render(steps), title=SECTION)
    print(f"wrote section {SECTION!r} of {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.chdir(Path(__file__).resolve().parent.parent)
    sys.exit(main())
