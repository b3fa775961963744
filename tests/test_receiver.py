"""The reference receiver over real loopback HTTP: storage, validation, tokens, faults, streaming, and the
raw-upload route's contract (what the real route accepts and refuses)."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import re
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import ADMIN_TOKEN, LOOPBACK, wait_for
from smt_watch.reference.receiver import Fault, ReceiverHandle, running_receiver
from smt_watch.reference.receiver_raw import Mismatch, node_base64

CSV = (
    b"ESIID,USAGE_DATE,REVISION_DATE,USAGE_START_TIME,USAGE_END_TIME,USAGE_KWH,ESTIMATED_ACTUAL,"
    b"CONSUMPTION_SURPLUSGENERATION\n'10443720000000001,1/2/2026,1/3/2026,0:00,0:15,0.25,A,Consumption\n"
)
SHA = hashlib.sha256(CSV).hexdigest()
PULL = "/api/admin/smt/pull"


@pytest.fixture
def rx(tmp_path: Path) -> Iterator[ReceiverHandle]:
    """The app in development (inline stored); production's refusals are tested with ``receiver``."""
    with running_receiver(tmp_path / "rx", inline=True) as handle:
        yield handle


def part_files(handle: ReceiverHandle) -> list[Path]:
    return sorted(handle.state.data_dir.glob(".*.part"))


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll a condition with a deadline (the thing awaited lives in another thread or process)."""
    wait_for(predicate, timeout, "condition")


def post_file(handle: ReceiverHandle, *, content: bytes = CSV, name: str = "M1_a.csv",
              headers: dict[str, str] | None = None, fields: dict[str, str] | None = None) -> httpx.Response:
    return LOOPBACK.post(handle.url + "/upload", files={"file": (name, content, "text/csv")}, data=fields,
                         headers=headers)


def inline_body(content: bytes = CSV, encoding: str = "base64") -> dict[str, Any]:
    data = gzip.compress(content) if encoding == "base64+gzip" else content
    body: dict[str, Any] = {
        "mode": "inline", "source": "adhocusage", "filename": "M1_a.csv", "mime": "text/csv",
        "encoding": encoding, "sizeBytes": len(content), "content_b64": base64.b64encode(data).decode(),
        "esiid": "10443720000000001", "meter": "M1", "captured_at": "2026-01-03T00:00:00Z",
    }
    if encoding == "base64+gzip":
        body["compressedBytes"] = len(data)
    return body


def test_multipart_stores_once_and_reports_duplicate(rx: ReceiverHandle) -> None:
    fields = {"esiid": "10443720000000001", "meter": "M1", "capturedAt": "2026-01-03T00:00:00Z",
              "source": "adhocusage", "sha256": SHA, "accountKey": "smt-watch", "role": "admin"}
    first = post_file(rx, headers={"Idempotency-Key": SHA}, fields=fields)
    assert first.status_code == 200
    assert first.json() == {"ok": True, "id": 1, "sha256": SHA, "sizeBytes": len(CSV), "duplicate": False}
    assert rx.read(SHA) == CSV
    again = post_file(rx, name="renamed.csv")
    assert again.json() == {**first.json(), "duplicate": True}
    [row] = rx.stored()
    assert (row["filename"], row["esiid"], row["meter"], row["captured_at"], row["source"], row["route"]) == (
        "M1_a.csv", "10443720000000001", "M1", "2026-01-03T00:00:00Z", "adhocusage", "/upload")
    first_rec, second_rec = rx.state.requests
    assert (first_rec.status, first_rec.duplicate, second_rec.duplicate) == (200, False, True)
    assert first_rec.fields == fields and first_rec.headers["idempotency-key"] == SHA
    assert part_files(rx) == []


def test_multipart_streams_large_file_through_a_hidden_temp_file(rx: ReceiverHandle) -> None:
    chunk = bytes(range(256)) * 256  # 64 KiB
    chunks = 480  # 30 MiB
    boundary = "smtwatchtestboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.csv\"\r\n"
            "Content-Type: text/csv\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    seen_part: list[Path] = []

    def body() -> Iterator[bytes]:
        yield head
        for i in range(chunks):
            if i == chunks // 2:  # halfway: the server must already be writing into data_dir
                wait_until(lambda: any(p.stat().st_size > 0 for p in part_files(rx)))
                seen_part.extend(part_files(rx))
            yield chunk
        yield tail

    tracemalloc.start()
    try:
        response = LOOPBACK.post(rx.url + "/upload", content=body(), timeout=60, headers={
            "content-type": f"multipart/form-data; boundary={boundary}",
            "content-length": str(len(head) + len(chunk) * chunks + len(tail))})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert response.status_code == 200, response.text
    expected = hashlib.sha256()
    for _ in range(chunks):
        expected.update(chunk)
    assert response.json()["sha256"] == expected.hexdigest()
    assert response.json()["sizeBytes"] == len(chunk) * chunks
    assert [p.name.startswith(".upload-") for p in seen_part] == [True]
    assert part_files(rx) == [] and not seen_part[0].exists()
    assert peak < 8 * 1024 * 1024, f"memory grew with file size: peak {peak} bytes"


def test_missing_file_field(rx: ReceiverHandle) -> None:
    response = LOOPBACK.post(rx.url + "/upload", files={"other": ("a.csv", CSV, "text/csv")}, data={"esiid": "1"})
    assert response.status_code == 400
    assert response.json() == {"ok": False, "error": 'Missing file field "file"'}
    assert rx.stored() == [] and part_files(rx) == []


def test_tokens_are_required_when_configured(tmp_path: Path) -> None:
    with running_receiver(tmp_path, admin_token="adm-secret", upload_token="up-secret", inline=True) as handle:
        for headers in ({}, {"x-smt-upload-token": "wrong"}, {"x-admin-token": "up-secret"}):
            response = post_file(handle, headers=headers)
            assert (response.status_code, response.json()) == (401, {"ok": False, "error": "unauthorized"})
            response = LOOPBACK.post(handle.url + PULL, json=inline_body(), headers=headers)
            assert (response.status_code, response.json()) == (401, {"ok": False, "error": "unauthorized"})
        assert handle.stored() == [] and part_files(handle) == []
        assert post_file(handle, headers={"x-smt-upload-token": "up-secret"}).status_code == 200
        ok = LOOPBACK.post(handle.url + PULL, json=inline_body(b"other"), headers={"x-admin-token": "adm-secret"})
        assert ok.status_code == 200
        assert handle.state.requests[2].headers["x-smt-upload-token"] == "wrong"
        assert handle.state.requests[-1].headers["x-admin-token"] == "adm-secret"


@pytest.mark.parametrize("encoding", ["base64", "base64+gzip"])
def test_inline_stores_decoded_bytes(rx: ReceiverHandle, encoding: str) -> None:
    response = LOOPBACK.post(rx.url + PULL, json=inline_body(encoding=encoding), headers={"Idempotency-Key": SHA})
    assert response.status_code == 200, response.text
    assert response.json() == {"ok": True, "id": 1, "sha256": SHA, "sizeBytes": len(CSV), "duplicate": False}
    assert rx.read(SHA) == CSV
    assert rx.stored()[0]["route"] == PULL and rx.stored()[0]["esiid"] == "10443720000000001"
    assert "content_b64" not in rx.state.requests[0].fields
    assert rx.state.requests[0].fields["encoding"] == encoding
    # the same bytes by the other route are a duplicate of the same row
    assert post_file(rx).json()["duplicate"] is True


@pytest.mark.parametrize(("encoding", "override", "code"), [
    ("base64", {"sizeBytes": len(CSV) + 1}, "INLINE_SIZE_MISMATCH"),
    ("base64+gzip", {"sizeBytes": len(CSV) - 1}, "INLINE_SIZE_MISMATCH"),
    ("base64+gzip", {"compressedBytes": 3}, "COMPRESSED_SIZE_MISMATCH"),
    ("base64+gzip", {"compressedBytes": None}, "MISSING_FIELD"),
    ("base64+gzip", {"content_b64": base64.b64encode(b"not gzip").decode(), "compressedBytes": 8},
     "INVALID_GZIP"),
    ("base64", {"content_b64": "not base64!"}, "INVALID_BASE64"),
    ("base64", {"encoding": "gzip"}, "INVALID_ENCODING"),
    ("base64", {"content_b64": None}, "MISSING_FIELD"),
    ("base64", {"mode": "url"}, "INVALID_MODE"),
    ("base64", {"filename": ""}, "INVALID_FIELD"),
    ("base64", {"esiid": 104437}, "HOME_ID_REQUIRED"),  # not a string: no house to look up, as the real route
    ("base64", {"sizeBytes": -1}, "INVALID_FIELD"),
    ("base64", {"sizeBytes": "12"}, "INVALID_FIELD"),
])
def test_inline_validation(rx: ReceiverHandle, encoding: str, override: dict[str, Any], code: str) -> None:
    body = {k: v for k, v in {**inline_body(encoding=encoding), **override}.items() if v is not None}
    response = LOOPBACK.post(rx.url + PULL, json=body)
    assert response.status_code == 400
    assert response.json()["ok"] is False and response.json()["error"] == code, response.json()
    assert rx.stored() == []


def test_inline_rejects_non_json(rx: ReceiverHandle) -> None:
    for content in (b"{nope", b"[1, 2]"):
        response = LOOPBACK.post(rx.url + PULL, content=content, headers={"content-type": "application/json"})
        assert (response.status_code, response.json()["error"]) == (400, "INVALID_JSON")


def test_sha256_mismatch_stores_nothing(rx: ReceiverHandle) -> None:
    wrong = "0" * 64
    for response in (
        post_file(rx, fields={"sha256": wrong}),
        post_file(rx, headers={"Idempotency-Key": wrong}),
        LOOPBACK.post(rx.url + PULL, json=inline_body(), headers={"Idempotency-Key": wrong}),
    ):
        assert response.status_code == 400
        assert response.json()["error"] == "SHA256_MISMATCH"
    assert rx.stored() == [] and part_files(rx) == []
    assert list((rx.state.data_dir / "files").iterdir()) == []


def test_fault_status_with_retry_after_then_normal(rx: ReceiverHandle) -> None:
    rx.state.faults.extend([Fault(status=503, retry_after="7"), Fault(status=429, body={"ok": False, "x": 1})])
    first = post_file(rx)
    assert (first.status_code, first.headers["retry-after"], first.json()) == (
        503, "7", {"ok": False, "error": "injected"})
    second = LOOPBACK.post(rx.url + PULL, json=inline_body())
    assert (second.status_code, second.json()) == (429, {"ok": False, "x": 1})
    assert "retry-after" not in second.headers
    assert post_file(rx).json()["duplicate"] is False  # faults consumed, nothing stored by them
    assert [r.status for r in rx.state.requests] == [503, 429, 200]
    assert rx.state.requests[0].fault == Fault(status=503, retry_after="7")


def test_fault_delay_then_proceeds(rx: ReceiverHandle) -> None:
    rx.state.faults.append(Fault(delay=0.3))
    started = time.monotonic()
    response = post_file(rx)
    assert response.status_code == 200 and response.json()["duplicate"] is False
    assert time.monotonic() - started >= 0.3


def test_fault_drop_breaks_the_connection(rx: ReceiverHandle) -> None:
    rx.state.faults.append(Fault(drop=True))
    with pytest.raises(httpx.RemoteProtocolError):
        post_file(rx)
    assert rx.stored() == [] and part_files(rx) == []
    assert rx.state.requests[0].status is None and rx.state.requests[0].fault == Fault(drop=True)
    assert post_file(rx).status_code == 200


def test_control_routes(rx: ReceiverHandle) -> None:
    queued = LOOPBACK.post(rx.url + "/_receiver/faults", json=[{"status": 502}, {"delay": 0.01, "retry_after": 3}])
    assert queued.json() == {"ok": True, "queued": 2}
    assert LOOPBACK.post(rx.url + "/_receiver/faults", json=[{"status": "x"}]).status_code == 400
    assert LOOPBACK.post(rx.url + "/_receiver/faults", json=[{"sttaus": 500}]).status_code == 400
    assert post_file(rx).status_code == 502
    assert post_file(rx, headers={"x-smt-upload-token": "t"}).status_code == 200
    records = LOOPBACK.get(rx.url + "/_receiver/requests").json()
    assert [(r["path"], r["status"], r["duplicate"]) for r in records] == [
        ("/upload", 502, None), ("/upload", 200, False)]
    assert records[0]["fault"]["status"] == 502 and records[1]["fault"]["retry_after"] == "3"
    assert records[1]["headers"]["x-smt-upload-token"] == "t"
    files = LOOPBACK.get(rx.url + "/_receiver/files").json()
    assert [(f["sha256"], f["sizeBytes"]) for f in files] == [(SHA, len(CSV))]
    assert rx.state.wait_for_requests(2, timeout=1)[1].sha256 == SHA


def test_too_large_upload_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    with running_receiver(tmp_path, max_upload_bytes=100_000) as handle:
        declared = post_file(handle, content=b"x" * 200_000)  # Content-Length already too big
        assert (declared.status_code, declared.json()) == (
            413, {"ok": False, "error": "too_large", "maxBytes": 100_000})
        # chunked (no Content-Length): refused while streaming, once the part crosses the limit
        boundary = "b0undary"
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n'.encode(),
                 b"y" * 60_000, b"y" * 60_000, f"\r\n--{boundary}--\r\n".encode()]
        streamed = LOOPBACK.post(handle.url + "/upload", content=iter(parts),
                                 headers={"content-type": f"multipart/form-data; boundary={boundary}"})
        assert streamed.status_code == 413
        assert post_file(handle, content=b"z" * 100_000).status_code == 200  # the limit itself is fine
        assert len(handle.stored()) == 1 and part_files(handle) == []


@pytest.mark.parametrize("body", [
    b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.csv"\r\n\r\nabc',  # no closing boundary
    b'--B\r\nContent-Disposition: form-data; name="esiid"\r\n\r\n' + b"1" * 70_000 + b"\r\n--B--\r\n",
    b"garbage without any boundary at all",
])
def test_malformed_multipart(rx: ReceiverHandle, body: bytes) -> None:
    response = LOOPBACK.post(rx.url + "/upload", content=body,
                             headers={"content-type": "multipart/form-data; boundary=B"})
    assert response.status_code == 400 and response.json()["error"] in {"MALFORMED_UPLOAD"}
    assert part_files(rx) == [] and rx.stored() == []


def test_client_disconnect_mid_upload_removes_temp_file(rx: ReceiverHandle) -> None:
    head = b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.csv"\r\n\r\n'
    body_start = head + b"q" * (2 * 1024 * 1024)
    request = (f"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=B\r\n"
               f"Content-Length: {len(body_start) + 10_000_000}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", rx.port)) as sock:
        sock.sendall(request + body_start)
        wait_until(lambda: bool(part_files(rx)))
    [record] = rx.state.wait_for_requests(1)
    assert record.status is None
    assert part_files(rx) == [] and rx.stored() == []


def test_concurrent_identical_uploads_store_one_file(rx: ReceiverHandle) -> None:
    results: list[dict[str, Any]] = []
    threads = [threading.Thread(target=lambda: results.append(post_file(rx).json())) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r["duplicate"] for r in results) == [False] + [True] * 5
    assert {r["id"] for r in results} == {1} and len(rx.stored()) == 1


# --- raw-upload: the real route's contract (app/api/admin/smt/raw-upload/route.ts) ---------------------

RAW = "/api/admin/smt/raw-upload"
ESIID = "10443720000000001"
NEEDS = ["filename (string)", "size_bytes|sizeBytes (number)", "sha256 (string)"]  # the real route's words


def interval_lines(n: int, start: int = 0) -> list[str]:
    labels = [f"{h}:{m:02d}" for h in range(24) for m in (0, 15, 30, 45)]
    return [f"'{ESIID},01/05/2026,01/06/2026,{labels[i]},{labels[(i + 1) % 96]},0.{i:03d},A,Consumption"
            for i in range(start, start + n)]


HEADER_LINE = CSV.split(b"\n")[0].decode()


def node_chunk(name: str, lines: list[str], part: int, parts: int) -> tuple[dict[str, Any], bytes]:
    """A chunk exactly as ``scripts/droplet/smt-upload-server.ts`` builds it (its field set; no
    contentType, no Idempotency-Key; lines joined with \\n and no newline at the end)."""
    content = "\n".join([HEADER_LINE, *lines]).encode()
    filename = f"{name}.part{part}-of-{parts}" if parts > 1 else name
    return {
        "filename": filename, "sizeBytes": len(content), "sha256": hashlib.sha256(content).hexdigest(),
        "contentBase64": base64.b64encode(content).decode(), "source": "droplet-upload",
        "receivedAt": "2026-01-06T12:00:00.000Z", "purgeExisting": part == 1, "postIngest": part == parts,
        "esiid": ESIID, "storagePath": f"/smt/{ESIID}/{filename}", "meter": "M1",
    }, content


def raw_body(content: bytes = CSV, **override: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"filename": "M1_a.csv", "sizeBytes": len(content), "sha256": hashlib.sha256(content)
                            .hexdigest(), "contentBase64": base64.b64encode(content).decode()}
    body.update(override)
    return {k: v for k, v in body.items() if v is not None}


def post_raw(handle: ReceiverHandle, body: object, token: str | None = ADMIN_TOKEN,
             headers: dict[str, str] | None = None) -> httpx.Response:
    sent = {"Content-Type": "application/json", **({"x-admin-token": token} if token is not None else {}),
            **(headers or {})}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return LOOPBACK.post(handle.url + RAW, content=data, headers=sent, timeout=10)


def raw_file(handle: ReceiverHandle, name: str) -> bytes:
    [row] = [r for r in handle.stored() if r["filename"] == name]
    return handle.read(row["sha256"])


def test_raw_upload_takes_node_server_chunks(receiver: ReceiverHandle) -> None:
    first, one = node_chunk("IntervalData_M1.csv", interval_lines(3), 1, 2)
    second, two = node_chunk("IntervalData_M1.csv", interval_lines(2, start=3), 2, 2)
    reply = post_raw(receiver, first)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body == {"ok": True, "id": body["id"], "filename": "IntervalData_M1.csv.part1-of-2",
                    "sizeBytes": len(one), "sha256": first["sha256"], "createdAt": body["createdAt"],
                    "normalizedInline": {"intervalsInserted": 3, "inserted": 3, "skipped": 0, "records": 3,
                                         "tsMin": "2026-01-05T06:00:00.000Z", "tsMax": "2026-01-05T06:30:00.000Z",
                                         "postIngestDeferred": False}}
    assert isinstance(body["id"], str) and body["id"].isdigit()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", body["createdAt"])
    last = post_raw(receiver, second).json()
    assert last["normalizedInline"]["postIngestDeferred"] is True and "duplicate" not in last
    assert raw_file(receiver, "IntervalData_M1.csv") == one + b"\n" + two.split(b"\n", 1)[1]
    assert receiver.state.raw.interval_count() == 5
    assert receiver.state.raw_mismatches == []


@pytest.mark.parametrize("drop", ["filename", "sizeBytes", "sha256"])
def test_raw_upload_names_each_missing_field(receiver: ReceiverHandle, drop: str) -> None:
    body = raw_body(contentType="text/csv")
    del body[drop]
    reply = post_raw(receiver, body)
    assert reply.status_code == 400
    assert reply.json() == {"ok": False, "error": "VALIDATION", "details": "Missing or invalid required fields",
                            "missing": [NEEDS[["filename", "sizeBytes", "sha256"].index(drop)]],
                            "receivedKeys": list(body)}
    assert receiver.state.raw.chunks() == []


@pytest.mark.parametrize(("body", "missing", "keys"), [
    (b"not json", NEEDS, []),
    (b"", NEEDS, []),
    (b"[1, 2]", NEEDS, ["0", "1"]),
    ({"filename": "", "sizeBytes": "12", "sha256": 0}, NEEDS, ["filename", "sizeBytes", "sha256"]),
    ({"filename": "a", "sizeBytes": True, "sha256": "x", "2": 1, "1": 0}, NEEDS[1:2],
     ["1", "2", "filename", "sizeBytes", "sha256"]),  # Object.keys: integer-like keys first
    ({"filename": "a", "sizeBytes": None, "size_bytes": "3", "sha256": "x"}, NEEDS[1:2],
     ["filename", "sizeBytes", "size_bytes", "sha256"]),
])
def test_raw_upload_validation_reads_the_body_as_javascript_does(receiver: ReceiverHandle, body: Any,
                                                                  missing: list[str], keys: list[str]) -> None:
    reply = post_raw(receiver, body)
    assert reply.status_code == 400
    assert (reply.json()["missing"], reply.json()["receivedKeys"]) == (missing, keys)


def test_raw_upload_optional_fields_and_names(receiver: ReceiverHandle) -> None:
    """``size_bytes`` stands for ``sizeBytes``; no contentType, no content, any name: all accepted."""
    reply = post_raw(receiver, raw_body(sizeBytes=None, size_bytes=len(CSV)))
    assert reply.status_code == 200 and reply.json()["sizeBytes"] == len(CSV)
    assert raw_file(receiver, "M1_a.csv") == CSV  # no .partN-of-M: a whole file, part 1 of 1
    assert receiver.state.raw.chunks() == [("M1_a.csv", 1, 1)]

    bare = post_raw(receiver, {"filename": "legacy.csv", "sizeBytes": 10, "sha256": "f" * 64})
    assert bare.status_code == 200 and bare.json()["normalizedInline"] is None
    assert [m.kind for m in receiver.state.raw_mismatches] == [Mismatch.NO_CONTENT]
    assert receiver.state.raw.lookup("f" * 64) is not None and receiver.state.raw.interval_count() == 1
    assert [r["filename"] for r in receiver.stored()] == ["M1_a.csv"]  # a row without content is not a file


def test_raw_upload_duplicate_answers_with_the_stored_row(receiver: ReceiverHandle) -> None:
    first = post_raw(receiver, raw_body(filename="a.csv.part1-of-2")).json()
    again = post_raw(receiver, raw_body(filename="renamed.csv")).json()
    assert "duplicate" not in first and again["duplicate"] is True
    assert {k: again[k] for k in ("id", "filename", "createdAt")} == {
        k: first[k] for k in ("id", "filename", "createdAt")}
    assert receiver.state.requests[-1].duplicate is True and receiver.state.raw.interval_count() == 1


def test_raw_upload_token(tmp_path: Path) -> None:
    with running_receiver(tmp_path / "a", admin_token="adm-secret") as handle:
        for token in (None, "wrong", ""):
            reply = post_raw(handle, raw_body(), token=token)
            assert (reply.status_code, reply.json()) == (401, {"error": "Unauthorized"})
        assert handle.state.raw.chunks() == []
        assert post_raw(handle, raw_body(), token="adm-secret").status_code == 200
        assert handle.state.raw_mismatches == []
    with running_receiver(tmp_path / "b") as handle:  # no token configured: accepted, but not as the app would
        assert post_raw(handle, raw_body(), token=None).status_code == 200
        assert [m.kind for m in handle.state.raw_mismatches] == [Mismatch.NO_ADMIN_TOKEN]


def test_raw_upload_records_what_the_real_route_does_not_check(receiver: ReceiverHandle) -> None:
    a, b, c, d = (CSV + "\n".join(interval_lines(n, start=1)).encode() + b"\n" for n in (1, 2, 3, 4))
    sloppy = base64.encodebytes(c).decode().replace("+", "-")  # line breaks, URL-safe alphabet
    cases = [
        (raw_body(a, sha256="0" * 64), [Mismatch.SHA256]),
        (raw_body(b, filename="b.csv", sizeBytes=len(b) + 1), [Mismatch.SIZE]),
        (raw_body(c, filename="c.csv", contentBase64=sloppy), [Mismatch.BASE64]),
    ]
    for body, kinds in cases:
        reply = post_raw(receiver, body)
        assert reply.status_code == 200, reply.text
        assert [m.kind for m in receiver.state.raw_mismatches] == kinds, body
        receiver.state.raw_mismatches.clear()
    assert raw_file(receiver, "c.csv") == c  # decoded as Node's Buffer.from would
    assert post_raw(receiver, raw_body(d, filename="d.csv"), headers={"Idempotency-Key": "3" * 64}).is_success
    assert [m.kind for m in receiver.state.raw_mismatches] == [Mismatch.IDEMPOTENCY_KEY]
    assert receiver.state.raw.interval_count() == 4 + 1  # lenient is lenient: every row went in


@pytest.mark.parametrize("override", [{"filename": 5}, {"sizeBytes": 1.5}, {"sizeBytes": 2**31},
                                      {"contentType": ["text/csv"]}, {"contentBase64": 7}])
def test_raw_upload_refuses_what_the_database_would(receiver: ReceiverHandle, override: dict[str, Any]) -> None:
    reply = post_raw(receiver, raw_body(**override))
    assert reply.status_code == 500
    assert (reply.json()["ok"], reply.json()["error"]) == (False, "DB")
    assert receiver.state.raw.chunks() == []


def test_raw_upload_null_body_is_an_empty_500(receiver: ReceiverHandle) -> None:
    reply = post_raw(receiver, b"null")
    assert (reply.status_code, reply.content) == (500, b"")


@pytest.mark.parametrize(("text", "expected"), [
    ("QUJD", b"ABC"), ("QU JD\n", b"ABC"), ("QUJ", b"AB"), ("Q", b""), ("QUJD=QUJD", b"ABC"),
    ("QUJD!!QUJD", b"ABCABC"), ("QU-_", b"AO\xbf"), ("QUJ=D", b"AB"), ("QUJD\u0141QUJD", b"ABC\x01\x05\x09"),
])
def test_node_base64(text: str, expected: bytes) -> None:
    """Outputs of ``Buffer.from(text, 'base64')`` under Node 20."""
    assert node_base64(text) == (expected, text == "QUJD")


# --- as production runs: Vercel's body limit, inline refused, what raw-upload keeps ----------------------


def _padded(body: dict[str, Any], size: int) -> bytes:
    """``body`` as JSON padded with trailing spaces (still valid JSON) to exactly ``size`` bytes."""
    data = json.dumps(body).encode()
    return data + b" " * (size - len(data))


def test_bodies_over_4_5_mb_get_vercels_413_before_the_route(receiver: ReceiverHandle) -> None:
    from smt_watch.delivery.base import MAX_REQUEST_BYTES

    at_limit = post_raw(receiver, _padded(raw_body(), MAX_REQUEST_BYTES))
    assert at_limit.status_code == 200, at_limit.text
    over = post_raw(receiver, _padded(raw_body(CSV + b"x"), MAX_REQUEST_BYTES + 1))
    assert over.status_code == 413 and "FUNCTION_PAYLOAD_TOO_LARGE" in over.text
    assert over.headers["x-vercel-error"] == "FUNCTION_PAYLOAD_TOO_LARGE"
    pull = LOOPBACK.post(receiver.url + PULL, content=_padded(inline_body(), MAX_REQUEST_BYTES + 1),
                         headers={"content-type": "application/json", "x-admin-token": ADMIN_TOKEN}, timeout=30)
    assert pull.status_code == 413
    assert len(receiver.state.raw.chunks()) == 1  # only the body at the limit reached the route
    assert [r.status for r in receiver.state.requests] == [200, 413, 413]


def test_the_upload_server_route_is_not_vercel(tmp_path: Path) -> None:
    """/upload stands in for the droplet's upload server: its own limit, not 4.5 MB."""
    with running_receiver(tmp_path / "rx") as handle:
        big = CSV + b"'10443720000000001,1/2/2026,1/3/2026,0:15,0:30,0.25,A,Consumption\n" * 70_000
        assert len(big) > 4_500_000
        assert post_file(handle, content=big).status_code == 200


