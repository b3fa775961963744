"""`serve` as IntelliWatt's pages and web app use it: field order, default role, messages, origins, the
built-in page, and the webhook bridge it replaces (what is handled, what is passed through byte for byte).

Real parts only: `serve` on an ephemeral loopback port (tests/test_server.py's ``running``), a stand-in
bridge that is a real HTTP server recording every request it gets, raw sockets where the order of bytes on
the wire is the point.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from test_server import BOUNDARY, FORM_TYPE, TOKEN, Running, connect, read_response, running, upload

from smt_watch.config import Settings
from smt_watch.reference.receiver import app_in_thread

Make = Callable[..., Settings]
SECRET = "webhook-secret-0f0f0f0f0f0f-SECRET"
HANDLED = ("admin_triggered", "admin_refresh", "smt_authorized", "user_refresh", "user_orchestrate")
BRIDGE_ONLY = ("smt_meter_info", "address_saved", "gapfill_compare", "past_sim_recalc")
PAGE_ORIGIN = "https://intelliwatt.com"


def form_parts(parts: list[tuple[str, bytes | str]]) -> bytes:
    """A multipart body with the parts in exactly this order; a bytes value is the file part."""
    out = b""
    for name, value in parts:
        if isinstance(value, bytes):
            out += (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; filename="a.csv"\r\n'
                    f"Content-Type: text/csv\r\n\r\n").encode() + value + b"\r\n"
        else:
            out += f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    return out + f"--{BOUNDARY}--\r\n".encode()


def post_form(srv: Running, parts: list[tuple[str, bytes | str]], **headers: str) -> httpx.Response:
    with srv.client() as client:
        return client.post("/upload", content=form_parts(parts), headers={"content-type": FORM_TYPE, **headers})


def admin_page(data: bytes) -> list[tuple[str, bytes | str]]:
    """IntelliWatt's RawClient.tsx: the file first, then role=admin and its account key."""
    return [("file", data), ("role", "admin"), ("accountKey", "intelliwatt-admin")]


def customer_page(data: bytes, account: str) -> list[tuple[str, bytes | str]]:
    return [("accountKey", account), ("file", data), ("role", "customer")]  # SmtUploadForm.tsx's order


@pytest.fixture
def strict(make_settings: Make) -> Iterator[Running]:
    """One customer upload per account, as in the issue; no upload token (the pages send none)."""
    with running(make_settings(SMT_UPLOAD_CUSTOMER_LIMIT="1", SMT_UPLOAD_ADMIN_LIMIT="50")) as r:
        yield r


# --- identity: the whole request ----------------------------------------------------------------------


def test_admin_page_is_accepted_after_a_no_role_curl_upload(strict: Running) -> None:
    """`curl -F file=@…` (IntelliWatt's own docs) counts as admin by address, as the Node server counts it;
    the admin page (file first, then role and account) is then judged as admin/intelliwatt-admin."""
    curl = post_form(strict, [("file", b"ESIID,X\ncurl,1\n")])
    assert curl.status_code == 202, curl.text
    assert (curl.json()["meta"]["role"], curl.json()["meta"]["accountKey"]) == ("admin", "127.0.0.1")
    page = post_form(strict, admin_page(b"ESIID,X\nadmin,2\n"), origin=PAGE_ORIGIN)
    assert page.status_code == 202, page.text
    assert (page.json()["meta"]["role"], page.json()["meta"]["accountKey"]) == ("admin", "intelliwatt-admin")
    assert page.json()["remaining"] == 49 and page.json()["meta"]["remaining"] == 49
    assert len(strict.stored()) == 2


