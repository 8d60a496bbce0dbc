"""The coordinator's HTTP control endpoint (the standard library's threading HTTP server).

    GET  /config    the data config in force and its version (`mmdit ctl get`)
    GET  /history   every version: when, from which step, what changed, why (`mmdit ctl history`)
    POST /config    {"changes": {"KEY": value, ...}, "why": "..."} (`mmdit ctl set`): applies a
                    change; 200 with {"config_version", "from_step", ...}, 400 with {"error": ...}
                    when the body or the change is bad (nothing changes), 401 without the token
    GET  /status    the coordinator's counters, producers and consumers

Reads need no token; writes need `Authorization: Bearer <token>`. The server binds
`service.control_host` (127.0.0.1 by default) and writes `run.dir/control.json` ({"url": ...})
and `run.dir/control.token` (mode 0600) when it starts; both are removed when it stops.
Other routes (metrics, dashboard) are added with `route`.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from mmdit.utils.atomic import atomic_write_json

log = logging.getLogger("mmdit.control")

CONTROL_JSON, CONTROL_TOKEN = "control.json", "control.token"
MAX_BODY = 1 << 20


class HttpError(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


Handler = Callable[[dict], tuple[int, str, bytes]]
"""request (method, path, query, body) -> (status, content type, payload)."""


class ControlServer:
    """Serves the routes on host:port (port 0: any free one) in a daemon thread."""

    def __init__(self, coordinator, host: str, port: int, run_dir: str | os.PathLike):
        self.coordinator, self.run_dir = coordinator, Path(run_dir)
        self.token = secrets.token_urlsafe(32)
        self.routes: dict[tuple[str, str], Handler] = {}
        self.prefixes: list[tuple[str, str, Handler]] = []
        self.route("GET", "/config", lambda req: _json(self._get_config()))
        self.route("GET", "/history", lambda req: _json(self.coordinator.history_dicts()))
        self.route("GET", "/status", lambda req: _json(self.coordinator.status()))
        self.route("POST", "/config", self._post_config, write=True)
        self.httpd = ThreadingHTTPServer((host, port), self._handler_class())
        self.httpd.daemon_threads = True
        self.url = f"http://{_url_host(host)}:{self.httpd.server_address[1]}"
        self._write_files()
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="control-http", daemon=True)
        self._thread.start()
        log.info("control endpoint %s (writes need %s)", self.url, self.run_dir / CONTROL_TOKEN)

    def route(self, method: str, path: str, handler: Handler, write: bool = False) -> None:
        self.routes[(method, path)] = (lambda req: self._authorized(req) or handler(req)) if write else handler

    def prefix_route(self, method: str, prefix: str, handler: Handler) -> None:
        """Read-only routes for every path under `prefix`."""
        self.prefixes.append((method, prefix, handler))

    # ---- routes

    def _get_config(self) -> dict:
        from mmdit.dataservice.data_config import describe

        history = self.coordinator.history_versions()
        return {**describe(history[-1]), "from_step": history[-1].from_step}

    def _post_config(self, req: dict):
        from mmdit.dataservice.data_config import ChangeError

        try:
            body = json.loads(req["body"] or b"null")
        except (ValueError, UnicodeDecodeError) as e:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"malformed JSON body: {e}") from None
        if not isinstance(body, dict) or not isinstance(body.get("changes"), dict):
            raise HttpError(HTTPStatus.BAD_REQUEST, 'expected {"changes": {"KEY": value, ...}, "why": "..."}')
        why = body.get("why", "")
        if not isinstance(why, str):
            raise HttpError(HTTPStatus.BAD_REQUEST, '"why" must be a string')
        try:
            return _json(self.coordinator.update_data(body["changes"], why))
        except ChangeError as e:
            raise HttpError(HTTPStatus.BAD_REQUEST, str(e)) from None

    def _authorized(self, req: dict):
        given = req["headers"].get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            raise HttpError(HTTPStatus.UNAUTHORIZED, f"a write needs the token in {self.run_dir / CONTROL_TOKEN}")
        return None

    # ---- files

    def _write_files(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        token_path = self.run_dir / CONTROL_TOKEN
        token_path.unlink(missing_ok=True)
        fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.token)
        atomic_write_json(self.run_dir / CONTROL_JSON, {"url": self.url, "pid": os.getpid()})

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        for name in (CONTROL_JSON, CONTROL_TOKEN):
            (self.run_dir / name).unlink(missing_ok=True)

    # ---- the HTTP plumbing

    def _handler_class(self):
        server = self

        class RequestHandler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self, method: str) -> None:
                path, _, query = self.path.partition("?")
                handler = server.routes.get((method, path)) or next(
                    (h for m, prefix, h in server.prefixes if m == method and path.startswith(prefix)), None)
                try:
                    if handler is None:
                        raise HttpError(HTTPStatus.NOT_FOUND, f"no route {method} {path}")
                    length = int(self.headers.get("Content-Length") or 0)
                    if length > MAX_BODY:
                        raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "body over 1 MiB")
                    body = self.rfile.read(length) if length else b""
                    status, kind, payload = handler({"method": method, "path": path, "query": query,
                                                     "body": body, "headers": self.headers})
                except HttpError as e:
                    status, kind, payload = e.status, "application/json", json.dumps({"error": str(e)}).encode()
                except Exception as e:  # noqa: BLE001 - a bug answers 500, the server goes on
                    log.exception("control request %s %s failed", method, path)
                    status, kind = HTTPStatus.INTERNAL_SERVER_ERROR, "application/json"
                    payload = json.dumps({"error": f"{type(e).__name__}: {e}"}).encode()
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(payload)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self):  # noqa: N802 - the stdlib's naming
                self._serve("GET")

            def do_POST(self):  # noqa: N802
                self._serve("POST")

            def log_message(self, fmt, *args):  # requests are not worth a log line each
                pass

        return RequestHandler


def _json(obj) -> tuple[int, str, bytes]:
    return HTTPStatus.OK, "application/json", json.dumps(obj).encode()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
