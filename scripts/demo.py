"""`make demo`: the main job end to end on loopback, with embedded defaults and no network.

Starts the reference receiver, writes a few SMT-shaped interval CSVs into a demo inbox, delivers them
with `smt-watch post` by multipart and by inline JSON (base64 and base64+gzip), shows that a repeat is a
duplicate, prints the ledger and what the receiver stored, then stops the receiver. Everything lives in
./demo-run (recreated each time).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import date, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "demo-run"
EXE = str(Path(sys.executable).parent / "smt-watch")
HEADER = (
    "ESIID,USAGE_DATE,REVISION_DATE,USAGE_START_TIME,USAGE_END_TIME,USAGE_KWH,ESTIMATED_ACTUAL,"
    "CONSUMPTION_SURPLUSGENERATION"
)


def interval_csv(path: Path, esiid: str, start: date, days: int) -> Path:
    """A plain SMT interval CSV: 96 fifteen-minute reads a day (no DST days in the demo range)."""
    lines = [HEADER]
    for d in range(days):
        day = start + timedelta(days=d)
        for i in range(96):
            begin, end = i * 15, (i + 1) * 15
            kwh = 0.2 + ((i * 37 + d * 11) % 50) / 100
            lines.append(
                f"'{esiid},{day:%m/%d/%Y},{day + timedelta(days=1):%m/%d/%Y},{begin // 60}:{begin % 60:02d},"
                f"{end // 60 % 24}:{end % 60:02d},{kwh:.3f},A,Consumption"
            )
    path.write_text("\n".join(lines) + "\n")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def step(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m" if sys.stdout.isatty() else f"\n== {title}", flush=True)


def smt(*args: str, env: dict[str, str]) -> int:
    print("$ smt-watch " + " ".join(args), flush=True)
    return subprocess.run([EXE, *args], env=env).returncode


def main() -> int:
    shutil.rmtree(RUN, ignore_errors=True)
    inbox, state, data = RUN / "inbox", RUN / "state", RUN / "receiver"
    inbox.mkdir(parents=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # Demo-only tokens: the receiver checks them exactly as the real services do.
    env = {
        **os.environ,
        "SMT_LOCAL_DIR": str(inbox),
        "SMT_STATE_DIR": str(state),
        "ADMIN_TOKEN": "demo-admin-token",
        "SMT_UPLOAD_TOKEN": "demo-upload-token",
        "ESIID_DEFAULT": "10443720000000001",
    }
    for key in ("SMT_UPLOAD_URL", "INTELLIWATT_BASE_URL", "SMT_DELIVERY", "STATE_FILE"):
        env.pop(key, None)

    step(f"start the reference receiver on {base}")
    receiver = subprocess.Popen([EXE, "receive", "--port", str(port), "--data", str(data)], env=env)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"{base}/_receiver/files", timeout=1).close()  # noqa: S310 (loopback)
                break
            except OSError:
                if time.monotonic() > deadline or receiver.poll() is not None:
                    print("receiver did not start", file=sys.stderr)
                    return 1
                time.sleep(0.1)

        step("write three interval CSVs into the inbox")
        a = interval_csv(inbox / "IntervalMeterUsage_M1001_jan.csv", "10443720000000001", date(2026, 1, 1), 31)
        b = interval_csv(inbox / "IntervalMeterUsage_M1001_feb.csv", "10443720000000001", date(2026, 2, 1), 28)
        c = interval_csv(inbox / "adhoc_apr.csv", "10443720000000002", date(2026, 4, 1), 30)
        for f in (a, b, c):
            print(f"  {f.name}  {f.stat().st_size:,} bytes")

        step("multipart delivery (SMT_UPLOAD_URL set: the droplet upload server path)")
        rc = smt("post", str(a), str(b), env={**env, "SMT_UPLOAD_URL": f"{base}/upload"})

        step("inline delivery (only INTELLIWATT_BASE_URL set: the legacy /api/admin/smt/pull path, gzip)")
        rc |= smt("post", str(c), env={**env, "INTELLIWATT_BASE_URL": base, "SMT_INLINE_ENCODING": "base64+gzip"})

        step("post everything again: the ledger knows these bytes, nothing is re-sent")
        rc |= smt("post", str(a), str(b), str(c), env={**env, "SMT_UPLOAD_URL": f"{base}/upload"})

        step("the ledger")
        smt("ledger", "list", env=env)

        step("what the receiver stored (RawSmtFile)")
        with urllib.request.urlopen(f"{base}/_receiver/files", timeout=5) as resp:  # noqa: S310 (loopback)
            for row in json.load(resp):
                print(f"  #{row['id']} {row['filename']:<36} {row['sizeBytes']:>9,} B  route={row['route']}"
                      f"  esiid={row['esiid']}  meter={row['meter']}")
        print(f"\ndemo files are in {RUN}")
        return rc
    finally:
        receiver.send_signal(signal.SIGTERM)
        receiver.wait(timeout=15)


if __name__ == "__main__":
    sys.exit(main())
