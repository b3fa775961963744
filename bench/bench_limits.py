"""Benchmark: a backlog drained with the outbound limit at its defaults, and with it off (issue 23 item 13).

The same pool of small SMT CSVs is renamed into the inbox of a fresh ``watch`` (multipart to bench/sink.py,
2 worker threads) twice: with ``SMT_MAX_REQUESTS_PER_SECOND``/``SMT_MAX_IN_FLIGHT`` as shipped, then both 0.
Printed per run: files/s, and the most requests the sink saw start in any one second (by its own log's
arrival times), which the limit must keep at its burst + rate (10 + 10 at the defaults) and which, off, is
what the app would take. Prints only; the lead records the figures in bench/RESULTS.md.

    .venv/bin/python bench/bench_limits.py [--files 300]
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_watch import Bench, CsvMaker, Procs, SinkLog, _terminate, make_pool, measure_drain, note  # not a package
from sink import start_sink_process

from smt_watch.config import load_settings

DEFAULTS = load_settings({"SMT_LOCAL_DIR": "/", "SMT_STATE_DIR": "/"})


def most_in_one_second(times: list[float]) -> int:
    times = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(times):
        while j < len(times) and times[j] < t + 1.0:
            j += 1
        best = max(best, j - i)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--files", type=int, default=300, help="files in the backlog (default 300)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    procs = Procs()
    runs = (
        (f"defaults ({DEFAULTS.max_requests_per_second:g}/s, {DEFAULTS.max_in_flight} in flight)",
         {"SMT_MAX_REQUESTS_PER_SECOND": f"{DEFAULTS.max_requests_per_second:g}",
          "SMT_MAX_IN_FLIGHT": str(DEFAULTS.max_in_flight)}),
        ("off (0, 0)", {"SMT_MAX_REQUESTS_PER_SECOND": "0", "SMT_MAX_IN_FLIGHT": "0"}),
    )
    with tempfile.TemporaryDirectory(prefix="bench-limits-", dir="/tmp") as tmp:
        work = Path(tmp)
        sink_log = work / "sink-requests.tsv"
        try:
            with start_sink_process(log_path=str(sink_log)) as port:
                b = Bench(work, port, SinkLog(sink_log), procs)
                pool = make_pool(b, CsvMaker(), args.files)
                for i, (label, env) in enumerate(runs):
                    start = b.log.poll()
                    drain = measure_drain(b, pool, 2, "thread", extra_env=env, suffix=f"-limits{i}")
                    got = b.log.wait_for(set(pool.keys.values()), start, timeout=1.0, interval=0.05)
                    print(f"{label}: {drain.files} files in {drain.seconds:.2f} s = {drain.rate:.1f} files/s; "
                          f"most requests in one second: {most_in_one_second(list(got.values()))}", flush=True)
        finally:
            procs.stop_all()
            note("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
