"""`make demo`: the main job end to end on loopback, with embedded defaults, no network and no root.

In ./demo-run (recreated each time; ``SMT_DEMO_DIR`` names another, as the test does) it starts the
reference receiver (a stand-in for IntelliWatt's web app as production runs it: `raw-upload` taken, inline
refused, 4.5 MB bodies refused), `smt-watch watch` delivering by raw-upload (`auto` with only
INTELLIWATT_BASE_URL), `smt-watch serve` (the upload server), and an SFTP server in this process standing in
for Smart Meter Texas. Realistic SMT files made by `smt-watch sample` then arrive by the three paths the
droplet has: `cp` into the inbox, `curl` to `/upload`, and an encrypted `.asc` fetched by `smt-watch sync`
(its daily CSV is recorded, not sent: the app's route reads interval CSVs only). It prints a table (file,
path in, sha256, intervals stored, seconds from landing to stored), shows that a copy is a duplicate, that
production refuses inline and that pointing SMT_UPLOAD_URL at `serve` is refused, lists the ledger, and
stops everything.
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
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN = Path(os.environ.get("SMT_DEMO_DIR") or ROOT / "demo-run")
EXE = str(Path(sys.executable).parent / "smt-watch")
sys.path.insert(0, str(ROOT / "tests"))  # the in-process SFTP server the test suite uses


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def step(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m" if sys.stdout.isatty() else f"\n== {title}", flush=True)


def smt(*args: str, env: dict[str, str], quiet: bool = False) -> int:
    print("$ smt-watch " + " ".join(args), flush=True)
    out = subprocess.DEVNULL if quiet else None
    return subprocess.run([EXE, *args], env=env, stdout=out).returncode


def wait_until(condition: object, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: timed out waiting for {what}")
        time.sleep(0.05)


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 (loopback only)
        return json.load(resp)


def up(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=1).close()  # noqa: S310 (loopback only)
        return True
    except OSError:
        return False


def upload(url: str, path: Path, token: str) -> dict[str, object]:
    """`curl -F` as the admin UI does; urllib when curl is missing."""
    headers = {"x-smt-upload-token": token, "x-smt-upload-role": "admin"}
    if shutil.which("curl"):
        cmd = ["curl", "-sS", "-F", f"file=@{path}"] + [a for k, v in headers.items() for a in ("-H", f"{k}: {v}")]
        print("$ " + " ".join(cmd[:4]) + f" -H 'x-smt-upload-token: …' {url}")
        return dict(json.loads(subprocess.run([*cmd, url], check=True, capture_output=True, text=True).stdout))
    boundary = "demo-boundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
            f"Content-Type: text/csv\r\n\r\n").encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(url, data=body, headers={  # noqa: S310 (loopback only)
        "Content-Type": f"multipart/form-data; boundary={boundary}", **headers})
    with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 (loopback only)
        return dict(json.load(resp))


def make_gpg_key(home: Path) -> str:
    """A throwaway key pair standing in for IntelliWatt's SMT decryption key; returns its user id."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    uid = "demo@smt-watch.invalid"
    gpg = ["gpg", "--batch", "--homedir", str(home), "--passphrase", ""]
    subprocess.run([*gpg, "--quick-gen-key", uid, "ed25519", "cert,sign", "never"], check=True, capture_output=True)
    listing = subprocess.run([*gpg, "--with-colons", "--list-keys"], check=True, capture_output=True, text=True)
    fpr = next(line.split(":")[9] for line in listing.stdout.splitlines() if line.startswith("fpr"))
    subprocess.run([*gpg, "--quick-add-key", fpr, "cv25519", "encr", "never"], check=True, capture_output=True)
    return uid


