"""``smt-watch verify``: is what was sent stored in IntelliWatt? (issue 26)

A 2xx from the app says a chunk was accepted, not that its intervals are kept: the raw-upload route drops
every interval outside its coverage window (:mod:`smt_watch.window`) and its parser collapses some rows
(:mod:`smt_watch.expect`). ``verify`` replays a delivered file through the app's own rules, then asks the
app's read-only admin routes what it holds, per ESIID, meter and Chicago day:

- ``GET /api/admin/smt/interval-coverage?esiid`` once per ESIID (an ESIID with no rows at all needs no
  per-day question);
- ``GET /api/admin/analysis/intervals?esiid&meter&date&tz`` per expected day: ``actual`` and ``kwhTotal``
  are compared with the replay (the route's own ``missing`` is not: a complete fall-back day reads 100
  expected, 96 kept);
- ``GET /api/admin/debug/smt/raw-files?limit&esiid&source`` only to tell ``missing`` (no trace at all) from a
  file whose raw rows are there but whose intervals are not; it has no hash filter, so the newest 100 rows
  by ESIID and by source are searched for the chunks' SHA-256.

Nothing here writes to the app. Requests are paced (``SMT_VERIFY_REQUESTS_PER_SECOND``), each has a deadline
(``SMT_VERIFY_TIMEOUT_SECONDS``) and so has each file (``SMT_VERIFY_FILE_SECONDS``); a 429 is waited out
(``Retry-After``) within that deadline. A route that refuses (401, 403, 503), is absent (404) or does not
answer makes the file ``unverifiable`` with the reason: never a guess.

Verdicts are kept in the ledger (:mod:`smt_watch.ledger.verdicts`). Days newer than the window when the file
was sent are scheduled for a re-send of just their rows once they have all entered it (:mod:`smt_watch.resend`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Final, Protocol

import httpx

from smt_watch.clock import pause
from smt_watch.config import Settings
from smt_watch.delivery.base import json_object
from smt_watch.errors import ConfigError, InputError, SmtWatchError
from smt_watch.expect import DayKey, DayTotal, Expectation, expect, expect_inline
from smt_watch.ledger.common import Labels, Row, epoch_of
from smt_watch.ledger.verdicts import Resend, Verdict, VerdictRow
from smt_watch.smtcsv import meter_for
from smt_watch.tls import verify_for
from smt_watch.window import coverage_window, enters_at

log = logging.getLogger("smt_watch.verify")

INTERVALS_PATH: Final = "/api/admin/analysis/intervals"
COVERAGE_PATH: Final = "/api/admin/smt/interval-coverage"
RAW_FILES_PATH: Final = "/api/admin/debug/smt/raw-files"
TZ: Final = "America/Chicago"
NODE_CHUNK_LINES: Final = 5000  # the droplet's Node upload server cuts multipart uploads into these
KWH_TOLERANCE: Final = Decimal("0.000005")  # per interval: the app stores Decimal(10, 5)
MAX_429_WAITS: Final = 3


class Unverifiable(Exception):
    """A read route refused, is absent or did not answer: the file cannot be judged (the message says why)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class SourceLedger(Protocol):
    def get(self, sha256: str) -> Row | None: ...
    def labels(self, sha256s: list[str]) -> dict[str, Labels]: ...


class VerifyLedger(Protocol):
    """The slice of the ledger ``verify`` uses."""

    def get(self, sha256: str) -> Row | None: ...
    def labels(self, sha256s: list[str]) -> dict[str, Labels]: ...
    def rows(self, state: str | None = None) -> list[Row]: ...
    def save_verdict(self, row: VerdictRow) -> None: ...
    def verdict(self, sha256: str) -> VerdictRow | None: ...


