"""File names are bytes: how smt-watch stores, shows and sends them without ever failing on one.

On Linux a name is any bytes but ``/`` and NUL. Python hands us undecodable bytes as lone surrogates
(``surrogateescape``), which SQLite, HTTP headers, JSON and a UTF-8 terminal all refuse; control characters
(newline, carriage return, ESC) are valid but would split or forge log lines and table rows. So:

- :func:`stored` / :func:`unstored`: the ledger's form of a path, valid UTF-8 and round-tripping to the exact
  bytes (a path that is valid UTF-8 is stored as it is, so existing ledgers read the same);
- :func:`shown`: any text made fit for one line of a log, an error or a table (escapes, never raises);
- :func:`sent`: the name given to the receiver, valid UTF-8 (Windows clients write latin-1/cp1252 names:
  ``Z\\xe4hlerstand.csv`` is sent as ``Zählerstand.csv``).
"""

from __future__ import annotations

import base64
import os
import unicodedata
from typing import Final

_STORED_PREFIX: Final = "bytes:"  # a real absolute path starts with "/", so this can never be one


def stored(path: str) -> str:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return _STORED_PREFIX + base64.urlsafe_b64encode(os.fsencode(path)).decode("ascii")
    return path


def unstored(value: str) -> str:
    if value.startswith(_STORED_PREFIX):
        return os.fsdecode(base64.urlsafe_b64decode(value[len(_STORED_PREFIX):]))
    return value


_ESCAPES: Final = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def shown(text: str) -> str:
    """Printable, one line, valid UTF-8: control and format characters and undecodable bytes escaped.

    Idempotent (a backslash is left as it is), so layers that each make sure of it never escape twice."""
    if text.isprintable():
        return text  # the common case, and cheap
    out = []
    for c in text:
        if c in _ESCAPES:
            out.append(_ESCAPES[c])
        elif 0xDC80 <= ord(c) <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
            out.append(f"\\x{ord(c) - 0xDC00:02x}")
        elif c == " " or c.isprintable():
            out.append(c)
        elif unicodedata.category(c) == "Cs":  # any other lone surrogate
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
    return "".join(out)


def sent(name: str) -> str:
    """A name as the receiver gets it: the bytes as UTF-8 when they are, else as cp1252 (what a Windows
    client writes), control characters replaced by ``_``; never empty."""
    raw = os.fsencode(name)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("cp1252", "replace")
    if text.isprintable():  # the common case, asked several times per delivered file: no per-character loop
        return text or "unnamed"
    return "".join(c if c.isprintable() else "_" for c in text) or "unnamed"
