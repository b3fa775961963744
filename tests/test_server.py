"""`serve` in process: uvicorn on an ephemeral loopback port, real HTTP clients (httpx, raw sockets).

Every wait is a condition with a deadline. "Nothing left behind" means: no stored file and no hidden
``.upload-*.part`` temp in the inbox, checked after the server has answered (or, for an abandoned body,
after waiting with a deadline for the temp to disappear).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sftp_server import SftpTestServer, sftp_env

import smt_watch.server as server_module
from conftest import TLS_CONTEXT, UPLOAD_TOKEN, IoCalls, wait_for, watching, write_csv
from smt_watch.config import Settings
from smt_watch.ledger import STATES, Ledger
from smt_watch.reference.receiver import app_in_thread
from smt_watch.server import MAX_NAME_BYTES, Server, build, safe_name
from smt_watch.statedir import open_ledger

Make = Callable[..., Settings]

TOKEN = UPLOAD_TOKEN  # the watcher sends SMT_UPLOAD_TOKEN to the receiver; serve requires the same variable
SECRET = "webhook-secret-5a5a5a5a5a5a-SECRET"
STAMPED = re.compile(r"^(\d{8}T\d{6})_(?:\d+_)?([A-Za-z0-9._-]+)$")
SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
UNAUTHORIZED = {"ok": False, "error": "unauthorized", "message": "Invalid or missing SMT upload token"}
# README and docs/contract.md §5, spelled out here rather than imported from the code under test, so that a header
# dropped from smt_watch.server.SECRET_HEADERS turns a test red (mutant serve-trigger-header-dropped).
SECRET_HEADERS = ("x-intelliwatt-secret", "x-smt-secret", "x-webhook-secret", "x-proxy-secret",
                  "x-droplet-webhook-secret")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def csv_bytes(tmp_path: Path, seed: int, rows: int = 10) -> bytes:
    return write_csv(tmp_path / "src" / f"{uuid.uuid4().hex}.csv", rows=rows, seed=seed).read_bytes()


# --- an in-process server on an ephemeral port ---------------------------------------------------------


@dataclass
class Running:
    url: str
    port: int
    server: Server
    ledger: Ledger
    inbox: Path

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=20, trust_env=False, verify=TLS_CONTEXT, **kw)

    def stored(self) -> list[Path]:
        """Visible files in the inbox (what ``watch`` would pick up)."""
        return sorted(p for p in self.inbox.iterdir() if not p.name.startswith("."))

    def temps(self) -> list[Path]:
        return sorted(self.inbox.glob(".upload-*"))

    def everything(self) -> list[Path]:
        return sorted(self.inbox.rglob("*"))


@contextmanager
def running(settings: Settings, *, uploads: bool = True) -> Iterator[Running]:
    ledger = open_ledger(settings)
    server = build(settings, ledger)
    try:
        with app_in_thread(server.app(uploads=uploads), start_timeout=15, name="smt-serve-test") as port:
            yield Running(f"http://127.0.0.1:{port}", port, server, ledger, settings.local_dir)
    finally:
        server.runner.join(30)
        ledger.close()


# --- request helpers -----------------------------------------------------------------------------------


def upload(client: httpx.Client, data: bytes, name: str = "a.csv", *, token: str | None = TOKEN,
           headers: dict[str, str] | None = None, fields: dict[str, str] | None = None) -> httpx.Response:
    h = {"x-smt-upload-token": token} if token is not None else {}
    h.update(headers or {})
    return client.post("/upload", files={"file": (name, data, "text/csv")}, data=fields or {}, headers=h)


BOUNDARY = "smtwatchtestboundary7MA4YWxkTrZu0gW"


def form(data: bytes, filename: bytes = b"a.csv", *, fields: dict[str, str] | None = None,
         file_field: str = "file") -> bytes:
    """A multipart body built by hand, so file names can carry raw bytes httpx would escape."""
    out = b""
    for k, v in (fields or {}).items():
        out += f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
    out += (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{file_field}"; filename="'.encode()
            + filename + b'"\r\nContent-Type: text/csv\r\n\r\n' + data + b"\r\n")
    return out + f"--{BOUNDARY}--\r\n".encode()


FORM_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def raw_head(port: int, length: int | None, *, token: str | None = TOKEN, extra: str = "") -> bytes:
    lines = ["POST /upload HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Content-Type: {FORM_TYPE}"]
    lines.append(f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked")
    if token is not None:
        lines.append(f"x-smt-upload-token: {token}")
    if extra:
        lines.append(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_response(sock: socket.socket, timeout: float = 15) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1.1 response (Content-Length framed) from a raw socket."""
    sock.settimeout(timeout)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before a response: {buf!r}")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines)}
    need = int(headers.get("content-length", "0"))
    while len(body) < need:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(status_line.split()[1]), headers, body


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=15)


def assert_nothing_stored(r: Running) -> None:
    assert r.stored() == [], r.everything()
    assert r.temps() == [], r.everything()


def assert_stored(r: Running, body: dict[str, Any], data: bytes) -> Path:
    path: Path = r.inbox / str(body["file"]["name"])
    assert path.parent == r.inbox
    assert path.read_bytes() == data
    assert body["file"]["size"] == len(data)
    assert body["file"]["sha256"] == sha(data)
    return path


# --- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture
def settings(make_settings: Make) -> Settings:
    return make_settings(SMT_UPLOAD_TOKEN=TOKEN, SMT_UPLOAD_CUSTOMER_LIMIT="1000", SMT_UPLOAD_MAX_CONCURRENT="32")


@pytest.fixture
def srv(settings: Settings) -> Iterator[Running]:
    with running(settings) as r:
        yield r


@pytest.fixture
def client(srv: Running) -> Iterator[httpx.Client]:
    with srv.client() as c:
        yield c


# --- safe_name -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("a.csv", "a.csv"),
        ("IntervalData_2026.CSV", "IntervalData_2026.CSV"),
        ("../../etc/passwd", "passwd"),
        ("/abs/path.csv", "path.csv"),
        ("C:\\win\\x.csv", "x.csv"),
        ("dir\\..\\..\\y.csv", "y.csv"),
        ("a\x00b.csv", "ab.csv"),
        ("\x1b[31mred.csv", "31mred.csv"),
        ("line\nbreak\r.csv", "linebreak.csv"),
        ("tab\there.csv", "tabhere.csv"),
        ("", "upload.csv"),
        (".", "upload.csv"),
        ("..", "upload.csv"),
        ("....", "upload.csv"),
        ("x/..", "upload.csv"),
        ("dir/", "upload.csv"),
        (".hidden.csv", "hidden.csv"),
        ("my file (1).csv", "my_file_1_.csv"),
        ("Zählerstand.csv", "Z_hlerstand.csv"),
        ("a;rm -rf $HOME`.csv", "a_rm_-rf_HOME_.csv"),
    ],
)
def test_safe_name(raw: str, expected: str) -> None:
    assert safe_name(raw) == expected


@pytest.mark.parametrize(
    "raw",
    ["a" * 300, "a" * 296 + ".csv", "é" * 300, "../" * 100 + "x.csv", "\x00" * 50, "." * 300, "-_." * 100 + "z",
     "%2e%2e%2fpasswd", "名前.csv", "\u202ecod.exe.csv", "CON", " ", "a\u2028b.csv"],
)
def test_safe_name_properties(raw: str) -> None:
    name = safe_name(raw)
    assert SAFE.match(name), name
    assert 0 < len(name.encode()) <= MAX_NAME_BYTES
    assert "/" not in name and "\\" not in name and name not in (".", "..")


# --- upload: the happy path and end to end -------------------------------------------------------------