def test_customer_page_limit_is_judged_after_the_body_and_stores_nothing(strict: Running) -> None:
    """The customer page sends role after the file: the limit is decided once the form is complete, and a
    refusal leaves nothing behind."""
    first = post_form(strict, customer_page(b"ESIID,X\nc,1\n", "HOME-1"), origin=PAGE_ORIGIN)
    assert first.status_code == 202 and first.json()["meta"]["role"] == "customer", first.text
    second = post_form(strict, customer_page(b"ESIID,X\nc,2\n", "HOME-1"), origin=PAGE_ORIGIN)
    assert second.status_code == 429, second.text
    body = second.json()
    assert (body["limit"], body["remaining"], body["role"], body["accountKey"]) == (1, 0, "customer", "HOME-1")
    assert "30-day window" in body["message"] and body["resetAt"] in body["message"]
    assert len(strict.stored()) == 1 and strict.temps() == []
    other = post_form(strict, customer_page(b"ESIID,X\nc,3\n", "HOME-2"), origin=PAGE_ORIGIN)
    assert other.status_code == 202  # another account has its own count


def test_fields_before_the_file_naming_both_refuse_before_the_file_is_read(strict: Running) -> None:
    """Role and account as fields ahead of the file part: over the limit, the answer comes before a byte of
    the file is sent (the client here has sent only the part headers of a 500 MB file)."""
    assert post_form(strict, [("role", "customer"), ("accountKey", "HOME-9"), ("file", b"ESIID\n1\n")]
                     ).status_code == 202
    head_of_body = form_parts([("role", "customer"), ("accountKey", "HOME-9")])[: -len(f"--{BOUNDARY}--\r\n")]
    head_of_body += (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.csv"\r\n'
                     "Content-Type: text/csv\r\n\r\n").encode()
    with connect(strict.port) as sock:
        sock.sendall((f"POST /upload HTTP/1.1\r\nHost: 127.0.0.1:{strict.port}\r\nContent-Type: {FORM_TYPE}\r\n"
                      f"Content-Length: {len(head_of_body) + 500_000_000}\r\n\r\n").encode() + head_of_body)
        status, _, body = read_response(sock)
    assert status == 429 and json.loads(body)["accountKey"] == "HOME-9"
    assert len(strict.stored()) == 1 and strict.temps() == []


@pytest.mark.parametrize("role", ["smt-ingest", "superuser", "ADMIN", "Customer-ish"])
def test_any_role_but_customer_counts_as_admin(strict: Running, role: str) -> None:
    """As the Node server counts it (the bash script sends role=smt-ingest): never 400 invalid_role."""
    resp = post_form(strict, [("file", b"ESIID,X\n" + role.encode() + b",1\n"), ("role", role)])
    assert resp.status_code == 202, resp.text
    assert resp.json()["meta"]["role"] == "admin" and resp.json()["meta"]["limit"] == 50
    assert len(strict.stored()) == 1


def test_customer_role_is_any_case(strict: Running) -> None:
    resp = post_form(strict, [("file", b"ESIID,X\nc,1\n"), ("role", " CUSTOMER ")], **{"x-smt-upload-role": "admin"})
    assert resp.status_code == 202 and resp.json()["meta"]["role"] == "customer", resp.text


# --- replies the pages can show -----------------------------------------------------------------------


@pytest.fixture
def guarded(make_settings: Make) -> Iterator[Running]:
    with running(make_settings(SMT_UPLOAD_TOKEN=TOKEN, SMT_UPLOAD_MAX_BYTES="1000",
                               SMT_UPLOAD_CORS_ORIGINS=PAGE_ORIGIN)) as r:
        yield r


def test_every_refusal_carries_a_message(guarded: Running) -> None:
    with guarded.client() as client:
        replies = {
            401: upload(client, b"x\n", token="wrong"),
            413: upload(client, os.urandom(5000)),
            415: client.post("/upload", content=b"{}", headers={"content-type": "application/json",
                                                                "x-smt-upload-token": TOKEN}),
            400: client.post("/upload", content=form_parts([("role", "admin")]),
                             headers={"content-type": FORM_TYPE, "x-smt-upload-token": TOKEN}),
            403: upload(client, b"x\n", headers={"origin": "https://evil.example"}),
        }
    for status, resp in replies.items():
        assert resp.status_code == status, (status, resp.text)
        body = resp.json()
        assert body["ok"] is False and isinstance(body["message"], str) and len(body["message"]) > 10, body
        assert "{" not in body["message"], body  # a sentence, not JSON
    assert replies[413].json()["maxBytes"] == 1000 and "1,000 bytes" in replies[413].json()["message"]
    assert guarded.stored() == [] and guarded.temps() == []


