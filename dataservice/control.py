"""The coordinator's HTTP control endpoint (the standard library's threading HTTP server).

    GET  /config    the data config in force and its version (`mmdit ctl get`)
    GET  /history   every version: when, from which step, what changed, why (`mmdit ctl history`)
    POST /config    {"changes": {"KEY": value, ...}, "why": "..."} (`mmdit ctl set`): applies a
                    change; 200 with {"config_version", "from_step", ...}, 400 with {"error": ...}
                    when the body or the change is bad (nothing changes), 401 without the token
    GET  /status    the coordinator's counters, producers and consumers

Reads need no token; writes need `Authorization: Bearer <token>`, checked before a byte of the
body is read. The server binds `service.control_host`, by default the address the coordinator's
RPC store listens on (127.0.0.1 for a local service; on a cluster the job network's, so `mmdit
ctl` works from every node of the job), never a wildcard, and writes `run.dir/control.json`
({"url", "bind": "host:port", "host": its host name, "pid"}) and `run.dir/control.token` (mode
0600) when it starts; it removes them when it stops, unless another server has replaced them.
Other routes (metrics, dashboard) are added with `route`; every route is served within the
limits of bounded_http.py (`service.control_max_connections`, `service.control_timeout_s`).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
import socket
import threading
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path

from mmdit.dataservice.bounded_http import BoundedHTTPServer, BoundedRequestHandler, HttpError
from mmdit.utils.atomic import atomic_write_json

log = logging.getLogger("mmdit.control")

CONTROL_JSON, CONTROL_TOKEN = "control.json", "control.token"

Handler = Callable[[dict], tuple[int, str, bytes]]
"""request (method, path, query, body) -> (status, content type, payload)."""


class ControlServer:
    """Serves the routes on host:port (port 0: any free one) in a daemon thread."""

    def __init__(self, coordinator, host: str, port: int, run_dir: str | os.PathLike, settings=None):
        """`settings` (CoordinatorSettings; default: the coordinator's) give the connection limits."""
        settings = settings or coordinator.cfg
        self.coordinator, self.run_dir = coordinator, Path(run_dir)
        self.token = secrets.token_urlsafe(32)
        self.routes: dict[tuple[str, str], tuple[Handler, bool]] = {}  # -> (handler, needs the token)
        self.prefixes: list[tuple[str, str, Handler]] = []
        self.route("GET", "/config", lambda req: _json(self._get_config()))
        self.route("GET", "/history", lambda req: _json(self.coordinator.history_dicts()))
        self.route("GET", "/status", lambda req: _json(self.coordinator.status()))
        self.route("POST", "/config", self._post_config, write=True)
        if host in ("", "*", "0.0.0.0", "::"):
            raise ValueError(f"service.control_host={host!r}: the control endpoint listens on one address, never on "
                             "every interface")
        self.httpd = BoundedHTTPServer((host, port), self._handler_class(), settings.control_max_connections,
                                       settings.control_timeout_s)
        self.bind = f"{_url_host(host)}:{self.httpd.server_address[1]}"
        self.url = f"http://{self.bind}"
        self._write_files()
        self.httpd.reaper.start()
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.1,), name="control-http", daemon=True)
        self._thread.start()
        log.info("control endpoint %s (writes need %s)", self.url, self.run_dir / CONTROL_TOKEN)

    def route(self, method: str, path: str, handler: Handler, write: bool = False) -> None:
        self.routes[(method, path)] = (handler, write)

    def prefix_route(self, method: str, prefix: str, handler: Handler) -> None:
        """Read-only routes for every path under `prefix`."""
        self.prefixes.append((method, prefix, handler))

    def _find(self, method: str, path: str) -> tuple[Handler, bool]:
        found = self.routes.get((method, path)) or next(
            ((h, False) for m, prefix, h in self.prefixes if m == method and path.startswith(prefix)), None)
        if found is None:
            raise HttpError(HTTPStatus.NOT_FOUND, f"no route {method} {path}")
        return found

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

    def _authorize(self, headers) -> None:
        given = headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(errors="replace"), f"Bearer {self.token}".encode()):
            raise HttpError(HTTPStatus.UNAUTHORIZED, f"a write needs the token in {self.run_dir / CONTROL_TOKEN}")

    # ---- files

    def _write_files(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        token_path = self.run_dir / CONTROL_TOKEN
        token_path.unlink(missing_ok=True)
        fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.token)
        atomic_write_json(self.run_dir / CONTROL_JSON, self._record())

    def _record(self) -> dict:
        return {"url": self.url, "bind": self.bind, "host": socket.gethostname(), "pid": os.getpid()}

    def _owns(self, name: str) -> bool:
        """Whether run.dir/`name` is still the file this server wrote (another service may have
        replaced it; `mmdit serve` keeps a second one off the run dir, see launch/serve.py)."""
        try:
            text = (self.run_dir / name).read_text()
            if name == CONTROL_JSON:
                return json.loads(text) == self._record()
            return text == self.token
        except (OSError, ValueError):
            return False

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.stop_reaper()
        self.httpd.connections.cut_all()
        self.httpd.server_close()
        for name in (CONTROL_JSON, CONTROL_TOKEN):
            if self._owns(name):
                (self.run_dir / name).unlink(missing_ok=True)

    # ---- the HTTP plumbing

    def _handler_class(self):
        server = self

        class RequestHandler(BoundedRequestHandler):
            def _serve(self) -> None:
                path, _, query = self.path.partition("?")
                try:
                    handler, write = server._find(self.command, path)
                    if write:
                        server._authorize(self.headers)  # before a byte of the body is read
                    body = self.read_body()
                    self.handling()
                    status, kind, payload = handler({"method": self.command, "path": path, "query": query,
                                                     "body": body, "headers": self.headers})
                except HttpError as e:
                    status, kind, payload = e.status, "application/json", json.dumps({"error": str(e)}).encode()
                except Exception as e:  # noqa: BLE001 - a bug answers 500, the server goes on
                    log.exception("control request %s %s failed", self.command, path)
                    status, kind = HTTPStatus.INTERNAL_SERVER_ERROR, "application/json"
                    payload = json.dumps({"error": f"{type(e).__name__}: {e}"}).encode()
                # an error may leave the body unread: the connection ends with the answer
                self.reply(status, kind, payload, close=status >= 400)

            do_GET = do_POST = _serve  # noqa: N815 - the stdlib's naming

        return RequestHandler


def _json(obj) -> tuple[int, str, bytes]:
    return HTTPStatus.OK, "application/json", json.dumps(obj).encode()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