def test_upload_lands_in_the_inbox_with_the_spec_reply(srv: Running, client: httpx.Client, tmp_path: Path) -> None:
    data = csv_bytes(tmp_path, 1)
    before = datetime.now(UTC).replace(microsecond=0)
    resp = upload(client, data, "IntervalData.csv")
    after = datetime.now(UTC)
    assert resp.status_code == 202, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"ok", "message", "duplicate", "file", "remaining", "meta", "queue", "ingest"}
    assert body["remaining"] == body["meta"]["remaining"] and set(body["queue"]) == {"position", "etaSeconds"}
    assert body["ok"] is True and body["duplicate"] is False and isinstance(body["message"], str)
    assert set(body["file"]) == {"name", "size", "sha256", "path", "interval"}  # path, interval: as the Node server
    assert body["file"]["interval"] is True and body["ingest"]["queued"] is True
    stamp, base = STAMPED.match(body["file"]["name"]).groups()  # type: ignore[union-attr]
    assert base == "IntervalData.csv"
    assert before <= datetime.strptime(stamp, "%Y%m%dT%H%M%S").replace(tzinfo=UTC) <= after
    path = assert_stored(srv, body, data)
    assert srv.stored() == [path] and srv.temps() == []
    meta = body["meta"]
    assert set(meta) == {"role", "accountKey", "limit", "remaining", "resetAt"}
    assert meta == {"role": "admin", "accountKey": "127.0.0.1", "limit": 40_000, "remaining": 39_999,
                    "resetAt": meta["resetAt"]}  # no role named: admin, as IntelliWatt's Node server counts it
    reset = datetime.strptime(meta["resetAt"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert before + timedelta(days=1) - timedelta(seconds=1) <= reset <= after + timedelta(days=1)


def test_stored_name_stamp_is_utc_whatever_the_local_zone(srv: Running, client: httpx.Client,
                                                         tmp_path: Path) -> None:
    """The local zone is set 6 hours behind UTC for this test: the stored name's stamp is still UTC.
    Checked against mutant serve-name-local-time (this machine runs in UTC, where the other tests cannot
    tell the difference)."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = "XST+6"  # POSIX rule: 6 hours west of UTC; needs no tzdata
    time.tzset()
    try:
        before = datetime.now(UTC).replace(microsecond=0)
        resp = upload(client, csv_bytes(tmp_path, 2), "zone.csv")
        after = datetime.now(UTC)
    finally:
        if old is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = old
        time.tzset()
    assert resp.status_code == 202, resp.text
    stamp, base = STAMPED.match(resp.json()["file"]["name"]).groups()  # type: ignore[union-attr]
    assert base == "zone.csv"
    assert before <= datetime.strptime(stamp, "%Y%m%dT%H%M%S").replace(tzinfo=UTC) <= after


def test_upload_is_fsynced_before_it_is_published(srv: Running, client: httpx.Client, io_calls: IoCalls,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The real os.fsync/os.link calls are recorded (and passed through): the temp file is fsynced before it
    gets its final name, so a crash cannot leave a named but empty or short upload.
    Checked against mutant serve-temp-no-fsync."""
    data = os.urandom(300_000)
    resp = upload(client, data, "durable.csv")
    monkeypatch.undo()
    events = io_calls.events
    assert resp.status_code == 202, resp.text
    final = assert_stored(srv, resp.json(), data).resolve()
    published = [i for i, e in enumerate(events) if e[0] == "link" and Path(e[2]).resolve() == final]
    assert len(published) == 1, events
    temp = str(Path(events[published[0]][1]).resolve())
    assert Path(temp).name.startswith(".upload-"), events
    assert ("fsync", temp) in events[:published[0]], f"published without an fsync of the temp: {events}"


def test_upload_is_delivered_by_watch_then_the_same_bytes_are_a_duplicate(
    make_settings: Make, receiver: Any, tmp_path: Path
) -> None:
    settings = make_settings(SMT_UPLOAD_URL=f"{receiver.url}/upload", SMT_UPLOAD_TOKEN=TOKEN,
                             SMT_SETTLE_SECONDS="0.2")
    data = csv_bytes(tmp_path, 7, rows=200)
    with running(settings) as srv, srv.client() as client, watching(settings):
        resp = upload(client, data, "usage.csv")
        assert resp.status_code == 202, resp.text
        name = resp.json()["file"]["name"]
        wait_for(lambda: [r["filename"] for r in receiver.stored()] == [name], 15, "upload delivered by watch")
        assert receiver.read(sha(data)) == data
        wait_for(lambda: (row := srv.ledger.get(sha(data))) is not None and row.state == "sent", 10, "row sent")

        again = upload(client, data, "usage-again.csv")
        assert again.status_code == 202, again.text
        body = again.json()
        assert body["ok"] is True and body["duplicate"] is True
        assert body["file"]["sha256"] == sha(data) and body["file"]["size"] == len(data)
        assert [p.name for p in srv.stored()] == [name]  # not stored again
        assert srv.temps() == []
        health = client.get("/health").json()
        assert health["ledger"]["sent"] == 1
    assert len(receiver.stored()) == 1


def test_twenty_concurrent_uploads_are_all_intact(srv: Running, tmp_path: Path) -> None:
    blobs = {f"file-{i:02d}.csv": os.urandom(150_000 + i * 4099) for i in range(20)}
    with srv.client(limits=httpx.Limits(max_connections=20)) as client, ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda kv: upload(client, kv[1], kv[0]), blobs.items()))
    assert [r.status_code for r in results] == [202] * 20, [r.text for r in results]
    names = set()
    for (name, data), resp in zip(blobs.items(), results, strict=True):
        body = resp.json()
        assert STAMPED.match(body["file"]["name"]).group(2) == name  # type: ignore[union-attr]
        assert_stored(srv, body, data)
        names.add(body["file"]["name"])
    assert sorted(p.name for p in srv.stored()) == sorted(names)
    assert srv.temps() == []


class FrozenClock:
    """``smt_watch.server``'s ``time`` module with ``time()`` stopped at one instant: every upload is stamped
    with the same second, so same-name uploads really collide (the case under test), deterministically."""

    def __init__(self, at: float) -> None:
        self.at = at

    def time(self) -> float:
        return self.at

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def frozen_stamp(monkeypatch: pytest.MonkeyPatch) -> str:
    """Freeze the server's clock at the current whole second; return the stamp every stored name gets."""
    at = float(int(time.time()))
    monkeypatch.setattr(server_module, "time", FrozenClock(at))
    return datetime.fromtimestamp(at, UTC).strftime("%Y%m%dT%H%M%S")


