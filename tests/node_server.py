"""IntelliWatt's Node upload server's chunking (``scripts/droplet/smt-upload-server.ts``), transcribed line by
line, for tests to compare smt-watch's raw-upload chunks with: a file the Node server already sent must be a
duplicate by hash."""

from __future__ import annotations

import re

# String.prototype.trim()'s set: WhiteSpace (with U+FEFF) and LineTerminator; not Python's str.strip() set
JS_TRIM = "\t\n\v\f\r \u00a0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000\ufeff"


def node_chunks(data: bytes, per_chunk: int = 5000) -> list[bytes]:
    r"""The chunks as ``scripts/droplet/smt-upload-server.ts`` builds them, transcribed line by line:
    ``text.split(/\r?\n/)``, header ``lines[0]``, data lines those whose ``trim()`` is not empty, each chunk
    ``[header, ...part].join("\n")`` (no newline at the end); no data line: the whole text."""
    text = data.decode("utf-8", "replace")
    lines = re.split(r"\r?\n", text)
    header, data_lines = lines[0], [line for line in lines[1:] if line.strip(JS_TRIM)]
    if not data_lines:
        return [text.encode()]
    return ["\n".join([header, *data_lines[i:i + per_chunk]]).encode() for i in range(0, len(data_lines), per_chunk)]


def node_whole(data: bytes) -> bytes:
    """The file the receiver assembles from those chunks (header once, then every data line)."""
    first, *rest = node_chunks(data, 10**9)
    return b"\n".join([first, *(c.split(b"\n", 1)[1] for c in rest)])
