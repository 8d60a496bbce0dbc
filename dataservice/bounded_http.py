"""The standard library's threading HTTP server, with limits no client can get around.

The control endpoint (control.py) answers on a port any local user can reach, so a broken or
hostile client must not exhaust the coordinator's threads or memory:

- Connections: at most `max_connections` at once, one thread each. A connection *waits* while
  no complete request of it has arrived (just opened, or kept alive between requests); when every
  slot is taken, a new connection takes the slot of the one that has waited longest (idle
  connections never lock out a real request), and is answered 503 at once when none waits.
- Deadlines: a waiting connection must complete its request (line, headers and body) within
  `timeout_s`, and take its response within `timeout_s`; otherwise it is closed. That covers the
  idle client and the one that drips its request a byte at a time (slowloris) alike. The route
  itself runs without a deadline.
- Sizes: a request line and headers of at most `MAX_HEAD` bytes (431 beyond), a body of at most
  `MAX_BODY` bytes, read only when `Content-Length` is one plain number within it: missing on a
  POST 411, not a number 400, too large 413, `Transfer-Encoding` 411. A handler checks what it
  must (a write's token) before it reads the body; an error answer closes the connection, so a
  body left unread is never taken for the next request.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger("mmdit.control")

MAX_BODY = 1 << 20
"""Largest request body read (a whole data preset is a few KiB)."""
MAX_HEAD = 64 << 10
"""Largest request line plus headers of one request."""


class HttpError(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


# A connection's phase: its deadline applies while it waits or writes, not while its route runs.
WAITING, HANDLING, WRITING, CUT = "waiting", "handling", "writing", "cut"


class _Connection:
    __slots__ = ("sock", "phase", "since")

    def __init__(self, sock: socket.socket):
        self.sock, self.phase, self.since = sock, WAITING, time.monotonic()


class Connections:
    """The connections being served, their phases, and the slots they hold."""

    def __init__(self, max_connections: int, timeout_s: float):
        self.max_connections, self.timeout_s = max_connections, timeout_s
        self.lock = threading.Lock()
        self.freed = threading.Condition(self.lock)
        self.open: dict[socket.socket, _Connection] = {}

    def admit(self, sock: socket.socket) -> bool:
        """Take a slot for `sock`, cutting the connection that has waited longest if all are
        taken; False if every one is busy with a request."""
        with self.lock:
            if len(self.open) >= self.max_connections:
                waiting = [c for c in self.open.values() if c.phase == WAITING]
                if not waiting:
                    return False
                _cut(min(waiting, key=lambda c: c.since))
                # its thread sees the connection end at once and gives the slot back
                if not self.freed.wait_for(lambda: len(self.open) < self.max_connections, timeout=self.timeout_s):
                    return False
            self.open[sock] = _Connection(sock)
            return True

    def release(self, sock: socket.socket) -> None:
        with self.lock:
            self.open.pop(sock, None)
            self.freed.notify_all()

    def enter(self, sock: socket.socket, phase: str) -> None:
        with self.lock:
            c = self.open.get(sock)
            if c is not None and c.phase != CUT:
                c.phase, c.since = phase, time.monotonic()

    def reap(self) -> None:
        """Cut the connections past their deadline."""
        now = time.monotonic()
        with self.lock:
            for c in self.open.values():
                if c.phase in (WAITING, WRITING) and now - c.since > self.timeout_s:
                    _cut(c)

    def cut_all(self) -> None:
        with self.lock:
            for c in self.open.values():
                _cut(c)


def _cut(c: _Connection) -> None:
    """End a connection from another thread: its blocked read returns end-of-stream, its write fails."""
    c.phase = CUT
    with contextlib.suppress(OSError):
        c.sock.shutdown(socket.SHUT_RDWR)


class BoundedHTTPServer(ThreadingHTTPServer):
    """Serves `handler_class` (a BoundedRequestHandler) with the limits above; `reaper` (a thread
    the owner starts and stops with `stop_reaper`) enforces the deadlines."""

    daemon_threads = True
    block_on_close = False  # close() cuts every connection instead of waiting for them
    request_queue_size = 128  # a burst of connections waits in the kernel, not refused

    def __init__(self, address, handler_class, max_connections: int, timeout_s: float):
        self.connections = Connections(max_connections, timeout_s)
        self._reaping = threading.Event()
        super().__init__(address, handler_class)
        self.reaper = threading.Thread(target=self._reap, name="control-http-reaper", daemon=True)

    def _reap(self) -> None:
        while not self._reaping.wait(min(0.25, self.connections.timeout_s / 4)):
            self.connections.reap()

    def stop_reaper(self) -> None:
        self._reaping.set()

    def process_request(self, request, client_address):
        if not self.connections.admit(request):
            _refuse(request)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.connections.release(request)
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release(request)

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], OSError):  # the client went away, or its connection was cut
            return
        log.exception("control connection from %s failed", client_address)


def _refuse(sock: socket.socket) -> None:
    payload = json.dumps({"error": "the control endpoint is busy: every connection serves a request "
                                   "(service.control_max_connections); try again"}).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}"
            "\r\nRetry-After: 1\r\nConnection: close\r\n\r\n").encode()
    with contextlib.suppress(OSError):
        sock.setblocking(False)  # a fresh socket's buffer takes it; never wait for this client
        sock.send(head + payload)


class _HeadLimit:
    """The request stream, giving at most MAX_HEAD bytes to a request's header lines (its
    request line is capped by the standard library: 414)."""

    def __init__(self, stream):
        self.stream = stream
        self.new_request()

    def new_request(self) -> None:
        self.left, self.request_line = MAX_HEAD, True

    def readline(self, size: int = -1) -> bytes:
        if self.request_line:
            self.request_line = False
            return self.stream.readline(size)
        size = self.left + 1 if size < 0 else min(size, self.left + 1)
        line = self.stream.readline(size)
        self.left -= len(line)
        if self.left < 0:  # the standard library answers 431
            raise http.client.LineTooLong(f"request headers over {MAX_HEAD} bytes")
        return line

    def read(self, size: int = -1) -> bytes:
        return self.stream.read(size)

    def close(self) -> None:
        self.stream.close()


class BoundedRequestHandler(BaseHTTPRequestHandler):
    """One connection's requests in turn; subclasses read a body with `read_body`, mark the
    start of their work with `handling()`, and answer with `reply`."""

    protocol_version = "HTTP/1.1"
    server: BoundedHTTPServer

    def setup(self):
        super().setup()
        self.rfile = _HeadLimit(self.rfile)

    def handle(self):
        self.close_connection = False
        while not self.close_connection:
            self.server.connections.enter(self.connection, WAITING)
            self.rfile.new_request()
            self.handle_one_request()

    def handle_expect_100(self):
        return True  # "100 Continue" only once the request passed its checks (read_body)

    def handling(self) -> None:
        """The request has arrived whole: its route runs without a deadline."""
        self.server.connections.enter(self.connection, HANDLING)

    def read_body(self) -> bytes:
        """The request's body, within the limits (HttpError otherwise)."""
        if "Transfer-Encoding" in self.headers:
            raise HttpError(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length, not a Transfer-Encoding")
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            if self.command == "POST":
                raise HttpError(HTTPStatus.LENGTH_REQUIRED, "a POST needs a Content-Length")
            return b""
        text = lengths[0].strip()
        if len(set(lengths)) > 1 or not (text.isascii() and text.isdigit()):
            raise HttpError(HTTPStatus.BAD_REQUEST, f"bad Content-Length {', '.join(lengths)!r}")
        if len(text) > len(str(MAX_BODY)) or int(text) > MAX_BODY:
            raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {MAX_BODY} bytes")
        length = int(text)
        if length and self.headers.get("Expect", "").lower() == "100-continue":
            self.send_response_only(HTTPStatus.CONTINUE)
            self.end_headers()
        body = self.rfile.read(length) if length else b""
        if len(body) < length:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"the body ended after {len(body)} of {length} bytes")
        return body

    def reply(self, status: int, kind: str, payload: bytes, close: bool = False) -> None:
        self.server.connections.enter(self.connection, WRITING)
        try:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("Cache-Control", "no-store")
            if close:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(payload)
        except OSError:  # the client went away, or was too slow to take it
            self.close_connection = True

    def log_message(self, fmt, *args):  # requests are not worth a log line each
        pass
