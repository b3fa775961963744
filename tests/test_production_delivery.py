"""Deliver as production accepts (issue 22 §4), against the reference receiver run as production runs:
inline refused (``400 HOME_ID_REQUIRED`` / ``400 INLINE_DISABLED``), bodies over 4.5 MB answered 413 by the
platform, raw-upload rows keeping ``source``, ``storagePath`` and each chunk's text.

- ``auto`` with only ``INTELLIWATT_BASE_URL`` is raw-upload; inline only when named, and its refusal is a
  ``failed`` row that says to use raw-upload;
- a delivery target that is smt-watch's own ``serve`` is refused at start-up of ``watch``, in ``post`` and by
  ``doctor``, by its port (static) or by its ``/health`` (dynamic);
- no request body to the app passes 4,500,000 bytes (raw-upload cuts chunks by bytes too; inline's default
  cap fails the file before any request); each raw-upload request gets the Node server's 120 s;
- chunk text is the Node server's, so a file it already sent is a duplicate by hash; ``source`` is
  ``smt-watch``; ``storagePath`` is ``/smt/<esiid>/<chunk>``;
- ``post --force`` re-sends every chunk; a daily or billing CSV is never sent to raw-upload.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import subprocess
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from node_server import node_chunks, node_whole

from conftest import ADMIN_TOKEN, LOOPBACK, UPLOAD_TOKEN, write_csv
from smt_watch.config import Settings, load_settings
from smt_watch.delivery.base import MAX_REQUEST_BYTES
from smt_watch.delivery.registry import OwnServeTarget, delivery_mode
from smt_watch.pipeline import post_files
from smt_watch.reference import sample
from smt_watch.reference.receiver import PULL_PATH, RAW_UPLOAD_PATH, Fault, app_in_thread, running_receiver
from smt_watch.server import build
from smt_watch.statedir import open_ledger

Make = Callable[..., Settings]
Run = Callable[..., subprocess.CompletedProcess[str]]

ESIID = sample.DEFAULT_ESIID


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def app_env(receiver: Any, **extra: str) -> dict[str, str]:
    """Only the web app configured, as the droplet's env file has it once the Node server is gone."""
    return {"INTELLIWATT_BASE_URL": receiver.url, "ADMIN_TOKEN": ADMIN_TOKEN, **extra}


def requests_to(receiver: Any, path: str) -> list[Any]:
    return [r for r in receiver.state.requests if r.path == path]


def chunks(receiver: Any) -> list[dict[str, Any]]:
    return list(LOOPBACK.get(f"{receiver.url}/_receiver/chunks", timeout=10).json())


# --- auto is raw-upload; inline only by name, and production refuses it ----------------------------------


def test_auto_with_only_the_base_url_delivers_by_raw_upload(make_settings: Make, receiver: Any,
                                                             tmp_path: Path) -> None:
    settings = make_settings(**app_env(receiver))
    f = tmp_path / "IntervalMeterUsage_M7_2025.csv"
    f.write_bytes(sample.interval_csv(60))
    [outcome] = post_files(settings, [f])
    assert outcome.result == "sent", outcome
    assert requests_to(receiver, PULL_PATH) == [] and len(requests_to(receiver, RAW_UPLOAD_PATH)) == 2
    rows = chunks(receiver)
    assert [r["filename"] for r in rows] == [f"{f.name}.part{n}-of-2" for n in (1, 2)]
    assert {r["source"] for r in rows} == {"smt-watch"}
    assert [r["storagePath"] for r in rows] == [f"/smt/{ESIID}/{f.name}.part{n}-of-2" for n in (1, 2)]
    assert [r["content"].encode() for r in rows] == node_chunks(f.read_bytes())
    with open_ledger(settings) as ledger:
        row = ledger.get(sha(f.read_bytes()))
    assert row is not None and row.state == "sent" and row.destination and row.destination.endswith(
        RAW_UPLOAD_PATH)