def main() -> int:
    from sftp_server import running_sftp_server, sftp_env

    shutil.rmtree(RUN, ignore_errors=True)
    inbox, state, data, logs, made = (RUN / d for d in ("inbox", "state", "receiver", "logs", "made"))
    for d in (inbox, logs, made):
        d.mkdir(parents=True)
    rport, sport = free_port(), free_port()
    base, upload_server = f"http://127.0.0.1:{rport}", f"http://127.0.0.1:{sport}"
    # Demo-only tokens: the receiver and serve check them exactly as the real services do.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMT_") and k not in (
        "INTELLIWATT_BASE_URL", "ADMIN_TOKEN", "STATE_FILE", "NOTIFY_SOCKET", "GNUPGHOME")}
    env |= {"SMT_LOCAL_DIR": str(inbox), "SMT_STATE_DIR": str(state), "ADMIN_TOKEN": "demo-admin-token",
            "SMT_UPLOAD_TOKEN": "demo-upload-token", "ESIID_DEFAULT": "10443720000000001",
            "SMT_SETTLE_SECONDS": "0.5", "GNUPGHOME": str(RUN / "gnupg"), "SMT_PATTERNS": "*.csv,*.asc,*.zip"}
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str, *args: str, extra: dict[str, str] | None = None) -> None:
        out = (logs / f"{name}.log").open("wb")
        procs.append(subprocess.Popen([EXE, *args], env={**env, **(extra or {})}, stdout=out, stderr=out))

    landed: dict[str, tuple[str, float]] = {}  # ESIID -> (path in, when it landed)
    try:
        step(f"start the reference receiver (stand-in for IntelliWatt) on {base}")
        start("receiver", "receive", "--port", str(rport), "--data", str(data))
        wait_until(lambda: up(f"{base}/_receiver/files"), "the receiver")

        step("start `watch` (INTELLIWATT_BASE_URL only: raw-upload, the web app's production route) and `serve`")
        start("watch", "watch", extra={"INTELLIWATT_BASE_URL": base})
        start("serve", "serve", "--port", str(sport), "--webhook-port", "0")  # not 0.0.0.0:8787 in a demo
        wait_until(lambda: "Watching " in (logs / "watch.log").read_text(), "watch to start")
        wait_until(lambda: up(f"{upload_server}/health"), "serve to start")

        step("make realistic SMT interval files (15-minute reads, DST days, a few estimated reads)")
        cp_file, up_file = made / "IntervalMeterUsage_M1001_2025.csv", made / "IntervalMeterUsage_M2002_q1.csv"
        smt("sample", "--days", "365", "--esiid", "10443720000000001", "-o", str(cp_file), env=env)
        smt("sample", "--days", "90", "--esiid", "10443720000000002", "--start", "2025-01-01", "-o", str(up_file),
            env=env)

        step("path 1: an operator copies a CSV into the inbox (as scp would)")
        shutil.copy(cp_file, inbox / ".incoming.part")
        os.rename(inbox / ".incoming.part", inbox / cp_file.name)
        landed["10443720000000001"] = ("cp", time.time())

        step("path 2: the admin UI uploads a CSV to serve")
        reply = upload(f"{upload_server}/upload", up_file, "demo-upload-token")
        landed["10443720000000002"] = ("curl /upload", time.time())
        print("  serve answered:", json.dumps(reply)[:150], "…")

        expected = 2
        if shutil.which("gpg"):
            step("path 3: SMT publishes an encrypted ZIP (*.CSV.1.asc) on its SFTP server; `sync` fetches it")
            uid = make_gpg_key(Path(env["GNUPGHOME"]))
            asc = made / "IntervalMeterUsage.CSV.1.asc"
            smt("sample", "--days", "30", "--esiid", "10443720000000003", "--start", "2025-10-15",
                "--encrypt-to", uid, "-o", str(asc), env=env)
            with running_sftp_server(RUN / "smt-sftp" / "root", RUN / "smt-sftp" / "keys") as sftp:
                sftp.put("adhocusage/2025/IntervalMeterUsage.CSV.1.asc", asc.read_bytes())
                sync_env = env | sftp_env(sftp, RUN / "smt-sftp" / "known_hosts")
                smt("sync", env=sync_env)
                landed["10443720000000003"] = ("sftp → sync", time.time())
            expected += 1  # the interval CSV inside the ZIP; its daily CSV is recorded `failed`, not sent
        else:
            step("gpg is not installed: skipping path 3 (the encrypted .asc fetched by sync)")

        step("the same bytes again under another name: a duplicate, not delivered twice")
        shutil.copy(cp_file, inbox / "copy_of_2025.csv")

        def rows() -> list[dict[str, object]]:
            return list(get_json(f"{base}/_receiver/files"))  # type: ignore[call-overload]

        wait_until(lambda: len(rows()) == expected and "copy_of_2025.csv" in (logs / "watch.log").read_text(),
                   f"{expected} deliveries", timeout=60)
        intervals: dict[str, int] = dict(get_json(f"{base}/_receiver/intervals"))  # type: ignore[call-overload]

        step("what IntelliWatt received (the reference receiver's RawSmtFile and SmtInterval tables)")
        print(f"  {'file':<52} {'path in':<13} {'sha256':<14} {'intervals stored':>16} {'landed → stored':>16}")
        for row in rows():
            esiid = str(row["esiid"])
            how, when = landed.get(esiid, ("?", 0.0))
            stored = datetime.fromisoformat(str(row["received_at"]).replace("Z", "+00:00")).timestamp()
            count = intervals.get(esiid, 0) if "Interval" in str(row["filename"]) else 0
            print(f"  {row['filename']!s:<52} {how:<13} {str(row['sha256'])[:12]:<14} {count:>16,}"
                  f" {stored - when:>15.2f}s")
        for line in (logs / "watch.log").read_text().splitlines():
            if "Skipping copy_of_2025.csv" in line:
                print("  watch:", line)

        step("the legacy inline route, named: production refuses it (400 INLINE_DISABLED), the row says what to do")
        legacy = made / "adhoc_apr.csv"
        smt("sample", "--days", "30", "--esiid", "10443720000000004", "--start", "2025-04-01", "-o", str(legacy),
            env=env, quiet=True)
        smt("post", str(legacy), env={**env, "INTELLIWATT_BASE_URL": base, "SMT_DELIVERY": "inline"})

        step("the droplet's old SMT_UPLOAD_URL pointing at `serve`: refused (exit 2), nothing sent")
        smt("post", str(legacy), env={**env, "INTELLIWATT_BASE_URL": base, "SMT_UPLOAD_URL": f"{upload_server}/upload"})

        step("`smt-watch post` with INTELLIWATT_BASE_URL only: raw-upload, as the fix says")
        rc = smt("post", str(legacy), env={**env, "INTELLIWATT_BASE_URL": base})

        step("the ledger")
        smt("ledger", "list", env=env)
        print(f"\ndemo files and logs are in {RUN}")
        return rc
    finally:
        if shutil.which("gpgconf") and (RUN / "gnupg").is_dir():  # the agent make_gpg_key started: no leftover
            subprocess.run(["gpgconf", "--homedir", str(RUN / "gnupg"), "--kill", "all"], capture_output=True,
                           timeout=30, check=False)
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    sys.exit(main())
