"""The ``multipart`` sink (docs/contract.md §4): a form upload to the droplet's upload server.

Text fields first, then the file, so a receiver sees ``sha256`` before the data; the file part streams
through :func:`~smt_watch.delivery.stream.verified_chunks`, so memory stays flat in file size.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator

from smt_watch.delivery.base import Body, Payload, Progress, Result, SinkContext
from smt_watch.delivery.http import Poster
from smt_watch.delivery.stream import verified_chunks

log = logging.getLogger("smt_watch.delivery")


class MultipartSink:
    """POSTs ``multipart/form-data`` with ``x-smt-upload-token``."""

    name = "multipart"

    def __init__(self, cx: SinkContext) -> None:
        self.url = cx.url
        self._poster = Poster(cx.settings, cx.url, ("x-smt-upload-token", cx.token))
        self.destination = self._poster.destination
        if cx.announce:
            log.info("Using droplet upload server at %s", self.destination)

    def send(self, payload: Payload, progress: Progress | None = None) -> Result:
        status, text, attempts = self._poster.post(payload.filename, payload.sha256, _body(payload), progress)
        log.info("Droplet upload success (%d): %s", status, text[:200])
        return Result(status=status, body=text, attempts=attempts, destination=self.destination)

    def close(self) -> None:
        self._poster.close()


def _body(payload: Payload) -> Body:
    boundary = uuid.uuid4().hex
    fields = {
        "esiid": payload.esiid,
        "meter": payload.meter,
        "capturedAt": payload.captured_at,
        "source": payload.source,
        "sha256": payload.sha256,
        "accountKey": "smt-watch",
        "role": "admin",
    }
    head = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in fields.items()
    )
    head += (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
        f"filename=\"{_quote_filename(payload.filename)}\"\r\nContent-Type: text/csv\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def chunks(progress: Progress | None) -> Iterator[bytes]:
        yield head
        yield from verified_chunks(payload.path, payload.size, payload.sha256, progress)
        yield tail

    return Body(f"multipart/form-data; boundary={boundary}", len(head) + payload.size + len(tail), chunks)


def _quote_filename(name: str) -> str:
    """Escape a file name for a Content-Disposition parameter the way browsers do."""
    name = name.replace("\\", "\\\\").replace('"', "%22")
    return "".join(c if c.isprintable() else f"%{ord(c):02X}" for c in name)
