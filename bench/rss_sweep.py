"""Peak RSS of ``smt-watch post`` against file size, per delivery mode: the data for the plot's right panel.

Memory must not grow with file size (issue 2): this runs post on 1 MiB … 1 GiB files to the bench sink and
writes ``{mode: [[size_mib, peak_rss_mib], ...]}`` as JSON.

The files are SMT interval CSVs (``smt-watch sample``'s year of reads, its lines repeated up to the size): the
raw-upload mode refuses any other kind of CSV before sending, as IntelliWatt's route reads interval files only.
raw-upload goes up to ``--raw-max-mib`` (1024 by default, as the others): besides cutting the chunks it picks
the ``postIngest`` chunks by the app's own parser on the rows dated near the app's window (smt_watch/postingest.py),
~40 MB/s of CPU here, so 1 GiB takes about a minute with the sink (it took ~10,000 rows/s before issue 27's fix,
when this stopped at 64 MiB).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_post import MIB, SMT_WATCH, clean_env, run_child
from sink import start_sink_process

SIZES_MIB = (1, 16, 64, 256, 1024)


def interval_file(path: Path, size_mib: int, year: Path) -> None:
    """``size_mib`` MiB (to the line) of interval reads: ``year``'s header, then its data lines over and over."""
    header, _, lines = year.read_bytes().partition(b"\n")
    with path.open("wb") as out:
        out.write(header + b"\n")
        left = size_mib * MIB - len(header) - 1
        while left > 0:
            block = lines if len(lines) <= left else lines[: lines.rfind(b"\n", 0, left) + 1]
            if not block:
                break
            out.write(block)
            left -= len(block)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--max-mib", type=int, default=1024, help="largest file (default 1024)")
    parser.add_argument("--raw-max-mib", type=int, default=1024, help="largest file for raw-upload (default 1024)")
    args = parser.parse_args()
    result: dict[str, list[list[float]]] = {"multipart": [], "inline base64": [], "raw-upload": []}
    with tempfile.TemporaryDirectory(prefix="bench-rss-", dir="/tmp") as tmp, start_sink_process() as port:
        work = Path(tmp)
        year = work / "year.csv"
        subprocess.run([str(SMT_WATCH), "sample", "--days", "365", "-o", str(year)], env=clean_env(), check=True,
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=300)
        for size in (s for s in SIZES_MIB if s <= args.max_mib):
            path = work / f"IntervalMeterUsage_M1_{size}.csv"
            interval_file(path, size, year)
            for mode in (m for m in result if m != "raw-upload" or size <= args.raw_max_mib):
                env = clean_env() | {"SMT_STATE_DIR": str(work / f"state-{mode}-{size}"),
                                     "SMT_LOCAL_DIR": str(work), "SMT_INLINE_MAX_BYTES": str(4 << 30),
                                     # raw-upload's chunks unpaced (the limit is 10 requests/s by default)
                                     "SMT_MAX_REQUESTS_PER_SECOND": "0", "SMT_MAX_IN_FLIGHT": "0"}
                if mode == "multipart":
                    env["SMT_UPLOAD_URL"] = f"http://127.0.0.1:{port}/upload"
                else:
                    env["INTELLIWATT_BASE_URL"] = f"http://127.0.0.1:{port}"
                    env["SMT_DELIVERY"] = "inline" if mode.startswith("inline") else "raw-upload"
                run = run_child([str(SMT_WATCH), "post", str(path)], env)
                if run.returncode != 0:
                    raise SystemExit(f"post {mode} {size} MiB failed: {run.stderr[-500:]}")
                result[mode].append([size, run.maxrss_kib / 1024])
                print(f"{mode:>14} {size:>5} MiB: peak RSS {run.maxrss_kib / 1024:.1f} MiB, {run.seconds:.2f} s",
                      flush=True)
            path.unlink()
    args.output.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