@pytest.mark.parametrize(("homes", "override", "code"), [
    (None, {}, "INLINE_DISABLED"),  # every ESIID has a house: production's own refusal
    (("10443720000000001",), {}, "INLINE_DISABLED"),
    (("10443720000000009",), {}, "HOME_ID_REQUIRED"),  # checked before the inline guard
    (("10443720000000009",), {"homeId": "house-1"}, "INLINE_DISABLED"),
    (None, {"esiid": "  "}, "HOME_ID_REQUIRED"),
])
def test_inline_is_refused_as_production_does(tmp_path: Path, homes: tuple[str, ...] | None,
                                              override: dict[str, Any], code: str) -> None:
    with running_receiver(tmp_path / "prod", admin_token=ADMIN_TOKEN, homes=homes) as handle:
        reply = LOOPBACK.post(handle.url + PULL, json={**inline_body(), **override},
                              headers={"x-admin-token": ADMIN_TOKEN}, timeout=10)
        assert reply.status_code == 400 and reply.json()["error"] == code, reply.text
        assert reply.json()["ok"] is False and reply.json()["message"]
        assert handle.stored() == []


def test_dev_inline_stores_what_production_refuses(tmp_path: Path) -> None:
    with running_receiver(tmp_path / "dev", admin_token=ADMIN_TOKEN, inline=True) as handle:
        reply = LOOPBACK.post(handle.url + PULL, json=inline_body(), headers={"x-admin-token": ADMIN_TOKEN}, timeout=10)
        assert reply.status_code == 200, reply.text
        assert handle.read(SHA) == CSV


