"""`make demo` must keep working: run the demo script exactly as the Makefile does and check its story."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_end_to_end() -> None:
    proc = subprocess.run([sys.executable, "scripts/demo.py"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    encrypted = shutil.which("gpg") is not None
    assert out.count("watch: [INFO] Delivered ") == 3 + 2 * encrypted
    assert "Skipping copy_of_jan.csv: already sent" in out
    assert '"duplicate": false' in out  # serve's 202 reply
    # All three delivery paths are in the receiver's table.
    assert out.count("route=/upload ") == 3 + 2 * encrypted
    assert out.count("route=/api/admin/smt/pull ") == 1
    assert out.count("route=/api/admin/smt/raw-upload ") == 1
    assert "Traceback" not in proc.stderr
