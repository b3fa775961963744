"""Delivery against the real reference receiver on loopback: both modes, retries, refusals, changes.

The receiver here is the web app in development (inline stored): these tests are about the delivery
mechanics; what production refuses is in ``test_production_delivery.py``."""

from __future__ import annotations

import base64
import hashlib
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from conftest import ADMIN_TOKEN, UPLOAD_TOKEN, write_csv
from smt_watch.config import Settings
from smt_watch.delivery import make_sink
from smt_watch.delivery.base import parse_retry_after
from smt_watch.delivery.http import direct_transport_is_enough
from smt_watch.errors import ConfigError
from smt_watch.pipeline import deliver_file, post_files
from smt_watch.reference.receiver import Fault, running_receiver
from smt_watch.statedir import open_ledger

Make = Callable[..., Settings]


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Any]:
    """The app in development (NODE_ENV=development: inline is stored, not refused)."""
    with running_receiver(tmp_path / "received", admin_token=ADMIN_TOKEN, upload_token=UPLOAD_TOKEN,
                          inline=True) as r:
        yield r


def multipart(make: Make, receiver: Any, **env: str) -> Settings:
    return make(SMT_UPLOAD_URL=f"{receiver.url}/upload", SMT_UPLOAD_TOKEN=UPLOAD_TOKEN, **env)


def inline(make: Make, receiver: Any, **env: str) -> Settings:
    return make(SMT_DELIVERY="inline", INTELLIWATT_BASE_URL=receiver.url, ADMIN_TOKEN=ADMIN_TOKEN, **env)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("kind", ["multipart", "inline-base64", "inline-gzip"])
def test_delivers_exact_bytes_and_fields(kind: str, make_settings: Make, receiver: Any, tmp_path: Path) -> None:
    f = write_csv(tmp_path / "inbox" / "IntervalMeterUsage_M123_2026.csv", rows=3000)
    if kind == "multipart":
        settings = multipart(make_settings, receiver, ESIID_DEFAULT="10443720000000001")
    else:
        enc = "base64" if kind == "inline-base64" else "base64+gzip"
        settings = inline(make_settings, receiver, SMT_INLINE_ENCODING=enc, ESIID_DEFAULT="10443720000000001")
    [outcome] = post_files(settings, [f])
    assert outcome.result == "sent", outcome
    assert receiver.read(sha(f)) == f.read_bytes()
    [row] = receiver.stored()
    assert (row["filename"], row["esiid"], row["meter"], row["source"]) == (
        f.name, "10443720000000001", "M123", "adhocusage"
    )
    [req] = receiver.state.requests
    assert req.headers["idempotency-key"] == sha(f)
    if kind == "multipart":
        assert req.headers["x-smt-upload-token"] == UPLOAD_TOKEN
        assert req.fields["accountKey"] == "smt-watch" and req.fields["role"] == "admin"
        assert req.fields["sha256"] == sha(f) and req.fields["capturedAt"].endswith("Z")
    else:
        assert req.headers["x-admin-token"] == ADMIN_TOKEN
        assert req.fields["mode"] == "inline" and req.fields["sizeBytes"] == f.stat().st_size
        if kind == "inline-gzip":
            # The receiver checked compressedBytes against the decoded body; it must be a real compression.
            assert 0 < req.fields["compressedBytes"] < f.stat().st_size / 2
    with open_ledger(settings) as ledger:
        ledger_row = ledger.get(sha(f))
    assert ledger_row is not None and (ledger_row.state, ledger_row.attempts, ledger_row.http_status) == (
        "sent", 1, 200
    )


def test_second_post_and_renamed_copy_are_duplicates(make_settings: Make, receiver: Any, tmp_path: Path) -> None:
    settings = multipart(make_settings, receiver)
    f = write_csv(tmp_path / "a.csv")
    copy = tmp_path / "copy-of-a.csv"
    copy.write_bytes(f.read_bytes())
    results = [o.result for o in post_files(settings, [f, f, copy])]
    assert results == ["sent", "duplicate", "duplicate"]
    assert len(receiver.state.requests) == 1
    assert [o.result for o in post_files(settings, [copy], force=True)] == ["sent"]
    assert receiver.state.requests[-1].duplicate is True  # the receiver recognised the forced re-send


def test_503_twice_then_sent_after_three_attempts(make_settings: Make, receiver: Any, tmp_path: Path) -> None:
    receiver.state.faults.extend([Fault(status=503), Fault(status=503)])
    [o] = post_files(multipart(make_settings, receiver), [write_csv(tmp_path / "a.csv")])
    assert (o.result, o.attempts) == ("sent", 3)
    assert [r.status for r in receiver.state.requests] == [503, 503, 200]


def test_429_retry_after_is_honoured(make_settings: Make, receiver: Any, tmp_path: Path) -> None:
    receiver.state.faults.append(Fault(status=429, retry_after="1"))
    [o] = post_files(multipart(make_settings, receiver), [write_csv(tmp_path / "a.csv")])
    assert o.result == "sent"
    first, second = receiver.state.requests
    assert second.arrived - first.arrived >= 1.0


