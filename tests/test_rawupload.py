"""``SMT_DELIVERY=raw-upload`` (docs/contract.md §4) against the reference receiver's ``/api/admin/smt/raw-upload``.

Chunks of ``SMT_RAW_LINES_PER_CHUNK`` data lines, the header in each, built byte for byte as IntelliWatt's
Node upload server builds them (``node_chunks``: a transcription of its code), named ``<name>.partN-of-M`` (one
chunk: the file's own name), each with its own SHA-256 as ``Idempotency-Key``, ``postIngest`` true on the
last only; acknowledged chunks are recorded so a failed attempt resumes at the first unacknowledged one; a
file that changes while its chunks go out is never sent mixed. The receiver accepts what the real route
accepts but records what it only lets through (wrong hash or size, sloppy base64, no content): every test
here asserts smt-watch sent none of that. The route's own contract is tested in ``test_receiver.py``.
"""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from node_server import node_chunks, node_whole

from conftest import ADMIN_TOKEN
from smt_watch.config import Settings
from smt_watch.delivery import delivery_mode, make_sink
from smt_watch.pipeline import Outcome, deliver_file, post_files
from smt_watch.reference import sample
from smt_watch.reference.receiver import RAW_UPLOAD_PATH, Fault, ReceiverHandle
from smt_watch.statedir import open_ledger

Make = Callable[..., Settings]

YEAR = sample.interval_csv(365)  # 35,044 rows (the fall-back day has 100), 35,040 with a kWh value
YEAR_NAME = "IntervalMeterUsage_M77_2025.csv"
DEFAULT_ESIID = "99999999999999999"
HEADER = (
    b"ESIID,USAGE_DATE,REVISION_DATE,USAGE_START_TIME,USAGE_END_TIME,USAGE_KWH,ESTIMATED_ACTUAL,"
    b"CONSUMPTION_SURPLUSGENERATION\n"
)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


expected_chunks = node_chunks


def raw_env(receiver: Any, **extra: str) -> dict[str, str]:
    return {"SMT_DELIVERY": "raw-upload", "INTELLIWATT_BASE_URL": receiver.url, "ADMIN_TOKEN": ADMIN_TOKEN,
            "ESIID_DEFAULT": DEFAULT_ESIID, **extra}


@pytest.fixture(autouse=True)
def _no_mismatches(request: pytest.FixtureRequest) -> Iterator[None]:
    """What smt-watch sent must hold up to the checks the real route skips (hash, size, strict base64)."""
    handle: ReceiverHandle | None = (request.getfixturevalue("receiver") if "receiver" in request.fixturenames
                                     else None)
    yield
    if handle is not None:
        assert handle.state.raw_mismatches == []


@pytest.fixture
def settings(make_settings: Make, receiver: Any) -> Settings:
    return make_settings(**raw_env(receiver))


def raw_requests(receiver: Any, start: int = 0) -> list[Any]:
    return [r for r in receiver.state.requests[start:] if r.path == RAW_UPLOAD_PATH]


def drop(settings: Settings, name: str, data: bytes) -> Path:
    path = settings.local_dir / name
    path.write_bytes(data)
    return path


def stored_chunks(receiver: Any) -> list[tuple[str, int, int, bytes]]:
    """RawChunk rows straight from the receiver's database: (name, part, parts, content)."""
    with closing(sqlite3.connect(receiver.state.data_dir / "raw.sqlite3")) as db:
        return [(n, p, m, bytes(c)) for n, p, m, c in
                db.execute("SELECT name, part, parts, content FROM RawChunk ORDER BY name, part")]


def whole_file(receiver: Any, name: str) -> bytes:
    [row] = [r for r in receiver.stored() if r["filename"] == name]
    assert row["route"] == RAW_UPLOAD_PATH
    data: bytes = receiver.read(row["sha256"])
    return data


# --- a year of reads ---------------------------------------------------------------------------------