def test_two_uploads_with_the_same_name_at_once_are_both_kept(srv: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same name, same second (the server's clock is frozen), at the same moment: both requests are held just
    before they publish (a barrier in os.chmod of the temp), and again at any rename of a temp into the inbox,
    so a check-then-rename server has checked for both before either renames. Both uploads must be kept, under
    distinct names sharing the second's stamp. Checked against mutants serve-collision-overwrites (rename
    over an existing name) and serve-collision-check-then-rename (exists() then rename)."""
    stamp = frozen_stamp(monkeypatch)
    real_chmod, real_replace, real_rename = os.chmod, os.replace, os.rename
    publishing = threading.Barrier(2, timeout=5)
    renaming = threading.Barrier(2, timeout=5)

    def hold(barrier: threading.Barrier) -> None:
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait()  # a server that serialises publishing never has two here at once: 5 s, then on

    def chmod(path: Any, mode: int, *a: Any, **kw: Any) -> None:
        if Path(path).name.startswith(".upload-"):
            hold(publishing)
        real_chmod(path, mode, *a, **kw)

    def replace(src: Any, dst: Any, *a: Any, **kw: Any) -> None:
        if Path(src).name.startswith(".upload-"):
            hold(renaming)
        real_replace(src, dst, *a, **kw)

    def rename(src: Any, dst: Any, *a: Any, **kw: Any) -> None:
        if Path(src).name.startswith(".upload-"):
            hold(renaming)
        real_rename(src, dst, *a, **kw)

    monkeypatch.setattr(os, "chmod", chmod)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "rename", rename)
    a, b = os.urandom(5000), os.urandom(5000)
    with srv.client() as client, ThreadPoolExecutor(2) as pool:
        ra, rb = pool.map(lambda d: upload(client, d, "same.csv"), (a, b))
    assert ra.status_code == rb.status_code == 202, (ra.text, rb.text)
    names = sorted(r.json()["file"]["name"] for r in (ra, rb))
    assert names == sorted([f"{stamp}_same.csv", f"{stamp}_1_same.csv"])  # they collided, and were told apart
    assert_stored(srv, ra.json(), a)
    assert_stored(srv, rb.json(), b)
    assert [p.name for p in srv.stored()] == names and srv.temps() == []


def test_same_name_uploads_one_after_another_get_distinct_names(srv: Running, client: httpx.Client,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Four uploads of one name in one second (the server's clock is frozen): four names, none overwritten.
    Checked against mutant serve-collision-overwrites."""
    stamp = frozen_stamp(monkeypatch)
    datas = [os.urandom(1000) for _ in range(4)]
    bodies = [upload(client, d, "same.csv").json() for d in datas]
    assert [b["file"]["name"] for b in bodies] == [f"{stamp}_same.csv", f"{stamp}_1_same.csv",
                                                   f"{stamp}_2_same.csv", f"{stamp}_3_same.csv"]
    for b, d in zip(bodies, datas, strict=True):
        assert_stored(srv, b, d)
    assert len(srv.stored()) == 4 and srv.temps() == []


def test_same_bytes_not_yet_delivered_are_stored_again(srv: Running, client: httpx.Client) -> None:
    """Only a ledger row in ``sent`` makes a duplicate; the watcher dedupes the rest by content."""
    data = os.urandom(2000)
    first, second = (upload(client, data, n).json() for n in ("x.csv", "y.csv"))
    assert first["duplicate"] is False and second["duplicate"] is False


def test_extra_fields_and_other_file_parts_are_ignored(srv: Running, client: httpx.Client) -> None:
    data = b"ESIID,USAGE\n1,2\n"
    resp = client.post(
        "/upload", headers={"x-smt-upload-token": TOKEN},
        files=[("attachment", ("other.csv", b"not me", "text/csv")), ("file", ("me.csv", data, "text/csv"))],
        data={"esiid": "10443720000000001", "note": "hello"},
    )
    assert resp.status_code == 202, resp.text
    assert_stored(srv, resp.json(), data)
    assert len(srv.stored()) == 1 and srv.temps() == []


def test_empty_file_is_stored(srv: Running, client: httpx.Client) -> None:
    resp = upload(client, b"", "empty.csv")
    assert resp.status_code == 202, resp.text
    assert_stored(srv, resp.json(), b"")


# --- refusals: token, missing field, malformed ---------------------------------------------------------


@pytest.mark.parametrize("token", [None, "", "wrong-token", TOKEN + "x", TOKEN[:-1], TOKEN.lower()])
def test_missing_or_wrong_token_is_401_and_stores_nothing(srv: Running, client: httpx.Client,
                                                          token: str | None) -> None:
    resp = upload(client, os.urandom(300_000), token=token)
    assert resp.status_code == 401
    assert resp.json() == UNAUTHORIZED
    assert_nothing_stored(srv)


def test_401_is_answered_before_the_body_is_read(srv: Running) -> None:
    with connect(srv.port) as sock:
        sock.sendall(raw_head(srv.port, 500_000_000, token="wrong"))
        status, _, body = read_response(sock)
    assert status == 401 and json.loads(body) == UNAUTHORIZED
    assert_nothing_stored(srv)


def test_token_and_secrets_are_compared_with_compare_digest(make_settings: Make,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """README: the upload token and the webhook secret are compared in constant time. Timing is not measured
    (a loaded 2-core machine makes that flaky); the real hmac.compare_digest is wrapped to record what it
    compared. Every secret header sent is compared, not just those up to the first match, so the timing
    does not say which one matched. Checked against mutants serve-secret-not-constant-time (==) and
    serve-trigger-stops-at-first-match (a generator in any())."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def compare_digest(a: Any, b: Any) -> bool:
        calls.append((bytes(a), bytes(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", compare_digest)
    with running(make_settings(SMT_UPLOAD_TOKEN=TOKEN, INTELLIWATT_WEBHOOK_SECRET=SECRET)) as srv, \
            srv.client() as client:
        assert upload(client, b"x\n", token="wrong-token").status_code == 401
        assert (b"wrong-token", TOKEN.encode()) in calls
        assert upload(client, b"x\n").status_code == 202
        assert (TOKEN.encode(), TOKEN.encode()) in calls

        calls.clear()
        headers = {h: SECRET if i == 0 else f"wrong-{i}" for i, h in enumerate(SECRET_HEADERS)}
        resp = client.post("/trigger/smt-now", headers=headers, json={"reason": "admin_triggered"})
        assert resp.status_code == 503, resp.text  # past the secret check: sync is not configured here
        compared = sorted(a for a, b in calls if b == SECRET.encode())
        assert compared == sorted([SECRET.encode()] + [f"wrong-{i}".encode() for i in range(1, 5)]), calls
        assert len(srv.stored()) == 1 and srv.temps() == []


def test_no_token_configured_accepts_uploads_without_one(make_settings: Make) -> None:
    with running(make_settings()) as srv, srv.client() as client:
        resp = upload(client, b"a,b\n", token=None)
        assert resp.status_code == 202, resp.text


def test_missing_file_field_is_400(srv: Running, client: httpx.Client) -> None:
    resp = client.post("/upload", headers={"x-smt-upload-token": TOKEN}, data={"role": "customer"},
                       files={"upload": ("a.csv", b"x,y\n", "text/csv")})
    assert resp.status_code == 400
    assert resp.json() == {"ok": False, "error": 'Missing file field "file"',
                           "message": 'The upload has no file: send it in the form field "file"'}
    assert_nothing_stored(srv)


@pytest.mark.parametrize(
    ("ctype", "body"),
    [
        ("multipart/form-data", b"--x\r\n"),  # no boundary parameter
        (FORM_TYPE, form(b"x" * 10_000)[:-30]),  # body ends before the closing boundary
        (FORM_TYPE, b"--" + BOUNDARY.encode() + b"\r\nContent-Type: text/plain\r\n\r\nno disposition\r\n"),
        # The file part is complete (its temp exists), then the parser itself rejects the next part's header
        # name: a FormParserError after the temp was opened (checked against mutant serve-malformed-temp-kept).
        (FORM_TYPE, form(b"x" * 10_000)[: -len(f"--{BOUNDARY}--\r\n")]
         + f"--{BOUNDARY}\r\nBad Header: v\r\n\r\nv\r\n--{BOUNDARY}--\r\n".encode()),
    ],
)
def test_malformed_bodies_are_400_and_leave_nothing(srv: Running, client: httpx.Client, ctype: str,
                                                    body: bytes) -> None:
    resp = client.post("/upload", content=body, headers={"x-smt-upload-token": TOKEN, "content-type": ctype})
    assert resp.status_code == 400, resp.text
    assert resp.json()["ok"] is False and resp.json()["message"].startswith("The upload could not be read")
    assert_nothing_stored(srv)


def test_a_body_that_is_not_a_form_is_415(srv: Running, client: httpx.Client) -> None:
    resp = client.post("/upload", content=b'{"file": "x"}',
                       headers={"x-smt-upload-token": TOKEN, "content-type": "application/json"})
    assert resp.status_code == 415 and "multipart/form-data" in resp.json()["message"]
    assert_nothing_stored(srv)


# --- oversize ------------------------------------------------------------------------------------------

MAX = 100_000
TOO_LARGE = {"ok": False, "error": "too_large", "maxBytes": MAX,
             "message": "File too large: the limit is 100,000 bytes (100.0 KB)"}


@pytest.fixture
def small(make_settings: Make) -> Iterator[Running]:
    with running(make_settings(SMT_UPLOAD_TOKEN=TOKEN, SMT_UPLOAD_MAX_BYTES=str(MAX),
                               SMT_UPLOAD_CUSTOMER_LIMIT="1000")) as r:
        yield r


def test_declared_length_over_the_limit_is_413_before_the_body(small: Running) -> None:
    with connect(small.port) as sock:
        sock.sendall(raw_head(small.port, 10**9))  # headers only: the answer must not wait for the body
        status, _, body = read_response(sock)
    assert status == 413
    assert json.loads(body) == TOO_LARGE
    assert_nothing_stored(small)


def test_declared_oversize_upload_with_httpx_is_413(small: Running) -> None:
    with small.client() as client:
        resp = upload(client, os.urandom(MAX * 3))
    assert resp.status_code == 413
    assert resp.json() == TOO_LARGE
    assert_nothing_stored(small)


def test_file_at_the_limit_is_accepted_one_byte_over_is_not(small: Running) -> None:
    data = os.urandom(MAX)
    with small.client() as client:
        ok = upload(client, data, "exact.csv")
        over = upload(client, data + b"!", "over.csv")
    assert ok.status_code == 202, ok.text
    assert over.status_code == 413, over.text
    assert_stored(small, ok.json(), data)
    assert len(small.stored()) == 1 and small.temps() == []


def test_undeclared_length_over_the_limit_is_413(small: Running) -> None:
    """Chunked transfer (a generator body): the limit is enforced while reading."""
    head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.csv"\r\n\r\n'.encode()

    def body() -> Iterator[bytes]:
        yield head
        for _ in range(40):
            yield os.urandom(8192)  # 320 KiB of file data against a 100 kB limit
        yield f"\r\n--{BOUNDARY}--\r\n".encode()

    with small.client() as client:
        resp = client.post("/upload", content=body(),
                           headers={"x-smt-upload-token": TOKEN, "content-type": FORM_TYPE})
    assert resp.status_code == 413, resp.text
    assert resp.json() == TOO_LARGE
    wait_for(lambda: small.temps() == [], 10, "temp removed")
    assert_nothing_stored(small)


def test_undeclared_length_over_the_limit_raw_chunked(small: Running) -> None:
    """The same over a raw socket: the 413 arrives while the client is still sending."""
    head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.csv"\r\n\r\n'.encode()
    with connect(small.port) as sock:
        sock.sendall(raw_head(small.port, None))
        chunk = head + os.urandom(MAX + 10)
        sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        status, _, body = read_response(sock)  # no terminating chunk sent: the server must not wait for it
    assert status == 413
    assert json.loads(body)["error"] == "too_large"
    wait_for(lambda: small.temps() == [], 10, "temp removed")
    assert_nothing_stored(small)


# --- aborted bodies ------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_client_abort_mid_body_leaves_nothing(srv: Running, chunked: bool) -> None:
    data = os.urandom(2_000_000)
    body = form(data, b"aborted.csv")
    part = body[: 700_000]
    with connect(srv.port) as sock:
        sock.sendall(raw_head(srv.port, None if chunked else len(body)))
        sock.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n" if chunked else part)
        wait_for(srv.temps, 15, "the temp file to be created")  # the server is mid-body
    # closed: the server must notice and discard
    wait_for(lambda: srv.temps() == [], 15, "temp removed after the client went away")
    assert_nothing_stored(srv)
    with srv.client() as client:  # the server is still healthy
        assert client.get("/health").status_code == 200


def test_client_abort_before_the_file_part_leaves_nothing(srv: Running) -> None:
    body = form(b"x" * 1000, fields={"role": "customer"})
    with connect(srv.port) as sock:
        sock.sendall(raw_head(srv.port, len(body)) + body[:40])
    with srv.client() as client:
        wait_for(lambda: client.get("/health").status_code == 200, 10, "server alive")
    assert_nothing_stored(srv)


def test_many_aborted_uploads_leave_nothing(srv: Running) -> None:
    body = form(os.urandom(300_000), b"x.csv")
    for _ in range(10):
        with connect(srv.port) as sock:
            sock.sendall(raw_head(srv.port, len(body)) + body[:200_000])
            wait_for(srv.temps, 15, "temp created")
    wait_for(lambda: srv.temps() == [], 15, "all temps removed")
    assert_nothing_stored(srv)


# --- unsafe names --------------------------------------------------------------------------------------

UNSAFE_NAMES: list[bytes] = [
    b"../../etc/passwd",
    b"../../../../../../tmp/escape.csv",
    b"/abs/path.csv",
    b"C:\\win\\x.csv",
    b"..\\..\\evil.csv",
    b"nul\x00byte.csv",
    b"ctl\x01\x1b[2J\x7f.csv",
    b"tab\tname.csv",
    b"",
    b"a" * 296 + b".csv",
    b"..",
    b"...",
    b".",
    b".hidden.csv",
    "Zählerstand.csv".encode(),
    b"inbox/../../x.csv",
]


def test_unsafe_names_are_stored_inside_the_inbox_under_a_safe_name(srv: Running, tmp_path: Path) -> None:
    results: list[tuple[bytes, bytes, dict[str, Any]]] = []
    with srv.client() as client:
        for i, raw in enumerate(UNSAFE_NAMES):
            data = f"row,{i}\n".encode() * 10
            resp = client.post("/upload", content=form(data, raw),
                               headers={"x-smt-upload-token": TOKEN, "content-type": FORM_TYPE})
            assert resp.status_code == 202, (raw, resp.text)
            results.append((raw, data, resp.json()))
    for raw, data, body in results:
        name = body["file"]["name"]
        m = STAMPED.match(name)
        assert m, (raw, name)
        base = m.group(2)
        assert SAFE.match(base) and len(base.encode()) <= MAX_NAME_BYTES, (raw, name)
        path = srv.inbox / name
        assert path.resolve().parent == srv.inbox.resolve(), (raw, name)
        assert path.read_bytes() == data
    inbox_files = {p.name for p in srv.everything()}
    assert inbox_files == {b["file"]["name"] for _, _, b in results}  # nothing nested, no temps
    # nothing escaped: every regular file under the test's directory is in the inbox
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and srv.inbox not in p.parents
               and "state" not in p.relative_to(tmp_path).parts]
    assert outside == []
    assert not (tmp_path / "escape.csv").exists() and not Path("/tmp/escape.csv").exists()


def test_unsafe_names_via_httpx_encoding(srv: Running, client: httpx.Client) -> None:
    """httpx percent-escapes control characters and escapes backslashes: still safe, still inside."""
    for raw in ("../../etc/passwd", "C:\\win\\x.csv", "a\x00b.csv", "q\"uote.csv"):
        resp = upload(client, raw.encode() + b"\n", raw)
        assert resp.status_code == 202, resp.text
        name = resp.json()["file"]["name"]
        assert STAMPED.match(name) and (srv.inbox / name).resolve().parent == srv.inbox.resolve()


# --- rate limits ---------------------------------------------------------------------------------------
# Uploads are counted in the ledger: each test runs on SQLite and on PostgreSQL (``both_ledgers``).


@pytest.fixture
def limited(make_settings: Make) -> Iterator[Running]:
    with running(make_settings(SMT_UPLOAD_TOKEN=TOKEN, SMT_UPLOAD_CUSTOMER_LIMIT="5",
                               SMT_UPLOAD_ADMIN_LIMIT="3")) as r:
        yield r


def assert_429(resp: httpx.Response, role: str, account: str, limit: int, window: timedelta) -> None:
    assert resp.status_code == 429, resp.text
    body = resp.json()
    assert set(body) == {"ok", "error", "message", "role", "accountKey", "limit", "remaining", "resetAt"}
    assert body["resetAt"] in body["message"] and "limit reached" in body["message"]
    assert body["ok"] is False and body["error"] == "rate_limited"
    assert (body["role"], body["accountKey"], body["limit"], body["remaining"]) == (role, account, limit, 0)
    reset = datetime.strptime(body["resetAt"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    now = datetime.now(UTC)
    # The uploads that used up the limit were made within the last minutes: the window (24 h admin, 30 days
    # customer) ends about a whole window from now, not sooner (checked against mutants serve-admin-window-1h
    # and serve-customer-window-1d, which only the upper bounds let through).
    assert now + window - timedelta(minutes=5) <= reset <= now + window + timedelta(seconds=2)
    retry = int(resp.headers["retry-after"])
    assert window.total_seconds() - 300 <= retry <= window.total_seconds() + 2
    assert abs((reset - now).total_seconds() - retry) < 5


CUSTOMER = timedelta(days=30)
ADMIN = timedelta(hours=24)
CUST = {"x-smt-upload-role": "customer"}  # an upload that names no role is admin's, as the Node server counts it


@pytest.mark.both_ledgers
def test_customer_limit_sixth_upload_is_429(limited: Running) -> None:
    with limited.client() as client:
        remaining = []
        for i in range(5):
            resp = upload(client, os.urandom(1000), f"{i}.csv", headers=CUST)
            assert resp.status_code == 202, resp.text
            remaining.append(resp.json()["meta"]["remaining"])
        assert remaining == [4, 3, 2, 1, 0]
        sixth = upload(client, os.urandom(50_000), "6.csv", headers=CUST)
        assert_429(sixth, "customer", "127.0.0.1", 5, CUSTOMER)
    assert len(limited.stored()) == 5 and limited.temps() == []


@pytest.mark.both_ledgers
def test_429_is_answered_before_the_body_when_headers_name_the_account(limited: Running) -> None:
    """Role and account both in headers: the identity is known, so the refusal needs no body at all."""
    with limited.client() as client:
        for i in range(5):
            assert upload(client, os.urandom(100), f"{i}.csv", headers={**CUST, "x-smt-upload-account-key": "acct-1"}
                          ).status_code == 202
    with connect(limited.port) as sock:
        sock.sendall(raw_head(limited.port, 500_000_000,
                              extra="x-smt-upload-account-key: acct-1\r\nx-smt-upload-role: customer"))
        status, headers, body = read_response(sock)
    assert status == 429 and "retry-after" in headers
    assert json.loads(body)["accountKey"] == "acct-1"
    assert len(limited.stored()) == 5 and limited.temps() == []


@pytest.mark.both_ledgers
def test_429_is_answered_when_the_file_part_begins(limited: Running) -> None:
    """Role and account in form fields before the file part: the refusal comes when the file part begins,
    before a byte of it is written and before the rest of the body is sent (the client here never sends it).
    Checked against mutant serve-429-after-file-written (the check at the start of the file part removed:
    the server then waits for the whole body and refuses only at acceptance)."""
    with limited.client() as client:
        for i in range(5):
            assert upload(client, os.urandom(100), f"{i}.csv",
                          fields={"role": "customer", "accountKey": "acct-form"}).status_code == 202
    declared = 50_000_000
    start = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="role"\r\n\r\ncustomer\r\n'
             f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="accountKey"\r\n\r\nacct-form\r\n'
             f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="late.csv"\r\n'
             f"Content-Type: text/csv\r\n\r\n").encode() + os.urandom(20_000)
    with connect(limited.port) as sock:
        sock.sendall(raw_head(limited.port, declared) + start)
        status, headers, body = read_response(sock)
        assert limited.temps() == []  # refused before the file part was written, while the client still sends
    assert status == 429 and "retry-after" in headers
    assert json.loads(body)["accountKey"] == "acct-form"
    assert len(limited.stored()) == 5 and limited.temps() == []


@pytest.mark.both_ledgers
def test_accounts_are_counted_separately_by_header_and_by_form_field(limited: Running) -> None:
    with limited.client() as client:
        for i in range(5):
            r = upload(client, os.urandom(100), f"h{i}.csv", headers={**CUST, "x-smt-upload-account-key": "by-header"})
            assert r.status_code == 202 and r.json()["meta"]["accountKey"] == "by-header"
        assert_429(upload(client, os.urandom(100), headers={**CUST, "x-smt-upload-account-key": "by-header"}),
                   "customer", "by-header", 5, CUSTOMER)
        for i in range(5):
            r = upload(client, os.urandom(100), f"f{i}.csv", headers={**CUST, "x-smt-upload-account-key": "other"},
                       fields={"accountKey": "by-form"})
            assert r.status_code == 202, r.text
            assert r.json()["meta"]["accountKey"] == "by-form"  # the form field wins over the header
            assert r.json()["meta"]["remaining"] == 4 - i
        refused = upload(client, os.urandom(30_000), headers={**CUST, "x-smt-upload-account-key": "other"},
                         fields={"accountKey": "by-form"})
        assert_429(refused, "customer", "by-form", 5, CUSTOMER)
        # "other" never had an upload counted
        r = upload(client, os.urandom(100), headers={**CUST, "x-smt-upload-account-key": "other"})
        assert r.status_code == 202 and r.json()["meta"]["remaining"] == 4
    assert len(limited.stored()) == 11 and limited.temps() == []


@pytest.mark.both_ledgers
def test_admin_role_by_header_and_by_form_field_has_its_own_limit(limited: Running) -> None:
    acct = {"x-smt-upload-account-key": "staff"}
    with limited.client() as client:
        r = upload(client, os.urandom(100), headers={**acct, "x-smt-upload-role": "admin"})
        assert r.status_code == 202, r.text
        assert r.json()["meta"] == {**r.json()["meta"], "role": "admin", "accountKey": "staff", "limit": 3,
                                    "remaining": 2}
        reset = datetime.strptime(r.json()["meta"]["resetAt"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        assert reset <= datetime.now(UTC) + ADMIN + timedelta(seconds=2)
        r = upload(client, os.urandom(100), headers={**acct, "x-smt-upload-role": "ADMIN"})
        assert r.status_code == 202 and r.json()["meta"]["remaining"] == 1
        r = upload(client, os.urandom(100), headers=acct, fields={"role": "admin"})
        assert r.status_code == 202, r.text
        assert r.json()["meta"]["role"] == "admin" and r.json()["meta"]["remaining"] == 0
        assert_429(upload(client, os.urandom(100), headers={**acct, "x-smt-upload-role": "admin"}),
                   "admin", "staff", 3, ADMIN)
        assert_429(upload(client, os.urandom(100), headers=acct, fields={"role": "admin"}),
                   "admin", "staff", 3, ADMIN)
        # the same account as a customer is still free
        r = upload(client, os.urandom(100), headers={**acct, **CUST})
        assert r.status_code == 202 and r.json()["meta"] == {**r.json()["meta"], "role": "customer", "limit": 5}
        # and naming no role at all is admin's, as IntelliWatt's Node upload server counts it
        assert_429(upload(client, os.urandom(100), headers=acct), "admin", "staff", 3, ADMIN)
    assert len(limited.stored()) == 4 and limited.temps() == []


@pytest.mark.both_ledgers
@pytest.mark.parametrize("how", ["header", "form"])
def test_any_other_role_counts_as_admin(limited: Running, how: str) -> None:
    """As IntelliWatt's Node upload server counts it: every role but ``customer`` is ``admin`` (the bash
    script sends ``smt-ingest``), with admin's limit; never ``400 invalid_role``."""
    acct = {"x-smt-upload-account-key": "ops"}
    with limited.client() as client:
        for i in range(4):
            if how == "header":
                r = upload(client, f"x,{i}\n".encode(), headers={"x-smt-upload-role": "smt-ingest", **acct})
            else:
                r = upload(client, f"x,{i}\n".encode(), fields={"role": "smt-ingest"}, headers=acct)
            if i < 3:
                assert r.status_code == 202 and r.json()["meta"]["role"] == "admin", r.text
        assert_429(r, "admin", "ops", 3, ADMIN)  # admin's limit (3 here), not customer's (5)
    assert len(limited.stored()) == 3


@pytest.mark.both_ledgers
@pytest.mark.parametrize("fields", [{"role": "admin"}, {"accountKey": "fresh-account"}], ids=["role", "accountKey"])
def test_form_identity_is_not_refused_on_the_client_address_count(limited: Running, fields: dict[str, str]) -> None:
    with limited.client() as client:
        for i in range(5):  # the client address (127.0.0.1) uses up its customer uploads
            assert upload(client, os.urandom(100), f"{i}.csv", headers=CUST).status_code == 202
        r = upload(client, os.urandom(100), "form.csv", headers=CUST, fields=fields)
    assert r.status_code == 202, r.text


@pytest.mark.both_ledgers
def test_refused_and_failed_uploads_do_not_count(limited: Running) -> None:
    with limited.client() as client:
        for _ in range(3):
            assert upload(client, b"x\n", token="wrong").status_code == 401
            assert client.post("/upload", headers={"x-smt-upload-token": TOKEN}, data={"a": "b"}).status_code == 415
        r = upload(client, b"x\n", headers=CUST)
        assert r.status_code == 202 and r.json()["meta"]["remaining"] == 4


@pytest.mark.both_ledgers
def test_an_account_with_control_characters_is_counted(limited: Running) -> None:
    """An account key is the client's text: PostgreSQL text holds no NUL, yet such an account is counted like
    any other (and its quota's lock key is no NUL-joined string either: every upload was a 500 once)."""
    with limited.client() as client:
        for i in range(5):
            r = upload(client, os.urandom(100), f"{i}.csv", headers=CUST, fields={"accountKey": "odd\x00\x01key"})
            assert r.status_code == 202, r.text
            assert r.json()["meta"]["remaining"] == 4 - i
        refused = upload(client, os.urandom(100), headers=CUST, fields={"accountKey": "odd\x00\x01key"})
    assert refused.status_code == 429, refused.text
    assert len(limited.stored()) == 5 and limited.temps() == []


@pytest.mark.both_ledgers
def test_limits_survive_a_server_restart(make_settings: Make) -> None:
    settings = make_settings(SMT_UPLOAD_TOKEN=TOKEN, SMT_UPLOAD_CUSTOMER_LIMIT="5")
    with running(settings) as srv, srv.client() as client:
        for i in range(5):
            assert upload(client, os.urandom(100), f"{i}.csv", headers=CUST).status_code == 202
    with running(settings) as srv, srv.client() as client:
        assert_429(upload(client, os.urandom(100), headers=CUST), "customer", "127.0.0.1", 5, CUSTOMER)
        assert len(srv.stored()) == 5 and srv.temps() == []


# --- CORS ----------------------------------------------------------------------------------------------

ALLOWED = "https://admin.intelliwatt.test"


@pytest.fixture
def cors(make_settings: Make) -> Iterator[Running]:
    with running(make_settings(SMT_UPLOAD_TOKEN=TOKEN, SMT_UPLOAD_CORS_ORIGINS=f"https://intelliwatt.com,{ALLOWED}",
                               SMT_UPLOAD_CUSTOMER_LIMIT="1000")) as r:
        yield r


def preflight(client: httpx.Client, origin: str) -> httpx.Response:
    return client.options("/upload", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "x-smt-upload-token, x-smt-upload-role, x-smt-upload-account-key",
    })


