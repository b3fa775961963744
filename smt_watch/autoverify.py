"""Automatic verification inside ``watch`` (issue 26 item 5): check each delivery once the app had time.

``watch`` calls :meth:`AutoVerify.after_delivery` when a file is ``sent`` (a check is scheduled
``SMT_VERIFY_DELAY_SECONDS`` later, in the ledger, so it survives a restart) and :meth:`AutoVerify.tick` from
its loop; a tick first re-sends the days the app's window dropped that have now entered it
(:mod:`smt_watch.resend`), then runs the checks that are due, paced by ``SMT_VERIFY_REQUESTS_PER_SECOND``,
and counts each verdict in Prometheus (``smt_watch_verdicts_total{verdict}``). It returns when the next
thing is due, so the loop can sleep until then. Without ``INTELLIWATT_BASE_URL`` and ``ADMIN_TOKEN`` there
is nothing to ask: ``enabled`` is False and both calls do nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from smt_watch.config import Settings
from smt_watch.delivery.base import Sink
from smt_watch.errors import SmtWatchError
from smt_watch.ledger import Ledger
from smt_watch.ledger.common import epoch_of
from smt_watch.metrics import Metrics
from smt_watch.pipeline import Outcome
from smt_watch.resend import ResendResult, resend_due
from smt_watch.verify import AppReader, Report, verify_rows

log = logging.getLogger("smt_watch.verify")

DAY_SECONDS: Final = 86_400.0  # sync's pass looks after the deliveries of the last day
IDLE_SECONDS: Final = 60.0  # how often run() looks for work scheduled by other processes
SCHEDULE_LOOK_SECONDS: Final = 0.25  # how soon run() sees a check this process scheduled while it waited
MAX_CHECKS_PER_TICK: Final = 20  # a tick returns to the loop between batches (stop requests stay prompt)


class AutoVerify:
    """Scheduled checks and re-sends for one ``watch`` (one ledger, one sink)."""

    def __init__(self, settings: Settings, ledger: Ledger, deliver: Callable[[Path], Outcome],
                 metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.ledger = ledger
        self.deliver = deliver
        self.metrics = metrics
        self.enabled = bool(settings.base_url) and settings.admin_token is not None
        self._reader: AppReader | None = None
        self._closers: list[Callable[[], None]] = []
        # set by after_delivery: run() looks at what is due at once, not at the end of an idle wait (a check
        # scheduled by this process is done SMT_VERIFY_DELAY_SECONDS after its delivery, not up to 60 s later)
        self._scheduled = threading.Event()

    @classmethod
    def for_watch(cls, settings: Settings, ledger: Ledger, metrics: Metrics | None = None,
                  stop: threading.Event | None = None) -> AutoVerify:
        """With a sink of its own (``watch``'s workers keep theirs), closed by :meth:`close`. ``stop``: watch's
        stop event, so a re-send waiting for the outbound limit ends when watch stops (the row stays
        ``pending``) instead of holding the verify thread until the stop grace runs out."""
        from smt_watch.delivery import delivery_mode, make_sink
        from smt_watch.pipeline import deliver_file

        sinks: list[Sink] = []  # built at the first re-send (most runs never need one), without a start line

        def deliver(path: Path) -> Outcome:
            if not sinks:
                sinks.append(make_sink(settings, delivery_mode(settings), chunks=ledger, announce=False,
                                        stop=stop))
            return deliver_file(settings, ledger, sinks[0], path)

        def close() -> None:
            for sink in sinks:
                sink.close()

        auto = cls(settings, ledger, deliver, metrics)
        auto._closers.append(close)
        return auto

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        for close in self._closers:
            close()

    def run(self, stop: threading.Event, idle: float = IDLE_SECONDS) -> None:
        """A loop for a thread of ``watch``'s own: tick, then wait until the next thing is due (at most
        ``idle`` seconds, so checks scheduled by other processes are seen) or ``stop`` is set. A verification
        takes minutes at the default pace, so it must not run on the watcher's main loop."""
        while not stop.is_set():
            self._scheduled.clear()  # before reading what is due: a check scheduled from here on wakes the wait
            try:
                self.tick(time.time())
            except SmtWatchError as exc:  # a ledger outage: said, and tried again at the next turn
                log.warning("Automatic verify paused: %s", exc)
            except Exception as exc:  # a bug must not end verify for the rest of watch's life: said, tried again
                log.error("Automatic verify failed: %s: %s (tried again in %g s)", type(exc).__name__, exc, idle)
                log.debug("automatic verify failed", exc_info=True)
                stop.wait(idle)  # not at once, nor at each delivery: what is due would fail the same way again
                continue
            due = self.next_due()
            self._wait(stop, idle if due is None else min(idle, max(0.05, due - time.time())))

    def _wait(self, stop: threading.Event, seconds: float) -> None:
        """Until ``stop`` (at once), a check scheduled by :meth:`after_delivery` (within
        :data:`SCHEDULE_LOOK_SECONDS`) or ``seconds`` have passed."""
        end = time.monotonic() + seconds
        while not self._scheduled.is_set():
            left = end - time.monotonic()
            if left <= 0 or stop.wait(min(left, SCHEDULE_LOOK_SECONDS)):
                return

    def after_delivery(self, sha256: str, now: float) -> None:
        """Schedule the check of a file just ``sent``."""
        if self.enabled:
            self.ledger.schedule_check(sha256, now + self.settings.verify_delay_seconds)
            self._scheduled.set()

    def tick(self, now: float) -> tuple[list[ResendResult], list[Report]]:
        """Run what is due: re-sends, then up to :data:`MAX_CHECKS_PER_TICK` checks."""
        if not self.enabled:
            return [], []
        reader = self._app()
        resent = resend_due(self.settings, self.ledger, self.deliver, now,
                            present=lambda k: int(reader.intervals(k[0], k[1], k[2]).get("actual") or 0) > 0)
        due = self.ledger.checks_due(now)[:MAX_CHECKS_PER_TICK]
        rows = [r for r in (self.ledger.get(v.sha256) for v in due) if r is not None]
        if not rows:
            return resent, []
        reports = verify_rows(self.settings, self.ledger, rows, reader=reader, on_report=self._count)
        return resent, reports

    def _app(self) -> AppReader:
        if self._reader is None:
            self._reader = AppReader(self.settings)
        self._reader.deadline = time.monotonic() + self.settings.verify_file_seconds
        return self._reader

    def _count(self, report: Report) -> None:
        if self.metrics is not None:
            self.metrics.verdicts.labels(verdict=report.verdict.value).inc()

    def next_due(self) -> float | None:
        """When :meth:`tick` has something to do next (epoch seconds), or None."""
        if not self.enabled:
            return None
        times = [v.check_due_at for v in self.ledger.checks_due(float("inf")) if v.check_due_at is not None]
        times += [v.resend_due_at for v in self.ledger.resends_due(float("inf")) if v.resend_due_at is not None]
        return min(times) if times else None