def test_a_year_goes_in_eight_chunks(settings: Settings, receiver: Any) -> None:
    path = drop(settings, YEAR_NAME, YEAR)
    [outcome] = post_files(settings, [path])
    assert outcome.result == "sent", outcome

    chunks = expected_chunks(YEAR, 5000)
    assert len(chunks) == 8 and len(YEAR.splitlines()) == 1 + 35044
    requests = raw_requests(receiver)
    assert [r.fields["filename"] for r in requests] == [f"{YEAR_NAME}.part{n}-of-8" for n in range(1, 9)]
    for request, chunk in zip(requests, chunks, strict=True):
        assert request.status == 200
        assert request.headers["idempotency-key"] == request.fields["sha256"] == sha(chunk)
        assert request.headers["x-admin-token"] == ADMIN_TOKEN
        assert request.headers["content-type"] == "application/json"
        assert request.fields["sizeBytes"] == len(chunk)
        assert request.fields["contentType"] == "text/csv"
        assert request.fields["esiid"] == sample.DEFAULT_ESIID  # from the CSV, not ESIID_DEFAULT
        assert request.fields["meter"] == "M77"
        assert request.fields["source"] == "smt-watch"  # its own: not SOURCE_TAG, nor the Node server's
        assert request.fields["storagePath"] == f"/smt/{sample.DEFAULT_ESIID}/{request.fields['filename']}"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", request.fields["receivedAt"])
    assert [r.fields["postIngest"] for r in requests] == [False] * 7 + [True]

    got = stored_chunks(receiver)
    assert [(n, p, m) for n, p, m, _ in got] == [(YEAR_NAME, n, 8) for n in range(1, 9)]
    for _, _, _, content in got:
        assert content.startswith(HEADER) and not content.endswith(b"\n")
        assert 1 <= content.count(b"\n") <= 5000
    assert [c for *_, c in got] == chunks
    assert receiver.state.raw.interval_count() == 35040
    assert whole_file(receiver, YEAR_NAME) == node_whole(YEAR)

    with open_ledger(settings) as ledger:
        row = ledger.get(sha(YEAR))
        assert row is not None and row.state == "sent"
        assert ledger.acked_chunks(sha(YEAR), 8) == {n: sha(c) for n, c in enumerate(chunks, start=1)}


def test_a_503_on_chunk_5_resumes_at_chunk_5(make_settings: Make, receiver: Any,
                                            run_cli: Callable[..., Any]) -> None:
    """Eight chunks (80 data lines, 10 a chunk: the resume does not depend on the chunk size, and a year in
    eight chunks of 5,000 is test_a_year_goes_in_eight_chunks' case), chunk 5 refused with a 503: the row is
    ``retrying`` with chunks 1-4 acknowledged, and another process sends 5-8 only."""
    name = "Resume_M77.csv"
    env = raw_env(receiver, SMT_RETRY_ATTEMPTS="1", SMT_RAW_LINES_PER_CHUNK="10")
    settings = make_settings(**env)
    data = HEADER + _rows(80)
    path = drop(settings, name, data)
    chunks = expected_chunks(data, 10)
    assert len(chunks) == 8
    receiver.state.faults.extend([Fault(), Fault(), Fault(), Fault(), Fault(status=503)])

    [outcome] = post_files(settings, [path])
    assert (outcome.result, outcome.status) == ("retrying", 503)
    first = raw_requests(receiver)
    assert [(r.fields.get("filename"), r.status) for r in first] == [
        *[(f"{name}.part{n}-of-8", 200) for n in range(1, 5)], (None, 503)]
    assert first[4].headers["idempotency-key"] == sha(chunks[4])
    with open_ledger(settings) as ledger:
        row = ledger.get(sha(data))
        assert row is not None and (row.state, row.http_status) == ("retrying", 503)
        assert ledger.acked_chunks(sha(data), 8) == {n: sha(chunks[n - 1]) for n in range(1, 5)}
    assert not [r for r in receiver.stored() if r["filename"] == name]  # not complete yet

    done = run_cli("post", str(path), env=env)  # another process, resuming from the ledger
    assert done.returncode == 0, done.stdout + done.stderr
    second = raw_requests(receiver, len(receiver.state.requests) - 4)
    assert len(receiver.state.requests) == 5 + 4
    assert [(r.fields["filename"], r.status) for r in second] == [
        (f"{name}.part{n}-of-8", 200) for n in range(5, 9)]
    assert [r.headers["idempotency-key"] for r in second] == [sha(c) for c in chunks[4:]]
    assert [r.fields["postIngest"] for r in [*first[:4], *second]] == [False] * 7 + [True]
    assert receiver.state.raw.interval_count() == 80
    assert whole_file(receiver, name) == node_whole(data)
    with open_ledger(settings) as ledger:
        row = ledger.get(sha(data))
        assert row is not None and row.state == "sent"


