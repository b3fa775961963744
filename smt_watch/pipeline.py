"""Deliver one file end to end: hash it, claim it in the ledger, send it, record the outcome.

Shared by ``post`` and ``watch`` (its jobs), so both follow the same state machine. The ledger row is marked
``sent`` only after the target answered 2xx (the Vector habit: move the checkpoint on delivery).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, closing, nullcontext
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import TypeVar, assert_never

from smt_watch.clock import pause
from smt_watch.config import Settings
from smt_watch.content import csv_part, hash_pass, is_container, unpack, work_dir
from smt_watch.delivery import Payload, Progress, Sink, delivery_mode, make_sink
from smt_watch.delivery.base import LeftOut
from smt_watch.delivery.http import IN_CALL_MAX_WAIT, backoff_delay
from smt_watch.delivery.registry import refusal
from smt_watch.errors import (
    ContentError,
    DeliveryError,
    FileChanged,
    InputError,
    LedgerUnavailable,
    PermanentDelivery,
    RetryableDelivery,
)
from smt_watch.esiids import labelled
from smt_watch.hashing import FileIdentity, identify
from smt_watch.ledger import SHA256_RE, Claim, Remember
from smt_watch.ledger.roles import Claims, Deliveries
from smt_watch.names import sent
from smt_watch.smtcsv import Sniffer, meter_for
from smt_watch.statedir import open_ledger

log = logging.getLogger("smt_watch.pipeline")
_T = TypeVar("_T")


class Result(StrEnum):
    """What became of one file (:attr:`Outcome.result`); prints as its value, as ``post`` shows it."""

    SENT = "sent"  # the target answered 2xx; the row is ``sent``
    DUPLICATE = "duplicate"  # these bytes were sent before, under any name: nothing was sent
    FAILED = "failed"  # refused for good (a 4xx, content that cannot be delivered): ``failed`` until forgotten
    RETRYING = "retrying"  # not delivered yet: ``retrying`` until its backoff expires
    CHANGED = "changed"  # the file changed while it was read: left ``pending``, read again once it holds still
    BUSY = "busy"  # another process or thread is sending these bytes right now
    LATER = "later"  # (watch) ``failed``, or ``retrying`` with its backoff not expired: left alone for now
    ERROR = "error"  # the file could not be read (missing, a symlink, no permission)


@dataclass(frozen=True)
class Outcome:
    """What happened to one file."""

    path: Path
    result: Result
    sha256: str | None = None
    name: str | None = None  # the name delivered (a CSV inside an .asc/.zip has its own)
    size: int | None = None
    status: int | None = None
    attempts: int = 0
    error: str | None = None
    seconds: float = 0.0
    children: tuple[Outcome, ...] = ()  # the CSVs of an .asc/.zip
    refused: bool = False  # FAILED because the mode's target cannot read this kind of CSV (nothing was sent)

    @property
    def ok(self) -> bool:
        return self.result in (Result.SENT, Result.DUPLICATE)


def payload_for(settings: Settings, ident: FileIdentity, name: str | None = None, esiid: str | None = None
                ) -> Payload:
    name = name or sent(ident.path.name)
    return Payload(
        path=ident.read_path,
        filename=name,
        sha256=ident.sha256,
        size=ident.size,
        mtime=ident.mtime,
        esiid=esiid or settings.esiid_default or "",
        meter=meter_for(name, settings.meter_default),
        source=settings.source_tag,
        data=ident.data,
        lease=ident.lease,
    )


def deliver_file(
    settings: Settings,
    ledger: Deliveries,
    sink: Sink,
    path: Path,
    *,
    force: bool = False,
    busy_wait: float = 0.0,
    progress: Progress | None = None,
    hashed: Hashed | None = None,
) -> Outcome:
    """Deliver ``path`` once; never raises for a per-file problem (the outcome says what happened).

    ``busy_wait``: how long to wait for another process that is sending the same bytes right now;
    if it finishes with ``sent`` this file is a duplicate, otherwise we take over. ``hashed``: the hash pass
    of ``path`` already under way (``post`` starts it before its imports), returning what :func:`hash_pass`
    returns or raising what it raises.
    """
    started = time.monotonic()
    try:
        ident, sniffer = hashed() if hashed is not None else hash_pass(path)
    except (InputError, FileChanged) as exc:
        return Outcome(path, Result.CHANGED if isinstance(exc, FileChanged) else Result.ERROR, error=str(exc))
    if not getattr(sink, "reads_lease", False):
        ident.close()  # only a sink that reads the lease's descriptor (multipart) needs it: the others re-hash
    try:
        return deliver_identified(
            settings, ledger, sink, ident, force=force, busy_wait=busy_wait, progress=progress, started=started,
            sniffed=sniffer,
        )
    finally:
        ident.close()  # the read lease of a big file's hash pass, if it took one: no writer waits on us now


Hashed = Callable[[], tuple[FileIdentity, Sniffer | None]]  # a hash_pass already under way


def deliver_identified(
    settings: Settings,
    ledger: Deliveries,
    sink: Sink,
    ident: FileIdentity,
    *,
    force: bool = False,
    busy_wait: float = 0.0,
    respect_backoff: bool = False,
    progress: Progress | None = None,
    started: float | None = None,
    remember: Remember | None = None,
    sniffed: Sniffer | None = None,
) -> Outcome:
    """Claim and send content whose SHA-256 is already known (the watcher knows it from its stat cache;
    sending re-hashes the bytes anyway, so a stale cache can never deliver wrong content). ``sniffed``: the
    sniffer the hash pass fed, if it did.

    An ``.asc``/``.zip`` is unpacked and each CSV inside delivered on its own (see :func:`_container`).
    """
    options = _Options(force, busy_wait, respect_backoff, progress,
                       time.monotonic() if started is None else started, remember, sniffed)
    if is_container(ident.path.name):
        return _container(settings, ledger, sink, ident, options)
    return _one(settings, ledger, sink, ident, sent(ident.path.name), None, options)


@dataclass(frozen=True)
class _Options:
    force: bool
    busy_wait: float
    respect_backoff: bool
    progress: Progress | None
    started: float
    remember: Remember | None  # a stat-cache row to write in the first claim's transaction
    sniffed: Sniffer | None = None  # what the hash pass sniffed of the top-level CSV


def _claim(ledger: Deliveries, ident: FileIdentity, name: str, mode: str, parent: str | None, o: _Options) -> Claim:
    force = o.force
    deadline = o.started + o.busy_wait
    while True:
        claim = ledger.claim(
            ident.sha256, filename=name, path=str(ident.path.absolute()), size=ident.size, mode=mode,
            force=force, respect_backoff=o.respect_backoff, parent=parent, remember=o.remember,
        )
        if claim is not Claim.BUSY or time.monotonic() >= deadline:
            return claim
        ident.close()  # no writer waits on our read lease meanwhile (the send then re-hashes: stream.py)
        pause(0.1)
        force = False  # what the other sender achieved counts as our forced re-send


@dataclass(frozen=True)
class _Subject:
    """A file (or a CSV unpacked from one) being delivered under ``name``: its outcomes are made here."""

    ident: FileIdentity
    name: str

    def outcome(self, result: Result, *, status: int | None = None, attempts: int = 0, error: str | None = None,
                seconds: float = 0.0, children: tuple[Outcome, ...] = (), refused: bool = False) -> Outcome:
        i = self.ident
        return Outcome(i.path, result, sha256=i.sha256, name=self.name, size=i.size, status=status,
                       attempts=attempts, error=error, seconds=seconds, children=children, refused=refused)


def _unclaimed(claim: Claim, subject: _Subject) -> Outcome | None:
    """The outcome when the claim was not ours to act on, else None."""
    match claim:
        case Claim.CLAIMED:
            return None
        case Claim.DUPLICATE:
            log.info("Skipping %s: already sent (sha256 %s)", subject.name, subject.ident.sha256[:12])
            return subject.outcome(Result.DUPLICATE)
        case Claim.BUSY:
            return subject.outcome(Result.BUSY, error="another smt-watch process is sending these bytes now")
        case Claim.LATER:
            return subject.outcome(Result.LATER)
        case _:
            assert_never(claim)


def _claimed(ledger: Deliveries, claim: Claim, subject: _Subject, prepare: Callable[[], _T], refused: str
             ) -> Outcome | _T:
    """Under ``claim``, ``prepare`` the subject's content (check a CSV, unpack an .asc/.zip).

    An :class:`Outcome` when there is nothing more to do: the claim was not ours, or ``prepare`` raised
    :class:`ContentError` (the row is then ``failed``, logged with the format ``refused``). Else what
    ``prepare`` returned. Whatever else interrupts ``prepare`` hands the claim back (``pending``)."""
    ident = subject.ident
    early = _unclaimed(claim, subject)
    if early is not None:
        return early
    try:
        return prepare()
    except ContentError as exc:
        ledger.mark_failed(ident.sha256, status=None, error=str(exc), attempts=0)
        log.error(refused, subject.name, exc)
        return subject.outcome(Result.FAILED, error=str(exc))
    except BaseException:
        ledger.release(ident.sha256, error="interrupted", attempts=0)
        raise


def _one(settings: Settings, ledger: Deliveries, sink: Sink, ident: FileIdentity, name: str,
         parent: str | None, o: _Options) -> Outcome:
    """One CSV: claim, validate (SMT_VALIDATE) and pick its ESIID, send, record.

    A kind of CSV the mode's target cannot read (a daily or billing CSV for raw-upload) is ``failed`` with
    the reason, and nothing is sent. ``force`` sends every part of a file sent in parts again."""
    claim = _claim(ledger, ident, name, sink.name, parent, o)
    subject = _Subject(ident, name)
    part = _claimed(ledger, claim, subject, lambda: csv_part(settings, ident, name, parent, o.sniffed),
                    "Delivery failed for %s: %s")
    if isinstance(part, Outcome):
        return part
    refused = refusal(sink.name, part.kind)
    if refused is not None:
        ledger.mark_failed(ident.sha256, status=None, error=refused, attempts=0)
        log.error("Not sending %s: %s", name, refused)
        return subject.outcome(Result.FAILED, error=refused, seconds=_since(o.started), refused=True)
    # what an uploader declared for these bytes (serve's esiid/meter), and the ESIID noted for forceRepost
    try:
        payload = replace(labelled(ledger, payload_for(settings, ident, name, part.esiid), parent, part.esiid),
                          resend=o.force)
    except BaseException:  # a ledger gone now must not leave the claim held by this live process forever
        ledger.release(ident.sha256, error="interrupted", attempts=0)
        raise
    return _send(settings, ledger, sink, payload, subject, o.started, o.progress)


def _container(settings: Settings, ledger: Deliveries, sink: Sink, ident: FileIdentity,
               o: _Options) -> Outcome:
    """Unpack an .asc/.zip and deliver every CSV in it; the parent row sums up its children.

    The parent is ``sent`` when every CSV is sent or a duplicate (or left out because the mode's target
    cannot read its kind, as long as one was delivered: SMT's ZIPs hold an interval CSV and a billing one, and
    the billing row says why it was left out), ``failed`` when one was refused or the container could not be
    opened, otherwise ``retrying`` (taken again when its CSVs are due; those already sent are then
    duplicates). The work dir is removed after every pass.
    """
    name = sent(ident.path.name)
    claim = _claim(ledger, ident, name, "unpack", None, o)
    subject = _Subject(ident, name)
    parts = _claimed(ledger, claim, subject, lambda: unpack(settings, ident), "Cannot deliver %s: %s")
    if isinstance(parts, Outcome):
        return parts
    # The parent's backoff already decided it is time: its CSVs are taken now, whatever their own rows say.
    child_options = replace(o, respect_backoff=False, remember=None, sniffed=None)
    try:
        children = [_one(settings, ledger, sink, p.ident, p.name, ident.sha256, child_options) for p in parts]
    except BaseException:
        ledger.release(ident.sha256, error="interrupted", attempts=0)
        raise
    finally:
        shutil.rmtree(work_dir(settings) / ident.sha256, ignore_errors=True)
    done, seconds = tuple(children), _since(o.started)
    left_out = [c for c in children if c.refused]
    failed = [c for c in children if c.result in (Result.FAILED, Result.ERROR) and not c.refused]
    if all(c.ok or c.refused for c in children) and len(left_out) < len(children):
        note = f", {len(left_out)} not sent ({', '.join(c.name or '' for c in left_out)})" if left_out else ""
        ledger.mark_sent(ident.sha256, status=None, destination=f"unpacked into {len(children)} CSV file(s){note}",
                         attempts=0)
        return subject.outcome(Result.SENT, children=done, seconds=seconds)
    failed = failed or left_out
    if failed:
        error = f"{len(failed)} of {len(children)} CSV file(s) failed: {failed[0].name}: {failed[0].error}"
        ledger.mark_failed(ident.sha256, status=failed[0].status, error=error, attempts=0)
        return subject.outcome(Result.FAILED, error=error, children=done, seconds=seconds)
    waits = [r.next_attempt_at for c in children if (r := ledger.get(c.sha256 or "")) and r.next_attempt_at]
    next_at = min(waits) if waits else time.time() + backoff_delay(1, settings.retry_backoff)
    pending = [c for c in children if not c.ok]
    error = f"{len(pending)} of {len(children)} CSV file(s) not delivered yet: {pending[0].error or pending[0].result}"
    ledger.mark_retrying(ident.sha256, status=None, error=error, attempts=0, next_attempt_at=next_at)
    return subject.outcome(Result.RETRYING, error=error, children=done, seconds=seconds)


def _send(
    settings: Settings,
    ledger: Deliveries,
    sink: Sink,
    payload: Payload,
    subject: _Subject,
    started: float,
    progress: Progress | None,
) -> Outcome:
    sha = payload.sha256
    try:
        result = sink.send(payload, progress)
    except FileChanged as exc:
        ledger.release(sha, error=str(exc), attempts=exc.attempts)
        log.warning("Abandoned %s: %s; it stays pending", payload.filename, exc)
        return subject.outcome(Result.CHANGED, attempts=exc.attempts, error=str(exc), seconds=_since(started))
    except PermanentDelivery as exc:
        ledger.mark_failed(sha, status=exc.status, error=str(exc), attempts=exc.attempts)
        log.error("Delivery failed for %s: %s", payload.filename, exc)
        return subject.outcome(Result.FAILED, status=exc.status, attempts=exc.attempts, error=str(exc),
                               seconds=_since(started), refused=isinstance(exc, LeftOut))
    except (RetryableDelivery, DeliveryError) as exc:
        try:
            row = ledger.get(sha)
        except LedgerUnavailable:  # mark_retrying below says so, and hands the claim back whatever happens
            row = None
        # Consecutive failed calls (each made up to SMT_RETRY_ATTEMPTS requests) drive the backoff.
        calls = ((row.attempts if row else 0) + exc.attempts) // max(1, settings.retry_attempts) + 1
        delay = backoff_delay(calls, settings.retry_backoff, exc.retry_after)
        ledger.mark_retrying(sha, status=exc.status, error=str(exc), attempts=exc.attempts,
                             next_attempt_at=time.time() + delay)
        log.warning("Delivery of %s will be retried in %.0fs: %s", payload.filename, delay, exc)
        return subject.outcome(Result.RETRYING, status=exc.status, attempts=exc.attempts, error=str(exc),
                               seconds=_since(started))
    except BaseException:
        # Interrupted (Ctrl-C) or a bug: the row must not stay claimed by a live process forever.
        ledger.release(sha, error="interrupted", attempts=0)
        raise
    ledger.mark_sent(sha, status=result.status, destination=result.destination, attempts=result.attempts)
    return subject.outcome(Result.SENT, status=result.status, attempts=result.attempts, seconds=_since(started))


def _since(started: float) -> float:
    return time.monotonic() - started


# --- what the commands call -------------------------------------------------------------------------


ProgressFor = Callable[[Path], AbstractContextManager[Progress | None]]


def post_files(
    settings: Settings,
    paths: Sequence[Path],
    *,
    force: bool = False,
    progress_for: ProgressFor | None = None,
    on_outcome: Callable[[Outcome], None] | None = None,
    first_hashed: Hashed | None = None,
) -> list[Outcome]:
    """``smt-watch post``: deliver each file now; one file's problem never stops the others.
    ``first_hashed``: the first file's hash pass, already under way (see :func:`deliver_file`)."""
    mode = delivery_mode(settings)
    outcomes: list[Outcome] = []
    with open_ledger(settings) as ledger, closing(make_sink(settings, mode, chunks=ledger)) as sink:
        # Another process may be sending the same bytes; wait as long as one delivery call can take.
        busy_wait = settings.http_timeout * settings.retry_attempts + IN_CALL_MAX_WAIT
        for i, path in enumerate(paths):
            with progress_for(path) if progress_for else nullcontext() as progress:
                outcome = deliver_file(
                    settings, ledger, sink, path, force=force, busy_wait=busy_wait, progress=progress,
                    hashed=first_hashed if i == 0 else None,
                )
            outcomes.append(outcome)
            if on_outcome:
                on_outcome(outcome)
    return outcomes