@pytest.mark.parametrize("origin", ["https://intelliwatt.com", ALLOWED])
def test_cors_preflight_from_an_allowed_origin(cors: Running, origin: str) -> None:
    with cors.client() as client:
        resp = preflight(client, origin)
        assert resp.status_code == 200, resp.text
        assert resp.headers["access-control-allow-origin"] == origin
        assert "POST" in resp.headers["access-control-allow-methods"]
        allowed = {h.strip().lower() for h in resp.headers["access-control-allow-headers"].split(",")}
        assert {"x-smt-upload-token", "x-smt-upload-role", "x-smt-upload-account-key", "content-type"} <= allowed
        post = upload(client, b"x\n", headers={"Origin": origin})
        assert post.status_code == 202 and post.headers["access-control-allow-origin"] == origin


@pytest.mark.parametrize("origin", ["https://evil.example", "http://intelliwatt.com", "https://intelliwatt.com.evil",
                                    "null"])
def test_cors_preflight_from_a_refused_origin(cors: Running, origin: str) -> None:
    with cors.client() as client:
        resp = preflight(client, origin)
        assert "access-control-allow-origin" not in resp.headers
        assert resp.status_code >= 400
        post = upload(client, b"x\n", headers={"Origin": origin})
        assert "access-control-allow-origin" not in post.headers