def test_foreign_origin_is_refused_before_the_body_and_others_are_not(guarded: Running) -> None:
    with connect(guarded.port) as sock:  # headers only: the body never comes
        sock.sendall((f"POST /upload HTTP/1.1\r\nHost: 127.0.0.1:{guarded.port}\r\nOrigin: https://evil.example\r\n"
                      f"x-smt-upload-token: {TOKEN}\r\nContent-Type: {FORM_TYPE}\r\nContent-Length: 900\r\n\r\n"
                      ).encode())
        status, headers, body = read_response(sock)
    assert status == 403 and json.loads(body)["error"] == "origin_not_allowed"
    assert "access-control-allow-origin" not in headers
    with guarded.client() as client:
        allowed = upload(client, b"ESIID\n1\n", headers={"origin": PAGE_ORIGIN})
        scripted = upload(client, b"ESIID\n2\n")  # curl and scripts send no Origin
        own_page = upload(client, b"ESIID\n3\n", headers={"origin": guarded.url})  # serve's own GET / page
    assert [r.status_code for r in (allowed, scripted, own_page)] == [202, 202, 202]
    assert allowed.headers["access-control-allow-origin"] == PAGE_ORIGIN
    assert len(guarded.stored()) == 3


def test_success_reply_has_remaining_and_a_queue(make_settings: Make, tmp_path: Path) -> None:
    settings = make_settings(SMT_UPLOAD_ADMIN_LIMIT="10", SMT_SETTLE_SECONDS="1", SMT_WORKERS="2")
    with running(settings) as srv:
        first = post_form(srv, admin_page(b"ESIID,X\nq,1\n")).json()
        assert first["remaining"] == 9 and first["queue"] == {"position": 1, "etaSeconds": None}
        # Two files waiting in the ledger, and recent deliveries that took about 2 s each.
        for i, state in enumerate(("pending", "retrying")):
            srv.ledger.claim(f"{i:064x}", filename=f"w{i}.csv", path=None, size=1, mode="multipart")
            if state == "retrying":
                srv.ledger.mark_retrying(f"{i:064x}", status=503, error="x", attempts=1, next_attempt_at=0)
            else:
                srv.ledger.release(f"{i:064x}", error="x", attempts=0)
        for i in range(3):
            sha = f"{100 + i:064x}"
            srv.ledger.claim(sha, filename=f"s{i}.csv", path=None, size=1, mode="multipart")
            # its delivery started (and it was first seen) 2 s before it was sent
            srv.ledger.port.execute(
                "UPDATE files SET first_seen = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-2 seconds'),"
                " started_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-2 seconds') WHERE sha256 = ?", (sha,))
            srv.ledger.mark_sent(sha, status=200, destination="x", attempts=1)
        second = post_form(srv, admin_page(b"ESIID,X\nq,2\n")).json()
    assert second["queue"]["position"] == 3  # two ahead, then this one
    # settle (1 s) + 2 rounds of the ~2 s deliveries; the upper slack is the time this test took between
    # stamping and marking the rows, on a loaded machine
    assert 1 + 2 * 2.0 - 0.1 <= second["queue"]["etaSeconds"] <= 1 + 2 * 3.0
    assert second["remaining"] == 8 and second["message"].startswith("Upload accepted")