def verify_after_sync(settings: Settings, ledger: Ledger, now: float, metrics: Metrics | None = None
                      ) -> tuple[list[ResendResult], list[Report]]:
    """``sync``'s timer pass (``SMT_SYNC_VERIFY``): make sure every file sent in the last day has a check
    scheduled (``SMT_VERIFY_DELAY_SECONDS`` after it was sent: a ``watch`` without ``ADMIN_TOKEN`` scheduled
    none), then run one :meth:`AutoVerify.tick`: the re-sends due and at most :data:`MAX_CHECKS_PER_TICK`
    checks, paced like ``watch``'s. With ``watch`` running the checks itself, there is usually nothing due."""
    auto = AutoVerify.for_watch(settings, ledger, metrics)
    if not auto.enabled:
        return [], []
    try:
        known = ledger.verdicts()
        for row in ledger.rows("sent"):
            if row.mode == "unpack" or not row.sent_at or row.sha256 in known:
                continue
            sent = epoch_of(row.sent_at)
            if sent >= now - DAY_SECONDS:
                ledger.schedule_check(row.sha256, sent + settings.verify_delay_seconds)
        resent, reports = auto.tick(now)
    finally:
        auto.close()
    if resent or reports:
        log.info("Sync verify: %d re-send(s), %d check(s): %s", len(resent), len(reports),
                 ", ".join(f"{r.filename} {r.verdict.value}" for r in reports) or "none due")
    return resent, reports
