"""What ``smt-watch status`` and ``serve``'s ``/status`` show: the state of the service as one typed object.

:func:`gather` reads everything from the ledger, so it tells the same story on any node that shares it:

- each ``watch``'s **heartbeat**, a meta row (``watch.heartbeat.<node>``) that the watcher rewrites every
  :data:`HEARTBEAT_SECONDS` and marks stopped on a clean exit; a beat older than :data:`STALE_SECONDS` means
  the watcher is not running (killed, hung, or its ledger unreachable);
- the **queue** (rows not delivered yet) and the counts by ledger state;
- the **last deliveries**, and per hour of the last 24 the deliveries and their latency (first sight to
  ``sent``, as the ledger knows it: backoff waits included);
- every **failure** (``failed`` and ``retrying`` rows) with its reason and the command that retries it;
- the **last sync pass** (a meta row ``sync.last`` written by :func:`record_sync`);
- **upload quota** use by role, as ``serve`` counts it;
- the files a ``watch`` **cannot read** (a meta row ``watch.unreadable.<node>``, rewritten when the set changes);
- ``verify``'s **verdicts** (how many files the app holds in full, in part, not at all...);
- **alerts**: every state that needs a person (a dead watcher, a failed row, an unreadable file, a sync pass
  that stopped, failed or is overdue, a file the app holds only in part or not at all), each one line;
  ``status`` exits 1 when there is any.

Writers here (:func:`beat`, :func:`record_sync`) are one idempotent meta upsert each; nothing else writes.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence, Sized
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Final, Protocol

from smt_watch.clock import utc_stamp
from smt_watch.errors import LedgerError, LedgerUnavailable
from smt_watch.ledger import STATES
from smt_watch.ledger.common import delivery_seconds, epoch_of
from smt_watch.ledger.roles import Meta, StatusReads
from smt_watch.names import shown
from smt_watch.sizes import human_bytes

if TYPE_CHECKING:
    from rich.text import Text

    from smt_watch.config import Settings

HEARTBEAT_PREFIX: Final = "watch.heartbeat."
HEARTBEAT_SECONDS: Final = 10.0  # how often `watch` rewrites its heartbeat
STALE_SECONDS: Final = 3 * HEARTBEAT_SECONDS  # a beat older than this: that watcher is not running
SYNC_KEY: Final = "sync.last"
UNREADABLE_PREFIX: Final = "watch.unreadable."
RECENT: Final = 10  # deliveries shown
HOURS: Final = 24  # hours in the charts
ROLES: Final = ("admin", "customer")  # as serve counts uploads (Settings.upload_limit, upload_window)
BUSIEST: Final = 5  # accounts shown per role


@dataclass(frozen=True)
class Watcher:
    """One node's ``watch``, from its heartbeat."""

    node: str
    pid: int
    started_at: str
    beat_at: str
    stopped_at: str | None
    running: bool  # beat within STALE_SECONDS and not stopped
    beat_age_seconds: float
    waiting: int  # files the watcher holds that the ledger does not know yet (settling or queued)
    mode: str
    workers: int


@dataclass(frozen=True)
class Delivery:
    filename: str
    sha256: str
    size: int | None
    seconds: float  # first sight to sent
    http_status: int | None
    sent_at: str


@dataclass(frozen=True)
class Failure:
    filename: str
    sha256: str
    state: str  # failed, or retrying (watch tries again at next_attempt_at)
    attempts: int
    http_status: int | None
    error: str
    updated_at: str
    next_attempt_at: str | None
    retry_command: str


@dataclass(frozen=True)
class SyncPass:
    node: str
    started_at: str
    finished_at: str
    listed: int
    new: int
    bytes: int
    already: int
    failed: list[str]
    error: str | None  # the pass stopped: a changed host key, a refused login, …


@dataclass(frozen=True)
class Quota:
    role: str
    limit: int  # uploads per account per window
    window_seconds: float
    accounts: int  # accounts with an upload in the window
    uploads: int
    at_limit: int  # accounts that would be refused now
    busiest: list[tuple[str, int]]


@dataclass(frozen=True)
class Unreadable:
    """A file in the inbox that a ``watch`` could not open: nothing of it is delivered until it can."""

    node: str
    path: str
    owner: str
    mode: str  # octal, as ls would show the permission bits
    user: str  # the user that watch runs as
    since: str