class Pacer:
    """At most ``rate`` requests a second from this process, whatever the number of threads."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = pause) -> None:
        self.interval = 1.0 / rate
        self._next = 0.0
        self._lock = threading.Lock()
        self._clock, self._sleep = clock, sleep

    def wait(self, deadline: float) -> None:
        with self._lock:
            now = self._clock()
            at = max(now, self._next)
            if at > deadline:
                raise Unverifiable("the file's verification deadline passed while pacing requests to the app")
            self._next = at + self.interval
        if at > now:
            self._sleep(at - now)  # pacing toward the app, not synchronisation


class AppReader:
    """The app's three read routes over one keep-alive client; GET only."""

    def __init__(self, settings: Settings, *, transport: httpx.BaseTransport | None = None) -> None:
        if not settings.base_url:
            raise ConfigError("verify needs INTELLIWATT_BASE_URL (the app whose read routes it asks)")
        if settings.admin_token is None:
            raise ConfigError("verify needs ADMIN_TOKEN (sent as x-admin-token to the app's admin read routes)")
        self.base = settings.base_url.rstrip("/")
        t = settings.verify_timeout
        self._client = httpx.Client(timeout=httpx.Timeout(connect=min(10.0, t), read=t, write=t, pool=t),
                                    headers={"x-admin-token": settings.admin_token.reveal()},
                                    follow_redirects=False, transport=transport,
                                    verify=verify_for(settings, self.base))
        self.pacer = Pacer(settings.verify_requests_per_second)
        self.requests = 0
        self.deadline = float("inf")

    def close(self) -> None:
        self._client.close()

    def get(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        """One GET; a refusal, absence, timeout or non-JSON answer is :class:`Unverifiable`."""
        for _ in range(MAX_429_WAITS + 1):
            self.pacer.wait(self.deadline)
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise Unverifiable("the file's verification deadline passed")
            self.requests += 1
            try:
                response = self._client.get(self.base + path, params=params,
                                            timeout=min(remaining, self._client.timeout.read or remaining))
            except httpx.TimeoutException as exc:
                raise Unverifiable(f"{path} did not answer in time ({type(exc).__name__})") from exc
            except httpx.HTTPError as exc:
                raise Unverifiable(f"{path} unreachable: {type(exc).__name__}: {exc}") from exc
            if response.status_code == 429:
                wait = _retry_after(response.headers.get("retry-after"))
                if time.monotonic() + wait > self.deadline:
                    break
                pause(wait)  # the app asked us to wait
                continue
            return _answer(path, response)
        raise Unverifiable(f"{path} kept answering 429 (rate limited)")

    def intervals(self, esiid: str, meter: str, day: date) -> dict[str, Any]:
        return self.get(INTERVALS_PATH, {"esiid": esiid, "meter": meter, "date": day.isoformat(), "tz": TZ})

    def coverage(self, esiid: str) -> dict[str, Any] | None:
        """The ESIID's interval rows in total, or None when the route is absent (the per-day route suffices)."""
        try:
            return self.get(COVERAGE_PATH, {"esiid": esiid})
        except Unverifiable as exc:
            if exc.status == 404:
                return None
            raise

    def raw_files(self, *, esiid: str | None = None, source: str | None = None) -> list[dict[str, Any]]:
        params = {"limit": "100"}
        if esiid:
            params["esiid"] = esiid
        if source:
            params["source"] = source
        rows = self.get(RAW_FILES_PATH, params).get("rows")
        return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def _retry_after(value: str | None) -> float:
    try:
        return min(60.0, max(0.0, float(value))) if value else 1.0
    except ValueError:
        return 1.0


def _answer(path: str, response: httpx.Response) -> dict[str, Any]:
    status = response.status_code
    if status in (401, 403):
        raise Unverifiable(f"{path} answered {status}: ADMIN_TOKEN is not the app's admin token", status)
    if status == 404:
        raise Unverifiable(f"{path} answered 404: the app has no such read route (an older deployment?)", status)
    if status == 503:
        raise Unverifiable(f"{path} answered 503: {_error_of(response) or 'unavailable'}", status)
    if status != 200:
        raise Unverifiable(f"{path} answered {status}: {_error_of(response) or response.text[:200]}", status)
    try:
        body = response.json()
    except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than Python follows
        raise Unverifiable(f"{path} answered 200 without JSON") from exc
    if not isinstance(body, dict) or body.get("ok") is False:
        raise Unverifiable(f"{path} answered ok:false: {_error_of(response)}")
    return body


def _error_of(response: httpx.Response) -> str:
    body = json_object(response)
    return str(body.get("error") or "") if body is not None else ""


@dataclass(frozen=True)
class DayDiff:
    """A day the app holds differently from the replay."""

    esiid: str
    meter: str
    day: date
    expected: int
    expected_kwh: Decimal
    actual: int
    actual_kwh: Decimal

    def to_json(self) -> dict[str, Any]:
        return {"esiid": self.esiid, "meter": self.meter, "day": self.day.isoformat(), "expected": self.expected,
                "expected_kwh": float(self.expected_kwh), "actual": self.actual, "actual_kwh": float(self.actual_kwh)}


@dataclass
class Report:
    """One file's verdict and why."""

    sha256: str
    filename: str
    verdict: Verdict
    reason: str
    days_checked: int = 0
    days_stored: int = 0
    differing: list[DayDiff] = field(default_factory=list)
    newer_days: list[DayKey] = field(default_factory=list)  # not yet in the window: re-sent later
    older_days: list[DayKey] = field(default_factory=list)  # before the window: never stored
    resend_due_at: float | None = None
    requests: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "sha256": self.sha256, "filename": self.filename, "verdict": self.verdict.value, "reason": self.reason,
            "days_checked": self.days_checked, "days_stored": self.days_stored,
            "differing": [d.to_json() for d in self.differing],
            "newer_days": [_key_json(k) for k in self.newer_days],
            "older_days": [_key_json(k) for k in self.older_days],
            "resend_due_at": _stamp(self.resend_due_at), "requests": self.requests,
        }