# --- chunk size, names, edge lines -------------------------------------------------------------------


def _rows(n: int, esiid: str = "10443720000000001") -> bytes:
    labels = [f"{h}:{m:02d}" for h in range(24) for m in (0, 15, 30, 45)]
    return b"".join(f"'{esiid},07/04/2025,07/05/2025,{labels[i]},{labels[(i + 1) % 96]},0.{i:03d},A,"
                    f"Consumption\n".encode() for i in range(n))


def test_lines_per_chunk_is_honoured(make_settings: Make, receiver: Any) -> None:
    settings = make_settings(**raw_env(receiver, SMT_RAW_LINES_PER_CHUNK="10"))
    data = HEADER + _rows(23)
    path = drop(settings, "small_M3.csv", data)
    [outcome] = post_files(settings, [path])
    assert outcome.result == "sent"
    requests = raw_requests(receiver)
    assert [r.fields["filename"] for r in requests] == [f"small_M3.csv.part{n}-of-3" for n in (1, 2, 3)]
    assert [r.fields["postIngest"] for r in requests] == [False, False, True]
    got = [c for *_, c in stored_chunks(receiver)]
    assert got == expected_chunks(data, 10)
    assert [c.count(b"\n") for c in got] == [10, 10, 3]  # data lines: no newline after the last
    assert all(c.startswith(HEADER) for c in got)
    assert receiver.state.raw.interval_count() == 23
    assert whole_file(receiver, "small_M3.csv") == node_whole(data)


def test_a_file_in_one_chunk_keeps_its_name(make_settings: Make, receiver: Any) -> None:
    settings = make_settings(**raw_env(receiver, SMT_RAW_LINES_PER_CHUNK="10"))
    data = HEADER + _rows(10)
    path = drop(settings, "one_M4.csv", data)
    [outcome] = post_files(settings, [path])
    assert outcome.result == "sent"
    [request] = raw_requests(receiver)
    assert (request.fields["filename"], request.fields["postIngest"], request.status) == ("one_M4.csv", True, 200)
    assert request.headers["idempotency-key"] == request.fields["sha256"] == sha(node_chunks(data)[0])
    assert [(n, p, m) for n, p, m, _ in stored_chunks(receiver)] == [("one_M4.csv", 1, 1)]
    assert receiver.state.raw.interval_count() == 10
    assert whole_file(receiver, "one_M4.csv") == node_whole(data)


