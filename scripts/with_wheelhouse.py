#!/usr/bin/env python3
"""Run a command (an image build) with docker/wheelhouse served over HTTP on loopback.

    python3 scripts/with_wheelhouse.py docker compose build

The command gets WHEELHOUSE_URL=http://127.0.0.1:<port>/, which docker-compose.yml passes to the
Dockerfile: pip then installs only those wheels (`--no-index --find-links`). The build runs on the
host network (`build.network: host`), so the wheels reach it without entering the build context or
an image layer. With no wheels in docker/wheelhouse the command runs unchanged (PyPI).

The port is fixed (WHEELHOUSE_PORT, default 8790) because the URL is a build argument: a new port
would invalidate the dependency layer's cache and reinstall every wheel on each build.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

WHEELHOUSE = Path(__file__).resolve().parents[1] / "docker" / "wheelhouse"


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: with_wheelhouse.py COMMAND [ARGS...]", file=sys.stderr)
        return 2
    env = dict(os.environ)
    server = None
    if any(WHEELHOUSE.glob("*.whl")):
        handler = functools.partial(_QuietHandler, directory=str(WHEELHOUSE))
        port = int(os.environ.get("WHEELHOUSE_PORT", "8790"))
        try:
            server = ThreadingHTTPServer(("127.0.0.1", port), handler)
        except OSError as exc:
            print(f"with_wheelhouse: cannot serve on 127.0.0.1:{port} ({exc.strerror}); "
                  "set WHEELHOUSE_PORT to a free port", file=sys.stderr)  # fmt: skip
            return 2
        threading.Thread(target=server.serve_forever, daemon=True).start()
        env["WHEELHOUSE_URL"] = f"http://127.0.0.1:{server.server_address[1]}/"
        print(f"with_wheelhouse: serving {WHEELHOUSE.name}/ at {env['WHEELHOUSE_URL']}", file=sys.stderr)
    try:
        return subprocess.call(argv, env=env)
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