def test_raw_upload_keeps_source_storage_path_and_chunk_text(receiver: ReceiverHandle) -> None:
    body, content = node_chunk("IntervalData_M1.csv", interval_lines(2), 1, 1)
    assert post_raw(receiver, body).status_code == 200
    bare = raw_body(b"ESIID,X\n1,2")
    assert post_raw(receiver, bare).status_code == 200
    rows = LOOPBACK.get(receiver.url + "/_receiver/chunks", timeout=10).json()
    assert [(r["filename"], r["source"], r["storagePath"], r["content"]) for r in rows] == [
        ("IntervalData_M1.csv", "droplet-upload", f"/smt/{ESIID}/IntervalData_M1.csv", content.decode()),
        ("M1_a.csv", "adhocusage", "/adhocusage/M1_a.csv", "ESIID,X\n1,2"),  # the route's defaults
    ]


def test_an_accepted_inline_file_is_normalized_as_the_inline_route_does(tmp_path: Path) -> None:
    """``receive --dev-inline`` with the app's routes: an inline file's intervals land in SmtInterval with no
    window; once an ESIID's only meter is ``unknown``, a later file's rows go there too, whatever meter it names
    (``dualWriteUsageIntervals``: the one existing meter wins), and a slot the table already holds keeps its
    kWh (``createMany(skipDuplicates)``); over real HTTP."""
    from smt_watch.reference.app_routes import AppStore

    header = "ESIID,USAGE_DATE,REVISION_DATE,USAGE_START_TIME,USAGE_END_TIME,USAGE_KWH,METER\n"
    first = (header + "'10443720000000001,01/05/2026,,0:00,0:15,0.5,\n").encode()
    second = (header + "'10443720000000001,01/05/2026,,0:00,0:15,0.9,M7\n"
              "'10443720000000001,01/05/2026,,0:15,0:30,0.4,M7\n").encode()
    with running_receiver(tmp_path / "data", admin_token=ADMIN_TOKEN, inline=True, app_routes=True) as handle:
        for n, content in enumerate((first, second)):
            reply = LOOPBACK.post(f"{handle.url}/api/admin/smt/pull", headers={"x-admin-token": ADMIN_TOKEN}, json={
                "mode": "inline", "filename": f"f{n}.csv", "encoding": "base64", "esiid": "10443720000000001",
                "content_b64": base64.b64encode(content).decode(), "sizeBytes": len(content)})
            assert reply.status_code == 200, reply.text
    store = AppStore(tmp_path / "data")
    try:
        rows = store.day_rows("10443720000000001", "unknown", 0, 2**62, 100)
        assert [(r["ts"], r["kwh"]) for r in rows] == [(1767592800000, "0.50000"), (1767593700000, "0.40000")]
        assert store.day_rows("10443720000000001", "M7", 0, 2**62, 100) == []
    finally:
        store.close()
