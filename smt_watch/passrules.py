"""What a file's hash pass takes with it, by the file's name: a CSV sniffer to feed, and, for a file sent as it
is, the read lease its send may read under (:mod:`smt_watch.readlease`).

One place for the two passes that apply these rules: :func:`smt_watch.content.hash_pass` and ``post``'s first
pass (:func:`smt_watch.clistart.first_pass`), which runs before the command line loads and so may import only
light modules: this one needs only hashing, smtcsv and readlease (no settings, gpg or zip modules).
"""

from __future__ import annotations

from pathlib import Path

from smt_watch.hashing import OVERLAP_CHUNK, FileIdentity, identify
from smt_watch.readlease import ReadLease, hold
from smt_watch.smtcsv import Sniffer


def is_container(name: str) -> bool:
    """An ``.asc``/``.zip``: unpacked, its CSVs sniffed and sent one by one, its own bytes never sent."""
    return name.lower().endswith((".asc", ".zip"))


def sniffing(name: str) -> Sniffer | None:
    """A sniffer for the hash pass to feed, or None for an ``.asc``/``.zip`` (its CSVs are sniffed when
    unpacked)."""
    return None if is_container(name) else Sniffer()


def pass_parts(path: Path) -> tuple[Sniffer | None, ReadLease | None]:
    """The sniffer the hash pass of ``path`` feeds and the read lease it runs under (taken now, before the
    pass; None where none is taken): a CSV sent as it is gets both, an ``.asc``/``.zip`` neither."""
    if is_container(path.name):
        return None, None
    return Sniffer(), hold(path)


def hash_pass(path: Path, read_size: int = OVERLAP_CHUNK) -> tuple[FileIdentity, Sniffer | None]:
    """One read of ``path`` before it is delivered, by these rules: its identity and, for a CSV, what the
    sniffer saw of it (a CSV sent as it is: a read lease for its send, taken before the pass)."""
    sniffer, lease = pass_parts(path)
    return identify(path, observe=sniffer.feed if sniffer else None, read_size=read_size, lease=lease), sniffer
