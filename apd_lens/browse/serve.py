"""Serve a built site on localhost until interrupted (``apd-lens browse --serve``)."""

from __future__ import annotations

import functools
import http.server
from pathlib import Path


def make_server(folder: str | Path, port: int = 8000, host: str = "127.0.0.1") -> http.server.ThreadingHTTPServer:
    """An HTTP server of ``folder`` on ``host:port`` (port 0: any free one); call ``serve_forever()``."""
    folder = Path(folder)
    if not (folder / "index.html").is_file():
        raise FileNotFoundError(f"{folder} holds no built site (index.html); build it with apd-lens browse first")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    return http.server.ThreadingHTTPServer((host, port), handler)


def serve(folder: str | Path, port: int = 8000, host: str = "127.0.0.1") -> None:
    """Serve ``folder`` until Ctrl-C."""
    server = make_server(folder, port, host)
    print(f"serving {folder} at http://{host}:{server.server_address[1]}/ (Ctrl-C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.server_close()
