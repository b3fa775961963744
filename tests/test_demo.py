"""`make demo` must keep working: run the demo script exactly as the Makefile does and check its story."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    started = time.monotonic()
    run_dir = tmp_path / "demo"  # not ./demo-run: a test never writes into the checkout
    proc = subprocess.run([sys.executable, "scripts/demo.py"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "SMT_DEMO_DIR": str(run_dir)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert time.monotonic() - started < 60  # the budget for the newcomer's first command
    out = proc.stdout
    table = {m.group(2): m for m in re.finditer(r"^  (\S+)\s+(cp|curl /upload|sftp → sync)\s+([0-9a-f]{12})\s+"
                                                 r"([\d,]+)\s+([\d.]+)s$", out, re.M)}
    assert set(table) == {"cp", "curl /upload"} | ({"sftp → sync"} if shutil.which("gpg") else set())
    assert table["cp"].group(4) == "35,040"  # a 12-month file: every 15-minute interval stored
    assert table["curl /upload"].group(4) == "8,636"  # Q1 2025: 90 days less the spring-forward hour
    assert "Skipping copy_of_2025.csv: already sent" in out
    assert "INLINE_DISABLED" in out and "use raw-upload" in out  # production refuses inline
    assert "is smt-watch's own serve" in proc.stderr  # SMT_UPLOAD_URL at serve: exit 2
    assert re.search(r"^sent\s+\S+adhoc_apr\.csv\s+sha256:", out, re.M)  # then raw-upload takes it
    assert "Traceback" not in proc.stderr
    assert (run_dir / "state" / "ledger.sqlite3").is_file() and f"demo files and logs are in {run_dir}" in out
