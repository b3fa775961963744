"""`make demo`: the main job end to end on loopback, with embedded defaults, no network and no root.

In ./demo-run (recreated each time; ``SMT_DEMO_DIR`` names another, as the test does) it starts the
reference receiver (a stand-in for IntelliWatt's web app as production runs it: `raw-upload` taken, inline
refused, 4.5 MB bodies refused), `smt-watch watch` delivering by raw-upload (`auto` with only
INTELLIWATT_BASE_URL), `smt-watch serve` (the upload server), and an SFTP server in this process standing in
for Smart Meter Texas. Realistic SMT files made by `smt-watch sample` then arrive by the three paths the
droplet has: `cp` into the inbox, `curl` to `/upload`, and an encrypted `.asc` fetched by `smt-watch sync`
(its daily CSV is recorded, not sent: the app's route reads interval CSVs only). It prints a table (file,
path in, sha256, intervals the app keeps, seconds from landing to stored), shows that a copy is a duplicate,
that production refuses inline and that pointing SMT_UPLOAD_URL at `serve` is refused.

Then `watch`'s automatic `verify` asks the app's read routes what it holds (issue 26): the year file is
`stored`; a daily file reaching into yesterday is `outside window` (the app keeps only days up to today
minus two, America/Chicago).
"Two days later" the receiver and `watch` are restarted with their clocks moved forward by libfaketime (both
sides read the wall clock, as in production; no clock setting exists in smt-watch): `watch` re-sends just
the dropped day's rows, checks again, and `verify` agrees: `stored`. Without libfaketime installed that part
is skipped, as the `.asc` path is without gpg. The files are dated relative to today, so the app's window
keeps them. Finally it lists the ledger (state/verdict) and stops everything, gpg-agent included.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

ROOT = Path(__file__).resolve().parent.parent
RUN = Path(os.environ.get("SMT_DEMO_DIR") or ROOT / "demo-run")
EXE = str(Path(sys.executable).parent / "smt-watch")
sys.path.insert(0, str(ROOT / "tests"))  # the in-process SFTP server the test suite uses
ADMIN_TOKEN = "demo-admin-token"  # noqa: S105 (demo-only: the receiver checks it exactly as the real app does)
LATER = "+2d"  # "two days later", for libfaketime (FAKETIME_DONT_FAKE_MONOTONIC=1: thread waits stay real)


def libfaketime() -> str | None:
    """libfaketime's preload library: preloaded directly (the `faketime` wrapper forks, and a SIGTERM to it
    would not reach the process it runs)."""
    for pattern in ("/usr/lib/*/faketime/libfaketime.so.1", "/usr/lib*/faketime/libfaketime.so.1",
                    "/usr/local/lib/faketime/libfaketime.so.1"):
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


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


def smt_all(*commands: list[str], env: dict[str, str]) -> None:
    """Several `smt-watch` commands at once (each prints its own line), all expected to succeed."""
    running = []
    for args in commands:
        print("$ smt-watch " + " ".join(args), flush=True)
        running.append(subprocess.Popen([EXE, *args], env=env, stdout=subprocess.PIPE, text=True))
    for proc in running:
        out, _ = proc.communicate()
        print(out, end="", flush=True)
        if proc.returncode:
            raise SystemExit(f"demo: {proc.args} exited {proc.returncode}")


def wait_until(condition: object, what: str, timeout: float = 60.0, every: float = 0.05) -> None:
    """Poll ``condition`` every ``every`` seconds. ``timeout`` only bounds a stuck demo: generous, because a
    busy machine (the test suite runs the demo next to other tests) stretches every step."""
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: timed out waiting for {what}")
        time.sleep(every)


def get_json(url: str, headers: dict[str, str] | None = None) -> object:
    req = urllib.request.Request(url, headers=headers or {})  # noqa: S310 (loopback only)
    with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 (loopback only)
        return json.load(resp)


def chicago_today() -> date:
    return datetime.now(UTC).astimezone(ZoneInfo("America/Chicago")).date()


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
    preload = libfaketime()
    shutil.rmtree(RUN, ignore_errors=True)
    inbox, state, data, logs, made = (RUN / d for d in ("inbox", "state", "receiver", "logs", "made"))
    for d in (inbox, logs, made):
        d.mkdir(parents=True)
    rport, sport = free_port(), free_port()
    base, upload_server = f"http://127.0.0.1:{rport}", f"http://127.0.0.1:{sport}"
    # Demo-only tokens: the receiver and serve check them exactly as the real services do.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMT_", "FAKETIME")) and k not in (
        "INTELLIWATT_BASE_URL", "ADMIN_TOKEN", "STATE_FILE", "NOTIFY_SOCKET", "GNUPGHOME", "LD_PRELOAD")}
    env |= {"SMT_LOCAL_DIR": str(inbox), "SMT_STATE_DIR": str(state), "ADMIN_TOKEN": ADMIN_TOKEN,
            "SMT_UPLOAD_TOKEN": "demo-upload-token", "ESIID_DEFAULT": "10443720000000001",
            "SMT_SETTLE_SECONDS": "0.2", "GNUPGHOME": str(RUN / "gnupg"), "SMT_PATTERNS": "*.csv,*.asc,*.zip",
            # verify: a loopback app bears more than production's 2 reads a second; `watch` checks each delivery
            # a second after it (production: 300 s, time for the app to normalize)
            "SMT_VERIFY_REQUESTS_PER_SECOND": "500", "SMT_VERIFY_DELAY_SECONDS": "1"}
    app_env = {**env, "INTELLIWATT_BASE_URL": base}
    later = {"LD_PRELOAD": preload or "", "FAKETIME": LATER, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(name: str, *args: str, extra: dict[str, str] | None = None, faked: bool = False) -> None:
        with (logs / f"{name}.log").open("ab") as out:  # the child keeps its own descriptor
            procs[name] = subprocess.Popen([EXE, *args], env={**env, **(extra or {}), **(later if faked else {})},
                                           stdout=out, stderr=out)

    def stop(*names: str) -> None:
        stopping = [procs.pop(name) for name in names]
        for proc in stopping:
            proc.send_signal(signal.SIGTERM)
        for proc in stopping:
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    today = chicago_today()
    end = today - timedelta(days=2)  # the app's window ends two days before today (America/Chicago)
    landed: dict[str, tuple[str, float]] = {}  # ESIID -> (path in, when it landed)
    try:
        step(f"start the reference receiver (stand-in for IntelliWatt, with its read routes) on {base}")
        start("receiver", "receive", "--port", str(rport), "--data", str(data))
        wait_until(lambda: up(f"{base}/_receiver/files"), "the receiver")

        step("start `watch` (INTELLIWATT_BASE_URL only: raw-upload, the web app's production route) and `serve`")
        start("watch", "watch", extra={"INTELLIWATT_BASE_URL": base})
        start("serve", "serve", "--port", str(sport), "--webhook-port", "0")  # not 0.0.0.0:8787 in a demo
        wait_until(lambda: "Watching " in (logs / "watch.log").read_text(), "watch to start")
        wait_until(lambda: up(f"{upload_server}/health"), "serve to start")

        step(f"make realistic SMT interval files (15-minute reads, DST days, a few estimated reads); today in "
             f"Chicago is {today}, so the app keeps days up to {end}")
        cp_file, up_file = made / "IntervalMeterUsage_M1001_year.csv", made / "IntervalMeterUsage_M2002_q.csv"
        daily = made / "IntervalMeterUsage_M5005_daily.csv"
        smt_all(["sample", "--days", "365", "--esiid", "10443720000000001", "--start",
                 str(end - timedelta(days=364)), "-o", str(cp_file)],
                ["sample", "--days", "90", "--esiid", "10443720000000002", "--start", str(end - timedelta(days=89)),
                 "-o", str(up_file)],
                ["sample", "--days", "3", "--esiid", "10443720000000005", "--start", str(today - timedelta(days=3)),
                 "-o", str(daily)], env=env)

        step("path 1: an operator copies CSVs into the inbox (as scp would): a year, and 3 days up to yesterday")
        for made_file, esiid in ((cp_file, "10443720000000001"), (daily, "10443720000000005")):
            shutil.copy(made_file, inbox / ".incoming.part")
            os.rename(inbox / ".incoming.part", inbox / made_file.name)
            landed[esiid] = ("cp", time.time())

        step("path 2: the admin UI uploads a CSV to serve")
        reply = upload(f"{upload_server}/upload", up_file, "demo-upload-token")
        landed["10443720000000002"] = ("curl /upload", time.time())
        print("  serve answered:", json.dumps(reply)[:150], "…")

        expected = 3
        if shutil.which("gpg"):
            from sftp_server import running_sftp_server, sftp_env

            step("path 3: SMT publishes an encrypted ZIP (*.CSV.1.asc) on its SFTP server; `sync` fetches it")
            uid = make_gpg_key(Path(env["GNUPGHOME"]))
            asc = made / "IntervalMeterUsage.CSV.1.asc"
            smt("sample", "--days", "30", "--esiid", "10443720000000003", "--start", str(end - timedelta(days=29)),
                "--encrypt-to", uid, "-o", str(asc), env=env)
            with running_sftp_server(RUN / "smt-sftp" / "root", RUN / "smt-sftp" / "keys") as sftp:
                sftp.put(f"adhocusage/{end.year}/IntervalMeterUsage.CSV.1.asc", asc.read_bytes())
                sync_env = env | sftp_env(sftp, RUN / "smt-sftp" / "known_hosts")
                smt("sync", env=sync_env)
                landed["10443720000000003"] = ("sftp → sync", time.time())
            expected += 1  # the interval CSV inside the ZIP; its daily CSV is recorded `failed`, not sent
        else:
            step("gpg is not installed: skipping path 3 (the encrypted .asc fetched by sync)")

        step("the same bytes again under another name: a duplicate, not delivered twice")
        shutil.copy(cp_file, inbox / "copy_of_year.csv")

        def rows() -> list[dict[str, object]]:
            return list(get_json(f"{base}/_receiver/files"))  # type: ignore[call-overload]

        # polled every 0.2 s: each look is a request to the receiver, which is busy storing the deliveries
        wait_until(lambda: "copy_of_year.csv" in (logs / "watch.log").read_text() and len(rows()) == expected,
                   f"{expected} deliveries", timeout=150, every=0.2)

        def kept(esiid: str) -> int:
            """What the app's SmtInterval table holds for ``esiid``, from its own read route."""
            got = get_json(f"{base}/api/admin/smt/interval-coverage?esiid={esiid}", {"x-admin-token": ADMIN_TOKEN})
            return int(got["smtInterval"]["rows"])  # type: ignore[index]

        step("what IntelliWatt holds (RawSmtFile rows; SmtInterval rows from GET /api/admin/smt/interval-coverage)")
        print(f"  {'file':<52} {'path in':<13} {'sha256':<14} {'intervals kept':>16} {'landed → stored':>16}")
        for row in rows():
            esiid = str(row["esiid"])
            how, when = landed.get(esiid, ("?", 0.0))
            stored = datetime.fromisoformat(str(row["received_at"]).replace("Z", "+00:00")).timestamp()
            count = kept(esiid) if "Interval" in str(row["filename"]) else 0
            print(f"  {row['filename']!s:<52} {how:<13} {str(row['sha256'])[:12]:<14} {count:>16,}"
                  f" {stored - when:>15.2f}s")
        for line in (logs / "watch.log").read_text().splitlines():
            if "Skipping copy_of_year.csv" in line:
                print("  watch:", line)

        step("the legacy inline route, named: production refuses it (400 INLINE_DISABLED), the row says what to do")
        legacy = made / "adhoc.csv"
        smt("sample", "--days", "30", "--esiid", "10443720000000004", "--start", str(end - timedelta(days=29)),
            "-o", str(legacy), env=env, quiet=True)
        smt("post", str(legacy), env={**app_env, "SMT_DELIVERY": "inline"})

        step("the droplet's old SMT_UPLOAD_URL pointing at `serve`: refused (exit 2), nothing sent")
        smt("post", str(legacy), env={**app_env, "SMT_UPLOAD_URL": f"{upload_server}/upload"})

        step("`smt-watch post` with INTELLIWATT_BASE_URL only: raw-upload, as the fix says")
        rc = smt("post", str(legacy), env=app_env)

        step("is it in the app? `watch` verified each delivery by itself (read-only admin routes, x-admin-token)")
        names = [str(r["filename"]) for r in rows() if "Interval" in str(r["filename"])]
        wait_until(lambda: all(f"Verify {n}: " in (logs / "watch.log").read_text() for n in names),
                   "the automatic checks", timeout=150)
        for line in (logs / "watch.log").read_text().splitlines():
            if "Verify " in line:
                print("  watch:", line)

        if preload:
            step(f"two days later ({LATER} for the receiver and `watch`, by libfaketime): the dropped day has entered"
                 " the window; `watch` re-sends just its rows and checks again")
            stop("watch", "receiver")
            before = len((logs / "watch.log").read_text())  # the restarted watch appends to the same log
            start("receiver", "receive", "--port", str(rport), "--data", str(data), faked=True)
            wait_until(lambda: up(f"{base}/_receiver/files"), "the receiver")
            start("watch", "watch", extra={"INTELLIWATT_BASE_URL": base}, faked=True)
            wait_until(lambda: f"Verify {daily.name}: stored" in (logs / "watch.log").read_text()[before:],
                       "the re-send and its check", timeout=150)
            for line in (logs / "watch.log").read_text()[before:].splitlines():
                if "Resend " in line or f"Verify {daily.name}" in line:
                    print("  watch:", line)
            print(f"$ FAKETIME={LATER} LD_PRELOAD=libfaketime.so.1 smt-watch verify {daily.name}", flush=True)
            verified = subprocess.run([EXE, "verify", str(inbox / daily.name)], env={**app_env, **later}).returncode
            rc = rc or verified
        else:
            step("libfaketime is not installed: skipping the re-send two days later (it moves both clocks)")

        step("the ledger (state/verdict)")
        smt("ledger", "list", env=env)
        print(f"\ndemo files and logs are in {RUN}")
        return rc
    finally:
        if shutil.which("gpgconf") and (RUN / "gnupg").is_dir():  # the agent make_gpg_key started: no leftover
            subprocess.run(["gpgconf", "--homedir", str(RUN / "gnupg"), "--kill", "all"], capture_output=True,
                           timeout=30, check=False)
        stop(*procs)


if __name__ == "__main__":
    sys.exit(main())
