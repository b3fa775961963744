"""The old bash script's ``.posted_sha256`` state file: read it so replays stay skipped after migration."""

from __future__ import annotations

import logging
import stat as stat_mod
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from smt_watch.errors import InputError
from smt_watch.ledger import SHA256_RE
from smt_watch.ledger.roles import HashImport

log = logging.getLogger("smt_watch.legacy")


@dataclass(frozen=True)
class ImportReport:
    path: Path
    read: int  # valid hash lines
    added: int  # new ledger rows
    skipped_lines: int  # lines that are not a hash (reported, not fatal)


def parse_hash_lines(lines: Iterable[str]) -> tuple[list[tuple[str, str | None]], int]:
    """Accept bare hashes and ``sha256sum`` lines (``HASH  NAME`` or ``HASH *NAME``); count the rest."""
    entries: list[tuple[str, str | None]] = []
    bad = 0
    for line in lines:
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        digest, _, rest = text.partition(" ")
        digest = digest.lower()
        if not SHA256_RE.match(digest):
            bad += 1
            continue
        name = rest.strip().removeprefix("*").strip() or None
        entries.append((digest, Path(name).name if name else None))
    return entries, bad


def import_file(ledger: HashImport, path: Path) -> ImportReport:
    if path.exists() and not path.is_file():
        raise InputError(f"{path}: not a regular file")
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError as exc:
        raise InputError(f"{path}: no such file") from exc
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from exc
    entries, bad = parse_hash_lines(text.splitlines())
    added = ledger.import_hashes(entries, origin=f"imported from {path}")
    if bad:
        log.warning("Skipped %d line(s) of %s that are not SHA-256 hashes", bad, path)
    return ImportReport(path=path, read=len(entries), added=added, skipped_lines=bad)


def import_state_file(ledger: HashImport, path: Path | None) -> ImportReport | None:
    """Import ``STATE_FILE`` when it exists and changed since the last import (cheap on every start)."""
    if path is None:
        return None
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("STATE_FILE %s cannot be read: %s", path, exc.strerror)
        return None
    if not stat_mod.S_ISREG(st.st_mode):
        log.warning("STATE_FILE %s is not a regular file; not imported", path)
        return None
    signature = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    if ledger.meta("state_file_signature") == signature:
        return None
    report = import_file(ledger, path)
    ledger.set_meta("state_file_signature", signature)
    ledger.set_meta("state_file_imported", f"{report.read} hashes from {path}")
    if report.added:
        log.info("Imported %d hash(es) from STATE_FILE %s as sent", report.added, path)
    return report