@pytest.mark.parametrize(("homes", "code"), [(None, "INLINE_DISABLED"), ((), "HOME_ID_REQUIRED")])
def test_inline_by_name_is_refused_as_production_does(run_cli: Run, tmp_path: Path, homes: tuple[str, ...] | None,
                                                      code: str) -> None:
    """Every ESIID has a house: 400 INLINE_DISABLED; none has: 400 HOME_ID_REQUIRED (checked first). Either is
    `failed`, not retried, with a reason that says to use raw-upload."""
    with running_receiver(tmp_path / "app", admin_token=ADMIN_TOKEN, homes=homes) as receiver:
        f = write_csv(tmp_path / "a_M1.csv")
        env = app_env(receiver, SMT_DELIVERY="inline")
        proc = run_cli("post", str(f), env=env)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert proc.stdout.startswith("failed") and code in proc.stdout
        assert "SMT_DELIVERY=raw-upload" in proc.stdout
        [request] = requests_to(receiver, PULL_PATH)
        assert request.status == 400 and receiver.stored() == []
        listed = json.loads(run_cli("ledger", "list", "--json", env=env).stdout)
        assert [(r["state"], r["http_status"], r["attempts"]) for r in listed] == [("failed", 400, 1)]
        assert "use raw-upload" in listed[0]["last_error"]
        # the fix the reason gives works: the same file by raw-upload lands
        assert run_cli("post", str(f), env=app_env(receiver, SMT_DELIVERY="raw-upload")).returncode == 0
        assert len(receiver.stored()) == 1


# --- a target that is smt-watch's own serve ----------------------------------------------------------------


def test_the_droplet_env_file_pointing_at_serve_is_refused_everywhere(run_cli: Run, tmp_path: Path,
                                                                      receiver: Any) -> None:
    """The droplet's env file says SMT_UPLOAD_URL=http://localhost:8081/upload; once serve listens on 8081
    that is smt-watch's own serve (it would store each file back in the inbox and answer 202)."""
    env_file = tmp_path / "intelliwatt-smt"
    env_file.write_text(f"SMT_UPLOAD_URL=http://localhost:8081/upload\nSMT_UPLOAD_PORT=8081\n"
                        f"INTELLIWATT_BASE_URL={receiver.url}\nADMIN_TOKEN={ADMIN_TOKEN}\n")
    env_file.chmod(0o600)
    f = write_csv(tmp_path / "a_M1.csv")
    for args in (("post", str(f)), ("watch",)):
        proc = run_cli(*args, "--env-file", str(env_file), timeout=30)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        [line] = proc.stderr.strip().splitlines()
        assert "http://localhost:8081/upload is smt-watch's own serve" in line
        assert "unset it to deliver by raw-upload" in line and "Traceback" not in line
    doctor = run_cli("doctor", "--env-file", str(env_file), "--offline")
    assert doctor.returncode == 1
    [fail] = [x for x in doctor.stdout.splitlines() if x.startswith("FAIL  delivery:")]
    assert "smt-watch's own serve" in fail and "-> point SMT_UPLOAD_URL at IntelliWatt's upload server" in fail
    online = run_cli("doctor", "--env-file", str(env_file))
    assert "endpoint:" not in online.stdout  # nothing to reach: the delivery check says why
    assert receiver.state.requests == []
    # unset, the same file goes to the app by raw-upload
    env_file.write_text(f"SMT_UPLOAD_PORT=8081\nINTELLIWATT_BASE_URL={receiver.url}\nADMIN_TOKEN={ADMIN_TOKEN}\n")
    assert run_cli("post", str(f), "--env-file", str(env_file)).returncode == 0
    assert [r.path for r in receiver.state.requests] == [RAW_UPLOAD_PATH]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "0.0.0.0", "[::1]"])
def test_serve_port_on_this_host_is_recognised_when_nothing_answers(make_settings: Make, host: str,
                                                                     unused_port: int) -> None:
    """serve not started yet (watch may start first): SMT_UPLOAD_PORT on this host is enough."""
    settings = make_settings(SMT_UPLOAD_URL=f"http://{host}:{unused_port}/upload", SMT_UPLOAD_PORT=str(unused_port))
    with pytest.raises(OwnServeTarget, match=f"port {unused_port} on this host is SMT_UPLOAD_PORT") as raised:
        post_files(settings, [])
    assert raised.value.exit_code == 2
    default = load_settings({}).upload_port  # serve's default port, whatever it is, on localhost
    with pytest.raises(OwnServeTarget):
        delivery_mode(make_settings(SMT_UPLOAD_URL=f"http://localhost:{default}/upload"), probe=False)