@dataclass(frozen=True)
class Hour:
    start: str  # the hour's first second (UTC)
    deliveries: int
    median_seconds: float | None
    max_seconds: float | None


@dataclass(frozen=True)
class Status:
    generated_at: str
    ledger: str  # where it is (a PostgreSQL URL without its password)
    watchers: list[Watcher]
    queue: int  # rows not delivered yet: pending, sending, retrying
    counts: dict[str, int]
    recent: list[Delivery]
    failures: list[Failure]
    last_sync: SyncPass | None
    quotas: list[Quota]
    hours: list[Hour] = field(default_factory=list)
    unreadable: list[Unreadable] = field(default_factory=list)
    verdicts: dict[str, int] = field(default_factory=dict)  # `verify`'s verdicts: how many files have each
    not_stored: list[str] = field(default_factory=list)  # "name (verdict)" of files the app holds only in part
    alerts: list[str] = field(default_factory=list)  # each state that needs a person, one line each

    @property
    def watching(self) -> bool:
        return any(w.running for w in self.watchers)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["watching"] = self.watching
        for q in out["quotas"]:
            q["busiest"] = [{"account": a, "uploads": n} for a, n in q["busiest"]]
        return out


# --- writers -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Beat:
    """What ``watch`` says about itself in each heartbeat."""

    node: str
    started_at: float
    waiting: int
    mode: str
    workers: int
    stopped: bool = False


def beat(ledger: Meta, b: Beat) -> None:
    now = time.time()
    value = {"node": b.node, "pid": os.getpid(), "started_at": utc_stamp(b.started_at), "beat_at": utc_stamp(now),
             "beat_epoch": now, "stopped_at": utc_stamp(now) if b.stopped else None, "waiting": b.waiting,
             "mode": b.mode, "workers": b.workers}
    ledger.set_meta(HEARTBEAT_PREFIX + b.node, json.dumps(value, sort_keys=True))


def record_unreadable(ledger: Meta, node: str, files: list[Unreadable]) -> None:
    """The files this node's ``watch`` cannot read now (an empty list once they are all readable or gone)."""
    ledger.set_meta(UNREADABLE_PREFIX + node, json.dumps([asdict(f) for f in files], sort_keys=True))


class SyncCounts(Protocol):
    """What :func:`record_sync` reads of a pass (``smt_watch.sync.SyncReport`` is one): ``sync`` calls
    ``status`` to record its pass, so ``status`` names only what it reads and never imports ``sync``."""

    @property
    def listed(self) -> int: ...

    @property
    def already(self) -> int: ...

    @property
    def bytes(self) -> int: ...

    @property
    def fetched(self) -> Sized: ...

    @property
    def failed(self) -> Sequence[str]: ...


def record_sync(ledger: Meta, node: str, started: float, report: SyncCounts | None, error: str | None) -> None:
    """Remember a finished pass (or the error that stopped it) for ``status``."""
    value = {"node": node, "started_at": utc_stamp(started), "finished_at": utc_stamp(time.time()),
             "listed": report.listed if report else 0, "new": len(report.fetched) if report else 0,
             "bytes": report.bytes if report else 0, "already": report.already if report else 0,
             "failed": list(report.failed) if report else [], "error": error}
    ledger.set_meta(SYNC_KEY, json.dumps(value, sort_keys=True))


# --- the reader --------------------------------------------------------------------------------------------


def retry_command(sha256: str) -> str:
    return f"smt-watch ledger retry {sha256}"


BULK_RETRY: Final = "smt-watch ledger retry --failed"


def retry_lines(status: Status) -> list[str]:
    """The commands that retry the failures, whole (a terminal's width never cuts them): one per row, then
    the bulk form when more than one row failed."""
    if not status.failures:
        return []
    lines = ["retry with:"] + [f"  {f.retry_command}" for f in status.failures]
    if sum(f.state == "failed" for f in status.failures) > 1:
        lines.append(f"  {BULK_RETRY}    (every failed row; --status CODE, --since WHEN narrow it)")
    return lines


