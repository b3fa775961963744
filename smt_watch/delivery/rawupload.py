"""The ``raw-upload`` sink (docs/contract.md §4): a CSV as JSON chunks, built exactly as the Node server builds them.

IntelliWatt's droplet upload server (``scripts/droplet/smt-upload-server.ts``) reads the file as UTF-8, splits
it with ``/\\r?\\n/``, keeps the first line as the header, drops blank data lines (``trim()`` empty), and sends
every ``SMT_RAW_LINES_PER_CHUNK`` (5,000) data lines as ``[header, ...lines].join("\\n")``: LF line ends, no
newline at the end, named ``<name>.partN-of-M`` (a file in one chunk keeps its own name; a file with no data
line goes whole). smt-watch builds the same bytes, so a chunk the Node server already sent is a duplicate by
its SHA-256 (the app's ``RawSmtFile`` key), not a new raw row. One rule more: a chunk is also cut before its
JSON body (base64 included) would pass :data:`~smt_watch.delivery.base.MAX_REQUEST_BYTES`, Vercel's 4.5 MB
request limit, which the Node server does not know (a line too long for any chunk fails the file).

Each chunk is its own request with its own SHA-256 as ``Idempotency-Key``, at least the Node server's
120 s timeout. ``postIngest: true`` (the app's cue to queue its bucket and plan work, for the ESIIDs whose
intervals survive its window in that chunk) goes on each ESIID's last chunk that holds intervals the app's
coverage window keeps (:mod:`smt_watch.postingest`), so a file whose last chunk holds only days too new for
the window still has its post-ingest work queued; the last chunk when no chunk holds any. ``storagePath`` is
``/smt/<esiid>/<chunk name>`` as the Node server sets it (the app's raw-files filter by ESIID finds it);
``source`` is ``smt-watch``, so rows smt-watch sent can be told from the Node server's (``droplet-upload``)
and the old script's inline ones (``SOURCE_TAG``).

A first pass plans the chunks (their hashes and sizes, the whole file's hash, which must still be the one
recorded, and which chunks carry ``postIngest``); the sending pass re-reads each chunk and checks it against
the plan, so a file that changes mid-way is never sent mixed. Acknowledged chunks are kept in the ledger (the
:class:`ChunkStore` the sink is built with): after a crash or a failed chunk, delivery resumes at the first
unacknowledged one; a forced re-send (``post --force``, :attr:`Payload.resend`) sends every chunk again.
Memory is bounded by one chunk and one 256 KiB read, whatever the file's size (the plan keeps a hash and a
size per chunk); the two passes read a block at a time (:func:`iter_chunks`).

Only interval CSVs go this way: the route parses nothing else, so the pipeline records a daily or billing
CSV as ``failed`` instead of sending it (:attr:`RawUploadSink.kinds`).
"""

from __future__ import annotations

import base64
import codecs
import dataclasses
import hashlib
import itertools
import json
import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from smt_watch.clock import utc_stamp
from smt_watch.delivery.base import MAX_REQUEST_BYTES, Body, Delivered, Payload, Progress, SinkContext
from smt_watch.delivery.http import Poster
from smt_watch.errors import DeliveryError, FileChanged, PermanentDelivery
from smt_watch.postingest import plan_post_ingest

log = logging.getLogger("smt_watch.delivery")

_EMPTY_CONTENT: Final = b'"contentBase64": ""'  # how json.dumps writes ChunkMeta.fields' placeholder
SOURCE: Final = "smt-watch"  # the rows' ``source``: not SOURCE_TAG (the old script's) nor "droplet-upload"
NODE_CHUNK_TIMEOUT: Final = 120.0  # the Node server's AbortSignal.timeout per chunk; the route may take 300 s
# JavaScript's String.prototype.trim() set (WhiteSpace and LineTerminator), for the Node server's blank test
JS_WHITESPACE: Final = "\t\n\x0b\x0c\r \xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a" \
    "\u2028\u2029\u202f\u205f\u3000\ufeff"