def test_a_stored_name_that_will_not_be_delivered_is_said(strict: Running) -> None:
    """`serve` stores any upload, but `watch` only takes SMT_PATTERNS: the reply says so honestly."""
    with strict.client() as client:
        taken = upload(client, b"ESIID\n1\n", "IntervalData.csv", token=None).json()
        left = upload(client, b"ESIID\n2\n", "notes.txt", token=None).json()
    assert taken["message"].startswith("Upload accepted and queued") and taken["file"]["interval"] is True
    assert Path(taken["file"]["path"]).read_bytes() == b"ESIID\n1\n"
    assert "will not be delivered" in left["message"] and "SMT_PATTERNS" in left["message"]
    assert Path(left["file"]["path"]).is_file()


def test_duplicate_of_sent_content_says_so(strict: Running) -> None:
    data = b"ESIID,X\ndup,1\n"
    sha = hashlib.sha256(data).hexdigest()
    strict.ledger.claim(sha, filename="d.csv", path=None, size=len(data), mode="multipart")
    strict.ledger.mark_sent(sha, status=200, destination="x", attempts=1)
    resp = post_form(strict, admin_page(data))
    assert resp.status_code == 202 and resp.json()["duplicate"] is True
    assert "already" in resp.json()["message"].lower() and resp.json()["queue"]["position"] == 0
    assert strict.stored() == []


def test_built_in_page(strict: Running) -> None:
    with strict.client() as client:
        page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for needle in ('id="file"', 'id="token"', 'id="send"', 'id="progress"', 'id="reply"', "upload.onprogress"):
        assert needle in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no external assets
    assert "default-src 'none'" in page.headers["content-security-policy"]


# --- the webhook bridge -------------------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


@dataclass
class StandInBridge:
    """The old webhook_server.py moved to another port: records requests, answers with a marker body."""

    url: str = ""
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def any(self, request: Request) -> Response:
        body = await request.body()
        with self.lock:
            self.seen.append(Seen(request.method, request.url.path, request.url.query,
                                  {k.lower(): v for k, v in request.headers.items()}, body))
        reply = b'{"ok":true,"from":"bridge","echo":' + (body or b"null") + b"}"
        resp = Response(reply, status_code=207, media_type="application/json")
        resp.raw_headers.append((b"set-cookie", b"a=1"))
        resp.raw_headers.append((b"set-cookie", b"b=2"))
        return resp


@contextmanager
def stand_in_bridge() -> Iterator[StandInBridge]:
    bridge = StandInBridge()
    app = Starlette(routes=[Route("/{path:path}", bridge.any,
                                  methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])])
    with app_in_thread(app, name="stand-in-bridge") as port:
        bridge.url = f"http://127.0.0.1:{port}"
        yield bridge


@pytest.fixture
def bridge() -> Iterator[StandInBridge]:
    with stand_in_bridge() as b:
        yield b


def webhook_settings(make: Make, tmp_path: Path, forward: str | None, unused_port: int) -> Settings:
    key = tmp_path / "id_key"
    key.write_text("not used: the sync pass fails in the background\n")
    env: dict[str, Any] = dict(INTELLIWATT_WEBHOOK_SECRET=SECRET, SMT_HOST="127.0.0.1", SMT_PORT=str(unused_port),
                               SMT_USER="smt", SMT_KEY=str(key))
    if forward:
        env["SMT_WEBHOOK_FORWARD_URL"] = forward
    return make(**env)


def trigger(client: httpx.Client, reason: str) -> httpx.Response:
    return client.post("/trigger/smt-now", content=json.dumps({"reason": reason, "esiid": "1044"}).encode(),
                       headers={"x-droplet-webhook-secret": SECRET, "content-type": "application/json"})