def test_a_failed_last_chunk_is_resent_alone_with_post_ingest(make_settings: Make, receiver: Any,
                                                               run_cli: Callable[..., Any]) -> None:
    env = raw_env(receiver, SMT_RAW_LINES_PER_CHUNK="10", SMT_RETRY_ATTEMPTS="1")
    settings = make_settings(**env)
    data = HEADER + _rows(25)
    chunks = expected_chunks(data, 10)
    path = drop(settings, "last_M9.csv", data)
    receiver.state.faults.extend([Fault(), Fault(), Fault(status=503)])

    [outcome] = post_files(settings, [path])
    assert (outcome.result, outcome.status) == ("retrying", 503)
    first = raw_requests(receiver)
    assert [(r.fields.get("filename"), r.fields.get("postIngest"), r.status) for r in first] == [
        ("last_M9.csv.part1-of-3", False, 200), ("last_M9.csv.part2-of-3", False, 200), (None, None, 503)]
    assert first[2].headers["idempotency-key"] == sha(chunks[2])  # the last chunk was the one refused

    done = run_cli("post", str(path), env=env)  # another process, resuming from the ledger
    assert done.returncode == 0, done.stdout + done.stderr
    [again] = raw_requests(receiver, 3)
    assert (again.fields["filename"], again.fields["postIngest"], again.status) == (
        "last_M9.csv.part3-of-3", True, 200)
    assert again.headers["idempotency-key"] == sha(chunks[2])
    assert len(receiver.state.requests) == 4  # chunks 1 and 2 were not sent again
    assert whole_file(receiver, "last_M9.csv") == node_whole(data)
    assert receiver.state.raw.interval_count() == 25


def test_crlf_and_trailing_blank_lines(make_settings: Make, receiver: Any) -> None:
    """As the Node server: CRLF split away, lines joined by LF, blank lines dropped (no header-only chunk)."""
    settings = make_settings(**raw_env(receiver, SMT_RAW_LINES_PER_CHUNK="10"))
    data = (HEADER + _rows(20)).replace(b"\n", b"\r\n") + b"\r\n  \r\n"
    path = drop(settings, "crlf.csv", data)
    [outcome] = post_files(settings, [path])
    assert outcome.result == "sent"
    got = [c for *_, c in stored_chunks(receiver)]
    assert got == node_chunks(data, 10) and len(got) == 2  # the blank lines are not a third, header-only chunk
    assert all(c.startswith(HEADER) and b"\r" not in c and c.count(b"\n") == 10 for c in got)
    assert receiver.state.raw.interval_count() == 20


def test_a_zip_goes_chunk_by_chunk_per_csv(make_settings: Make, receiver: Any) -> None:
    import io
    import zipfile

    settings = make_settings(**raw_env(receiver, SMT_RAW_LINES_PER_CHUNK="50"))
    a, b = HEADER + _rows(96), HEADER + _rows(60, esiid="10443720000000002")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a_M1.csv", a)
        zf.writestr("b_M2.csv", b)
    path = drop(settings, "both.zip", buf.getvalue())
    [outcome] = post_files(settings, [path])
    assert outcome.result == "sent" and [c.result for c in outcome.children] == ["sent", "sent"]
    assert sorted(r.fields["filename"] for r in raw_requests(receiver)) == [
        "a_M1.csv.part1-of-2", "a_M1.csv.part2-of-2", "b_M2.csv.part1-of-2", "b_M2.csv.part2-of-2"]
    assert {r.fields["esiid"] for r in raw_requests(receiver) if r.fields["filename"].startswith("b_")} == {
        "10443720000000002"}
    assert sorted(r.fields["filename"] for r in raw_requests(receiver) if r.fields["postIngest"]) == [
        "a_M1.csv.part2-of-2", "b_M2.csv.part2-of-2"]  # the last chunk of each CSV
    assert whole_file(receiver, "a_M1.csv") == node_whole(a) and whole_file(receiver, "b_M2.csv") == node_whole(b)
    assert receiver.state.raw.interval_count() == 156


# --- a file that changes while its chunks go out -----------------------------------------------------


def _deliver_with(settings: Settings, path: Path, on_chunk: Callable[[int], None]) -> Outcome:
    calls = 0

    def progress(_: int) -> None:
        nonlocal calls
        calls += 1
        on_chunk(calls)

    with open_ledger(settings) as ledger, \
            closing(make_sink(settings, delivery_mode(settings), chunks=ledger)) as deliverer:
        return deliver_file(settings, ledger, deliverer, path, progress=progress)


PER_CHUNK = 2000
CHUNKS = 10