def test_another_service_on_serves_port_is_taken(make_settings: Make, receiver: Any, tmp_path: Path) -> None:
    """Before the migration the Node server holds the port serve is configured for: its /health names it,
    and delivering to it is right (here the reference receiver names itself the same way)."""
    assert LOOPBACK.get(f"{receiver.url}/health", timeout=10).json()["service"] != "smt-watch"
    settings = make_settings(SMT_UPLOAD_URL=f"{receiver.url}/upload", SMT_UPLOAD_TOKEN=UPLOAD_TOKEN,
                             SMT_UPLOAD_PORT=str(receiver.port))
    [outcome] = post_files(settings, [write_csv(tmp_path / "IntervalData_M1.csv")])
    assert outcome.result == "sent"
    with pytest.raises(OwnServeTarget):  # without asking /health, the port alone decides
        delivery_mode(settings, probe=False)


@contextmanager
def running_serve(settings: Settings) -> Iterator[str]:
    """smt-watch's own serve app on a real loopback socket (in-process: what is tested is the client)."""
    ledger = open_ledger(settings)
    server = build(settings, ledger)
    try:
        with app_in_thread(server.app(), start_timeout=15, name="smt-serve-own") as port:
            yield f"http://127.0.0.1:{port}"
    finally:
        server.runner.join(30)
        ledger.close()


def test_serve_on_another_port_is_recognised_by_its_health(run_cli: Run, make_settings: Make,
                                                           tmp_path: Path) -> None:
    serve_settings = make_settings(SMT_STATE_DIR=str(tmp_path / "serve-state"))
    with running_serve(serve_settings) as url:
        assert LOOPBACK.get(f"{url}/health", timeout=10).json()["service"] == "smt-watch"
        f = write_csv(tmp_path / "a_M1.csv")
        proc = run_cli("post", str(f), env={"SMT_UPLOAD_URL": f"{url}/upload", "SMT_UPLOAD_TOKEN": UPLOAD_TOKEN})
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "/health answers service smt-watch" in proc.stderr and "never reach IntelliWatt" in proc.stderr
        assert list(serve_settings.local_dir.iterdir()) == []  # nothing was uploaded to it


def test_a_local_upload_server_that_is_not_smt_watch_is_taken(make_settings: Make, receiver: Any,
                                                              tmp_path: Path) -> None:
    """The reference receiver's /upload (like the Node server, whose /health says smt-upload-server)."""
    settings = make_settings(SMT_UPLOAD_URL=f"{receiver.url}/upload", SMT_UPLOAD_TOKEN=UPLOAD_TOKEN)
    [outcome] = post_files(settings, [write_csv(tmp_path / "IntervalData_M1.csv")])
    assert outcome.result == "sent"


# --- Vercel's 4.5 MB request limit, and the Node server's 120 s ------------------------------------------------


def _long_rows(count: int, pad: int) -> bytes:
    """Interval rows with a padding column: few rows, many bytes (the receiver still reads the first eight)."""
    labels = [f"{h}:{m:02d}" for h in range(24) for m in (0, 15, 30, 45)]
    return b"".join(f"'{ESIID},07/{4 + i // 96:02d}/2025,07/20/2025,{labels[i % 96]},{labels[(i + 1) % 96]},"
                    f"0.{i % 1000:03d},A,Consumption,{'x' * pad}\n".encode() for i in range(count))


def test_raw_upload_chunks_are_cut_by_bytes_under_the_request_limit(make_settings: Make, receiver: Any,
                                                                     tmp_path: Path) -> None:
    header = b",".join(h.encode() for h in sample.INTERVAL_HEADER) + b",PAD\n"
    data = header + _long_rows(1000, 11_000)  # 11 MB: one chunk by lines, four by bytes
    f = tmp_path / "wide_M2.csv"
    f.write_bytes(data)
    settings = make_settings(**app_env(receiver, SMT_RAW_LINES_PER_CHUNK="100000"))
    [outcome] = post_files(settings, [f])
    assert outcome.result == "sent", outcome
    sent = requests_to(receiver, RAW_UPLOAD_PATH)
    lengths = [int(r.headers["content-length"]) for r in sent]
    assert len(sent) == 4 and all(r.status == 200 for r in sent)
    assert max(lengths) <= MAX_REQUEST_BYTES and max(lengths) > MAX_REQUEST_BYTES * 0.95  # the cap, used fully
    assert [r.fields["filename"] for r in sent] == [f"wide_M2.csv.part{n}-of-4" for n in range(1, 5)]
    assert [r.fields["postIngest"] for r in sent] == [False, False, False, True]
    assert receiver.stored()[0]["sha256"] == sha(node_whole(data))  # every line, in order, once
    assert receiver.state.raw.interval_count() == 1000


