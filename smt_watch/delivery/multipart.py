"""The ``multipart`` sink (docs/contract.md §4): a form upload to the droplet's upload server.

Text fields first, then the file, so a receiver sees ``sha256`` before the data; the file part streams
through :func:`~smt_watch.delivery.stream.verified_chunks`, so memory stays flat in file size. A small file
a watch worker read once (``Payload.data``: the bytes that hashed to ``sha256``) is sent from those bytes.

The upload server decides what it forwards: IntelliWatt's Node server keeps only file names holding
``interval`` and answers any other ``202 {ok:true, message:"Upload ignored (non-interval file removed)",
file:{interval:false}}``. That reply is ``failed`` with the reason (:func:`classify_multipart`), not ``sent``:
nothing reached the app.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator

from smt_watch.delivery.base import (
    Body,
    Delivered,
    LeftOut,
    Payload,
    Progress,
    Reply,
    SinkContext,
    classify,
    json_object,
)
from smt_watch.delivery.http import Poster
from smt_watch.delivery.stream import READ_CHUNK, verified_bytes, verified_chunks
from smt_watch.errors import DeliveryError

log = logging.getLogger("smt_watch.delivery")


class MultipartSink:
    """POSTs ``multipart/form-data`` with ``x-smt-upload-token``."""

    name = "multipart"
    reads_lease = True  # sends a big file from FileIdentity.lease's descriptor (pipeline.deliver_file keeps it)

    def __init__(self, cx: SinkContext) -> None:
        self.url = cx.url
        self._poster = Poster(cx.settings, cx.url, ("x-smt-upload-token", cx.token), classify_multipart,
                              stop=cx.stop)
        self.destination = self._poster.destination
        if cx.announce:
            log.info("Using droplet upload server at %s", self.destination)

    def send(self, payload: Payload, progress: Progress | None = None) -> Delivered:
        status, text, attempts = self._poster.post(payload.filename, payload.sha256, _body(payload), progress)
        log.info("Droplet upload success (%d): %s", status, text[:200])
        return Delivered(status=status, body=text, attempts=attempts, destination=self.destination)

    def close(self) -> None:
        self._poster.close()


def classify_multipart(response: Reply, body: str, destination: str) -> DeliveryError | None:
    """The default verdict, except that an upload server's 2xx saying it dropped the file is a refusal."""
    error = classify(response, body, destination)
    if error is not None:
        return error
    data = json_object(response)
    if data is None:
        return None
    file = data.get("file")
    ignored = (isinstance(file, dict) and file.get("interval") is False) or str(
        data.get("message", "")).startswith("Upload ignored")
    if not ignored:
        return None
    return LeftOut(
        f"HTTP {response.status_code} from {destination}, but the upload server dropped the file (IntelliWatt's"
        f" Node server keeps only names with 'interval'; unset SMT_UPLOAD_URL to deliver by raw-upload): {body}",
        status=response.status_code, body=body)


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
        if payload.data is not None:  # the bytes the hash pass hashed and kept: sent as they are
            yield head + payload.data + tail
            if progress:
                progress(len(payload.data))
            return
        if payload.size <= READ_CHUNK:  # the whole request body in one write (most SMT files are this small)
            data = verified_bytes(payload.path, payload.size, payload.sha256)
            yield head + data + tail
            if progress:
                progress(len(data))
            return
        yield head
        yield from verified_chunks(payload.path, payload.size, payload.sha256, progress, lease=payload.lease)
        yield tail

    return Body(f"multipart/form-data; boundary={boundary}", len(head) + payload.size + len(tail), chunks)


def _quote_filename(name: str) -> str:
    """Escape a file name for a Content-Disposition parameter the way browsers do."""
    if name.isprintable() and "\\" not in name and '"' not in name:
        return name  # the common case (every request has one): nothing to escape, no per-character loop
    name = name.replace("\\", "\\\\").replace('"', "%22")
    return "".join(c if c.isprintable() else f"%{ord(c):02X}" for c in name)
