"""The reference receiver over real loopback HTTP: storage, validation, tokens, faults, streaming."""

from __future__ import annotations

import base64
import gzip
import hashlib
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import wait_for
from smt_watch.receiver import Fault, ReceiverHandle, running_receiver

CSV = (
    b"ESIID,USAGE_DATE,REVISION_DATE,USAGE_START_TIME,USAGE_END_TIME,USAGE_KWH,ESTIMATED_ACTUAL,"
    b"CONSUMPTION_SURPLUSGENERATION\n'10443720000000001,1/2/2026,1/3/2026,0:00,0:15,0.25,A,Consumption\n"
)
SHA = hashlib.sha256(CSV).hexdigest()
PULL = "/api/admin/smt/pull"


@pytest.fixture
def rx(tmp_path: Path) -> Iterator[ReceiverHandle]:
    with running_receiver(tmp_path / "rx") as handle:
        yield handle


def part_files(handle: ReceiverHandle) -> list[Path]:
    return sorted(handle.state.data_dir.glob(".*.part"))


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll a condition with a deadline (the thing awaited lives in another thread or process)."""
    wait_for(predicate, timeout, "condition")


def post_file(handle: ReceiverHandle, *, content: bytes = CSV, name: str = "M1_a.csv",
              headers: dict[str, str] | None = None, fields: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(handle.url + "/upload", files={"file": (name, content, "text/csv")}, data=fields,
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
        response = httpx.post(rx.url + "/upload", content=body(), timeout=60, headers={
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
    response = httpx.post(rx.url + "/upload", files={"other": ("a.csv", CSV, "text/csv")}, data={"esiid": "1"})
    assert response.status_code == 400
    assert response.json() == {"ok": False, "error": 'Missing file field "file"'}
    assert rx.stored() == [] and part_files(rx) == []


def test_tokens_are_required_when_configured(tmp_path: Path) -> None:
    with running_receiver(tmp_path, admin_token="adm-secret", upload_token="up-secret") as handle:
        for headers in ({}, {"x-smt-upload-token": "wrong"}, {"x-admin-token": "up-secret"}):
            response = post_file(handle, headers=headers)
            assert (response.status_code, response.json()) == (401, {"ok": False, "error": "unauthorized"})
            response = httpx.post(handle.url + PULL, json=inline_body(), headers=headers)
            assert (response.status_code, response.json()) == (401, {"ok": False, "error": "unauthorized"})
        assert handle.stored() == [] and part_files(handle) == []
        assert post_file(handle, headers={"x-smt-upload-token": "up-secret"}).status_code == 200
        ok = httpx.post(handle.url + PULL, json=inline_body(b"other"), headers={"x-admin-token": "adm-secret"})
        assert ok.status_code == 200
        assert handle.state.requests[2].headers["x-smt-upload-token"] == "wrong"
        assert handle.state.requests[-1].headers["x-admin-token"] == "adm-secret"


@pytest.mark.parametrize("encoding", ["base64", "base64+gzip"])
def test_inline_stores_decoded_bytes(rx: ReceiverHandle, encoding: str) -> None:
    response = httpx.post(rx.url + PULL, json=inline_body(encoding=encoding), headers={"Idempotency-Key": SHA})
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
    ("base64", {"esiid": 104437}, "INVALID_FIELD"),
    ("base64", {"sizeBytes": -1}, "INVALID_FIELD"),
    ("base64", {"sizeBytes": "12"}, "INVALID_FIELD"),
])
def test_inline_validation(rx: ReceiverHandle, encoding: str, override: dict[str, Any], code: str) -> None:
    body = {k: v for k, v in {**inline_body(encoding=encoding), **override}.items() if v is not None}
    response = httpx.post(rx.url + PULL, json=body)
    assert response.status_code == 400
    assert response.json()["ok"] is False and response.json()["error"] == code, response.json()
    assert rx.stored() == []


def test_inline_rejects_non_json(rx: ReceiverHandle) -> None:
    for content in (b"{nope", b"[1, 2]"):
        response = httpx.post(rx.url + PULL, content=content, headers={"content-type": "application/json"})
        assert (response.status_code, response.json()["error"]) == (400, "INVALID_JSON")


def test_sha256_mismatch_stores_nothing(rx: ReceiverHandle) -> None:
    wrong = "0" * 64
    for response in (
        post_file(rx, fields={"sha256": wrong}),
        post_file(rx, headers={"Idempotency-Key": wrong}),
        httpx.post(rx.url + PULL, json=inline_body(), headers={"Idempotency-Key": wrong}),
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
    second = httpx.post(rx.url + PULL, json=inline_body())
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
    queued = httpx.post(rx.url + "/_receiver/faults", json=[{"status": 502}, {"delay": 0.01, "retry_after": 3}])
    assert queued.json() == {"ok": True, "queued": 2}
    assert httpx.post(rx.url + "/_receiver/faults", json=[{"status": "x"}]).status_code == 400
    assert httpx.post(rx.url + "/_receiver/faults", json=[{"sttaus": 500}]).status_code == 400
    assert post_file(rx).status_code == 502
    assert post_file(rx, headers={"x-smt-upload-token": "t"}).status_code == 200
    records = httpx.get(rx.url + "/_receiver/requests").json()
    assert [(r["path"], r["status"], r["duplicate"]) for r in records] == [
        ("/upload", 502, None), ("/upload", 200, False)]
    assert records[0]["fault"]["status"] == 502 and records[1]["fault"]["retry_after"] == "3"
    assert records[1]["headers"]["x-smt-upload-token"] == "t"
    files = httpx.get(rx.url + "/_receiver/files").json()
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
        streamed = httpx.post(handle.url + "/upload", content=iter(parts),
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
    response = httpx.post(rx.url + "/upload", content=body,
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