# --- trigger -------------------------------------------------------------------------------------------


class StalledSftp:
    """A TCP listener that accepts and never speaks: a sync pass hangs in the SSH handshake until released.

    That makes "a sync is running" a state the test controls, without sleeps.
    """

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])
        self.conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        self.sock.settimeout(0.05)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.conns.append(conn)

    def release(self) -> None:
        """Hang up on every connection: the pass fails at once (and later ones are refused). Idempotent."""
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.fixture
def stalled() -> Iterator[StalledSftp]:
    s = StalledSftp()
    try:
        yield s
    finally:
        s.release()


@pytest.fixture
def ssh_key(tmp_path: Path) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    path = tmp_path / "id_ed25519"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return path


@pytest.fixture
def sync_env(stalled: StalledSftp, ssh_key: Path, tmp_path: Path) -> dict[str, str]:
    return {"SMT_HOST": "127.0.0.1", "SMT_PORT": str(stalled.port), "SMT_USER": "smt", "SMT_KEY": str(ssh_key),
            "SMT_KNOWN_HOSTS": str(tmp_path / "known_hosts"), "SMT_SFTP_TIMEOUT": "60",
            "INTELLIWATT_WEBHOOK_SECRET": SECRET}


@pytest.fixture
def hooked(make_settings: Make, sync_env: dict[str, str], stalled: StalledSftp) -> Iterator[Running]:
    with running(make_settings(**sync_env)) as r:
        try:
            yield r
        finally:
            stalled.release()  # before the server stops, so a hanging pass ends now, not at its timeout