def _unreadable(ledger: StatusReads) -> list[Unreadable]:
    out: list[Unreadable] = []
    for raw in ledger.meta_prefix(UNREADABLE_PREFIX).values():
        try:
            out.extend(Unreadable(**{k: str(v) for k, v in item.items()}) for item in json.loads(raw))
        except (ValueError, TypeError, AttributeError):
            continue  # written by another version: not ours to judge
    return sorted(out, key=lambda u: (u.node, u.path))


def _alerts(settings: Settings, status: Status, now: float) -> list[str]:
    """Every state that needs a person, one line each; ``status`` exits 1 when there is any."""
    out = [f"watch on {w.node} is not running: last heartbeat {age(w.beat_at, now)} (pid {w.pid})"
           for w in status.watchers if not w.running and not w.stopped_at]
    failed = sum(f.state == "failed" for f in status.failures)
    if failed:
        out.append(f"{failed} failed row(s): fix the cause, then {BULK_RETRY if failed > 1 else 'retry it'}")
    if status.unreadable:
        users = ", ".join(sorted({u.user for u in status.unreadable}))
        out.append(f"{len(status.unreadable)} file(s) in the inbox that watch cannot read as {users}: nothing of "
                   "them is delivered until it can")
    if status.not_stored:
        names = ", ".join(status.not_stored[:3]) + (" …" if len(status.not_stored) > 3 else "")
        out.append(f"{len(status.not_stored)} file(s) sent but not held in full by the app: {names}; "
                   "`smt-watch verify --json` says which days")
    p = status.last_sync
    if p is not None:
        if p.error:
            out.append(f"sync stopped on {p.node}: {p.error}")
        elif p.failed:
            out.append(f"sync's last pass on {p.node} failed {len(p.failed)} file(s): {', '.join(p.failed[:3])}")
        stale = settings.sync_stale_seconds
        if stale and now - epoch_of(p.finished_at) > stale:
            out.append(f"sync has not run for {age(p.finished_at, now).removesuffix(' ago')} (alert after "
                       f"SMT_SYNC_STALE_SECONDS={stale:g}): is smt-sync.timer enabled? systemctl list-timers smt-sync")
    return out


def _watchers(ledger: StatusReads, now: float) -> list[Watcher]:
    out: list[Watcher] = []
    for raw in ledger.meta_prefix(HEARTBEAT_PREFIX).values():
        try:
            v = json.loads(raw)
            age = max(0.0, now - float(v["beat_epoch"]))
            out.append(Watcher(node=str(v["node"]), pid=int(v["pid"]), started_at=str(v["started_at"]),
                               beat_at=str(v["beat_at"]), stopped_at=v.get("stopped_at"),
                               running=v.get("stopped_at") is None and age <= STALE_SECONDS,
                               beat_age_seconds=round(age, 1), waiting=int(v.get("waiting", 0)),
                               mode=str(v.get("mode", "")), workers=int(v.get("workers", 0))))
        except (ValueError, KeyError, TypeError):
            continue  # written by another version: not ours to judge
    return sorted(out, key=lambda w: w.node)


