"""The ``raw-upload`` delivery mode (SPEC §4): a CSV as JSON chunks of whole lines, header in each.

The web app's production route takes one JSON body of at most a few MB at a time. A file is split into
chunks of ``SMT_RAW_LINES_PER_CHUNK`` data lines, each prefixed with the header line, and posted as
``<name>.partN-of-M`` (a file that fits in one chunk keeps its own name) with its own SHA-256 as
``Idempotency-Key``; only the last chunk carries ``postIngest: true``, the app's cue to queue its bucket
and plan work, also when it is sent after a resume. A first pass plans the chunks (their hashes and sizes,
and the whole file's hash, which must still be the one recorded); the sending pass re-reads each chunk and
checks it against the plan, so a file that changes mid-way is never sent mixed.
Acknowledged chunks are kept in the ledger: after a crash or a failed chunk, delivery resumes at the
first unacknowledged one. Memory is bounded by one chunk, not by the file.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from smt_watch.config import Settings
from smt_watch.errors import FileChanged


class ChunkStore(Protocol):
    def acked_chunks(self, sha256: str, parts: int) -> dict[int, str]: ...

    def ack_chunk(self, sha256: str, part: int, parts: int, chunk_sha256: str) -> None: ...


def _raw_lines(path: Path) -> Iterator[bytes]:
    with path.open("rb") as fh:
        yield from fh


def iter_chunks(path: Path, lines_per_chunk: int, digest: hashlib._Hash | None = None) -> Iterator[bytes]:
    """Chunk contents: the header line, then up to ``lines_per_chunk`` non-blank data lines.

    ``digest`` (when given) is fed every byte of the file, so a caller can check the whole file's hash.
    """
    lines = _raw_lines(path)
    header = next(lines, b"")
    if digest is not None:
        digest.update(header)
    if not header.endswith(b"\n"):
        header += b"\n"
    batch: list[bytes] = []
    for line in lines:
        if digest is not None:
            digest.update(line)
        if not line.strip():
            continue
        batch.append(line if line.endswith(b"\n") else line + b"\n")
        if len(batch) == lines_per_chunk:
            yield header + b"".join(batch)
            batch = []
    if batch:
        yield header + b"".join(batch)


def plan_chunks(path: Path, size: int, sha256: str, lines_per_chunk: int) -> list[tuple[str, int]]:
    """(chunk SHA-256, chunk size) for every chunk; raises FileChanged if the file is not the one hashed."""
    digest = hashlib.sha256()
    plan = [(hashlib.sha256(c).hexdigest(), len(c)) for c in iter_chunks(path, lines_per_chunk, digest)]
    if digest.hexdigest() != sha256:
        raise FileChanged(f"{path.name}: changed since it was hashed")
    return plan


class RawUploadMode:
    """Builds one chunk's JSON body; the Deliverer sends the chunks in order and records each ack."""

    name = "raw-upload"

    def __init__(self, settings: Settings) -> None:
        assert settings.base_url is not None
        self.url = settings.base_url + "/api/admin/smt/raw-upload"
        self._token = settings.admin_token
        self.lines_per_chunk = settings.raw_lines_per_chunk

    def auth_headers(self) -> dict[str, str]:
        return {"x-admin-token": self._token.reveal()} if self._token else {}

    def chunk_json(self, filename: str, esiid: str, meter: str, source: str, number: int, total: int,
                   content: bytes, chunk_sha: str) -> bytes:
        """Chunk ``number`` of ``total`` (from 1); only the last one asks the app for its post-ingest work."""
        return json.dumps({
            "filename": chunk_name(filename, number, total),
            "sizeBytes": len(content),
            "sha256": chunk_sha,
            "contentBase64": base64.b64encode(content).decode(),
            "source": source,
            "esiid": esiid,
            "meter": meter,
            "contentType": "text/csv",
            "receivedAt": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "postIngest": number == total,
        }).encode()


def chunk_name(filename: str, number: int, total: int) -> str:
    """``<name>.partN-of-M``, or the file's own name when it goes in one chunk (as the Node server names them)."""
    return filename if total == 1 else f"{filename}.part{number}-of-{total}"
