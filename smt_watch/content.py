"""What a ready file turns into: one or more CSV deliveries (docs/contract.md §6).

- ``*.csv``: itself.
- ``*.zip``: every CSV inside, each its own delivery.
- ``*.asc``: decrypted with gpg (:mod:`smt_watch.gpg`: a private copy of ``GNUPGHOME`` or ``~/.gnupg``, so it
  works under the unit's read-only home), then treated as above (SMT sends encrypted ZIPs).

Decrypted and extracted files go to a private work dir under ``SMT_STATE_DIR`` (never the inbox, so the
watcher never sees them as new files); identity is each CSV's SHA-256, so SMT re-sending the same data
under new encryption is a duplicate. A ZIP entry with an absolute or ``..`` name, one that would unpack
past ``SMT_MAX_UNPACKED_BYTES`` or more than 200× its compressed size, a wrong key, bad armour or a ZIP
with no CSV fails the parent file with one clear reason (:class:`ContentError`) and extracts nothing.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Final

from smt_watch import gpg
from smt_watch.config import Settings
from smt_watch.errors import ContentError, LineTooLong, SmtWatchError
from smt_watch.hashing import FileIdentity, check_regular, identify
from smt_watch.names import shown
from smt_watch.passrules import hash_pass as hash_pass  # re-exported: pipeline.py's pass (passrules says why)
from smt_watch.passrules import is_container as is_container  # re-exported: the callers of content keep it
from smt_watch.passrules import sniffing as sniffing
from smt_watch.smtcsv import Sniff, Sniffer, Summary, sniff, summarize_file

log = logging.getLogger("smt_watch.content")

MAX_RATIO: Final = 200
ESIID_RE: Final = re.compile(r"[0-9]{17,22}")
ZIP_MAGIC: Final = b"PK\x03\x04"


@dataclass(frozen=True)
class Part:
    """One CSV to deliver: where its bytes are, under which name, with which ESIID."""

    ident: FileIdentity
    name: str
    esiid: str | None
    kind: str
    parent: str | None = None  # SHA-256 of the .asc/.zip it came from


def work_dir(settings: Settings) -> Path:
    return settings.state_dir / "work"


def csv_part(settings: Settings, ident: FileIdentity, name: str, parent: str | None = None,
             sniffed: Sniffer | None = None) -> Part:
    """Validate a CSV and pick its ESIID: the file's own when it holds exactly one, else ESIID_DEFAULT.

    ``sniffed``: the sniffer the hash pass fed (:func:`sniffing`), so the file is not read again for this."""
    try:
        found = sniffed.result() if sniffed is not None else sniff(ident.read_path)
    except OSError as exc:
        raise ContentError(f"{name}: cannot read: {exc.strerror}") from exc
    except LineTooLong as exc:
        if settings.validate:
            raise ContentError(f"{name}: {exc}") from exc
        found = Sniff("other", frozenset())  # SMT_VALIDATE=0 delivers it anyway, with ESIID_DEFAULT
    if found.kind == "other" and settings.validate:
        raise ContentError(f"not an SMT file: {name} (no ESIID column; set SMT_VALIDATE=0 to deliver anyway)")
    invalid = sorted(e for e in found.esiids if not ESIID_RE.fullmatch(e))
    if invalid and settings.validate:
        raise ContentError(f"{name}: invalid ESIID {shown(invalid[0][:40])!r}"
                           f"{'…' if len(invalid[0]) > 40 else ''} (an ESIID is 17 to 22 digits)")
    esiid: str | None = None
    if len(found.esiids) == 1 and not invalid:
        esiid = next(iter(found.esiids))
    elif len(found.esiids) > 1:
        log.warning("%s holds %d ESIIDs; sending it with ESIID_DEFAULT", name, len(found.esiids))
    elif invalid:
        log.warning("%s: invalid ESIID %r; sending it with ESIID_DEFAULT", name, shown(invalid[0][:40]))
    return Part(ident, name, esiid, found.kind, parent)


def unpack(settings: Settings, ident: FileIdentity) -> list[Part]:
    """Decrypt and/or unzip a container into the work dir; every CSV inside becomes a :class:`Part`."""
    dest = work_dir(settings) / ident.sha256
    if dest.exists():
        shutil.rmtree(dest)  # a crash mid-unpack: start over, nothing in there was delivered from it
    dest.mkdir(parents=True, mode=0o700)
    try:
        paths = open_container(settings, ident.read_path, dest, ident.path.name)
        parts = []
        for p in paths:
            sniffer = Sniffer()
            parts.append(csv_part(settings, identify(p, observe=sniffer.feed), p.name, ident.sha256, sniffer))
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    log.info("Unpacked %s: %d CSV file(s)", ident.path.name, len(parts))
    return parts


def open_container(settings: Settings, path: Path, dest: Path, name: str | None = None) -> list[Path]:
    """Decrypt (``.asc``) and unzip into ``dest`` (a private, empty directory); return the CSV paths.

    ``name``: the file's name when ``path`` is only where to read it (an open descriptor)."""
    name = name or path.name
    source = path
    if name.lower().endswith(".asc"):
        source = gpg.decrypt(settings, path, dest / ".decrypted", name)
    with source.open("rb") as fh:
        is_zip = fh.read(4) == ZIP_MAGIC
    if is_zip:
        paths = extract(settings, source, dest, name)
    elif source is not path:  # an .asc holding a plain CSV
        inner = re.sub(r"\.asc$", "", name, flags=re.IGNORECASE)
        paths = [source.rename(dest / (inner if inner.lower().endswith(".csv") else inner + ".csv"))]
    else:
        raise ContentError(f"{name}: not a ZIP file")
    if source is not path:
        source.unlink(missing_ok=True)
    return paths