def trigger(client: httpx.Client, body: Any = None, header: str = "x-intelliwatt-secret",
            secret: str = SECRET) -> httpx.Response:
    kw: dict[str, Any] = {} if body is None else {"json": body}
    return client.post("/trigger/smt-now", headers={header: secret}, **kw)


def test_trigger_accepts_each_secret_header_and_joins_the_running_sync(hooked: Running,
                                                                       stalled: StalledSftp) -> None:
    with hooked.client() as client:
        replies = []
        for header in SECRET_HEADERS:
            resp = trigger(client, {"reason": "admin_triggered"}, header=header)
            assert resp.status_code == 202, (header, resp.text)
            replies.append(resp.json())
            wait_for(lambda: stalled.conns, 15, "the sync pass to connect")
    assert set(replies[0]) == {"ok", "syncId", "joined", "started", "message"}
    assert all(r["ok"] is True and isinstance(r["syncId"], str) and r["syncId"] for r in replies)
    assert [r["joined"] for r in replies] == [False, True, True, True, True]
    assert len({r["syncId"] for r in replies}) == 1
    assert len(stalled.conns) == 1


def test_two_triggers_at_once_run_one_sync(hooked: Running, stalled: StalledSftp) -> None:
    barrier = threading.Barrier(2, timeout=10)

    def fire(_: int) -> httpx.Response:
        with hooked.client() as client:
            barrier.wait()
            return trigger(client, {"reason": "smt_authorized"})

    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(fire, range(2))
    assert a.status_code == b.status_code == 202, (a.text, b.text)
    assert a.json()["syncId"] == b.json()["syncId"]
    assert sorted([a.json()["joined"], b.json()["joined"]]) == [False, True]
    wait_for(lambda: stalled.conns, 15, "the sync pass to connect")
    with hooked.client() as client:  # still running: a later trigger joins too
        c = trigger(client)
        assert c.json() == {"ok": True, "syncId": a.json()["syncId"], "joined": True, "started": True,
                            "message": "Joined the sync pass already running"}
    assert len(stalled.conns) == 1
    stalled.release()  # the pass fails now; the next trigger starts a new one
    hooked.server.runner.join(30)
    with hooked.client() as client:
        d = trigger(client, {"reason": "user_refresh"})
    assert d.status_code == 202 and d.json()["joined"] is False and d.json()["syncId"] != a.json()["syncId"]