def test_each_app_reason_is_handled_or_passed_through(make_settings: Make, tmp_path: Path, unused_port: int,
                                                      bridge: StandInBridge) -> None:
    settings = webhook_settings(make_settings, tmp_path, bridge.url, unused_port)
    with running(settings, uploads=False) as srv, srv.client() as client:
        for reason in HANDLED:
            resp = trigger(client, reason)
            assert resp.status_code == 202, (reason, resp.text)
            assert resp.json()["started"] is True and resp.json()["message"]
        assert bridge.seen == [], "a reason serve handles went to the bridge"
        for reason in BRIDGE_ONLY:
            sent = json.dumps({"reason": reason, "esiid": "1044"}).encode()
            resp = trigger(client, reason)
            assert resp.status_code == 207 and resp.content == b'{"ok":true,"from":"bridge","echo":' + sent + b"}"
            assert resp.headers.get_list("set-cookie") == ["a=1", "b=2"]
            got = bridge.seen[-1]
            assert (got.method, got.path, got.body) == ("POST", "/trigger/smt-now", sent)
            assert got.headers["x-droplet-webhook-secret"] == SECRET  # the bridge checks its own secret
        srv.server.runner.join(30)
    assert [s.body for s in bridge.seen] == [json.dumps({"reason": r, "esiid": "1044"}).encode() for r in BRIDGE_ONLY]


def test_other_paths_pass_through_byte_for_byte(make_settings: Make, tmp_path: Path, unused_port: int,
                                                bridge: StandInBridge) -> None:
    settings = webhook_settings(make_settings, tmp_path, bridge.url, unused_port)
    body = os.urandom(70_000)  # binary, larger than one read
    with running(settings, uploads=False) as srv, srv.client() as client:
        agreements = client.post("/agreements", content=body, headers={"x-intelliwatt-secret": SECRET,
                                                                       "content-type": "application/octet-stream"})
        status = client.get("/smt/report-status", params={"id": "r 1", "esiid": "10443720000000001"})
    assert agreements.status_code == 207 and agreements.content.endswith(body + b"}")
    first, second = bridge.seen
    assert (first.method, first.path, first.body) == ("POST", "/agreements", body)
    assert first.headers["x-intelliwatt-secret"] == SECRET and first.headers["content-length"] == str(len(body))
    assert (second.method, second.path, second.query) == ("GET", "/smt/report-status", "id=r+1&esiid=10443720000000001")
    assert status.status_code == 207


def test_without_a_bridge_unhandled_reasons_start_nothing(make_settings: Make, tmp_path: Path,
                                                          unused_port: int) -> None:
    settings = webhook_settings(make_settings, tmp_path, None, unused_port)
    with running(settings, uploads=False) as srv, srv.client() as client:
        for reason in BRIDGE_ONLY:
            resp = trigger(client, reason)
            assert resp.status_code == 200, resp.text
            assert resp.json()["ok"] is True and resp.json()["started"] is False and reason in resp.json()["message"]
        assert srv.server.runner._current is None  # no sync pass was started
        missing = client.get("/agreements")
    assert missing.status_code == 404 and "/agreements" in missing.json()["message"]


def test_bridge_down_is_a_clear_502(make_settings: Make, tmp_path: Path, unused_port: int) -> None:
    with stand_in_bridge() as gone:
        url = gone.url
    settings = webhook_settings(make_settings, tmp_path, url, unused_port)
    with running(settings, uploads=False) as srv, srv.client() as client:
        resp = client.post("/agreements", content=b"{}")
        reason = trigger(client, "smt_meter_info")
    for r in (resp, reason):
        assert r.status_code == 502 and r.json()["error"] == "bridge_unreachable"
        assert url.split("//")[1] in r.json()["message"]


def test_a_long_client_name_keeps_its_extension_and_is_delivered(strict: Running) -> None:
    """Cut at 200 bytes, a long name once lost its `.csv`, was answered "queued" and never delivered."""
    with strict.client() as client:
        body = upload(client, b"ESIID\n1\n", "IntervalData_" + "x" * 400 + ".csv", token=None).json()
    name = body["file"]["name"]
    assert name.endswith(".csv") and len(name.partition("_")[2].encode()) <= 200, name
    assert body["message"].startswith("Upload accepted and queued"), body["message"]