class RawUploadSink:
    """POSTs each chunk as JSON to ``/api/admin/smt/raw-upload`` with ``x-admin-token``, in order, recording
    each acknowledgement in the chunk store."""

    name = "raw-upload"
    kinds: Final = frozenset({"interval"})  # what the app's route parses; SMT_VALIDATE=0 lets "other" through

    def __init__(self, cx: SinkContext) -> None:
        self.url = cx.url
        settings = cx.settings
        if settings.http_timeout < NODE_CHUNK_TIMEOUT:
            settings = dataclasses.replace(settings, http_timeout=NODE_CHUNK_TIMEOUT)
        self._poster = Poster(settings, cx.url, ("x-admin-token", cx.token), stop=cx.stop)
        self.destination = self._poster.destination
        self._store = cx.chunks
        self.lines_per_chunk = cx.settings.raw_lines_per_chunk
        if cx.announce:
            log.info("Using %s delivery to %s", self.name, self.destination)

    def close(self) -> None:
        self._poster.close()

    def send(self, payload: Payload, progress: Progress | None = None) -> Delivered:
        store = self._store
        meta = ChunkMeta(payload.filename, payload.esiid, payload.meter)
        budget = meta.content_budget(payload.size)
        # the chunks whose postIngest the app acts on: each ESIID's last chunk with intervals its window keeps,
        # judged in the same pass as the plan
        post: set[int] = set()

        def judge(chunks: Iterator[bytes]) -> None:
            post.update(plan_post_ingest(chunks, esiid=payload.esiid or None, meter=payload.meter,
                                         now=datetime.now(UTC)))

        plan = plan_chunks(payload.path, payload.sha256, self.lines_per_chunk, budget, judge)
        total = len(plan)
        acked = store.acked_chunks(payload.sha256, total) if store and not payload.resend else {}
        attempts, status, text = 0, 200, ""
        digest = hashlib.sha256()
        number = 0
        try:
            for number, content in enumerate(iter_chunks(payload.path, self.lines_per_chunk, budget, digest),
                                             start=1):
                if number > total:
                    raise FileChanged(f"{payload.filename}: grew while its chunks were being sent")
                chunk_sha, _ = plan[number - 1]
                if acked.get(number) == chunk_sha:
                    continue
                if hashlib.sha256(content).hexdigest() != chunk_sha:
                    raise FileChanged(f"{payload.filename}: changed while its chunks were being sent")
                data = meta.json(number, total, content, chunk_sha, post=number in post)
                if len(data) > MAX_REQUEST_BYTES:  # content_budget makes this impossible; never send it anyway
                    raise PermanentDelivery(f"{payload.filename} part {number}: a {len(data)}-byte body is over "
                                            f"the web app's {MAX_REQUEST_BYTES}-byte request limit")
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
        log.info("Raw upload success (%d): %s in %d chunk(s), %d sent: %s", status, payload.filename, total,
                 total - len(acked), text[:200])
        return Delivered(status=status, body=text, attempts=attempts, destination=self.destination)