def test_the_receiver_answers_413_past_the_limit_as_vercel_does(make_settings: Make, receiver: Any,
                                                                tmp_path: Path) -> None:
    """What smt-watch would meet if a chunk were not capped: 413 FUNCTION_PAYLOAD_TOO_LARGE, `failed`."""
    receiver.state.max_body_bytes = 1000
    settings = make_settings(**app_env(receiver))
    [outcome] = post_files(settings, [write_csv(tmp_path / "a_M1.csv", rows=40)])
    assert (outcome.result, outcome.status) == ("failed", 413)
    assert "FUNCTION_PAYLOAD_TOO_LARGE" in (outcome.error or "")


def test_a_line_no_request_can_carry_fails_before_any_request(make_settings: Make, receiver: Any,
                                                              tmp_path: Path) -> None:
    header = b",".join(h.encode() for h in sample.INTERVAL_HEADER) + b",PAD\n"
    f = tmp_path / "huge_line_M3.csv"
    f.write_bytes(header + _long_rows(2, 10)[:-1] + b"y" * 3_400_000 + b"\n")
    settings = make_settings(**app_env(receiver, SMT_VALIDATE="0"))
    [outcome] = post_files(settings, [f])
    assert outcome.result == "failed" and "line 3 is" in (outcome.error or "")
    assert f"{MAX_REQUEST_BYTES} bytes" in (outcome.error or "")
    assert receiver.state.requests == []


def test_inline_default_cap_keeps_the_body_under_the_limit(make_settings: Make, tmp_path: Path) -> None:
    with running_receiver(tmp_path / "dev-app", admin_token=ADMIN_TOKEN, inline=True) as receiver:
        settings = make_settings(**app_env(receiver, SMT_DELIVERY="inline"))
        assert settings.inline_max_bytes == MAX_REQUEST_BYTES
        small, big = tmp_path / "small_M1.csv", tmp_path / "big_M1.csv"
        small.write_bytes(sample.interval_csv(30))
        big.write_bytes(sample.interval_csv(500))  # 3.6 MB: base64 passes 4.5 MB
        assert big.stat().st_size * 4 / 3 > MAX_REQUEST_BYTES > small.stat().st_size * 4 / 3
        sent, failed = post_files(settings, [small, big])
        assert sent.result == "sent" and failed.result == "failed"
        assert "SMT_DELIVERY=raw-upload" in (failed.error or "") and "4.5 MB" in (failed.error or "")
        [request] = receiver.state.requests
        assert int(request.headers["content-length"]) <= MAX_REQUEST_BYTES


def test_each_chunk_gets_the_node_servers_time(make_settings: Make, receiver: Any, tmp_path: Path) -> None:
    """SMT_HTTP_TIMEOUT=1, a chunk answered after 1.5 s: still one attempt (raw-upload waits at least 120 s)."""
    settings = make_settings(**app_env(receiver, SMT_HTTP_TIMEOUT="1", SMT_RETRY_ATTEMPTS="1"))
    receiver.state.faults.append(Fault(delay=1.5))
    [outcome] = post_files(settings, [write_csv(tmp_path / "slow_M1.csv")])
    assert (outcome.result, outcome.attempts) == ("sent", 1), outcome


# --- chunk text as the Node server builds it --------------------------------------------------------------


def _node_post(receiver: Any, name: str, data: bytes, esiid: str) -> list[dict[str, Any]]:
    """Post ``data`` as the Node server does (its field set, source droplet-upload); the replies."""
    parts = node_chunks(data)
    replies = []
    for n, content in enumerate(parts, start=1):
        filename = name if len(parts) == 1 else f"{name}.part{n}-of-{len(parts)}"
        body = {"filename": filename, "sizeBytes": len(content), "sha256": sha(content),
                "contentBase64": base64.b64encode(content).decode(), "source": "droplet-upload",
                "receivedAt": "2026-01-06T12:00:00.000Z", "purgeExisting": n == 1, "postIngest": n == len(parts),
                "esiid": esiid, "storagePath": f"/smt/{esiid}/{filename}", "meter": "M1"}
        reply = LOOPBACK.post(receiver.url + RAW_UPLOAD_PATH, json=body, headers={"x-admin-token": ADMIN_TOKEN},
                              timeout=30)
        assert reply.status_code == 200, reply.text
        replies.append(reply.json())
    return replies


