"""The ``raw-upload`` sink (docs/contract.md §4): a CSV as JSON chunks of whole lines, header in each.

The web app's production route takes one JSON body of at most a few MB at a time. A file is split into
chunks of ``SMT_RAW_LINES_PER_CHUNK`` data lines, each prefixed with the header line, and posted as
``<name>.partN-of-M`` (a file that fits in one chunk keeps its own name) with its own SHA-256 as
``Idempotency-Key``; only the last chunk carries ``postIngest: true``, the app's cue to queue its bucket
and plan work, also when it is sent after a resume. A first pass plans the chunks (their hashes and sizes,
and the whole file's hash, which must still be the one recorded); the sending pass re-reads each chunk and
checks it against the plan, so a file that changes mid-way is never sent mixed.
Acknowledged chunks are kept in the ledger (the :class:`ChunkStore` the sink is built with): after a
crash or a failed chunk, delivery resumes at the first unacknowledged one. Each chunk is its own request
with its own retries. Memory is bounded by one chunk, not by the file.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

from smt_watch.clock import utc_stamp
from smt_watch.delivery.base import Body, Payload, Progress, Result, SinkContext
from smt_watch.delivery.http import Poster
from smt_watch.errors import DeliveryError, FileChanged

log = logging.getLogger("smt_watch.delivery")


class RawUploadSink:
    """POSTs each chunk as JSON to ``/api/admin/smt/raw-upload`` with ``x-admin-token``, in order, recording
    each acknowledgement in the chunk store."""

    name = "raw-upload"

    def __init__(self, cx: SinkContext) -> None:
        self.url = cx.url
        self._poster = Poster(cx.settings, cx.url, ("x-admin-token", cx.token))
        self.destination = self._poster.destination
        self._store = cx.chunks
        self.lines_per_chunk = cx.settings.raw_lines_per_chunk
        if cx.announce:
            log.info("Using %s delivery to %s", self.name, self.destination)

    def close(self) -> None:
        self._poster.close()

    def send(self, payload: Payload, progress: Progress | None = None) -> Result:
        store = self._store
        plan = plan_chunks(payload.path, payload.size, payload.sha256, self.lines_per_chunk)
        total = len(plan)
        acked = store.acked_chunks(payload.sha256, total) if store else {}
        attempts, status, text = 0, 200, ""
        digest = hashlib.sha256()
        number = 0
        try:
            for number, content in enumerate(iter_chunks(payload.path, self.lines_per_chunk, digest), start=1):
                if number > total:
                    raise FileChanged(f"{payload.filename}: grew while its chunks were being sent")
                chunk_sha, _ = plan[number - 1]
                if acked.get(number) == chunk_sha:
                    continue
                if hashlib.sha256(content).hexdigest() != chunk_sha:
                    raise FileChanged(f"{payload.filename}: changed while its chunks were being sent")
                data = chunk_json(payload.filename, payload.esiid, payload.meter, payload.source, number, total,
                                  content, chunk_sha)
                body = Body("application/json", len(data), _constant(data))
                status, text, used = self._poster.post(f"{payload.filename} part {number}/{total}", chunk_sha,
                                                       body, None)
                attempts += used
                if store:
                    store.ack_chunk(payload.sha256, number, total, chunk_sha)
                if progress:
                    progress(len(content))
            if number != total or digest.hexdigest() != payload.sha256:
                # Every chunk sent matched the plan, but the file as a whole is no longer the one hashed
                # (cut short, or changed in a part already acknowledged): do not call it sent.
                raise FileChanged(f"{payload.filename}: changed while its chunks were being sent")
        except DeliveryError as exc:
            exc.attempts += attempts
            raise
        log.info("Raw upload success (%d): %s in %d chunk(s): %s", status, payload.filename, total, text[:200])
        return Result(status=status, body=text, attempts=attempts, destination=self.destination)


def _constant(data: bytes) -> Callable[[Progress | None], Iterator[bytes]]:
    """A body factory for a chunk already in memory (bounded by SMT_RAW_LINES_PER_CHUNK lines)."""

    def chunks(_progress: Progress | None) -> Iterator[bytes]:
        yield data

    return chunks


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


def chunk_json(filename: str, esiid: str, meter: str, source: str, number: int, total: int, content: bytes,
               chunk_sha: str) -> bytes:
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
        "receivedAt": utc_stamp(),
        "postIngest": number == total,
    }).encode()


def chunk_name(filename: str, number: int, total: int) -> str:
    """``<name>.partN-of-M``, or the file's own name when it goes in one chunk (as the Node server names them)."""
    return filename if total == 1 else f"{filename}.part{number}-of-{total}"
