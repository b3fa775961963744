"""Stand-in for the old ``smt-ingest.service`` (``fetch_and_post.sh``): posts every inbox CSV it has not posted.

Like the bash script it posts each file whose SHA-256 is not yet in its ``STATE_FILE`` (``.posted_sha256``)
as multipart with ``role=smt-ingest`` and ``accountKey=intelliwatt-smt-ingest``, then appends the hash; unlike
it, it loops on its own (the real unit's ``Restart=always`` re-runs the script every 30 s). Its requests reach
the reference receiver with that role, so a test sees at once when the old ingest delivers beside smt-watch.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
import urllib.request
import uuid
from pathlib import Path

PASS_INTERVAL = 0.1  # seconds between passes of this stand-in's own loop


def post(url: str, token: str, path: Path, data: bytes) -> None:
    boundary = uuid.uuid4().hex
    parts = [(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n').encode()
             for name, value in (("role", "smt-ingest"), ("accountKey", "intelliwatt-smt-ingest"))]
    parts.append((f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
                  "Content-Type: text/csv\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode())
    request = urllib.request.Request(url, data=b"".join(parts), method="POST", headers={
        "content-type": f"multipart/form-data; boundary={boundary}", "x-smt-upload-token": token})
    with urllib.request.urlopen(request, timeout=30) as response:
        response.read()


def main() -> int:
    inbox = Path(os.environ["SMT_LOCAL_DIR"])
    state = Path(os.environ.get("STATE_FILE") or inbox / ".posted_sha256")
    url, token = os.environ["OLD_INGEST_URL"], os.environ.get("SMT_UPLOAD_TOKEN", "")
    while True:
        posted = set(state.read_text().split()) if state.exists() else set()
        for path in sorted(inbox.rglob("*.csv")):
            if any(part.startswith(".") for part in path.relative_to(inbox).parts):
                continue
            data = path.read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            if digest not in posted:
                post(url, token, path, data)
                with state.open("a") as fh:
                    fh.write(digest + "\n")
                print(f"posted {path.name} {digest}", flush=True)
        time.sleep(PASS_INTERVAL)  # the stand-in bash script's own pass interval, not a synchronisation


if __name__ == "__main__":
    sys.exit(main())