def _key_json(key: DayKey) -> list[str]:
    return [key[0], key[1], key[2].isoformat()]


def _stamp(epoch: float | None) -> str | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")


# --- the replay ----------------------------------------------------------------------------------------


def iter_line_chunks(path: Path, lines_per_chunk: int) -> Iterator[bytes]:
    """The file as the app receives it: the header, then up to ``lines_per_chunk`` non-blank lines, per
    chunk. The same cut as :func:`smt_watch.delivery.rawupload.iter_chunks` (kept separate so a change to how
    the sink cuts is one place to mirror here: :func:`chunks_for`)."""
    from smt_watch.delivery.rawupload import iter_chunks

    return iter_chunks(path, lines_per_chunk)


def chunks_for(settings: Settings, row: Row, path: Path) -> Iterator[bytes]:
    """The chunks the app parsed for this file: raw-upload's cut, the Node upload server's 5,000 lines for a
    multipart delivery, or the whole file."""
    if row.mode == "raw-upload":
        return iter_line_chunks(path, settings.raw_lines_per_chunk)
    if row.mode == "multipart":
        return iter_line_chunks(path, NODE_CHUNK_LINES)
    return iter([path.read_bytes()])


def delivered_as(settings: Settings, ledger: SourceLedger, row: Row) -> tuple[str | None, str]:
    """The ESIID and meter the delivery of ``row`` carried, as :func:`smt_watch.esiids.labelled` chose them:
    what an uploader declared for these bytes (or for the ``.asc``/``.zip`` they came from) wins, then the
    ESIID the delivery noted in the ledger, then ``ESIID_DEFAULT`` and the meter in the file name."""
    keys = [row.sha256] + ([row.parent] if row.parent else [])
    known = ledger.labels(keys)
    declared = next((known[k] for k in keys if k in known and (known[k].declared_esiid or known[k].declared_meter)),
                    None)
    own = known.get(row.sha256)
    esiid = (own.esiid if own else None) or (declared.declared_esiid if declared else None) or settings.esiid_default
    meter = (declared.declared_meter if declared else None) or meter_for(row.filename, settings.meter_default)
    return esiid, meter