def test_400_fails_at_once_with_status_and_body(make_settings: Make, receiver: Any, tmp_path: Path) -> None:
    receiver.state.faults.append(Fault(status=400, body={"ok": False, "error": "BAD_CSV"}))
    settings = multipart(make_settings, receiver)
    f = write_csv(tmp_path / "a.csv")
    [o] = post_files(settings, [f])
    assert (o.result, o.status, o.attempts) == ("failed", 400, 1)
    with open_ledger(settings) as ledger:
        row = ledger.get(sha(f))
    assert row is not None and row.state == "failed" and row.http_status == 400
    assert row.last_error is not None and "BAD_CSV" in row.last_error
    assert len(receiver.state.requests) == 1


def test_2xx_with_ok_false_is_failed(make_settings: Make, receiver: Any, tmp_path: Path) -> None:
    receiver.state.faults.append(Fault(status=200, body={"ok": False, "error": "NOPE"}))
    [o] = post_files(multipart(make_settings, receiver), [write_csv(tmp_path / "a.csv")])
    assert (o.result, o.status) == ("failed", 200)


def test_dropped_connection_is_retried(make_settings: Make, receiver: Any, tmp_path: Path) -> None:
    receiver.state.faults.append(Fault(drop=True))
    [o] = post_files(multipart(make_settings, receiver), [write_csv(tmp_path / "a.csv")])
    assert (o.result, o.attempts) == ("sent", 2)


def test_connection_refused_leaves_row_retrying(make_settings: Make, tmp_path: Path, unused_port: int) -> None:
    settings = make_settings(SMT_UPLOAD_URL=f"http://127.0.0.1:{unused_port}/upload", SMT_RETRY_ATTEMPTS="2")
    f = write_csv(tmp_path / "a.csv")
    before = time.time()
    [o] = post_files(settings, [f])
    assert (o.result, o.attempts) == ("retrying", 2)
    with open_ledger(settings) as ledger:
        row = ledger.get(sha(f))
    assert row is not None and row.state == "retrying" and row.next_attempt_at is not None
    assert row.next_attempt_at > before and "ConnectError" in (row.last_error or "")


def test_backoff_between_calls_doubles_and_caps_at_15_minutes(make_settings: Make, tmp_path: Path,
                                                              unused_port: int) -> None:
    """The k-th consecutive failed call schedules the next one ``step/2 .. step`` later (jitter on the upper
    half), ``step = SMT_RETRY_BACKOFF_SECONDS * 2**k`` capped at 15 minutes. Each call is made at once (as
    ``post`` does) and the scheduled time read from the ledger, so no real waiting is needed. Checked against
    the mutants backoff-zero, backoff-constant, backoff-no-doubling and backoff-no-cap
    (tests/mutants/headline.toml): each fails one of the bounds below."""
    base = 100.0
    settings = make_settings(SMT_UPLOAD_URL=f"http://127.0.0.1:{unused_port}/upload", SMT_RETRY_ATTEMPTS="1",
                             SMT_RETRY_BACKOFF_SECONDS=str(base))
    f = write_csv(tmp_path / "a.csv")
    delays = []
    with open_ledger(settings) as ledger, \
            closing(make_sink(settings, "multipart", chunks=ledger, announce=False)) as deliverer:
        for k in range(1, 6):
            before = time.time()
            o = deliver_file(settings, ledger, deliverer, f)
            after = time.time()
            row = ledger.get(sha(f))
            assert o.result == "retrying" and row is not None and row.next_attempt_at is not None
            assert row.attempts == k  # one request per call (SMT_RETRY_ATTEMPTS=1)
            step = min(15 * 60.0, base * 2**k)
            assert before + step / 2 <= row.next_attempt_at <= after + step, (k, row.next_attempt_at - after)
            delays.append(round(row.next_attempt_at - after))
    assert max(delays) <= 900, delays


def test_long_retry_after_ends_the_call_at_once(make_settings: Make, receiver: Any, tmp_path: Path) -> None:
    """A ``Retry-After`` over 60 s is not waited out inside the call: one request, the row ``retrying`` until
    the time the server asked for. Checked against the mutant backoff-long-retry-after."""
    receiver.state.faults.append(Fault(status=503, retry_after="120"))
    settings = multipart(make_settings, receiver, SMT_RETRY_ATTEMPTS="3")
    f = write_csv(tmp_path / "a.csv")
    before = time.monotonic(), time.time()
    [o] = post_files(settings, [f])
    assert (o.result, o.attempts, o.status) == ("retrying", 1, 503)
    assert time.monotonic() - before[0] < 30, "the call waited for the Retry-After"
    assert len(receiver.state.requests) == 1
    with open_ledger(settings) as ledger:
        row = ledger.get(sha(f))
    assert row is not None and row.state == "retrying" and row.next_attempt_at is not None
    assert row.next_attempt_at >= before[1] + 120  # Retry-After is a floor for the next call


