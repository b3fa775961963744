"""`make demo`: the main job end to end on loopback, with embedded defaults and no network.

Starts the reference receiver (a stand-in for IntelliWatt), `smt-watch watch` and `smt-watch serve`;
drops interval CSVs into the inbox and uploads one through serve, and watch delivers them; shows a
duplicate skipped, a legacy inline `post`, the ledger and what the receiver stored; then stops everything.
Everything lives in ./demo-run (recreated each time), logs in ./demo-run/logs.
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


def wait_until(condition: object, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: timed out waiting for {what}")
        time.sleep(0.1)


def http_json(url: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> object:
    req = urllib.request.Request(url, data=data, headers=headers or {})  # noqa: S310 (loopback only)
    with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 (loopback only)
        return json.load(resp)


def up(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=1).close()  # noqa: S310 (loopback only)
        return True
    except OSError:
        return False


def multipart_body(name: str, content: bytes, boundary: str = "demo-boundary") -> bytes:
    return (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            f"Content-Type: text/csv\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()


def make_gpg_key(home: Path) -> None:
    """A throwaway key pair standing in for IntelliWatt's SMT decryption key."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    subprocess.run(["gpg", "--batch", "--homedir", str(home), "--passphrase", "", "--quick-gen-key",
                    "demo@smt-watch.invalid", "ed25519", "cert,sign", "never"], check=True, capture_output=True)
    fpr = subprocess.run(["gpg", "--batch", "--homedir", str(home), "--with-colons", "--list-keys"],
                         check=True, capture_output=True, text=True).stdout
    fingerprint = next(line.split(":")[9] for line in fpr.splitlines() if line.startswith("fpr"))
    subprocess.run(["gpg", "--batch", "--homedir", str(home), "--passphrase", "", "--quick-add-key", fingerprint,
                    "cv25519", "encr", "never"], check=True, capture_output=True)


def main() -> int:
    shutil.rmtree(RUN, ignore_errors=True)
    inbox, state, data = RUN / "inbox", RUN / "state", RUN / "receiver"
    inbox.mkdir(parents=True)
    rport, sport = free_port(), free_port()
    base, upload_server = f"http://127.0.0.1:{rport}", f"http://127.0.0.1:{sport}"
    # Demo-only tokens: the receiver and serve check them exactly as the real services do.
    env = {
        **os.environ,
        "SMT_LOCAL_DIR": str(inbox),
        "SMT_STATE_DIR": str(state),
        "ADMIN_TOKEN": "demo-admin-token",
        "SMT_UPLOAD_TOKEN": "demo-upload-token",
        "ESIID_DEFAULT": "10443720000000001",
        "SMT_SETTLE_SECONDS": "0.5",
        "GNUPGHOME": str(RUN / "gnupg"),
    }
    for key in ("SMT_UPLOAD_URL", "INTELLIWATT_BASE_URL", "SMT_DELIVERY", "STATE_FILE", "NOTIFY_SOCKET"):
        env.pop(key, None)
    procs: list[subprocess.Popen[bytes]] = []
    logs = RUN / "logs"
    logs.mkdir()

    def start(name: str, *args: str, extra: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        out = (logs / f"{name}.log").open("wb")
        proc = subprocess.Popen([EXE, *args], env={**env, **(extra or {})}, stdout=out, stderr=out)
        procs.append(proc)
        return proc

    try:
        step(f"start the reference receiver (stand-in for IntelliWatt) on {base}")
        start("receiver", "receive", "--port", str(rport), "--data", str(data))
        wait_until(lambda: up(f"{base}/_receiver/files"), "the receiver")

        step("start `smt-watch watch` (multipart to the receiver) and `smt-watch serve` (uploads)")
        start("watch", "watch", extra={"SMT_UPLOAD_URL": f"{base}/upload"})
        start("serve", "serve", "--port", str(sport))
        wait_until(lambda: "Watching " in (logs / "watch.log").read_text(), "watch to start")
        wait_until(lambda: up(f"{upload_server}/health"), "serve to start")

        step("an operator copies two interval CSVs into the inbox (as scp or sync would)")
        interval_csv(inbox / "IntervalMeterUsage_M1001_jan.csv", "10443720000000001", date(2026, 1, 1), 31)
        nested = inbox / "adhocusage" / "2026"
        nested.mkdir(parents=True)
        interval_csv(nested / "IntervalMeterUsage_M1001_feb.csv", "10443720000000001", date(2026, 2, 1), 28)

        step("the admin UI uploads a CSV to serve; it lands in the inbox and watch delivers it")
        content = (RUN / "march.csv")
        interval_csv(content, "10443720000000002", date(2026, 3, 1), 31)
        reply = http_json(f"{upload_server}/upload", multipart_body("IntervalMeterUsage_M2002_mar.csv",
                                                                   content.read_bytes()),
                          {"Content-Type": "multipart/form-data; boundary=demo-boundary",
                           "x-smt-upload-token": "demo-upload-token", "x-smt-upload-role": "admin"})
        print("  serve answered:", json.dumps(reply)[:160], "…")

        step("the same bytes again under another name: a duplicate, not delivered twice")
        shutil.copy(inbox / "IntervalMeterUsage_M1001_jan.csv", inbox / "copy_of_jan.csv")
        expected = 3

        if shutil.which("gpg"):
            step("SMT's real format: a PGP-encrypted ZIP (interval + daily CSV) lands as *.CSV.1.asc")
            make_gpg_key(Path(env["GNUPGHOME"]))
            asc = RUN / "IntervalMeterUsage.CSV.1.asc"
            smt("sample", "--days", "14", "--esiid", "10443720000000003", "--encrypt-to", "demo@smt-watch.invalid",
                "-o", str(asc), env=env)
            os.replace(asc, inbox / asc.name)
            expected += 2
        else:
            step("gpg is not installed: skipping the encrypted .asc part of the demo")

        def delivered() -> int:
            return len(http_json(f"{base}/_receiver/files"))  # type: ignore[arg-type]

        wait_until(lambda: delivered() == expected and "copy_of_jan.csv" in (logs / "watch.log").read_text(),
                   f"{expected} deliveries")
        for line in (logs / "watch.log").read_text().splitlines():
            if "Delivered" in line or "Skipping" in line or "Droplet upload success" in line:
                print("  watch:", line[:150])

        step("legacy inline delivery with `smt-watch post` (INTELLIWATT_BASE_URL only, base64+gzip)")
        c = interval_csv(RUN / "adhoc_apr.csv", "10443720000000002", date(2026, 4, 1), 30)
        rc = smt("post", str(c), env={**env, "INTELLIWATT_BASE_URL": base, "SMT_INLINE_ENCODING": "base64+gzip"})

        step("the web app's production route: raw-upload in chunks of 5,000 lines (a 12-month file)")
        year = RUN / "IntervalMeterUsage_M3003_2025.csv"
        smt("sample", "--days", "365", "--esiid", "10443720000000004", "-o", str(year), env=env)
        rc |= smt("post", "--delivery", "raw-upload", str(year), env={**env, "INTELLIWATT_BASE_URL": base})

        step("the ledger")
        smt("ledger", "list", env=env)

        step("what the receiver stored (RawSmtFile)")
        for row in http_json(f"{base}/_receiver/files"):  # type: ignore[attr-defined]
            print(f"  #{row['id']} {row['filename']:<50} {row['sizeBytes']:>9,} B  route={row['route']:<26}"
                  f"  esiid={row['esiid']}  meter={row['meter']}")
        print(f"\ndemo files and logs are in {RUN}")
        return rc
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    sys.exit(main())