def replay(settings: Settings, row: Row, path: Path, labels: tuple[str | None, str] | None = None) -> Expectation:
    """What the app keeps from ``row``'s file: an inline delivery as the inline route stores it (whole, no
    window), anything else as raw-upload chunks with the window of the day it was sent. ``labels``: the ESIID
    and meter the delivery carried (:func:`delivered_as`; default ``ESIID_DEFAULT`` and the file name's meter)."""
    esiid, meter = labels or (settings.esiid_default, meter_for(row.filename, settings.meter_default))
    if row.mode == "inline":
        return expect_inline(path.read_bytes(), esiid=esiid, meter=meter)
    sent = datetime.fromtimestamp(epoch_of(row.sent_at), UTC) if row.sent_at else datetime.now(UTC)
    return expect(chunks_for(settings, row, path), esiid=esiid, meter=meter, window=coverage_window(sent))


def chunk_shas(settings: Settings, row: Row, path: Path) -> set[str]:
    return {hashlib.sha256(c).hexdigest() for c in chunks_for(settings, row, path)}


# --- where a delivered file's bytes are now ------------------------------------------------------------


def _sha256_file(path: Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def _candidates(settings: Settings, stored_path: str) -> list[Path]:
    """The ledger's path, then where ``SMT_AFTER_SEND=move`` would have put it."""
    path = Path(stored_path)
    out = [path]
    with suppress(ValueError):  # not under the inbox: no archive place to look
        out.append(settings.archive_path / path.relative_to(settings.local_dir))
    return out


@contextmanager
def source_of(settings: Settings, ledger: SourceLedger, row: Row) -> Iterator[Path | str]:
    """The delivered bytes of ``row`` as a file (for a CSV from an .asc/.zip, unpacked again from its parent
    into a private work dir, removed afterwards), or the reason they cannot be had. The bytes must still hash
    to ``row.sha256``: a file replaced under the same name is not the one that was sent."""
    if row.parent:
        parent = ledger.get(row.parent)
        if parent is None or not parent.path:
            yield f"its container {row.parent[:12]} has no path in the ledger"
            return
        found = next((p for p in _candidates(settings, parent.path) if _sha256_file(p) == parent.sha256), None)
        if found is None:
            yield f"its container is no longer at {parent.path}"
            return
        dest = settings.state_dir / "work" / f"verify-{row.sha256[:16]}"
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True, mode=0o700)
        try:
            from smt_watch.content import open_container

            try:
                paths = open_container(settings, found, dest, parent.filename)
            except SmtWatchError as exc:
                yield f"its container cannot be opened again: {exc}"
                return
            match = next((p for p in paths if _sha256_file(p) == row.sha256), None)
            yield match if match is not None else f"its container at {found} no longer holds it"
        finally:
            shutil.rmtree(dest, ignore_errors=True)
        return
    if not row.path:
        yield "the ledger has no path for it (imported from a .posted_sha256?)"
        return
    found = next((p for p in _candidates(settings, row.path) if _sha256_file(p) == row.sha256), None)
    yield found if found is not None else f"the file is no longer at {row.path} (or changed since it was sent)"


# --- one file -------------------------------------------------------------------------------------------


def same(expected: DayTotal, actual: int, actual_kwh: Decimal) -> bool:
    return actual == expected.count and abs(actual_kwh - expected.kwh) <= KWH_TOLERANCE * max(1, expected.count)


def verify_row(settings: Settings, reader: AppReader, row: Row, previous: VerdictRow | None,
               ledger: SourceLedger) -> Report:
    """Judge one ``sent`` row; never raises for the app's or the file's problems (the report says)."""
    with source_of(settings, ledger, row) as source:
        if isinstance(source, str):
            return Report(row.sha256, row.filename, Verdict.UNVERIFIABLE,
                          f"{source}: what the app should hold cannot be computed")
        return _verify_at(settings, reader, row, previous, source, delivered_as(settings, ledger, row))