def test_file_changed_while_sending_is_not_recorded(make_settings: Make, receiver: Any, tmp_path: Path) -> None:
    settings = multipart(make_settings, receiver, SMT_VALIDATE="0")
    f = tmp_path / "big.csv"
    f.write_bytes(b"x" * (8 * 1024 * 1024))
    calls = []

    def tamper(n: int) -> None:
        # Runs after the first chunk went out; the read-ahead is at most a few chunks (~3 MiB) ahead,
        # so a byte near the end has not been read yet.
        calls.append(n)
        if len(calls) == 1:
            with f.open("r+b") as fh:
                fh.seek(8 * 1024 * 1024 - 100)
                fh.write(b"y")

    with open_ledger(settings) as ledger, closing(make_sink(settings, "multipart", chunks=ledger)) as deliverer:
        o = deliver_file(settings, ledger, deliverer, f, progress=tamper)
        assert o.result == "changed"
        row = ledger.get(o.sha256 or "")
    assert row is not None and row.state == "pending" and "changed" in (row.last_error or "")
    assert receiver.stored() == []


def test_inline_over_limit_fails_without_a_request(make_settings: Make, receiver: Any, tmp_path: Path) -> None:
    settings = inline(make_settings, receiver, SMT_INLINE_MAX_BYTES="1000")
    [o] = post_files(settings, [write_csv(tmp_path / "a.csv", rows=100)])
    assert o.result == "failed" and "SMT_DELIVERY=raw-upload" in (o.error or "")
    assert receiver.state.requests == []


def test_bad_inputs_do_not_stop_the_others(make_settings: Make, receiver: Any, tmp_path: Path) -> None:
    good = write_csv(tmp_path / "good.csv")
    link = tmp_path / "link.csv"
    link.symlink_to(good)
    results = post_files(multipart(make_settings, receiver), [tmp_path / "missing.csv", tmp_path, link, good])
    assert [o.result for o in results] == ["error", "error", "error", "sent"]
    assert "no such file" in (results[0].error or "")
    assert "directory" in (results[1].error or "")
    assert "symlink" in (results[2].error or "")


def test_no_delivery_target_is_a_config_error(make_settings: Make, tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        post_files(make_settings(), [write_csv(tmp_path / "a.csv")])


def test_tokens_never_logged(make_settings: Make, receiver: Any, tmp_path: Path,
                             caplog: pytest.LogCaptureFixture) -> None:
    receiver.state.faults.extend([Fault(status=503), Fault(status=401, body={"echo": UPLOAD_TOKEN})])
    with caplog.at_level(logging.DEBUG):
        [o] = post_files(multipart(make_settings, receiver), [write_csv(tmp_path / "a.csv")])
    assert o.result == "failed"
    ours = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("smt_watch.receiver"))
    assert UPLOAD_TOKEN not in ours and UPLOAD_TOKEN not in (o.error or "")
    assert "Using droplet upload server at" in ours
    assert '{"echo":"***"}' in (o.error or "")


@pytest.mark.parametrize(
    ("value", "expected"),
    [("3", 3.0), (" 0 ", 0.0), ("soon", None), (None, None), ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0)],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


def test_parse_retry_after_http_date_in_future() -> None:
    from email.utils import formatdate

    now = time.time()
    assert parse_retry_after(formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30, abs=1)


def test_credentials_in_the_url_are_sent_as_basic_auth(make_settings: Make, receiver: Any, tmp_path: Path) -> None:
    f = write_csv(tmp_path / "inbox" / "IntervalMeterUsage_M1.csv")
    url = receiver.url.replace("http://", "http://smt:pa55@") + "/upload"
    [outcome] = post_files(make_settings(SMT_UPLOAD_URL=url, SMT_UPLOAD_TOKEN=UPLOAD_TOKEN), [f])
    assert outcome.result == "sent", outcome
    [req] = receiver.state.requests
    assert req.headers["authorization"] == "Basic " + base64.b64encode(b"smt:pa55").decode()


def test_proxy_from_the_environment_is_used(make_settings: Make, receiver: Any, tmp_path: Path,
                                            unused_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """HTTP_PROXY at a port nobody listens on: the request must go there (and fail), not straight through."""
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{unused_port}")
    f = write_csv(tmp_path / "inbox" / "IntervalMeterUsage_M1.csv")
    settings = multipart(make_settings, receiver, SMT_RETRY_ATTEMPTS="1")
    [outcome] = post_files(settings, [f])
    assert outcome.result in ("retrying", "failed") and "ConnectError" in (outcome.error or ""), outcome
    assert receiver.state.requests == []


@pytest.mark.parametrize(
    ("url", "env", "direct"),
    [
        ("http://127.0.0.1:9/upload", {}, True),
        ("http://u:p@127.0.0.1:9/upload", {}, False),
        ("https://example.test/upload", {"HTTPS_PROXY": "http://proxy:3128"}, False),
        ("https://example.test/upload", {"HTTP_PROXY": "http://proxy:3128"}, True),
        ("http://127.0.0.1:9/upload", {"ALL_PROXY": "http://proxy:3128"}, False),
    ],
)
def test_direct_transport_only_for_plain_targets(url: str, env: dict[str, str], direct: bool,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert direct_transport_is_enough(url) is direct
