"""The reference receiver with the app's read routes, in the foreground (tests run it under libfaketime).

Apart from :mod:`smt_watch.reference.app_routes` so that the routes never import the receiver that wraps itself
in them.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from smt_watch.reference.app_routes import wrap
from smt_watch.reference.receiver import create_app


def main(argv: list[str] | None = None) -> None:
    """Run the reference receiver with these routes in the foreground (tests run it under libfaketime).

    Prints ``listening on http://HOST:PORT`` once bound. The admin token comes from a file (never argv)."""
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m smt_watch.reference.app_server")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--admin-token-file", type=Path)
    args = parser.parse_args(argv)
    token = args.admin_token_file.read_text().strip() if args.admin_token_file else None
    app = wrap(create_app(args.data, admin_token=token), args.data, token)
    config = uvicorn.Config(app, host=args.host, port=args.port, lifespan="off", log_level="warning",
                            log_config=None)

    class _Announcing(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.started:
                port = self.servers[0].sockets[0].getsockname()[1]
                print(f"listening on http://{args.host}:{port}", flush=True)  # the parent reads it

    try:
        _Announcing(config).run()
    finally:
        app.store.close()


if __name__ == "__main__":
    main()