def _verify_at(settings: Settings, reader: AppReader, row: Row, previous: VerdictRow | None, path: Path,
               labels: tuple[str | None, str]) -> Report:
    name = row.filename
    try:
        exp = replay(settings, row, path, labels)
    except OSError as exc:
        return Report(row.sha256, name, Verdict.UNVERIFIABLE, f"cannot read {path}: {exc.strerror or exc}")
    resent = previous is not None and previous.resend_state == Resend.SENT.value
    wanted: dict[DayKey, DayTotal] = dict(exp.stored)
    newer = dict(exp.newer)
    if resent:  # the rows of those days went again once inside the window: they are expected now
        wanted.update(newer)
        newer = {}
    report = Report(row.sha256, name, Verdict.STORED, "", newer_days=sorted(newer), older_days=sorted(exp.older))
    reader.deadline = time.monotonic() + settings.verify_file_seconds
    before = reader.requests
    try:
        _compare(reader, wanted, report)
        trace = None
        if report.days_stored == 0:  # nothing found: is there any trace of the file at all?
            trace = _raw_trace(settings, reader, row, path, exp)
    except Unverifiable as exc:
        report.verdict, report.reason = Verdict.UNVERIFIABLE, str(exc)
        report.requests = reader.requests - before
        return report
    report.requests = reader.requests - before
    _judge(report, wanted, trace)
    if newer and not resent:
        report.resend_due_at = max(enters_at(k[2]) for k in newer).timestamp()
    return report


def _compare(reader: AppReader, wanted: dict[DayKey, DayTotal], report: Report) -> None:
    empty: set[str] = set()
    for esiid in sorted({k[0] for k in wanted}):
        cov = reader.coverage(esiid)
        if cov is not None and int((cov.get("smtInterval") or {}).get("rows") or 0) == 0:
            empty.add(esiid)
    for key in sorted(wanted):
        esiid, meter, day = key
        want = wanted[key]
        report.days_checked += 1
        if esiid in empty:
            actual, kwh = 0, Decimal(0)
        else:
            got = reader.intervals(esiid, meter, day)
            actual = int(got.get("actual") or 0)
            kwh = Decimal(str(got.get("kwhTotal") or 0))
        if same(want, actual, kwh):
            report.days_stored += 1
        else:
            report.differing.append(DayDiff(esiid, meter, day, want.count, want.kwh, actual, kwh))


def _raw_trace(settings: Settings, reader: AppReader, row: Row, path: Path, exp: Expectation) -> bool:
    """Whether the app holds a raw row of any of the file's chunks (by ESIID, then by source)."""
    shas = chunk_shas(settings, row, path) | {row.sha256}
    for esiid in sorted(exp.esiids)[:3]:
        if any(r.get("sha256") in shas for r in reader.raw_files(esiid=esiid)):
            return True
    return any(r.get("sha256") in shas for r in reader.raw_files(source=settings.source_tag))


def _judge(report: Report, wanted: dict[DayKey, DayTotal], trace: bool | None) -> None:
    n_new, n_old = len(report.newer_days), len(report.older_days)
    if report.differing:
        if report.days_stored == 0 and not trace:
            report.verdict = Verdict.MISSING
            report.reason = f"no trace in the app: none of {len(wanted)} day(s) and no raw row of its chunks"
        else:
            d = report.differing[0]
            report.verdict = Verdict.PARTIAL
            report.reason = (f"{len(report.differing)} of {len(wanted)} day(s) differ, first {d.esiid} {d.meter}"
                             f" {d.day}: {d.actual} interval(s) {d.actual_kwh} kWh, expected {d.expected}"
                             f" {d.expected_kwh}")
        return
    if n_new:
        report.verdict = Verdict.OUTSIDE_WINDOW
        first, last = report.newer_days[0][2], report.newer_days[-1][2]
        report.reason = (f"{report.days_stored} day(s) stored; {n_new} day(s) {first}..{last} were newer than the"
                         " app's window and are re-sent once inside it")
        return
    if not wanted:
        if n_old:
            report.verdict = Verdict.OUTSIDE_WINDOW
            report.reason = f"all {n_old} day(s) were older than the app's window: never stored"
        elif trace:
            report.reason = "the app keeps no intervals from this file; its raw row is there"
        else:
            report.verdict = Verdict.MISSING
            report.reason = "no trace in the app (and no intervals the app would keep)"
        return
    report.reason = f"{report.days_stored} day(s) stored" + (
        f"; {n_old} day(s) older than the app's window were never stored" if n_old else "")