@pytest.mark.parametrize("body", [None, {}, {"reason": None}, {"reason": "smt_authorized"},
                                  {"reason": "admin_triggered"}, {"reason": "admin_refresh"},
                                  {"reason": "user_refresh"}, {"reason": "user_orchestrate",
                                                               "esiid": "10443720000000001",
                                                               "meter": "M1", "forceRepost": True}])
def test_trigger_known_reasons_and_no_body_are_accepted(hooked: Running, body: Any) -> None:
    with hooked.client() as client:
        resp = trigger(client, body)
    assert resp.status_code == 202, resp.text
    assert resp.json()["ok"] is True


@pytest.mark.parametrize("body", [{"reason": "drop_tables"}, {"reason": ""}, {"reason": "SMT_AUTHORIZED"}])
def test_trigger_unknown_reason_starts_nothing(hooked: Running, stalled: StalledSftp, body: Any) -> None:
    """As the old bridge answers a reason it does not know: 200, started: false, nothing runs."""
    with hooked.client() as client:
        resp = trigger(client, body)
    assert resp.status_code == 200 and resp.json()["ok"] is True and resp.json()["started"] is False
    assert hooked.server.runner._current is None and stalled.conns == []


def test_trigger_numeric_reason_is_400(hooked: Running, stalled: StalledSftp) -> None:
    with hooked.client() as client:
        resp = trigger(client, {"reason": 7})
    assert resp.status_code == 400 and resp.json()["ok"] is False and resp.json()["message"]
    assert stalled.conns == []


@pytest.mark.parametrize("reason", [["smt_authorized"], {"a": 1}], ids=["list", "dict"])
def test_trigger_non_string_reason_is_400(make_settings: Make, sync_env: dict[str, str], reason: Any) -> None:
    with running(make_settings(**sync_env)) as srv, srv.client() as client:
        status = trigger(client, {"reason": reason}).status_code
    # Asserted only once the server thread has stopped: on Python 3.11 its traceback logging (ast.parse for
    # carets) racing pytest's own failure report (ast.parse too) can crash pytest ("AST constructor recursion
    # depth mismatch").
    assert status == 400


@pytest.mark.parametrize("content", [b"not json", b"[1, 2]", b'"smt_authorized"'])
def test_trigger_body_must_be_a_json_object(hooked: Running, content: bytes) -> None:
    with hooked.client() as client:
        resp = client.post("/trigger/smt-now", headers={"x-smt-secret": SECRET}, content=content)
    assert resp.status_code == 400 and resp.json()["ok"] is False


@pytest.mark.parametrize("headers", [{}, {"x-intelliwatt-secret": "wrong"}, {"x-smt-secret": SECRET + "x"},
                                     {"authorization": f"Bearer {SECRET}"}, {"x-intelliwatt-secret": ""}])
def test_trigger_wrong_secret_is_401(hooked: Running, stalled: StalledSftp, headers: dict[str, str]) -> None:
    with hooked.client() as client:
        resp = client.post("/trigger/smt-now", headers=headers, json={"reason": "admin_triggered"})
    assert resp.status_code == 401
    assert resp.json() == {"ok": False, "error": "unauthorized", "message": "Missing or wrong webhook secret header"}
    assert stalled.conns == []


def test_trigger_one_right_header_among_wrong_ones_is_accepted(hooked: Running) -> None:
    with hooked.client() as client:
        resp = client.post("/trigger/smt-now", headers={"x-intelliwatt-secret": "nope", "x-proxy-secret": SECRET})
    assert resp.status_code == 202, resp.text


def test_trigger_secret_alias_droplet_webhook_secret(make_settings: Make, sync_env: dict[str, str],
                                                     stalled: StalledSftp) -> None:
    env = {k: v for k, v in sync_env.items() if k != "INTELLIWATT_WEBHOOK_SECRET"}
    with running(make_settings(**env, DROPLET_WEBHOOK_SECRET=SECRET)) as srv, srv.client() as client:
        assert trigger(client, header="x-droplet-webhook-secret").status_code == 202
        stalled.release()


def test_trigger_without_a_secret_configured_is_503(make_settings: Make, sync_env: dict[str, str]) -> None:
    env = {k: v for k, v in sync_env.items() if k != "INTELLIWATT_WEBHOOK_SECRET"}
    with running(make_settings(**env)) as srv, srv.client() as client:
        resp = trigger(client, {"reason": "admin_triggered"}, secret="anything")
    assert resp.status_code == 503
    assert resp.json()["ok"] is False and "INTELLIWATT_WEBHOOK_SECRET" in resp.json()["message"]


def test_trigger_without_sync_configured_is_503(make_settings: Make) -> None:
    with running(make_settings(INTELLIWATT_WEBHOOK_SECRET=SECRET)) as srv, srv.client() as client:
        resp = trigger(client, {"reason": "admin_triggered"})
    assert resp.status_code == 503 and resp.json()["ok"] is False
    assert "SMT_HOST" in resp.json()["message"]


def test_trigger_with_an_unreachable_sftp_host_still_answers_and_fails_in_the_background(
    make_settings: Make, ssh_key: Path, unused_port: int, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(SMT_HOST="127.0.0.1", SMT_PORT=str(unused_port), SMT_USER="smt", SMT_KEY=str(ssh_key),
                             SMT_KNOWN_HOSTS=str(tmp_path / "kh"), INTELLIWATT_WEBHOOK_SECRET=SECRET)
    with running(settings) as srv, srv.client() as client:
        first = trigger(client, {"reason": "admin_refresh"})
        assert first.status_code == 202 and first.json()["ok"] is True
        srv.server.runner.join(30)
        # the pass failed in the background, and said so with its id and the reason
        failed = [r.getMessage() for r in caplog.records if r.name == "smt_watch.server" and r.levelname == "ERROR"]
        assert any(m.startswith(f"Sync {first.json()['syncId'][:8]} failed:") and str(unused_port) in m
                   for m in failed), failed
        second = trigger(client)
        assert second.json()["joined"] is False and second.json()["syncId"] != first.json()["syncId"]
        assert client.get("/health").status_code == 200


def sync_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "smt-sync" and t.is_alive()]