def _last_sync(ledger: StatusReads) -> SyncPass | None:
    raw = ledger.meta(SYNC_KEY)
    if raw is None:
        return None
    try:
        v = json.loads(raw)
        return SyncPass(node=str(v["node"]), started_at=str(v["started_at"]), finished_at=str(v["finished_at"]),
                        listed=int(v["listed"]), new=int(v["new"]), bytes=int(v["bytes"]),
                        already=int(v["already"]), failed=[str(f) for f in v["failed"]], error=v.get("error"))
    except (ValueError, KeyError, TypeError):
        return None


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _hours(ledger: StatusReads, now: float) -> list[Hour]:
    """The last :data:`HOURS` clock hours (UTC), this one last."""
    first = (int(now) // 3600 - (HOURS - 1)) * 3600
    buckets: list[list[float]] = [[] for _ in range(HOURS)]
    for sent, seconds in ledger.delivery_times(first):
        index = int(sent - first) // 3600
        if 0 <= index < HOURS:
            buckets[index].append(seconds)
    return [Hour(start=utc_stamp(first + i * 3600), deliveries=len(b),
                 median_seconds=round(_median(b), 3) if b else None, max_seconds=round(max(b), 3) if b else None)
            for i, b in enumerate(buckets)]


def _quotas(settings: Settings, ledger: StatusReads, now: float) -> list[Quota]:
    out = []
    for role in ROLES:
        limit, window = settings.upload_limit(role), settings.upload_window(role)
        counts = ledger.upload_counts(role, now - window)
        out.append(Quota(role=role, limit=limit, window_seconds=window, accounts=len(counts),
                         uploads=sum(counts.values()), at_limit=sum(1 for n in counts.values() if n >= limit),
                         busiest=list(counts.items())[:BUSIEST]))
    return out


# verify's verdicts that need a person (`partial`, `missing`); `outside window` days are re-sent by watch
NEEDS_A_PERSON: Final = ("partial", "missing")


def verdicts_by_sha(ledger: StatusReads) -> dict[str, str]:
    """verify's verdict of each file that has one (``ledger list`` shows it beside ``sent``)."""
    try:
        return {sha: row.verdict for sha, row in ledger.verdicts().items()}
    except LedgerUnavailable:
        raise
    except LedgerError:  # a ledger a newer watch has not migrated yet, opened read-only: no verdicts yet
        return {}


def _verdicts(ledger: StatusReads) -> dict[str, Any]:
    """Counts of verify's verdicts, and the files whose verdict needs a person (by name)."""
    counts: dict[str, int] = {}
    not_stored: list[str] = []
    for sha, verdict in sorted(verdicts_by_sha(ledger).items()):
        counts[verdict] = counts.get(verdict, 0) + 1
        if verdict in NEEDS_A_PERSON:
            found = ledger.get(sha)
            not_stored.append(f"{found.filename if found else sha[:12]} ({verdict})")
    return {"verdicts": counts, "not_stored": not_stored}


def gather(settings: Settings, ledger: StatusReads, now: float | None = None) -> Status:
    """Everything ``status`` shows, read from the ledger now."""
    now = time.time() if now is None else now
    failures = [
        Failure(filename=r.filename, sha256=r.sha256, state=r.state, attempts=r.attempts, http_status=r.http_status,
                error=r.last_error or "", updated_at=r.updated_at,
                next_attempt_at=utc_stamp(r.next_attempt_at) if r.next_attempt_at else None,
                retry_command=retry_command(r.sha256))
        for state in ("failed", "retrying") for r in ledger.rows(state)
    ]
    recent = [Delivery(filename=r.filename, sha256=r.sha256, size=r.size,
                       seconds=round(delivery_seconds(r.first_seen, r.sent_at or r.first_seen, r.started_at), 3),
                       http_status=r.http_status, sent_at=r.sent_at or "")
              for r in ledger.recent_deliveries(RECENT)]
    counts = ledger.counts()
    status = Status(
        generated_at=utc_stamp(now), ledger=str(ledger.path), watchers=_watchers(ledger, now),
        queue=sum(counts[s] for s in ("pending", "sending", "retrying")), counts={s: counts[s] for s in STATES},
        recent=recent, failures=failures, last_sync=_last_sync(ledger), quotas=_quotas(settings, ledger, now),
        hours=_hours(ledger, now), unreadable=_unreadable(ledger), **_verdicts(ledger),
    )
    return replace(status, alerts=_alerts(settings, status, now))


def age(stamp: str, now: float) -> str:
    """``3 s ago``, ``5 min ago``, ``2 h ago``, ``4 d ago``: how long before ``now`` a row time was."""
    seconds = max(0.0, now - epoch_of(stamp))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} ago"
    return f"{int(seconds)} s ago"


def human_size(n: int | None) -> str:
    """A size in the one unit every operator-facing text uses (:mod:`smt_watch.sizes`); ``-`` if unknown."""
    return "-" if n is None else human_bytes(n)


def seconds_text(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.2f} s" if s < 60 else f"{s / 60:.1f} min" if s < 3600 else f"{s / 3600:.1f} h"