# --- many files, with the ledger -----------------------------------------------------------------------


def record(ledger: VerifyLedger, report: Report, previous: VerdictRow | None) -> VerdictRow:
    """Keep the verdict; schedule the re-send of the newer days (once); say the older days once."""
    base = previous or VerdictRow(sha256=report.sha256, verdict=report.verdict.value)
    changes: dict[str, Any] = {}
    if report.resend_due_at is not None and base.resend_state is None:
        changes.update(resend_due_at=report.resend_due_at, resend_state=Resend.WAITING.value,
                       resend_days=json.dumps([_key_json(k) for k in report.newer_days]))
    if report.older_days and not base.older_said:
        log.warning("Verify %s: %d day(s) older than the app's window were never stored (%s..%s)",
                    report.filename, len(report.older_days), report.older_days[0][2], report.older_days[-1][2])
        changes["older_said"] = 1
    from smt_watch.ledger.common import now_iso

    row = replace(base, verdict=report.verdict.value, detail=json.dumps(report.to_json()), checked_at=now_iso(),
                  check_due_at=None, **changes)
    ledger.save_verdict(row)
    return row


def parse_since(text: str, now: datetime) -> datetime:
    """``--since``: an ISO date or date-time (UTC unless it says), or an age: ``90m``, ``12h``, ``2d``, ``1w``."""
    m = re.fullmatch(r"\s*(\d+)\s*([smhdw])\s*", text)
    if m:
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
        return now - timedelta(seconds=int(m.group(1)) * unit)
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise InputError(f"--since {text!r}: give an ISO date or time, or an age like 12h or 2d") from exc
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def select(ledger: VerifyLedger, shas: Iterable[str] | None, since: datetime | None) -> list[Row]:
    """The rows to verify: the named ones (whatever their state), else every ``sent`` row (since ``since``)."""
    if shas is not None:
        out = []
        for sha in shas:
            row = ledger.get(sha)
            if row is not None:
                out.append(row)
        return out
    rows = [r for r in ledger.rows("sent") if r.mode != "unpack"]  # a container's CSVs are rows of their own
    if since is not None:
        rows = [r for r in rows if r.sent_at and epoch_of(r.sent_at) >= since.timestamp()]
    return rows


def verify_rows(settings: Settings, ledger: VerifyLedger, rows: list[Row], *,
                reader: AppReader | None = None, on_report: Callable[[Report], None] | None = None) -> list[Report]:
    """Verify each row, keep each verdict, and return the reports (one file's trouble never stops the rest)."""
    own = reader is None
    reader = reader or AppReader(settings)
    reports = []
    try:
        for row in rows:
            previous = ledger.verdict(row.sha256)
            if row.state != "sent":
                report = Report(row.sha256, row.filename, Verdict.UNVERIFIABLE, f"not sent (ledger state {row.state})")
            else:
                report = verify_row(settings, reader, row, previous, ledger)
                record(ledger, report, previous)
            log.info("Verify %s: %s (%s)", row.filename, report.verdict.value, report.reason)
            reports.append(report)
            if on_report:
                on_report(report)
    finally:
        if own:
            reader.close()
    return reports
