"""``smt-watch sync``: one pass that copies files new on the SMT SFTP server into the inbox.

"New" is decided by the ledger's ``remote_files`` table, not by what is in the inbox: a file fetched once is
never fetched again (even after ``watch`` moved or deleted the local copy) unless its size or mtime on the
server changed. Each file is downloaded to a hidden ``.<name>.<size>-<mtime>.part`` beside its final path
(same filesystem), fsynced and renamed into place, so ``watch`` only ever sees complete files; a part left
by an interrupted pass is resumed when the remote file is unchanged (its name says which version it is).

One pass at a time: the ledger's sync lock (a lock file beside the SQLite ledger, or a PostgreSQL advisory
lock shared by every node) keeps a timer run and a webhook run from overlapping.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import tenacity

from smt_watch.config import Settings
from smt_watch.errors import ConfigError, SftpError, SmtWatchError
from smt_watch.hashing import identify
from smt_watch.ledger import Ledger
from smt_watch.sftp import Connection, RemoteFile
from smt_watch.statedir import open_ledger

log = logging.getLogger("smt_watch.sync")

ATTEMPTS = 3


@dataclass
class SyncReport:
    listed: int = 0
    already: int = 0
    todo: list[RemoteFile] = field(default_factory=list)
    fetched: list[Path] = field(default_factory=list)
    bytes: int = 0
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    dry_run: bool = False

    def summary(self) -> str:
        if self.dry_run:
            size = human_bytes(sum(f.size for f in self.todo))
            return f"sync: {len(self.todo)} to fetch ({size}), {self.already} already fetched (dry run)"
        return (f"sync: {len(self.fetched)} new ({human_bytes(self.bytes)} in {self.seconds:.1f} s), "
                f"{self.already} already fetched, {len(self.failed)} failed")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


def part_path(final: Path, remote: RemoteFile) -> Path:
    return final.with_name(f".{final.name}.{remote.size}-{remote.mtime}.part")


def alternative_name(final: Path, n: int) -> Path:
    """``a.CSV`` → ``a.1.CSV``; ``X.CSV.3.asc`` → ``X.1.CSV.3.asc``: still matches ``SMT_PATTERNS``."""
    stem, dot, rest = final.name.partition(".")
    return final.with_name(f"{stem}.{n}{dot}{rest}")


def place(part: Path, final: Path, sha256: str) -> Path:
    """Rename the finished part into place, never over different content that may not be delivered yet."""
    dest, n = final, 0
    while dest.exists() or dest.is_symlink():
        try:
            if not dest.is_symlink() and identify(dest).sha256 == sha256:
                part.unlink()
                return dest
        except Exception:  # noqa: S110 - unreadable or changing: just pick another name
            pass
        n += 1
        dest = alternative_name(final, n)
    os.replace(part, dest)
    dir_fd = os.open(dest.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)
    for stale in final.parent.glob(f".{final.name}.*.part"):
        stale.unlink(missing_ok=True)  # parts of older versions of this file
    return dest


def list_remote(conn: Connection, settings: Settings) -> list[RemoteFile]:
    seen: dict[str, RemoteFile] = {}
    for top in settings.smt_remote_dirs:
        for f in conn.walk(top, settings.patterns):
            seen.setdefault(f.path, f)
    return list(seen.values())


def run_sync(
    settings: Settings,
    *,
    workers: int = 4,
    dry_run: bool = False,
    wait: bool = False,
    accept_new_host_key: bool = False,
    on_bytes: Callable[[int], None] | None = None,
    on_plan: Callable[[SyncReport], None] | None = None,
    force_repost: bool = False,
) -> SyncReport | None:
    """One pass. Returns None when another pass holds the lock (and ``wait`` is off).

    ``force_repost`` (the webhook's ``forceRepost``): what this pass fetches is delivered even if the same
    bytes were sent before; their ledger rows are dropped before the file is renamed into the inbox.
    """
    with open_ledger(settings, max_connections=workers + 2) as ledger, ledger.sync_lock(wait) as locked:
        if not locked:
            return None
        started = time.monotonic()
        began = time.time()
        report = SyncReport(dry_run=dry_run)
        try:
            with Connection(settings, accept_new_host_key=accept_new_host_key) as conn:
                remote = list_remote(conn, settings)
            known = ledger.remote_files()
            report.listed = len(remote)
            report.todo = [f for f in remote if known.get(f.path) != (f.size, f.mtime)]
            report.already = report.listed - len(report.todo)
            if on_plan:
                on_plan(report)
            if not dry_run and report.todo:
                _fetch_all(settings, ledger, report, workers, on_bytes, force_repost)
        except SmtWatchError as exc:
            if not dry_run:
                _record(ledger, settings, began, report, str(exc))
            raise
        report.seconds = time.monotonic() - started
        if not dry_run:  # a dry run fetched nothing: the last real pass stays what `status` shows
            _record(ledger, settings, began, report, None)
        return report


def _record(ledger: Ledger, settings: Settings, began: float, report: SyncReport, error: str | None) -> None:
    """The pass as `status` shows it; a ledger that fails here does not turn the pass into a failure."""
    from smt_watch.status import record_sync

    try:
        record_sync(ledger, settings.node_name, began, report, error)
    except SmtWatchError as exc:
        log.warning("Could not record this sync pass for `status`: %s", exc)


def _fetch_all(
    settings: Settings,
    ledger: Ledger,
    report: SyncReport,
    workers: int,
    on_bytes: Callable[[int], None] | None,
    force_repost: bool,
) -> None:
    jobs: queue.Queue[RemoteFile] = queue.Queue()
    for f in sorted(report.todo, key=lambda f: -f.size):  # biggest first: the pass ends sooner
        jobs.put(f)
    lock = threading.Lock()
    fatal: list[ConfigError] = []

    def worker() -> None:
        conn: Connection | None = None
        try:
            while not fatal:
                try:
                    remote = jobs.get_nowait()
                except queue.Empty:
                    return
                try:
                    forget = ledger.forget if force_repost else None
                    conn, dest, sha = _fetch_with_retries(settings, conn, remote, on_bytes, forget)
                except ConfigError as exc:
                    with lock:
                        fatal.append(exc)
                    return
                except (SmtWatchError, OSError) as exc:
                    # A local problem (disk full, a file where a directory should be) fails this file only.
                    reason = exc if isinstance(exc, SmtWatchError) else f"{type(exc).__name__}: {exc}"
                    log.error("Failed to fetch %s: %s", remote.path, reason)
                    with lock:
                        report.failed.append(remote.path)
                    continue
                ledger.record_fetch(remote.path, remote.size, remote.mtime, sha, str(dest))
                with lock:
                    report.fetched.append(dest)
                    report.bytes += remote.size
        finally:
            if conn is not None:
                conn.close()

    threads = [threading.Thread(target=worker, name=f"smt-sync-{i}", daemon=True)
               for i in range(max(1, min(workers, len(report.todo))))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if fatal:
        raise fatal[0]


def _fetch_with_retries(
    settings: Settings,
    conn: Connection | None,
    remote: RemoteFile,
    on_bytes: Callable[[int], None] | None,
    forget: Callable[[list[str]], int] | None = None,
) -> tuple[Connection, Path, str]:
    """Fetch one file; a dropped connection is re-opened and the transfer resumes from its part."""
    final = settings.local_dir / remote.relative
    part = part_path(final, remote)
    final.parent.mkdir(parents=True, exist_ok=True)
    holder = [conn]
    started = time.monotonic()

    def attempt() -> tuple[Path, str]:
        current = holder[0] if holder[0] is not None else Connection(settings)
        holder[0] = current
        try:
            sha = current.download(remote, part, on_bytes)
        except SftpError:
            current.close()
            holder[0] = None
            raise
        if forget is not None:
            forget([sha])  # before the rename, so the watcher cannot judge it a duplicate first
        return place(part, final, sha), sha

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(SftpError),
        stop=tenacity.stop_after_attempt(ATTEMPTS),
        wait=tenacity.wait_exponential(multiplier=1, max=10),
        before_sleep=lambda s: log.warning("Retrying %s after: %s", remote.path,
                                           s.outcome.exception() if s.outcome else "?"),
        reraise=True,
    )
    dest, sha = retrying(attempt)
    assert holder[0] is not None
    log.info("Fetched %s (%s in %.1f s) -> %s", remote.path, human_bytes(remote.size),
             time.monotonic() - started, dest)
    return holder[0], dest, sha