@dataclasses.dataclass(frozen=True)
class ChunkMeta:
    """What every chunk of one file carries besides its content."""

    filename: str
    esiid: str
    meter: str

    def fields(self, number: int, total: int, size: int, chunk_sha: str, received_at: str,
               post: bool = False) -> dict[str, object]:
        name = chunk_name(self.filename, number, total)
        fields: dict[str, object] = {
            "filename": name,
            "sizeBytes": size,
            "sha256": chunk_sha,
            "contentBase64": "",
            "source": SOURCE,
            "esiid": self.esiid,
            "meter": self.meter,
            "contentType": "text/csv",
            "receivedAt": received_at,
            "postIngest": post,
        }
        if self.esiid.strip():
            fields["storagePath"] = storage_path(self.esiid, name)
        return fields

    def json(self, number: int, total: int, content: bytes, chunk_sha: str, *, post: bool) -> bytes:
        """Chunk ``number`` of ``total`` (from 1); ``post``: it asks the app for its post-ingest work."""
        fields = self.fields(number, total, len(content), chunk_sha, utc_stamp(), post)
        # json.dumps with the base64 in place, without its scan of ~0.5 MB for characters to escape: base64's
        # alphabet has none, and the empty value's key is found once (inside a JSON string a quote is \")
        head, empty, tail = json.dumps(fields).encode().partition(_EMPTY_CONTENT)
        if not empty:
            raise AssertionError("contentBase64 not in the chunk's JSON")
        return b"".join((head, b'"contentBase64": "', base64.b64encode(content), b'"', tail))

    def content_budget(self, file_size: int) -> int:
        """The most content bytes a chunk may hold so that its JSON body stays within MAX_REQUEST_BYTES: the
        body without content, with every number at its widest, leaves this much room for the base64."""
        widest = file_size + 1  # no file has more chunks than bytes + 1
        fields = self.fields(1, 2, MAX_REQUEST_BYTES, "0" * 64, utc_stamp())
        fields["filename"] = chunk_name(self.filename, widest, widest)
        if "storagePath" in fields:
            fields["storagePath"] = storage_path(self.esiid, str(fields["filename"]))
        fields["postIngest"] = False  # "false" is the longer
        overhead = len(json.dumps(fields).encode())
        return max(0, (MAX_REQUEST_BYTES - overhead) // 4 * 3)


def storage_path(esiid: str, name: str) -> str:
    """As the Node server sets it: ``/smt/<esiid>/<chunk name>``."""
    return f"/smt/{esiid.strip()}/{name}"


def chunk_name(filename: str, number: int, total: int) -> str:
    """``<name>.partN-of-M``, or the file's own name when it goes in one chunk (as the Node server names them)."""
    return filename if total == 1 else f"{filename}.part{number}-of-{total}"


def _constant(data: bytes) -> Callable[[Progress | None], Iterator[bytes]]:
    """A body factory for a chunk already in memory (bounded by the request limit)."""

    def chunks(_progress: Progress | None) -> Iterator[bytes]:
        yield data

    return chunks


_READ: Final = 256 * 1024  # bytes read at once: a block and its lines stay small (and in the CPU's caches)


class _BlankTail:
    """The bytes of line ``number``, past ``limit`` (no chunk can hold it): read only to see that it is blank
    (``trim()`` empties it, so the Node server drops it), never kept. :meth:`feed` raises
    :class:`PermanentDelivery` at its first non-blank character, so a hostile line of gigabytes fails after
    ``limit`` bytes, not after all of them are held."""

    def __init__(self, path: Path, number: int, limit: int) -> None:
        self._path, self._number, self._limit = path, number, limit
        self._decode = codecs.getincrementaldecoder("utf-8")("replace").decode  # a sequence may straddle reads

    def feed(self, data: bytes, final: bool = False) -> None:
        if self._number == 1 or self._decode(data, final).strip(JS_WHITESPACE):
            raise PermanentDelivery(
                f"{self._path.name}: line {self._number} is over {self._limit} bytes; it cannot fit a raw-upload"
                f" request of at most {MAX_REQUEST_BYTES} bytes (the web app's limit)")


def _js_line_runs(path: Path, digest: hashlib._Hash | None,
                  limit: int | None = None) -> Iterator[tuple[int, list[bytes], bool]]:
    """The file's lines as ``text.split(/\\r?\\n/)`` gives them (``\\n`` and one ``\\r`` before it removed, a last
    empty line when the file ends with ``\\n``), in runs of about a block: (the first one's line number, the
    lines, ``clean``). A clean run is ASCII and has no line that is empty or starts with a byte up to a space,
    so none is blank and each is the chunks' bytes as it is; another is read line by line (:func:`_utf8`,
    :func:`_blank`). ``digest`` is fed every byte of the file.

    A line still open is kept as the blocks' parts, joined once when its ``\\n`` comes (not copied again with
    every block). Past ``limit`` (+1 for a CR) bytes no chunk can hold it: its bytes are no longer kept but
    checked (:class:`_BlankTail`): a non-blank one fails the file at once; a blank one, which the Node server
    drops, is yielded as ``b""`` once its end comes. Memory: ``limit`` and a block, whatever the line."""
    number = 1
    parts: list[bytes] = []  # the line still open (no \n yet)
    pending = 0  # its length
    tail: _BlankTail | None = None  # that line is past the limit: only its blankness is checked
    with path.open("rb") as fh:
        while block := fh.read(_READ):
            if digest is not None:
                digest.update(block)
            if tail is not None:
                end = block.find(b"\n")
                tail.feed(block if end < 0 else block[:end], final=end >= 0)
                if end < 0:
                    continue
                tail = None
                yield number, [b""], False  # blank: b"" stands for it (dropped as the Node server drops it)
                number += 1
                block = block[end + 1 :]
            cut = block.rfind(b"\n") + 1
            if cut == 0:
                if block:
                    parts.append(block)
                    pending += len(block)
                if limit is not None and pending > limit + 1:
                    tail = _BlankTail(path, number, limit)
                    for part in parts:
                        tail.feed(part)
                    parts, pending = [], 0
                continue
            text = b"".join([*parts, block[:cut]]) if parts else block[:cut]
            carry = block[cut:]
            parts, pending = ([carry], len(carry)) if carry else ([], 0)
            if b"\r" in text:
                text = text.replace(b"\r\n", b"\n")  # one CR before each LF (a lone CR stays, as in JavaScript)
            lines = text[:-1].split(b"\n")
            # a blank line is empty or starts with a blank; the least line starts with the least byte
            clean = text.isascii() and min(lines)[:1] > b" "
            yield number, lines, clean
            number += len(lines)
    if tail is not None:
        tail.feed(b"", final=True)
        parts = []
    yield number, [b"".join(parts)], False  # the last line, with no newline after it (b"" after a final one)


def _utf8(line: bytes) -> bytes:
    """``Buffer.from(buffer.toString("utf8"), "utf8")``: invalid UTF-8 becomes U+FFFD, as Node decodes it."""
    return line if line.isascii() else line.decode("utf-8", "replace").encode()


def _blank(line: bytes) -> bool:
    """``line.trim().length === 0`` in JavaScript."""
    stripped = line.strip()
    if not stripped:
        return True
    return not stripped.isascii() and not line.decode("utf-8", "replace").strip(JS_WHITESPACE)


def iter_chunks(path: Path, lines_per_chunk: int, budget: int = MAX_REQUEST_BYTES,
                digest: hashlib._Hash | None = None) -> Iterator[bytes]:
    """Chunk contents as the Node server builds them: the header and up to ``lines_per_chunk`` non-blank data
    lines joined by ``\\n``, no newline at the end; also cut before a chunk passes ``budget`` bytes. A file with
    no data line is one chunk, the whole file. ``digest`` (when given) is fed every byte of the file, so a
    caller can check the whole file's hash. Raises :class:`PermanentDelivery` when the header and one line
    alone pass ``budget`` (a line past it as soon as it is read that far: :func:`_js_line_runs`), and
    :class:`FileChanged` when a file sent whole is no longer the bytes hashed.

    Memory: one chunk and one block. Time: a clean run (:func:`_js_line_runs`) is taken in slices of as many
    lines as the chunk has room for, each added at once when it fits the budget; the rest line by line."""
    runs = _js_line_runs(path, digest, budget)
    _, first, first_clean = next(runs)
    header = _utf8(first[0])
    batch: list[bytes] = []
    size = len(header)
    data_lines = 0
    for start, lines, clean in itertools.chain([(2, first[1:], first_clean)], runs):
        i, n = 0, len(lines)
        while i < n:
            if clean:
                if len(batch) == lines_per_chunk:
                    yield b"\n".join([header, *batch])
                    batch, size = [], len(header)
                take = lines[i : i + lines_per_chunk - len(batch)]
                more = sum(map(len, take)) + len(take)
                if size + more <= budget:  # every line fits: as the loop below would take them, at once
                    batch += take
                    size += more
                    data_lines += len(take)
                    i += len(take)
                    continue
            else:
                take = lines[i : i + 1]
            for line in take:
                i += 1
                if _blank(line):
                    continue
                line = _utf8(line)
                data_lines += 1
                if batch and (len(batch) == lines_per_chunk or size + 1 + len(line) > budget):
                    yield b"\n".join([header, *batch])
                    batch, size = [], len(header)
                if size + 1 + len(line) > budget:
                    raise PermanentDelivery(
                        f"{path.name}: line {start + i - 1} is {len(line)} bytes; with the header it cannot fit a"
                        f" raw-upload request of at most {MAX_REQUEST_BYTES} bytes (the web app's limit)")
                batch.append(line)
                size += 1 + len(line)
    if batch:
        yield b"\n".join([header, *batch])
    elif data_lines == 0:
        # the file goes whole: read once more (at most budget + 1 bytes: UTF-8 repair never shortens, so more
        # cannot fit), and only as the bytes just hashed, or a change in between would go under the old hash
        with path.open("rb") as fh:
            raw = fh.read(budget + 1)
        if len(raw) > budget:
            size = max(len(raw), path.stat().st_size)
            raise PermanentDelivery(f"{path.name}: {size} bytes without a data line cannot fit a"
                                    f" raw-upload request of at most {MAX_REQUEST_BYTES} bytes")
        if digest is not None and hashlib.sha256(raw).hexdigest() != digest.hexdigest():
            raise FileChanged(f"{path.name}: changed while its chunks were being read")
        whole = _utf8(raw)
        if len(whole) > budget:
            raise PermanentDelivery(f"{path.name}: {len(whole)} bytes without a data line cannot fit a raw-upload"
                                    f" request of at most {MAX_REQUEST_BYTES} bytes")
        yield whole


def plan_chunks(path: Path, sha256: str, lines_per_chunk: int, budget: int = MAX_REQUEST_BYTES,
                see: Callable[[Iterator[bytes]], object] | None = None) -> list[tuple[str, int]]:
    """(chunk SHA-256, chunk size) for every chunk; raises FileChanged if the file is not the one hashed.
    ``see``, when given, reads the same chunks as they are planned (one pass over the file for both); the ones
    it leaves are read after it."""
    digest = hashlib.sha256()
    plan: list[tuple[str, int]] = []

    def planned() -> Iterator[bytes]:
        for content in iter_chunks(path, lines_per_chunk, budget, digest):
            plan.append((hashlib.sha256(content).hexdigest(), len(content)))
            yield content

    chunks = planned()
    if see is not None:
        see(chunks)
    for _ in chunks:  # what ``see`` left unread: the plan and the file's hash need every chunk
        pass
    if digest.hexdigest() != sha256:
        raise FileChanged(f"{path.name}: changed since it was hashed")
    return plan