def forget_target(ledger: Claims, target: str) -> list[str]:
    """Resolve ``ledger forget``'s argument (a hash, a unique hash prefix, or a path) and drop the rows."""
    shas = resolve_target(ledger, target)
    removed = ledger.forget(shas) if shas else 0
    return shas[:removed] if removed else []


def retry_target(ledger: Claims, target: str) -> list[str]:
    """``ledger retry``: the rows ``target`` names (as for ``forget``) back to ``pending``; the hashes moved."""
    shas = resolve_target(ledger, target)
    return ledger.retry(shas) if shas else []


def resolve_target(ledger: Claims, target: str) -> list[str]:
    """The hashes a command-line target names: a hash, a unique hash prefix, or a file (by path or content)."""
    text = target.strip().lower()
    if SHA256_RE.match(text):
        shas = [text]
    elif len(text) >= 8 and all(c in "0123456789abcdef" for c in text) and not Path(target).exists():
        shas = [r.sha256 for r in ledger.find(sha_prefix=text)]
        if len(shas) > 1:
            raise InputError(f"{target}: prefix matches {len(shas)} rows; give more digits")
    else:
        path = Path(target)
        shas = [r.sha256 for r in ledger.find(path=str(path.absolute()))]
        if not shas and path.is_file() and not path.is_symlink():
            shas = [identify(path).sha256]
    return shas


def retry_failed(ledger: Claims, *, http_status: int | None = None, since: float | None = None) -> list[str]:
    """``ledger retry --failed``: every ``failed`` row (only those the app answered ``http_status``, and only
    those that failed at or after ``since``, when given) back to ``pending``; the hashes moved."""
    shas = [r.sha256 for r in ledger.rows("failed", since=since, http_status=http_status)]
    return ledger.retry(shas) if shas else []