def _safe_entry(name: str) -> PurePosixPath:
    rel = PurePosixPath(name.replace("\\", "/"))
    if rel.is_absolute() or ".." in rel.parts or name.startswith(("/", "\\")) or ":" in (rel.parts or ("",))[0]:
        raise ContentError(f"unsafe ZIP entry name {name!r}")
    return rel


def extract(settings: Settings, archive: Path, dest: Path, label: str | None = None) -> list[Path]:
    """Extract the CSVs of a ZIP after checking every entry; refuse the whole archive on any risk.

    ``label`` names the file in errors (the .asc the operator knows, not our decrypted temp file).
    """
    limit = settings.max_unpacked_bytes
    label = label or archive.name
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ContentError(f"{label}: not a readable ZIP ({exc})") from exc
    with zf:
        if len(zf.infolist()) > settings.max_zip_entries:
            raise ContentError(f"{label}: holds {len(zf.infolist())} entries, over SMT_MAX_ZIP_ENTRIES "
                               f"({settings.max_zip_entries})")
        entries = [i for i in zf.infolist() if not i.is_dir()]
        for info in entries:
            _safe_entry(info.filename)
        csvs = [i for i in entries if i.filename.lower().endswith(".csv")]
        if not csvs:
            raise ContentError(f"{label}: no CSV inside")
        total = sum(i.file_size for i in csvs)
        if total > limit:
            raise ContentError(f"{label}: would unpack to {total} bytes, over SMT_MAX_UNPACKED_BYTES ({limit})")
        for info in csvs:
            if info.file_size > MAX_RATIO * max(info.compress_size, 1):
                raise ContentError(
                    f"{label}: entry {info.filename!r} expands more than {MAX_RATIO}x (zip bomb?)"
                )
        paths = []
        for n, info in enumerate(csvs):
            # each entry in a directory of its own: `x.csv`, `d/x.csv` and `X.CSV` never overwrite each
            # other, and each is delivered under its own base name
            name = PurePosixPath(info.filename.replace("\\", "/")).name
            target = dest / f"{n:04d}" / name
            target.parent.mkdir(mode=0o700)
            _copy_capped(zf, info, target, limit)
            paths.append(target)
    return paths


def _copy_capped(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, limit: int) -> None:
    """Copy one entry; declared sizes can lie, so the bytes actually produced are counted too."""
    written = 0
    cap = min(limit, info.file_size)
    try:
        with zf.open(info) as src, target.open("wb") as out:
            while data := src.read(1024 * 1024):
                written += len(data)
                if written > cap:
                    raise ContentError(f"entry {info.filename!r} is larger than declared (zip bomb?)")
                out.write(data)
            out.flush()
            os.fsync(out.fileno())
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, NotImplementedError) as exc:
        raise ContentError(f"entry {info.filename!r} cannot be extracted: {exc}") from exc


def inspect_path(settings: Settings, path: Path) -> list[Summary]:
    """``smt-watch inspect``: a summary of every CSV in a .csv, .zip or .asc (unpacked to a private temp dir)."""
    try:
        check_regular(path)
    except SmtWatchError as exc:
        raise ContentError(str(exc)) from exc
    try:
        if not is_container(path.name):
            return [summarize_file(path)]
        with tempfile.TemporaryDirectory(prefix="smt-watch-inspect-") as tmp:
            return [summarize_file(p) for p in open_container(settings, path, Path(tmp))]
    except OSError as exc:
        raise ContentError(f"{shown(str(path))}: cannot read: {exc.strerror}") from exc
    except csv.Error as exc:  # a field past the csv module's limit, a NUL byte, …: not SMT data
        raise ContentError(f"{shown(path.name)}: not a readable CSV: {exc}") from exc