def test_stalled_pass_is_exactly_one_sync_thread(hooked: Running, stalled: StalledSftp) -> None:
    with hooked.client() as client:
        first = trigger(client, {"reason": "admin_triggered"})
        wait_for(lambda: stalled.conns, 15, "the sync pass to connect")
        for _ in range(3):
            assert trigger(client, {"reason": "user_refresh"}).json()["joined"] is True
    assert first.json()["joined"] is False
    assert len(sync_threads()) == 1
    stalled.release()
    hooked.server.runner.join(30)
    assert sync_threads() == []


# --- trigger with a real SFTP server (tests/sftp_server.py): the pass really runs ----------------------


def sftp_settings(make_settings: Make, sftp: SftpTestServer, tmp_path: Path, **extra: str) -> Settings:
    env = sftp_env(sftp, tmp_path / "ssh" / "known_hosts", timeout=60)  # a stalled read must not time out
    return make_settings(**env, INTELLIWATT_WEBHOOK_SECRET=SECRET, **extra)


def test_two_triggers_at_once_run_one_real_sync(make_settings: Make, sftp: SftpTestServer, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    sftp.put("adhocusage/2026/a.CSV", data)
    settings = sftp_settings(make_settings, sftp, tmp_path)
    sftp.stall()  # the pass blocks on its first file read until released
    barrier = threading.Barrier(2, timeout=10)

    with running(settings) as srv:
        def fire(_: int) -> httpx.Response:
            with srv.client() as client:
                barrier.wait()
                return trigger(client, {"reason": "smt_authorized"})

        try:
            with ThreadPoolExecutor(2) as pool:
                a, b = pool.map(fire, range(2))
            assert a.status_code == b.status_code == 202, (a.text, b.text)
            assert a.json()["syncId"] == b.json()["syncId"]
            assert sorted([a.json()["joined"], b.json()["joined"]]) == [False, True]
            wait_for(sftp.read_blocked.is_set, 30, "the pass to be transferring")
            with srv.client() as client:
                c = trigger(client, {"reason": "admin_refresh"})
            assert c.json() == {"ok": True, "syncId": a.json()["syncId"], "joined": True, "started": True,
                            "message": "Joined the sync pass already running"}
            assert len(sync_threads()) == 1
            logins = sftp.logins
        finally:
            sftp.release()
        srv.server.runner.join(60)
        assert sync_threads() == []
        assert (settings.local_dir / "adhocusage" / "2026" / "a.CSV").read_bytes() == data
        assert sftp.served("/adhocusage/2026/a.CSV") == len(data)  # fetched once
        assert sftp.logins == logins  # nobody queued a second pass behind the first
        with srv.client() as client:
            d = trigger(client)
        assert d.json()["joined"] is False and d.json()["syncId"] != a.json()["syncId"]
        srv.server.runner.join(60)
        assert sftp.logins > logins and sftp.served("/adhocusage/2026/a.CSV") == len(data)  # nothing new
        assert sftp.mutations == []


def test_trigger_without_force_repost_keeps_a_sent_row(make_settings: Make, sftp: SftpTestServer,
                                                         tmp_path: Path) -> None:
    data = csv_bytes(tmp_path, 3)
    sftp.put("a.csv", data)
    with running(sftp_settings(make_settings, sftp, tmp_path)) as srv, srv.client() as client:
        srv.ledger.import_hashes([(sha(data), "earlier.csv")], "test")
        assert trigger(client, {"reason": "admin_refresh"}).status_code == 202
        srv.server.runner.join(60)
        assert (srv.inbox / "a.csv").read_bytes() == data
        row = srv.ledger.get(sha(data))
        assert row is not None and row.state == "sent"  # the watcher will call it a duplicate


def test_force_repost_delivers_bytes_sent_before(make_settings: Make, sftp: SftpTestServer, receiver: Any,
                                                 tmp_path: Path) -> None:
    data = csv_bytes(tmp_path, 4)
    sftp.put("adhocusage/IntervalData.csv", data)
    settings = sftp_settings(make_settings, sftp, tmp_path, SMT_UPLOAD_URL=f"{receiver.url}/upload",
                             SMT_UPLOAD_TOKEN=TOKEN, SMT_SETTLE_SECONDS="0.2")
    with running(settings) as srv, srv.client() as client, watching(settings):
        srv.ledger.import_hashes([(sha(data), "earlier.csv")], "test")  # delivered long ago
        resp = trigger(client, {"reason": "user_orchestrate", "esiid": "10443720000000001", "forceRepost": True})
        assert resp.status_code == 202, resp.text
        wait_for(lambda: [r["filename"] for r in receiver.stored()] == ["IntervalData.csv"], 30,
                 "the re-fetched file delivered again")
        assert receiver.read(sha(data)) == data
        srv.server.runner.join(60)


def test_get_on_trigger_and_post_on_health_are_405(srv: Running, client: httpx.Client) -> None:
    assert client.get("/trigger/smt-now").status_code == 405
    assert client.post("/health").status_code == 405
    assert client.get("/upload").status_code == 405
    assert client.get("/nope").status_code == 404


# --- health --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/health", "/healthz"])
def test_health(srv: Running, client: httpx.Client, path: str) -> None:
    resp = client.get(path)
    assert resp.status_code == 200
    body = resp.json()
    assert body == {"ok": True, "service": "smt-watch", "inbox": str(srv.inbox),
                    "uploadDir": str(srv.inbox), "maxBytes": srv.server.settings.upload_max_bytes,
                    "ledger": dict.fromkeys(STATES, 0)}  # service, uploadDir, maxBytes: as the Node server


def test_health_counts_ledger_rows(srv: Running, client: httpx.Client) -> None:
    srv.ledger.import_hashes([(sha(b"one"), None), (sha(b"two"), None)], "test")
    assert client.get("/healthz").json()["ledger"] == {**dict.fromkeys(STATES, 0), "sent": 2}


def test_bytes_already_sent_are_a_duplicate_and_not_stored(srv: Running, client: httpx.Client) -> None:
    data = b"ESIID,USAGE_DATE\n1,2\n"
    srv.ledger.import_hashes([(sha(data), "old.csv")], "test")
    resp = upload(client, data, "again.csv")
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert body["ok"] is True and body["duplicate"] is True
    assert body["file"] == {"name": body["file"]["name"], "size": len(data), "sha256": sha(data), "path": None,
                            "interval": False}
    assert body["ingest"]["queued"] is False
    assert_nothing_stored(srv)


def test_health_needs_no_token(srv: Running) -> None:
    with srv.client() as client:
        assert client.get("/health").status_code == 200


def test_webhook_app_serves_trigger_and_health_but_not_upload(make_settings: Make) -> None:
    settings = make_settings(SMT_UPLOAD_TOKEN=TOKEN, INTELLIWATT_WEBHOOK_SECRET=SECRET)
    with running(settings, uploads=False) as srv, srv.client() as client:
        assert upload(client, b"x\n").status_code == 404
        assert client.get("/health").status_code == 200
        assert client.get("/healthz").status_code == 200
        assert trigger(client).status_code == 503  # sync not configured: the route is there
        assert_nothing_stored(srv)
