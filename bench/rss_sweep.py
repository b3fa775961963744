"""Peak RSS of ``smt-watch post`` against file size, per delivery mode: the data for the plot's right panel.

Memory must not grow with file size (issue 2): this runs post on 1 MiB … 1 GiB files to the bench sink and
writes ``{mode: [[size_mib, peak_rss_mib], ...]}`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_post import SMT_WATCH, clean_env, make_file, run_child
from sink import start_sink_process

SIZES_MIB = (1, 16, 64, 256, 1024)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--max-mib", type=int, default=1024)
    args = parser.parse_args()
    result: dict[str, list[list[float]]] = {"multipart": [], "inline base64": [], "raw-upload": []}
    with tempfile.TemporaryDirectory(prefix="bench-rss-", dir="/tmp") as tmp, start_sink_process() as port:
        work = Path(tmp)
        for size in (s for s in SIZES_MIB if s <= args.max_mib):
            path = work / f"IntervalMeterUsage_M1_{size}.csv"
            make_file(path, size, "csv")
            for mode in result:
                env = clean_env() | {"SMT_STATE_DIR": str(work / f"state-{mode}-{size}"),
                                     "SMT_LOCAL_DIR": str(work), "SMT_INLINE_MAX_BYTES": str(4 << 30)}
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