def watch_line(status: Status, now: float) -> str:
    if not status.watchers:
        return "watch: never seen (no heartbeat in this ledger)"
    parts = []
    for w in status.watchers:
        if w.running:
            parts.append(f"{w.node}: running since {w.started_at} (pid {w.pid}, beat {w.beat_age_seconds:.0f} s ago,"
                         f" {w.waiting} waiting, {w.workers} worker(s), {w.mode})")
        elif w.stopped_at:
            parts.append(f"{w.node}: stopped {age(w.stopped_at, now)} (at {w.stopped_at})")
        else:
            parts.append(f"{w.node}: NOT RUNNING: last heartbeat {age(w.beat_at, now)} (pid {w.pid})")
    return "watch: " + "; ".join(parts)


def sync_line(status: Status, now: float) -> str:
    p = status.last_sync
    if p is None:
        return "sync: no pass recorded"
    text = (f"sync: last pass {age(p.finished_at, now)} on {p.node}: {p.new} new ({human_size(p.bytes)}), "
            f"{p.already} already fetched, {len(p.failed)} failed")
    if p.error:
        text += f"; STOPPED: {p.error}"
    return text


def plain(value: object) -> Text:
    """A table cell or title as plain text: names, cells and errors are the sender's (or a server's) text, so
    control characters are escaped (:func:`shown`: an ESC would reach the terminal) and rich reads nothing in
    it: a ``[/]`` is no markup (an error), a ``:smile:`` no emoji shortcode (a str cell gets both). A list is
    joined by commas (``-`` when empty), a float has 3 decimals, None is ``-``."""
    from rich.text import Text

    if isinstance(value, list):
        text = ", ".join(map(str, value)) or "-"
    elif isinstance(value, float):
        text = f"{value:.3f}"
    else:
        text = "-" if value is None else str(value)
    return Text(shown(text))


def console_view(status: Status, now: float | None = None) -> Any:
    """``smt-watch status`` as a rich renderable (one screen)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    now = time.time() if now is None else now
    head = Text()
    if status.alerts:
        head.append("needs attention:\n", style="bold red")
        for alert in status.alerts:  # shown(): an alert can name a file (the sender's bytes) or quote an error
            head.append(f"  - {shown(alert)}\n", style="red")
    head.append(shown(watch_line(status, now)) + "\n", style="green" if status.watching else "bold red")
    counts = ", ".join(f"{s} {n}" for s, n in status.counts.items())
    head.append(f"queue: {status.queue} not delivered yet   ledger: {counts}\n")
    if status.verdicts:
        held = ", ".join(f"{v} {n}" for v, n in sorted(status.verdicts.items()))
        head.append(shown(f"in the app (verify): {held}") + "\n")  # a verdict is ledger text too
    sync_alert = any(a.startswith(("sync ", "sync's")) for a in status.alerts)
    head.append(shown(sync_line(status, now)) + "\n", style="bold red" if sync_alert else "")
    for u in status.unreadable:
        # every field is a ledger row's text (another version's, or hand-edited): shown() as the path is
        head.append(shown(f"cannot read: {u.path} (owner {u.owner}, mode {u.mode}; watch on {u.node} runs as "
                          f"{u.user}) since {u.since}") + "\n", style="bold red")
    quotas = "; ".join(f"{q.role} {q.uploads} upload(s) from {q.accounts} account(s), {q.at_limit} at the limit "
                       f"of {q.limit}" for q in status.quotas)
    head.append(f"uploads: {quotas}\n")
    recent = Table("sent", "file", "size", "latency", "HTTP", title=f"last {RECENT} deliveries", title_justify="left",
                   expand=False)
    for d in status.recent:
        recent.add_row(age(d.sent_at, now), plain(d.filename), human_size(d.size), seconds_text(d.seconds),
                       str(d.http_status or "-"))
    parts: list[Any] = [head, recent]
    if status.failures:
        failed = Table("state", "file", "att", "HTTP", "reason", title="failures", title_justify="left",
                       title_style="bold red")
        for f in status.failures:
            reason = f.error[:200] + (f" (next attempt {f.next_attempt_at})" if f.next_attempt_at else "")
            failed.add_row(plain(f.state), plain(f.filename), str(f.attempts), str(f.http_status or "-"), plain(reason))
        parts.append(failed)
    else:
        parts.append(Text("failures: none"))
    parts.append(Text(f"as of {status.generated_at}; ledger {shown(status.ledger)}", style="dim"))
    return Group(*parts)