def test_a_file_the_node_server_sent_is_a_duplicate_by_hash(make_settings: Make, receiver: Any,
                                                            tmp_path: Path) -> None:
    """Both at their default chunk size (5,000 lines): 110 days are 3 chunks, the last a short one (a year's
    8 chunks proved no more, at four times the CPU)."""
    data = sample.interval_csv(110)
    f = tmp_path / "IntervalMeterUsage_M1_2025.csv"
    f.write_bytes(data)
    first = _node_post(receiver, f.name, data, ESIID)
    assert len(first) == 3 and not any(r.get("duplicate") for r in first)
    before = len(chunks(receiver))
    [outcome] = post_files(make_settings(**app_env(receiver)), [f])
    assert outcome.result == "sent"
    ours = requests_to(receiver, RAW_UPLOAD_PATH)[3:]
    assert len(ours) == 3 and all(r.duplicate is True for r in ours)  # every chunk: an existing raw row
    assert len(chunks(receiver)) == before == 3
    assert {r["source"] for r in chunks(receiver)} == {"droplet-upload"}


TRICKY = (
    "\ufeffESIID,USAGE_DATE,REVISION_DATE,USAGE_START_TIME,USAGE_END_TIME,USAGE_KWH,ESTIMATED_ACTUAL,"
    "CONSUMPTION_SURPLUSGENERATION\r\n"
    f"'{ESIID},1/5/2026,1/6/2026,0:00,0:15,0.100,A,Consumption\r\n"
    "   \r\n"  # blank: spaces
    "\u00a0\u3000\n"  # blank to JavaScript's trim(), not to bytes.strip()
    "\ufeff\n"  # blank to JavaScript's trim(), not to Python's str.strip()
    "\x1c\n"  # blank to Python's str.strip(), not to JavaScript's trim(): a data line for the Node server
    f"'{ESIID},1/5/2026,1/6/2026,0:15,0:30,0.200,A,Consumption\r\r\n"  # \r\r\n: one \r stays
    f"'{ESIID},1/5/2026,1/6/2026, 0:30,0:45,0.300,E,Consumption\n"
    "\n\n"
).encode() + f"'{ESIID},1/5/2026,1/6/2026,0:45,1:00,0.4\xff\xfe,A,Consumption".encode("latin-1")  # bad UTF-8, no \n


@pytest.mark.parametrize("per_chunk", ["5000", "2"])
def test_chunk_text_matches_the_node_server_byte_for_byte(make_settings: Make, receiver: Any, tmp_path: Path,
                                                          per_chunk: str) -> None:
    f = tmp_path / "tricky_M1.csv"
    f.write_bytes(TRICKY)
    settings = make_settings(**app_env(receiver, SMT_VALIDATE="0", SMT_RAW_LINES_PER_CHUNK=per_chunk))
    [outcome] = post_files(settings, [f])
    assert outcome.result == "sent", outcome
    expected = node_chunks(TRICKY, int(per_chunk))
    assert len(expected) == (1 if per_chunk == "5000" else 3)  # 5 data lines
    sent = requests_to(receiver, RAW_UPLOAD_PATH)
    assert [r.fields["sha256"] for r in sent] == [sha(c) for c in expected]
    assert [r.fields["sizeBytes"] for r in sent] == [len(c) for c in expected]
    assert receiver.state.raw_mismatches == []
    assert not any(c.endswith(b"\n") for c in expected) and "\ufffd".encode() in expected[-1]
    assert b"".join(expected).count(b"\r") == 1  # only the \r of \r\r\n that /\r?\n/ leaves


def test_a_file_without_data_lines_goes_whole(make_settings: Make, receiver: Any, tmp_path: Path) -> None:
    data = b",".join(h.encode() for h in sample.INTERVAL_HEADER) + b"\r\n\r\n"
    f = tmp_path / "empty_M1.csv"
    f.write_bytes(data)
    [outcome] = post_files(make_settings(**app_env(receiver, SMT_VALIDATE="0")), [f])
    assert outcome.result == "sent"
    [request] = requests_to(receiver, RAW_UPLOAD_PATH)
    assert request.fields["sha256"] == sha(data) == sha(node_chunks(data)[0])


# --- post --force -----------------------------------------------------------------------------------------


