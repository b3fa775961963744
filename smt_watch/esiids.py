"""Whose data a file is: the ESIID and meter an uploader declared, the ESIID a delivery carried, and
``forceRepost`` of one customer's files.

IntelliWatt's bash script uploads with ``-F esiid=… -F meter=…`` and its Node upload server passes both on
to the web app. ``serve`` checks them (:func:`clean_esiid`, :func:`clean_meter`: hostile text is a ``400``,
never stored) and keeps them in the ledger's ``labels`` table keyed by the bytes' SHA-256, before the file
is visible in the inbox; the pipeline puts them in the payload (:func:`labelled`), for the upload itself or
for the CSVs unpacked from an uploaded ``.asc``/``.zip``. What the uploader declared wins over the ESIID
found in the CSV, as the Node server sends it (a disagreement is logged).

Every delivery also notes the ESIID it carried, so a trigger's ``forceRepost`` with an ``esiid`` finds every
file of that customer still in the inbox, sent before or not, and puts it back to ``pending`` for ``watch``
(:func:`repost_esiid`), as the old script re-posted every file in its inbox. The work is bounded: one
indexed query, at most :data:`REPOST_MAX` rows, one ``stat`` each.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

from smt_watch.config import Settings
from smt_watch.content import ESIID_RE  # the rule a CSV's own ESIID is held to: 17 to 22 digits
from smt_watch.delivery import Payload
from smt_watch.inbox import regular_stat
from smt_watch.ledger.roles import Labelling

log = logging.getLogger("smt_watch.esiids")

METER_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
REPOST_MAX: Final = 1000  # rows one forceRepost looks at: a customer's files for years of daily deliveries


class InvalidLabel(ValueError):
    """An ``esiid`` or ``meter`` that is not one; the message says what is expected (never echoes much)."""


def clean_esiid(raw: str | None) -> str | None:
    """An ESIID as the web app sends it (digits; blank means none), or :class:`InvalidLabel`."""
    text = (raw or "").strip()
    if not text:
        return None
    if not ESIID_RE.fullmatch(text):
        raise InvalidLabel("esiid must be an ESIID: 17 to 22 digits")
    return text


def clean_meter(raw: str | None) -> str | None:
    """A meter id (letters, digits, ``. _ -``, at most 64; blank means none), or :class:`InvalidLabel`."""
    text = (raw or "").strip()
    if not text:
        return None
    if not METER_RE.fullmatch(text):
        raise InvalidLabel("meter must be a meter id: letters, digits, '.', '_' or '-', at most 64")
    return text


def labelled(ledger: Labelling, payload: Payload, parent: str | None, found_esiid: str | None) -> Payload:
    """``payload`` with what an uploader declared for these bytes (or for the ``.asc``/``.zip`` they were
    unpacked from); the ESIID it then carries is noted in the ledger for ``forceRepost``. ``found_esiid``:
    the CSV's own ESIID, if it holds exactly one."""
    keys = [payload.sha256] + ([parent] if parent else [])
    known = ledger.labels(keys)
    for key in keys:
        said = known.get(key)
        if said is None or not (said.declared_esiid or said.declared_meter):
            continue
        if said.declared_esiid and found_esiid and said.declared_esiid != found_esiid:
            log.warning("%s: the uploader said ESIID %s, the file holds %s; sending %s, as the Node upload server "
                        "did", payload.filename, said.declared_esiid, found_esiid, said.declared_esiid)
        payload = replace(payload, esiid=said.declared_esiid or payload.esiid,
                          meter=said.declared_meter or payload.meter)
        break
    own = known.get(payload.sha256)
    if payload.esiid and (own is None or own.esiid != payload.esiid):
        ledger.note_esiid(payload.sha256, payload.esiid)
    return payload


@dataclass(frozen=True)
class Repost:
    """What one ``forceRepost`` did: ``files`` in the inbox that ``watch`` delivers again, ``moved`` the
    hashes back to ``pending`` (those files, and the CSVs inside an ``.asc``/``.zip``), ``gone`` rows whose
    file left the inbox."""

    files: int
    moved: tuple[str, ...]
    gone: int
    truncated: bool


def repost_esiid(settings: Settings, ledger: Labelling, esiid: str) -> Repost:
    """Every file of ``esiid`` still in the inbox back to ``pending`` (sent, failed or retrying alike), so
    ``watch`` delivers it again; a CSV unpacked from an ``.asc``/``.zip`` takes its parent along (the file in
    the inbox is the parent). Rows in ``sending`` are on their way already and left alone; a row whose file
    left the inbox (``SMT_AFTER_SEND=move``/``delete``) cannot be sent again and is only counted."""
    root = settings.local_dir.absolute()
    shas = ledger.with_esiid(esiid, REPOST_MAX + 1)
    truncated = len(shas) > REPOST_MAX
    targets: list[str] = []
    tops: set[str] = set()
    gone = 0
    for sha in shas[:REPOST_MAX]:
        row = ledger.get(sha)
        if row is None:
            continue  # declared by an upload not seen yet: watch delivers it anyway
        top = ledger.get(row.parent) if row.parent else row
        if top is None or not top.path or regular_stat(Path(top.path), root) is None:
            gone += 1
            continue
        tops.add(top.sha256)
        targets.extend(s for s in (top.sha256, sha) if s not in targets)
    moved = tuple(ledger.repost(targets)) if targets else ()
    files = len(tops.intersection(moved))
    log.info("forceRepost for ESIID %s: %d file(s) back to pending, %d no longer in the inbox%s", esiid,
             files, gone, f" (only the newest {REPOST_MAX} looked at)" if truncated else "")
    return Repost(files, moved, gone, truncated)
