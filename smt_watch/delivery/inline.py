"""The ``inline`` sink (docs/contract.md §4): the file as base64 inside one JSON body, the legacy route.

``content_b64`` is produced on the fly; with ``SMT_INLINE_ENCODING=base64+gzip`` the file is first gzipped
to a private temp file (hashing as it reads), so the exact body length is known before the first byte is
sent. A body over ``SMT_INLINE_MAX_BYTES`` (default: Vercel's 4.5 MB request limit) is refused before
sending, naming raw-upload.

IntelliWatt's production route refuses inline (``app/api/admin/smt/pull/route.ts``: ``400 HOME_ID_REQUIRED``
when the ESIID matches no house, then ``400 INLINE_DISABLED`` when ``NODE_ENV`` is production): either is
``failed`` with a reason that says to use raw-upload (:func:`classify_inline`).
"""

from __future__ import annotations

import base64
import gzip
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from smt_watch.delivery.base import Body, Delivered, Payload, Progress, Reply, SinkContext, classify, json_object
from smt_watch.delivery.http import Poster
from smt_watch.delivery.stream import b64_len, b64_stream, plain_chunks, verified_chunks
from smt_watch.errors import DeliveryError, PermanentDelivery

log = logging.getLogger("smt_watch.delivery")

PRODUCTION_REFUSALS: Final = frozenset({"INLINE_DISABLED", "HOME_ID_REQUIRED"})
USE_RAW_UPLOAD: Final = "use raw-upload (SMT_DELIVERY=raw-upload, or unset SMT_DELIVERY with only INTELLIWATT_BASE_URL)"


def classify_inline(response: Reply, body: str, destination: str) -> DeliveryError | None:
    """The default verdict, except that the production route's refusals of inline say what to do."""
    error = classify(response, body, destination)
    if error is None or response.status_code != 400:
        return error
    code = (json_object(response) or {}).get("error")
    if code not in PRODUCTION_REFUSALS:
        return error
    return PermanentDelivery(f"HTTP 400 {code} from {destination}: the web app refuses inline delivery; "
                             f"{USE_RAW_UPLOAD}: {body}", status=400, body=body)


class InlineSink:
    """POSTs ``application/json`` to ``/api/admin/smt/pull`` with ``x-admin-token``."""

    name = "inline"

    def __init__(self, cx: SinkContext) -> None:
        self.url = cx.url
        self._poster = Poster(cx.settings, cx.url, ("x-admin-token", cx.token), classify_inline, stop=cx.stop)
        self.destination = self._poster.destination
        self._encoding = cx.settings.inline_encoding
        self._max = cx.settings.inline_max_bytes
        self._tmp = cx.settings.state_dir / "tmp"
        if cx.announce:
            log.info("Using %s delivery to %s", self.name, self.destination)

    def send(self, payload: Payload, progress: Progress | None = None) -> Delivered:
        with self._body(payload) as body:
            status, text, attempts = self._poster.post(payload.filename, payload.sha256, body, progress)
        log.info("Inline POST success (%d): %s", status, text[:200])
        return Delivered(status=status, body=text, attempts=attempts, destination=self.destination)

    def close(self) -> None:
        self._poster.close()

    @contextmanager
    def _body(self, payload: Payload) -> Iterator[Body]:
        """The body; the context owns the gzip temp file it needs across retries."""
        meta: dict[str, object] = {
            "mode": "inline",
            "source": payload.source,
            "filename": payload.filename,
            "mime": "text/csv",
            "encoding": self._encoding,
            "sizeBytes": payload.size,
            "esiid": payload.esiid,
            "meter": payload.meter,
            "captured_at": payload.captured_at,
        }
        gz_path: Path | None = None
        try:
            if self._encoding == "base64+gzip":
                gz_path = self._compress(payload)
                meta["compressedBytes"] = raw_size = gz_path.stat().st_size
            else:
                raw_size = payload.size
            head = (json.dumps(meta, ensure_ascii=True)[:-1] + ', "content_b64": "').encode()
            tail = b'"}'
            length = len(head) + b64_len(raw_size) + len(tail)
            if length > self._max:
                raise PermanentDelivery(
                    f"{payload.filename}: inline body would be {length} bytes, over SMT_INLINE_MAX_BYTES"
                    f" ({self._max}; the web app refuses bodies over 4.5 MB); deliver it by raw-upload"
                    " (SMT_DELIVERY=raw-upload sends it in chunks under the limit)"
                )

            def chunks(progress: Progress | None) -> Iterator[bytes]:
                yield head
                if gz_path is not None:
                    yield from b64_stream(plain_chunks(gz_path, progress))
                else:
                    # base64 of each READ_CHUNK (a multiple of 3) concatenates cleanly; encoded as it is read
                    yield from verified_chunks(payload.path, payload.size, payload.sha256, progress,
                                               encode=base64.b64encode)
                yield tail

            yield Body("application/json", length, chunks)
        finally:
            if gz_path is not None:
                gz_path.unlink(missing_ok=True)

    def _compress(self, payload: Payload) -> Path:
        """Gzip to a private temp file while hashing, so the exact body length is known up front."""
        self._tmp.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".gz-", suffix=".part", dir=self._tmp)
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as gz:
                for data in verified_chunks(payload.path, payload.size, payload.sha256):
                    gz.write(data)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return path
