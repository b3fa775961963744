"""Plot the figures ``bench/run_all`` collects: delivery latency distribution, and post's RSS vs file size.

Reads the JSON files run_all writes (``--latency`` from ``bench_watch.py --samples``, ``--rss`` from
run_all's own size sweep) and writes one PNG with two panels. matplotlib is only needed here
(``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--latency", type=Path, required=True)
    parser.add_argument("--rss", type=Path, required=True)
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    latency: dict[str, list[float]] = json.loads(args.latency.read_text())
    rss: dict[str, list[list[float]]] = json.loads(args.rss.read_text())
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for settle, seconds in sorted(latency.items()):
        ms = sorted((s - float(settle)) * 1000 for s in seconds)
        frac = [(i + 1) / len(ms) for i in range(len(ms))]
        left.step(ms, frac, where="post", label=f"SMT_SETTLE_SECONDS={settle} ({len(ms)} files)")
    left.set_xlabel("land → 2xx, minus the settle time (ms)")
    left.set_ylabel("fraction of files")
    left.set_title("watch: delivery latency (CDF)")
    left.axvline(50, color="grey", linestyle=":", linewidth=1)
    left.axvline(250, color="grey", linestyle="--", linewidth=1)
    left.legend(loc="lower right", fontsize=8)
    left.grid(alpha=0.3)
    for label, points in sorted(rss.items()):
        xs, ys = zip(*sorted(points), strict=True)
        right.plot(xs, ys, marker="o", label=label)
    right.set_xscale("log", base=2)
    right.set_xlabel("file size (MiB)")
    right.set_ylabel("peak RSS (MiB)")
    right.set_title("post: peak RSS vs file size")
    right.axhline(64, color="grey", linestyle="--", linewidth=1)
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
