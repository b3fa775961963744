"""Stand-in for a long-running droplet server that holds a port: the Node upload server or the old bridge.

``listener.py VAR HOST`` listens on ``HOST``:``$VAR``, as the real ones do: the Node server on ``SMT_UPLOAD_PORT``
(its ``app.listen(PORT)`` binds ``::``, every address of both families), the bridge on ``PORT`` (8787 unless
set) of ``0.0.0.0`` and answers every request ``200 {"ok": true, "server": VAR}``,
so a port check sees the process that holds it and a forwarded request gets an answer.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import sys


def main() -> int:
    variable, host = sys.argv[1], sys.argv[2]
    body = json.dumps({"ok": True, "server": variable}).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            self.rfile.read(length)
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_HEAD = _answer

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if family == socket.AF_INET6:
        try:
            socket.socket(socket.AF_INET6).close()
        except OSError:  # a kernel without IPv6: every IPv4 address, still a wildcard
            family, host = socket.AF_INET, "0.0.0.0"

    class Server(http.server.HTTPServer):
        address_family = family

    server = Server((host, int(os.environ.get(variable, "8787"))), Handler)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