def test_post_force_resends_every_chunk(run_cli: Run, receiver: Any, tmp_path: Path) -> None:
    env = app_env(receiver, SMT_RAW_LINES_PER_CHUNK="30")
    f = write_csv(tmp_path / "force_M1.csv", rows=100)
    assert run_cli("post", str(f), env=env).returncode == 0
    assert len(requests_to(receiver, RAW_UPLOAD_PATH)) == 4
    again = run_cli("post", "--force", str(f), env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert re.match(r"sent\s.*HTTP 200, 4 attempt\(s\)", again.stdout), again.stdout
    second = requests_to(receiver, RAW_UPLOAD_PATH)[4:]
    assert [r.fields["filename"] for r in second] == [f"force_M1.csv.part{n}-of-4" for n in range(1, 5)]
    assert [r.fields["postIngest"] for r in second] == [False, False, False, True]
    assert all(r.duplicate is True for r in second)
    plain = run_cli("post", str(f), env=env)
    assert plain.stdout.startswith("duplicate") and len(requests_to(receiver, RAW_UPLOAD_PATH)) == 8


# --- daily and billing CSVs -------------------------------------------------------------------------------


def test_a_daily_csv_is_not_sent_to_raw_upload(run_cli: Run, receiver: Any, tmp_path: Path) -> None:
    f = tmp_path / "DailyMeterUsage_M1.csv"
    f.write_bytes(sample.billing_csv(ESIID, date(2025, 1, 1), 30))
    env = app_env(receiver)
    proc = run_cli("post", str(f), env=env)
    assert proc.returncode == 1
    assert proc.stdout.startswith("failed") and "daily or billing CSV" in proc.stdout
    assert "reads interval CSVs only" in proc.stdout
    assert receiver.state.requests == []
    [row] = json.loads(run_cli("ledger", "list", "--json", env=env).stdout)
    assert row["state"] == "failed" and "daily or billing CSV" in row["last_error"]


def test_smts_zip_delivers_its_interval_csv_and_records_the_billing_one(make_settings: Make, receiver: Any,
                                                                       tmp_path: Path) -> None:
    interval = sample.interval_csv(10)
    billing = sample.billing_csv(ESIID, date(2025, 1, 1), 10)
    f = tmp_path / "IntervalMeterUsage_M1.zip"
    f.write_bytes(sample.smt_zip("IntervalMeterUsage_M1.csv", interval, billing))
    settings = make_settings(**app_env(receiver))
    [outcome] = post_files(settings, [f])
    assert outcome.result == "sent", outcome
    by_name = {c.name: c for c in outcome.children}
    assert by_name["IntervalMeterUsage_M1.csv"].result == "sent"
    [daily] = [c for name, c in by_name.items() if name.startswith("Daily")]
    assert daily.result == "failed" and "daily or billing CSV" in (daily.error or "")
    assert [r.fields["filename"] for r in requests_to(receiver, RAW_UPLOAD_PATH)] == ["IntervalMeterUsage_M1.csv"]
    with open_ledger(settings) as ledger:
        parent, child = ledger.get(sha(f.read_bytes())), ledger.get(sha(billing))
    assert parent is not None and parent.state == "sent" and "1 not sent" in (parent.destination or "")
    assert child is not None and child.state == "failed" and "daily or billing CSV" in (child.last_error or "")
    # a second pass changes nothing: the interval CSV is a duplicate, the daily one stays failed, unsent
    assert post_files(settings, [f])[0].result == "duplicate"
    assert len(requests_to(receiver, RAW_UPLOAD_PATH)) == 1


def test_a_zip_of_only_a_daily_csv_is_failed(make_settings: Make, receiver: Any, tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("DailyMeterUsage_M1.csv", sample.billing_csv(ESIID, date(2025, 1, 1), 5))
    f = tmp_path / "DailyMeterUsage_M1.zip"
    f.write_bytes(buf.getvalue())
    [outcome] = post_files(make_settings(**app_env(receiver)), [f])
    assert outcome.result == "failed" and "daily or billing CSV" in (outcome.error or "")
    assert receiver.state.requests == []


def test_an_upload_server_that_drops_the_file_is_not_sent(make_settings: Make, receiver: Any,
                                                          tmp_path: Path) -> None:
    """The Node server's reply to a name without 'interval': 202, ok:true, but nothing forwarded."""
    receiver.state.faults.append(Fault(status=202, body={
        "ok": True, "message": "Upload ignored (non-interval file removed)",
        "file": {"name": "usage_M1.csv", "interval": False}}))
    settings = make_settings(SMT_UPLOAD_URL=f"{receiver.url}/upload", SMT_UPLOAD_TOKEN=UPLOAD_TOKEN)
    [outcome] = post_files(settings, [write_csv(tmp_path / "usage_M1.csv")])
    assert (outcome.result, outcome.status) == ("failed", 202)
    assert "dropped the file" in (outcome.error or "") and "raw-upload" in (outcome.error or "")
