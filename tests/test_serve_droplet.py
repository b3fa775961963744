"""`serve` with the defaults and names IntelliWatt's droplet has (issue 22 §3).

The droplet's callers are taken as they are: the bash script's exact ``curl -F`` fields, the web app's
trigger with either webhook secret, ``forceRepost`` with the payload's ``esiid``, the Node upload server's
limit variables and ``/health`` fields. Real parts only: ``serve`` as a process (the CLI, its ports) or on
an ephemeral loopback port in a thread, ``watch`` delivering to the reference receiver, a real SFTP server
for the trigger's sync pass, real ``curl``. Every wait is a condition with a deadline. No test binds the
default 0.0.0.0:8787: each names its ports.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
import pytest
from sftp_server import SftpTestServer
from test_serve_fidelity import form_parts
from test_server import (  # noqa: F401 (fixtures: stalled, ssh_key, sync_env)
    FORM_TYPE,
    SECRET,
    running,
    sftp_settings,
    ssh_key,
    stalled,
    sync_env,
    trigger,
)
from test_server_process import free_ports, serving

from conftest import ADMIN_TOKEN, LOOPBACK, UPLOAD_TOKEN, cli_in_process, wait_for, watching, write_csv
from smt_watch.config import Settings, load_settings
from smt_watch.content import is_container
from smt_watch.esiids import repost_esiid
from smt_watch.hashing import Signature
from smt_watch.inbox import is_candidate
from smt_watch.ledger import Ledger, Remember
from smt_watch.ledger.common import REPOST_NOTE
from smt_watch.statedir import open_ledger

Make = Callable[..., Settings]
ESIID = "10443720000000001"  # what write_csv puts in its rows
OTHER_ESIID = "1008901012126195372100"
DECLARED_METER = "112233445"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def csv_of(path: Path, esiid: str = ESIID, seed: int = 0) -> Path:
    """An SMT interval CSV whose rows all carry ``esiid``."""
    write_csv(path, rows=8, seed=seed)
    path.write_text(path.read_text().replace(f"'{ESIID},", f"'{esiid},"))
    return path


def healthy_at(host: str, port: int) -> bool:
    try:
        return LOOPBACK.get(f"http://{host}:{port}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def sent_to(receiver: Any, digest: str) -> list[dict[str, Any]]:
    """The fields of every 2xx delivery of ``digest`` the receiver answered (multipart ``/upload``)."""
    return [r.fields for r in list(receiver.state.requests) if r.sha256 == digest and r.status and r.status < 300]


# --- ports and addresses ---------------------------------------------------------------------------------


@pytest.fixture
def env(base_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path / "home"), **base_env,
            "INTELLIWATT_WEBHOOK_SECRET": SECRET}


def test_webhook_listener_binds_its_own_address(env: dict[str, str], tmp_path: Path) -> None:
    """SMT_WEBHOOK_HOST is the trigger's address, not SMT_UPLOAD_HOST's (the web app calls the trigger on
    the droplet's public address, uploads come through nginx on 127.0.0.1). 127.0.0.2 stands in for the
    public address: a loopback address of its own, so the test shows which socket listens where."""
    port, hook = free_ports(2)
    with serving({**env, "SMT_WEBHOOK_HOST": "127.0.0.2", "SMT_WEBHOOK_PORT": str(hook)}, tmp_path / "serve.log",
                 port=port) as s:
        wait_for(lambda: healthy_at("127.0.0.2", hook), 30, "the webhook listener on 127.0.0.2")
        assert not healthy_at("127.0.0.1", hook)  # not on the upload address
        assert not healthy_at("127.0.0.2", port)  # and uploads not on the webhook's
        t = LOOPBACK.post(f"http://127.0.0.2:{hook}/trigger/smt-now", headers={"x-intelliwatt-secret": SECRET},
                          timeout=10)
        assert t.status_code == 503 and "SMT_HOST" in t.json()["message"]  # the route is there
        assert s.signal() == 0, s.text()
    assert f"the webhook on http://127.0.0.2:{hook}/trigger/smt-now" in s.text()


def test_webhook_port_0_leaves_the_trigger_on_the_upload_port(env: dict[str, str], tmp_path: Path) -> None:
    with serving({**env, "SMT_WEBHOOK_PORT": "0"}, tmp_path / "serve.log") as s:
        t = LOOPBACK.post(f"{s.url}/trigger/smt-now", headers={"x-intelliwatt-secret": SECRET}, timeout=10)
        assert t.status_code == 503 and "SMT_HOST" in t.json()["message"]
        assert s.signal() == 0
    assert "the webhook on" not in s.text()


def test_webhook_port_equal_to_the_upload_port_is_a_clear_error(env: dict[str, str], tmp_path: Path) -> None:
    """What the CLI prints and exits with, so in-process (conftest's ``cli_in_process``): a ``serve`` that
    wrongly started would hang here until pytest-timeout, as a subprocess would until its own time-out."""
    [port] = free_ports(1)
    proc = cli_in_process(["serve", "--port", str(port), "--webhook-port", str(port)], env, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "SMT_WEBHOOK_PORT" in proc.stderr and "SMT_WEBHOOK_PORT=0" in proc.stderr
    assert "Traceback" not in proc.stderr


# --- the bash script's upload: role smt-ingest, esiid and meter carried to delivery ----------------------


@pytest.mark.parametrize("mode", ["multipart", "raw-upload"])
def test_the_bash_scripts_curl_upload_is_taken_and_its_esiid_and_meter_are_delivered(
        env: dict[str, str], receiver: Any, tmp_path: Path, make_settings: Make, mode: str) -> None:
    """deploy/smt/fetch_and_post.sh's own curl line, field for field (it sends no token). serve counts
    role=smt-ingest as admin (as the Node server does, never 400 invalid_role), stores esiid and meter with
    the bytes, and watch delivers them: the uploader's ESIID wins over the one in the CSV, as the Node
    server passes it on to raw-upload."""
    csv = csv_of(tmp_path / "src" / "IntervalMeterUsage_M7_20260101.csv")
    with serving(env, tmp_path / "serve.log") as s:
        out = tmp_path / "resp.json"
        code = subprocess.run(
            ["curl", "-sS", "-o", str(out), "-w", "%{http_code}", "--connect-timeout", "30", "--max-time", "300",
             "-X", "POST", f"{s.url}/upload", "-F", f"file=@{csv}", "-F", f"esiid={OTHER_ESIID}",
             "-F", f"meter={DECLARED_METER}", "-F", "accountKey=intelliwatt-smt-ingest", "-F", "role=smt-ingest",
             "-F", "capturedAt=2026-01-02T03:04:05Z"],
            capture_output=True, text=True, timeout=120, check=False).stdout
        assert code == "202", out.read_text()
        reply = json.loads(out.read_text())
        assert (reply["meta"]["role"], reply["meta"]["accountKey"]) == ("admin", "intelliwatt-smt-ingest")
        assert reply["meta"]["limit"] == 40_000  # the Node server's admin default: the admin page is not throttled
        assert s.signal() == 0, s.text()
    assert f"esiid {OTHER_ESIID}, meter {DECLARED_METER}" in s.text()
    target = ({"SMT_UPLOAD_URL": f"{receiver.url}/upload", "SMT_UPLOAD_TOKEN": UPLOAD_TOKEN} if mode == "multipart"
              else {"SMT_DELIVERY": "raw-upload", "INTELLIWATT_BASE_URL": receiver.url, "ADMIN_TOKEN": ADMIN_TOKEN})
    settings = make_settings(SMT_SETTLE_SECONDS="0.2", **target)
    with watching(settings):
        wait_for(lambda: receiver.stored(), 30, "the upload delivered")
    [row] = receiver.stored()
    assert (row["esiid"], row["meter"]) == (OTHER_ESIID, DECLARED_METER)  # not the CSV's ESIID, not M7
    if mode == "multipart":
        assert receiver.read(row["sha256"]) == csv.read_bytes()
    with open_ledger(settings) as ledger:
        assert ledger.labels([sha(csv.read_bytes())])[sha(csv.read_bytes())].esiid == OTHER_ESIID


def test_an_upload_without_labels_is_delivered_with_its_own_esiid(make_settings: Make, receiver: Any,
                                                                   tmp_path: Path) -> None:
    settings = make_settings(SMT_SETTLE_SECONDS="0.2", SMT_UPLOAD_URL=f"{receiver.url}/upload",
                             SMT_UPLOAD_TOKEN=UPLOAD_TOKEN)
    data = csv_of(tmp_path / "src" / "a.csv", OTHER_ESIID).read_bytes()
    with running(settings) as srv, srv.client() as client, watching(settings):
        assert client.post("/upload", files={"file": ("IntervalData_M3.csv", data, "text/csv")},
                           headers={"x-smt-upload-token": UPLOAD_TOKEN}).status_code == 202
        wait_for(lambda: sent_to(receiver, sha(data)), 30, "the upload delivered")
    [fields] = sent_to(receiver, sha(data))
    assert (fields["esiid"], fields["meter"]) == (OTHER_ESIID, "M3")  # the CSV's ESIID, the name's meter


HOSTILE_LABELS = [
    ("esiid", "abc"), ("esiid", "1044372000000000'; DROP TABLE files; --"), ("esiid", "1" * 40), ("esiid", "12345"),
    ("esiid", "10443720000000001x"), ("meter", "../../etc/passwd"), ("meter", "M 1"), ("meter", "x" * 65),
    ("meter", "<script>"), ("meter", "M1\x00"),
]


@pytest.mark.both_ledgers
def test_a_hostile_esiid_or_meter_is_400_and_nothing_is_stored(make_settings: Make) -> None:
    """Before the file part it is refused before a byte is stored; after it, once the form is complete.
    Either way: one message naming the field, no file, no temp, no label. Every value, before and after, is
    sent to one serve (one ledger of each kind): each case is checked on its own reply, and "nothing stored"
    is checked after each, so it holds for each case and for all of them together."""
    data = b"ESIID,X\nhostile,1\n"
    wrong: list[str] = []
    with running(make_settings()) as srv, srv.client() as client:
        for where in ("before", "after"):
            for field, value in HOSTILE_LABELS:
                parts: list[tuple[str, bytes | str]] = [("file", data)]
                parts.insert(0 if where == "before" else 1, (field, value))
                resp = client.post("/upload", content=form_parts(parts), headers={"content-type": FORM_TYPE})
                body = resp.json() if resp.headers.get("content-type", "").startswith("application/json") else {}
                if not (resp.status_code == 400 and body.get("ok") is False and body.get("error") == "invalid_label"
                        and field in body.get("message", "")):
                    wrong.append(f"{where} {field}={value!r}: {resp.status_code} {resp.text[:200]}")
                if srv.stored() or srv.temps() or srv.ledger.labels([sha(data)]):
                    wrong.append(f"{where} {field}={value!r}: left {srv.everything()}, "
                                 f"labels {srv.ledger.labels([sha(data)])}")
    assert wrong == [], "\n".join(wrong)


# --- both webhook secrets --------------------------------------------------------------------------------


def test_either_webhook_secret_is_accepted_at_once(make_settings: Make, sync_env: dict[str, str],  # noqa: F811
                                                   stalled: Any) -> None:  # noqa: F811
    """The app sends INTELLIWATT_WEBHOOK_SECRET from some routes and DROPLET_WEBHOOK_SECRET from others; the
    bridge accepts both at once, and so does serve."""
    droplet = "droplet-secret-3e3e3e3e3e3e-SECRET"
    with running(make_settings(**sync_env, DROPLET_WEBHOOK_SECRET=droplet)) as srv, srv.client() as client:
        try:
            first = trigger(client, {"reason": "admin_triggered"}, header="x-intelliwatt-secret", secret=SECRET)
            assert first.status_code == 202, first.text
            second = trigger(client, {"reason": "smt_authorized"}, header="x-droplet-webhook-secret", secret=droplet)
            assert second.status_code == 202 and second.json()["syncId"] == first.json()["syncId"], second.text
            third = trigger(client, {"reason": "user_refresh"}, header="x-proxy-secret", secret=droplet)
            assert third.status_code == 202
            assert trigger(client, header="x-intelliwatt-secret", secret=SECRET + "x").status_code == 401
            assert trigger(client, header="x-intelliwatt-secret", secret=droplet[:-1]).status_code == 401
        finally:
            stalled.release()


# --- forceRepost with the payload's esiid ------------------------------------------------------------------


def test_force_repost_resends_every_inbox_file_of_that_esiid(make_settings: Make, sftp: SftpTestServer,
                                                             receiver: Any, tmp_path: Path) -> None:
    """As the old bridge ran its script for the payload's ESIID with SMT_FORCE_REPOST=true: every file of
    that ESIID in the inbox is sent again, delivered before or not, also an upload whose ESIID the uploader
    declared; another customer's file is left alone. Without an esiid nothing sent before is re-posted."""
    settings = sftp_settings(make_settings, sftp, tmp_path, SMT_UPLOAD_URL=f"{receiver.url}/upload",
                             SMT_UPLOAD_TOKEN=UPLOAD_TOKEN, SMT_SETTLE_SECONDS="0.2")
    inbox = settings.local_dir
    mine = csv_of(inbox / "adhocusage" / "mine.csv", ESIID, seed=1).read_bytes()
    theirs = csv_of(inbox / "theirs.csv", OTHER_ESIID, seed=2).read_bytes()
    declared = csv_of(tmp_path / "src" / "declared.csv", OTHER_ESIID, seed=3).read_bytes()
    with running(settings) as srv, srv.client() as client, watching(settings):
        up = client.post("/upload", files={"file": ("declared.csv", declared, "text/csv")},
                         data={"esiid": ESIID, "role": "smt-ingest"}, headers={"x-smt-upload-token": UPLOAD_TOKEN})
        assert up.status_code == 202, up.text
        for data in (mine, theirs, declared):
            wait_for(lambda d=data: len(sent_to(receiver, sha(d))) == 1, 30, "the first deliveries")  # type: ignore[misc]

        plain = trigger(client, {"reason": "admin_refresh", "forceRepost": True})
        assert plain.status_code == 202 and plain.json()["reposted"] == 0, plain.text
        assert "needs the payload's esiid" in plain.json()["message"]
        srv.server.runner.join(60)
        assert {r.state for r in srv.ledger.rows()} == {"sent"}

        assert trigger(client, {"reason": "admin_refresh", "esiid": "not-an-esiid", "forceRepost": True}
                       ).status_code == 400
        resp = trigger(client, {"reason": "admin_refresh", "esiid": ESIID, "forceRepost": True})
        assert resp.status_code == 202, resp.text
        assert resp.json()["reposted"] == 2 and "2 file(s) of ESIID" in resp.json()["message"]
        wait_for(lambda: len(sent_to(receiver, sha(mine))) == 2 and len(sent_to(receiver, sha(declared))) == 2, 30,
                 "that ESIID's files delivered again")
        srv.server.runner.join(60)
        row = srv.ledger.get(sha(theirs))
        assert row is not None and row.state == "sent" and row.last_error != REPOST_NOTE  # never touched
        wait_for(lambda: {r.state for r in srv.ledger.rows()} == {"sent"}, 30, "every row sent again")
    assert len(sent_to(receiver, sha(theirs))) == 1
    assert [f["esiid"] for f in sent_to(receiver, sha(declared))] == [ESIID, ESIID]  # the declared ESIID, twice


def _row(ledger: Ledger, data: bytes, path: Path | None, state: str, parent: str | None = None) -> str:
    digest = sha(data)
    ledger.claim(digest, filename=(path.name if path else "x.csv"), path=str(path) if path else None,
                 size=len(data), mode="multipart", parent=parent,
                 remember=Remember(str(path), Signature(1, 1, 1, 1), digest) if path else None)
    match state:
        case "sent":
            ledger.mark_sent(digest, status=200, destination="test", attempts=1)
        case "failed":
            ledger.mark_failed(digest, status=422, error="refused", attempts=1)
        case "retrying":
            ledger.mark_retrying(digest, status=503, error="later", attempts=1, next_attempt_at=9e9)
    return digest


@pytest.mark.both_ledgers
def test_repost_takes_any_state_the_parent_container_and_leaves_gone_files(make_settings: Make,
                                                                          tmp_path: Path) -> None:
    """Sent, failed and retrying rows of the ESIID go back to pending (acknowledged raw-upload chunks
    forgotten, so every chunk goes again); a CSV unpacked from an .asc takes its parent (the file watch
    reads); a row in flight is left to its sender; a file no longer in the inbox is counted, not touched."""
    settings = make_settings()
    inbox = settings.local_dir
    asc = inbox / "IntervalMeterUsage.CSV.1.asc"
    asc.write_bytes(b"armoured")
    for name in ("sent.csv", "failed.csv", "retrying.csv", "sending.csv"):
        (inbox / name).write_text(name)
    with open_ledger(settings) as ledger:
        parent = _row(ledger, b"armoured", asc, "sent")
        child = _row(ledger, b"child csv", tmp_path / "work" / "child.csv", "sent", parent=parent)
        shas = {name: _row(ledger, name.encode(), inbox / name, name.removesuffix(".csv"))
                for name in ("sent.csv", "failed.csv", "retrying.csv", "sending.csv")}
        gone = _row(ledger, b"moved away", inbox / "archived.csv", "sent")
        other = _row(ledger, b"other customer", inbox / "sent.csv", "sent")
        for digest in (child, gone, *shas.values()):
            ledger.note_esiid(digest, ESIID)
        ledger.note_esiid(other, OTHER_ESIID)
        ledger.ack_chunk(shas["sent.csv"], 1, 2, "c" * 64)

        result = repost_esiid(settings, ledger, ESIID)
        assert (result.files, result.gone, result.truncated) == (4, 1, False)
        assert set(result.moved) == {parent, child, shas["sent.csv"], shas["failed.csv"], shas["retrying.csv"]}
        states = {r.sha256: r.state for r in ledger.rows()}
        assert [states[d] for d in result.moved] == ["pending"] * 5
        assert states[shas["sending.csv"]] == "sending" and states[gone] == "sent" and states[other] == "sent"
        assert ledger.acked_chunks(shas["sent.csv"], 2) == {}
        assert all(r.last_error == REPOST_NOTE for r in ledger.rows() if r.sha256 in result.moved)


# --- patterns ----------------------------------------------------------------------------------------------


def test_default_patterns_take_csv_dot_anything_but_temp_names_still_win() -> None:
    patterns = load_settings({}).patterns
    take = ["a.csv", "IntervalData.csv.1", "x.CSV.20260101", "IntervalMeterUsage.CSV.1.asc", "b.zip"]
    skip = ["x.csv.part", "x.csv.tmp", "x.CSV.partial", "x.csv.filepart", "x.csv.crdownload", "x.csv.1~",
            ".x.csv.1", "notes.txt"]
    assert [n for n in take if is_candidate(PurePosixPath(n), patterns)] == take
    assert [n for n in skip if is_candidate(PurePosixPath(n), patterns)] == []
    assert is_container("IntervalMeterUsage.CSV.1.asc") and not is_container("IntervalData.csv.1")


def test_watch_delivers_a_csv_dot_n_file_by_default(make_settings: Make, receiver: Any, tmp_path: Path) -> None:
    settings = make_settings(SMT_SETTLE_SECONDS="0.2", SMT_UPLOAD_URL=f"{receiver.url}/upload",
                             SMT_UPLOAD_TOKEN=UPLOAD_TOKEN)
    with watching(settings):
        part = csv_of(settings.local_dir / "skip.csv.part", seed=5).read_bytes()
        data = csv_of(settings.local_dir / "IntervalData.csv.1", seed=4).read_bytes()
        wait_for(lambda: sent_to(receiver, sha(data)), 30, "IntervalData.csv.1 delivered")
    assert [r["filename"] for r in receiver.stored()] == ["IntervalData.csv.1"]
    assert sent_to(receiver, sha(part)) == []


# --- the Node upload server's limit variables --------------------------------------------------------------


def test_the_node_servers_customer_limit_and_window_are_read(make_settings: Make) -> None:
    """SMT_CUSTOMER_UPLOAD_MONTHLY_LIMIT and SMT_CUSTOMER_UPLOAD_WINDOW_MS, as the Node server's env file sets
    them: the second upload is refused and resets one window (here 2 hours) after the first."""
    settings = make_settings(SMT_CUSTOMER_UPLOAD_MONTHLY_LIMIT="1", SMT_CUSTOMER_UPLOAD_WINDOW_MS="7200000")
    fields = {"role": "customer", "accountKey": "HOME-1"}
    with running(settings) as srv, srv.client() as client:
        first = client.post("/upload", files={"file": ("a.csv", b"ESIID\n1\n", "text/csv")}, data=fields)
        assert first.status_code == 202 and first.json()["meta"]["limit"] == 1, first.text
        second = client.post("/upload", files={"file": ("b.csv", b"ESIID\n2\n", "text/csv")}, data=fields)
        assert second.status_code == 429, second.text
        retry_after = int(second.headers["retry-after"])
        assert 7000 < retry_after <= 7201  # the 2-hour window, not the default 30 days
    with running(make_settings(SMT_CUSTOMER_UPLOAD_MONTHLY_LIMIT="1", SMT_UPLOAD_CUSTOMER_LIMIT="2")) as srv, \
            srv.client() as client:  # ours wins when both are set
        other = {"role": "customer", "accountKey": "HOME-2"}
        replies = [client.post("/upload", files={"file": (f"{i}.csv", f"ESIID\n{i}\n".encode(), "text/csv")},
                               data=other).status_code for i in range(3)]
    assert replies == [202, 202, 429]


def test_health_has_the_node_servers_fields(env: dict[str, str], tmp_path: Path) -> None:
    with serving({**env, "SMT_UPLOAD_MAX_BYTES": "10485760"}, tmp_path / "serve.log") as s:
        body = LOOPBACK.get(f"{s.url}/health", timeout=10).json()
        assert s.signal() == 0
    assert (body["service"], body["uploadDir"], body["maxBytes"]) == ("smt-watch", env["SMT_LOCAL_DIR"], 10485760)