@pytest.fixture
def big(make_settings: Make, receiver: Any) -> Iterator[tuple[Settings, Path, bytes]]:
    """20,000 data lines in 10 chunks of 2,000 (about 150 kB each).

    Changes are made around chunk 8 or 9 once chunk 1 is acknowledged: a megabyte past anything the
    sender can have read ahead (Python buffers ``st_blksize`` bytes)."""
    settings = make_settings(**raw_env(receiver, SMT_RAW_LINES_PER_CHUNK=str(PER_CHUNK), SMT_RETRY_ATTEMPTS="1"))
    data = b"".join(YEAR.splitlines(keepends=True)[:1 + PER_CHUNK * CHUNKS])
    path = drop(settings, "big_M8.csv", data)
    if os.stat(path).st_blksize >= 512 * 1024:
        pytest.skip("the file system's read buffer would hide a change made mid-send")
    yield settings, path, data


def test_a_line_changed_mid_send_is_never_sent_mixed(big: tuple[Settings, Path, bytes], receiver: Any) -> None:
    settings, path, data = big
    old = expected_chunks(data, PER_CHUNK)
    lines = data.splitlines(keepends=True)
    target = 1 + PER_CHUNK * 8 + 17  # a data line of chunk 9, rewritten (same length) once chunk 1 is acknowledged
    changed = lines[target].replace(b",A,", b",E,") if b",A," in lines[target] else lines[target].replace(
        b",E,", b",A,")
    assert len(changed) == len(lines[target]) and changed != lines[target]
    offset = sum(map(len, lines[:target]))

    def tamper(n: int) -> None:
        if n == 1:
            with open(path, "r+b") as fh:
                fh.seek(offset)
                fh.write(changed)

    outcome = _deliver_with(settings, path, tamper)
    assert outcome.result == "changed", outcome
    sent = [r.headers["idempotency-key"] for r in raw_requests(receiver)]
    assert sent == [sha(c) for c in old[:8]]  # chunks 1-8 of the hashed content, then it stopped
    assert not [r for r in receiver.stored() if r["filename"] == path.name]
    with open_ledger(settings) as ledger:
        row = ledger.get(sha(data))
        assert row is not None and row.state == "pending"

    new = path.read_bytes()
    [outcome] = post_files(settings, [path])  # the new content is a new file, sent whole
    assert outcome.result == "sent" and outcome.sha256 == sha(new)
    assert whole_file(receiver, path.name) == node_whole(new)


def test_a_file_truncated_mid_send_is_not_marked_sent(big: tuple[Settings, Path, bytes], receiver: Any) -> None:
    settings, path, data = big
    keep = sum(map(len, data.splitlines(keepends=True)[:1 + PER_CHUNK * 8]))

    def truncate(n: int) -> None:
        if n == 1:
            with open(path, "r+b") as fh:
                fh.truncate(keep)  # exactly the end of chunk 8's data lines

    outcome = _deliver_with(settings, path, truncate)
    with open_ledger(settings) as ledger:
        row = ledger.get(sha(data))
        state = row.state if row else None
    assert (outcome.result, state) != ("sent", "sent"), (
        f"only {len(raw_requests(receiver))} of {CHUNKS} chunks were sent, yet the file is `sent`")
    assert outcome.result == "changed"


def test_a_line_appended_mid_send_is_a_change(big: tuple[Settings, Path, bytes], receiver: Any) -> None:
    settings, path, data = big

    def append(n: int) -> None:
        if n == 1:
            with open(path, "ab") as fh:
                fh.write(data.splitlines(keepends=True)[-1])

    outcome = _deliver_with(settings, path, append)
    assert outcome.result == "changed"
    assert len(raw_requests(receiver)) <= CHUNKS


# --- re-sending --------------------------------------------------------------------------------------


