"""Deliver one file end to end: hash it, claim it in the ledger, send it, record the outcome.

Shared by ``post`` and (later) ``watch``, so both follow the same state machine. The ledger row is marked
``sent`` only after the target answered 2xx (the Vector habit: move the checkpoint on delivery).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

from smt_watch.config import Settings, delivery_mode
from smt_watch.delivery import IN_CALL_MAX_WAIT, Deliverer, Payload, Progress, backoff_delay, meter_for
from smt_watch.errors import (
    ConfigError,
    DeliveryError,
    FileChanged,
    InputError,
    PermanentDelivery,
    RetryableDelivery,
)
from smt_watch.hashing import FileIdentity, identify
from smt_watch.ledger import SHA256_RE, Claim, Ledger
from smt_watch.legacy import import_state_file

log = logging.getLogger("smt_watch.pipeline")


@dataclass(frozen=True)
class Outcome:
    """What happened to one file. ``result`` is one of the names below."""

    path: Path
    result: str  # sent | duplicate | failed | retrying | changed | busy | later | error
    sha256: str | None = None
    size: int | None = None
    status: int | None = None
    attempts: int = 0
    error: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.result in ("sent", "duplicate")


def payload_for(settings: Settings, ident: FileIdentity) -> Payload:
    name = ident.path.name
    return Payload(
        path=ident.path,
        filename=name,
        sha256=ident.sha256,
        size=ident.size,
        mtime=ident.mtime,
        esiid=settings.esiid_default or "",
        meter=meter_for(name, settings.meter_default),
        source=settings.source_tag,
    )


def deliver_file(
    settings: Settings,
    ledger: Ledger,
    deliverer: Deliverer,
    path: Path,
    *,
    force: bool = False,
    busy_wait: float = 0.0,
    progress: Progress | None = None,
) -> Outcome:
    """Deliver ``path`` once; never raises for a per-file problem (the outcome says what happened).

    ``busy_wait``: how long to wait for another process that is sending the same bytes right now;
    if it finishes with ``sent`` this file is a duplicate, otherwise we take over.
    """
    started = time.monotonic()
    try:
        ident = identify(path)
    except (InputError, FileChanged) as exc:
        return Outcome(path, "changed" if isinstance(exc, FileChanged) else "error", error=str(exc))
    return deliver_identified(
        settings, ledger, deliverer, ident, force=force, busy_wait=busy_wait, progress=progress, started=started
    )


def deliver_identified(
    settings: Settings,
    ledger: Ledger,
    deliverer: Deliverer,
    ident: FileIdentity,
    *,
    force: bool = False,
    busy_wait: float = 0.0,
    respect_backoff: bool = False,
    progress: Progress | None = None,
    started: float | None = None,
) -> Outcome:
    """Claim and send content whose SHA-256 is already known (the watcher knows it from its stat cache;
    sending re-hashes the bytes anyway, so a stale cache can never deliver wrong content)."""
    started = time.monotonic() if started is None else started
    path = ident.path
    payload = payload_for(settings, ident)
    mode = deliverer.mode.name
    deadline = started + busy_wait
    while True:
        claim = ledger.claim(
            ident.sha256, filename=payload.filename, path=str(path.absolute()), size=ident.size,
            mode=mode, force=force, respect_backoff=respect_backoff,
        )
        if claim is not Claim.BUSY or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
        force = False  # what the other sender achieved counts as our forced re-send
    base = Outcome(path, claim.value, sha256=ident.sha256, size=ident.size)
    if claim is Claim.LATER:
        return base
    if claim is Claim.DUPLICATE:
        log.info("Skipping %s: already sent (sha256 %s)", payload.filename, ident.sha256[:12])
        return base
    if claim is Claim.BUSY:
        return replace(base, error="another smt-watch process is sending these bytes now")
    return _send(settings, ledger, deliverer, payload, base, started, progress)


def _send(
    settings: Settings,
    ledger: Ledger,
    deliverer: Deliverer,
    payload: Payload,
    base: Outcome,
    started: float,
    progress: Progress | None,
) -> Outcome:
    sha = payload.sha256
    try:
        result = deliverer.deliver(payload, progress)
    except FileChanged as exc:
        ledger.release(sha, error=str(exc), attempts=exc.attempts)
        log.warning("Abandoned %s: %s; it stays pending", payload.filename, exc)
        return replace(base, result="changed", attempts=exc.attempts, error=str(exc), seconds=_since(started))
    except PermanentDelivery as exc:
        ledger.mark_failed(sha, status=exc.status, error=str(exc), attempts=exc.attempts)
        log.error("Delivery failed for %s: %s", payload.filename, exc)
        return replace(base, result="failed", status=exc.status, attempts=exc.attempts, error=str(exc),
                        seconds=_since(started))
    except (RetryableDelivery, DeliveryError) as exc:
        row = ledger.get(sha)
        # Consecutive failed calls (each made up to SMT_RETRY_ATTEMPTS requests) drive the backoff.
        calls = ((row.attempts if row else 0) + exc.attempts) // max(1, settings.retry_attempts) + 1
        delay = backoff_delay(calls, settings.retry_backoff, exc.retry_after)
        ledger.mark_retrying(sha, status=exc.status, error=str(exc), attempts=exc.attempts,
                             next_attempt_at=time.time() + delay)
        log.warning("Delivery of %s will be retried in %.0fs: %s", payload.filename, delay, exc)
        return replace(base, result="retrying", status=exc.status, attempts=exc.attempts, error=str(exc),
                        seconds=_since(started))
    except BaseException:
        # Interrupted (Ctrl-C) or a bug: the row must not stay claimed by a live process forever.
        ledger.release(sha, error="interrupted", attempts=0)
        raise
    ledger.mark_sent(sha, status=result.status, destination=result.destination, attempts=result.attempts)
    return replace(base, result="sent", status=result.status, attempts=result.attempts, seconds=_since(started))


def _since(started: float) -> float:
    return time.monotonic() - started


# --- what the commands call -------------------------------------------------------------------------


def open_ledger(settings: Settings) -> Ledger:
    """Open the ledger in ``SMT_STATE_DIR`` and pick up the old script's ``STATE_FILE`` if present."""
    try:
        settings.state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"SMT_STATE_DIR {settings.state_dir} cannot be created: {exc.strerror}") from None
    if not os.access(settings.state_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"SMT_STATE_DIR {settings.state_dir} is not writable")
    ledger = Ledger(settings.ledger_path)
    try:
        import_state_file(ledger, settings.state_file)
    except BaseException:
        ledger.close()
        raise
    return ledger


ProgressFor = Callable[[Path], AbstractContextManager[Progress | None]]


def post_files(
    settings: Settings,
    paths: Sequence[Path],
    *,
    force: bool = False,
    progress_for: ProgressFor | None = None,
    on_outcome: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """``smt-watch post``: deliver each file now; one file's problem never stops the others."""
    mode = delivery_mode(settings)
    outcomes: list[Outcome] = []
    with open_ledger(settings) as ledger, Deliverer(settings, mode) as deliverer:
        # Another process may be sending the same bytes; wait as long as one delivery call can take.
        busy_wait = settings.http_timeout * settings.retry_attempts + IN_CALL_MAX_WAIT
        for path in paths:
            with progress_for(path) if progress_for else nullcontext() as progress:
                outcome = deliver_file(
                    settings, ledger, deliverer, path, force=force, busy_wait=busy_wait, progress=progress
                )
            outcomes.append(outcome)
            if on_outcome:
                on_outcome(outcome)
    return outcomes


def forget_target(ledger: Ledger, target: str) -> list[str]:
    """Resolve ``ledger forget``'s argument (a hash, a unique hash prefix, or a path) and drop the rows."""
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
    removed = ledger.forget(shas) if shas else 0
    return shas[:removed] if removed else []
