"""Re-send what the app's window dropped: only the rows of those days, once they are inside it (issue 26).

The raw-upload route drops the days newer than its coverage window (today minus two days in Chicago) and
still answers ``ok``. Re-sending the whole file later would be wrong: every chunk makes the app delete its
whole time range per ESIID and meter before inserting, so an old file would overwrite newer data and
delete what lies in its gaps. So when ``verify`` finds such days it records them in the ledger with the
time the last of them enters the window (:mod:`smt_watch.ledger.verdicts`); :func:`resend_due` then writes a
derived CSV holding the header and just those days' rows (under ``SMT_STATE_DIR/resend``, outside the
inbox, so the watcher never takes it as a new file) and hands it to the ordinary delivery path, and asks for
a check of the original once the app has had ``SMT_VERIFY_DELAY_SECONDS`` to normalize it.

It survives restarts (everything is in the ledger); a file no longer at its ledger path is said to be
unresendable, once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path
from typing import Final, Protocol

from smt_watch.config import Settings
from smt_watch.expect import DayKey, line_days
from smt_watch.ledger.common import Labels, Row, now_iso
from smt_watch.ledger.verdicts import Resend, VerdictRow
from smt_watch.pipeline import Outcome
from smt_watch.verify import Unverifiable, delivered_as, source_of

log = logging.getLogger("smt_watch.resend")

RESEND_DIR: Final = "resend"
RETRY_SECONDS: Final = 900.0  # a re-send that could not be delivered is tried again after this long


class ResendLedger(Protocol):
    def get(self, sha256: str) -> Row | None: ...
    def labels(self, sha256s: list[str]) -> dict[str, Labels]: ...
    def declare_labels(self, sha256: str, esiid: str | None, meter: str | None) -> None: ...
    def resends_due(self, now: float) -> list[VerdictRow]: ...
    def save_verdict(self, row: VerdictRow) -> None: ...


@dataclass(frozen=True)
class ResendResult:
    sha256: str  # the original file
    state: Resend | None  # None: still waiting (delivery will be tried again)
    derived: Path | None = None
    outcome: Outcome | None = None
    note: str = ""


def derived_name(filename: str, days: list[date]) -> str:
    """``<stem>.resend-<first>-<last><suffix>``: the original's name (its meter stays findable) and the days."""
    stem, dot, suffix = filename.rpartition(".")
    if not dot:
        stem, suffix = filename, "csv"
    return f"{stem}.resend-{min(days):%Y%m%d}-{max(days):%Y%m%d}.{suffix}"


def write_derived(src: Path, keys: set[DayKey], dest: Path, *, esiid: str | None, meter: str) -> int:
    """The header and every line the app files under one of ``keys``, written atomically; the data lines."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    kept = 0
    with src.open("rb") as fh, tmp.open("wb") as out:
        for number, (line, key) in enumerate(line_days(fh, esiid, meter)):
            if number == 0 or (key is not None and key in keys):  # the header, then the days' rows
                out.write(line if line.endswith(b"\n") else line + b"\n")
                kept += number > 0
        out.flush()
        os.fsync(out.fileno())
    tmp.replace(dest)
    return kept


def resend_due(settings: Settings, ledger: ResendLedger, deliver: Callable[[Path], Outcome], now: float,
               present: Callable[[DayKey], bool] | None = None) -> list[ResendResult]:
    """Re-send every due file's dropped days through ``deliver`` (``watch``: its sink's
    :func:`~smt_watch.pipeline.deliver_file`); each result is kept in the ledger.

    ``present`` (the app's intervals route, when given): a day the app already holds intervals of came from
    a later delivery (SMT sends recent days again); it is left out, so an older copy never overwrites it."""
    results = []
    for v in ledger.resends_due(now):
        results.append(_one(settings, ledger, deliver, v, now, present))
    return results


def _one(settings: Settings, ledger: ResendLedger, deliver: Callable[[Path], Outcome], v: VerdictRow,
         now: float, present: Callable[[DayKey], bool] | None) -> ResendResult:
    row = ledger.get(v.sha256)
    keys = {(e, m, date.fromisoformat(d)) for e, m, d in json.loads(v.resend_days or "[]")}
    if row is None or not keys:
        return _unresendable(ledger, v, "no ledger row or no days", len(keys))
    if present is not None:
        try:
            held = {k for k in keys if present(k)}
        except Unverifiable as exc:
            log.warning("Resend %s: cannot ask the app which days it holds (%s); trying again later",
                        row.filename, exc)
            ledger.save_verdict(replace(v, resend_due_at=now + RETRY_SECONDS))
            return ResendResult(v.sha256, None, note=str(exc))
        if held:
            log.info("Resend %s: %d day(s) already held by the app from a later delivery are left out",
                     row.filename, len(held))
            keys -= held
        if not keys:
            ledger.save_verdict(replace(v, resend_state=Resend.SENT.value, resend_due_at=None,
                                        check_due_at=now + settings.verify_delay_seconds))
            return ResendResult(v.sha256, Resend.SENT, note="every day is already held by the app")
    with source_of(settings, ledger, row) as src:
        if isinstance(src, str):
            return _unresendable(ledger, v, src, len(keys), row.filename)
        return _send(settings, ledger, deliver, v, row, keys, src, now)


def _unresendable(ledger: ResendLedger, v: VerdictRow, why: str, days: int, name: str | None = None) -> ResendResult:
    note = f"unresendable: the file left the inbox ({why})"
    log.warning("Resend %s: %s; %d day(s) the app dropped stay missing", name or v.sha256, note, days)
    ledger.save_verdict(replace(v, resend_state=Resend.UNRESENDABLE.value, resend_due_at=None))
    return ResendResult(v.sha256, Resend.UNRESENDABLE, note=note)


def _send(settings: Settings, ledger: ResendLedger, deliver: Callable[[Path], Outcome], v: VerdictRow, row: Row,
          keys: set[DayKey], src: Path, now: float) -> ResendResult:
    dest = settings.state_dir / RESEND_DIR / derived_name(row.filename, sorted(k[2] for k in keys))
    esiid, meter = delivered_as(settings, ledger, row)
    try:
        lines = write_derived(src, keys, dest, esiid=esiid, meter=meter)
        # the derived bytes go as the original went: with the same ESIID and meter (the Node server's fields)
        ledger.declare_labels(hashlib.sha256(dest.read_bytes()).hexdigest(), esiid or None, meter)
    except OSError as exc:
        log.warning("Resend %s: cannot write %s: %s; trying again later", row.filename, dest, exc)
        ledger.save_verdict(replace(v, resend_due_at=now + RETRY_SECONDS))
        return ResendResult(v.sha256, None, note=str(exc))
    outcome = deliver(dest)
    if not outcome.ok:
        log.warning("Resend %s: %s delivery %s (%s); trying again later", row.filename, dest.name,
                    outcome.result, outcome.error)
        ledger.save_verdict(replace(v, resend_due_at=now + RETRY_SECONDS))
        return ResendResult(v.sha256, None, dest, outcome)
    log.info("Resend %s: %d line(s) of %d day(s) sent again as %s", row.filename, lines, len(keys), dest.name)
    ledger.save_verdict(replace(v, resend_state=Resend.SENT.value, resend_due_at=None, resend_sha256=outcome.sha256,
                                check_due_at=now + settings.verify_delay_seconds, checked_at=v.checked_at or now_iso()))
    # the derived file stays: it is a ledger row of its own, and `verify` may read it
    return ResendResult(v.sha256, Resend.SENT, dest, outcome)
