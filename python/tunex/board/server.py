"""The board's HTTP server: the page, its static files and two JSON routes, on the stdlib's
threading server (one thread per request; every request reads the work dirs afresh).

Routes: ``/`` the page; ``/static/NAME`` the page's files; ``/api/runs`` the run names;
``/api/run?name=NAME`` one run's view (:func:`tunex.board.runs.run_view`).
"""

from __future__ import annotations

import json
import math
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from tunex.board.runs import find_runs, run_view

STATIC = Path(__file__).resolve().parent / "static"
TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".txt": "text/plain"}


def _finite(value):
    """JSON has no NaN/Infinity: a diverged run's values go out as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def make_handler(root: Path, interval_s: float) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "tunex-board"

        def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
            pass  # no line per poll on the console

        def _send(self, status: int, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, value, status: int = HTTPStatus.OK) -> None:
            self._send(status, json.dumps(_finite(value), allow_nan=False).encode(), "application/json")

        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            url = urlparse(self.path)
            if url.path in ("/", "/index.html"):
                page = (STATIC / "index.html").read_text(encoding="utf-8")
                page = page.replace("{{ROOT}}", _html(str(root))).replace(
                    "{{INTERVAL_MS}}", str(int(interval_s * 1000))
                )
                self._send(HTTPStatus.OK, page.encode(), "text/html; charset=utf-8")
            elif url.path.startswith("/static/"):
                name = url.path[len("/static/") :]
                path = STATIC / name
                if "/" in name or name.startswith(".") or not path.is_file():
                    self._json({"error": f"no static file {name!r}"}, HTTPStatus.NOT_FOUND)
                    return
                self._send(HTTPStatus.OK, path.read_bytes(), TYPES.get(path.suffix, "application/octet-stream"))
            elif url.path == "/api/runs":
                self._json({"root": str(root), "runs": list(find_runs(root))})
            elif url.path == "/api/run":
                name = parse_qs(url.query).get("name", [""])[0]
                runs = find_runs(root)
                if name not in runs:
                    self._json({"error": f"no run {name!r} under {root}"}, HTTPStatus.NOT_FOUND)
                    return
                self._json({"name": name, **run_view(runs[name])})
            else:
                self._json({"error": f"no route {url.path!r}"}, HTTPStatus.NOT_FOUND)

    return Handler


def _html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def make_server(root: str | Path, host: str = "127.0.0.1", port: int = 6007, interval_s: float = 2.0):
    """A ThreadingHTTPServer over ``root`` (port 0 = any free port: read ``server.server_port``).

    Raises:
        FileNotFoundError: when ``root`` is not a folder.
        OSError: when the port is taken.
    """
    folder = Path(root)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder (give a work dir or a folder of work dirs)")
    server = ThreadingHTTPServer((host, port), make_handler(folder, interval_s))
    server.daemon_threads = True
    return server