def test_forget_then_post_resends_every_chunk_as_duplicates(make_settings: Make, receiver: Any,
                                                            run_cli: Callable[..., Any]) -> None:
    env = raw_env(receiver, SMT_RAW_LINES_PER_CHUNK="30")
    settings = make_settings(**env)
    data = sample.interval_csv(1, start=date(2025, 11, 2))  # the 100-row fall-back day
    path = drop(settings, "fall_M2.csv", data)
    assert post_files(settings, [path])[0].result == "sent"
    assert len(raw_requests(receiver)) == 4
    assert receiver.state.raw.interval_count() == 100

    assert post_files(settings, [path])[0].result == "duplicate"
    assert len(raw_requests(receiver)) == 4  # already sent: nothing re-sent

    forget = run_cli("ledger", "forget", str(path), env=env)
    assert forget.returncode == 0, forget.stderr
    resent = run_cli("post", str(path), env=env)
    assert resent.returncode == 0, resent.stderr
    second = raw_requests(receiver, 4)
    assert [r.fields["filename"] for r in second] == [f"fall_M2.csv.part{n}-of-4" for n in (1, 2, 3, 4)]
    assert all(r.status == 200 and r.duplicate is True for r in second)
    assert receiver.state.raw.interval_count() == 100
    assert len([r for r in receiver.stored() if r["filename"] == "fall_M2.csv"]) == 1


def _post_with_chunking(make_settings: Make, receiver: Any, path: Path, per_chunk: str) -> None:
    settings = make_settings(**raw_env(receiver, SMT_RAW_LINES_PER_CHUNK=per_chunk))
    with open_ledger(settings) as ledger:
        ledger.forget([sha(path.read_bytes())])
    [outcome] = post_files(settings, [path])
    assert outcome.result == "sent", outcome


def test_resending_with_other_chunking_changes_no_interval_counts(make_settings: Make, receiver: Any) -> None:
    data = sample.interval_csv(3, start=date(2025, 11, 1))  # 96 + 100 + 96 rows
    path = make_settings().local_dir / "three_M5.csv"
    path.write_bytes(data)
    _post_with_chunking(make_settings, receiver, path, "1000")
    assert receiver.state.raw.interval_count() == 292
    _post_with_chunking(make_settings, receiver, path, "7")
    assert receiver.state.raw.interval_count() == 292


@pytest.mark.parametrize("per_chunk", ["5000", "6"])  # 6: a chunk boundary inside the repeated hour
def test_fall_back_day_is_stored_as_100_distinct_utc_instants(make_settings: Make, receiver: Any,
                                                               per_chunk: str) -> None:
    settings = make_settings(**raw_env(receiver, SMT_RAW_LINES_PER_CHUNK=per_chunk))
    path = drop(settings, "fall_M6.csv", sample.interval_csv(1, start=date(2025, 11, 2)))
    [outcome] = post_files(settings, [path])
    assert outcome.result == "sent"
    with closing(sqlite3.connect(receiver.state.data_dir / "raw.sqlite3")) as db:
        got = sorted(_utc(row[0]) for row in db.execute("SELECT ts FROM SmtInterval WHERE meter = 'M6'"))
    start = datetime(2025, 11, 2, 5, tzinfo=UTC)
    assert got == [start + timedelta(minutes=15 * n) for n in range(100)]


def _utc(value: object) -> datetime:
    """A stored ts as an aware datetime, whether kept as epoch seconds or ISO-8601 text."""
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC)
    parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def test_a_revised_file_under_the_same_name_is_never_assembled_mixed(make_settings: Make,
                                                                     receiver: Any) -> None:
    settings = make_settings(**raw_env(receiver, SMT_RAW_LINES_PER_CHUNK="10"))
    old = HEADER + _rows(30)
    new = HEADER + _rows(30).replace(b",A,", b",E,")
    path = drop(settings, "rev_M1.csv", old)
    assert post_files(settings, [path])[0].result == "sent"
    path.write_bytes(new)
    assert post_files(settings, [path])[0].result == "sent"
    assembled = {r["sha256"] for r in receiver.stored() if r["filename"] == "rev_M1.csv"}
    assert assembled == {sha(node_whole(old)), sha(node_whole(new))}
