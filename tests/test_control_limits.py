"""The control endpoint under hostile or broken clients: raw sockets against a real server on
127.0.0.1, in this process (so its threads can be counted).

A body is never trusted beyond a fixed maximum and never read before the token of a write is
checked; a bad length is a 400/411/413, never a 500; connections are bounded (idle ones give way
to a real request) and closed when idle or slow. Plus the data-config names the job cannot draw.
"""

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from mmdit.config.service import ServiceConfig
from mmdit.dataservice import dashboard
from mmdit.dataservice.bounded_http import MAX_BODY
from mmdit.dataservice.control import ControlServer
from mmdit.dataservice.coordinator import Coordinator
from mmdit.dataservice.plan import DataVersion, SampleRef, Selection

LIMIT, TIMEOUT_S = 8, 1.0


@pytest.fixture
def endpoint(tmp_path):
    refs = [SampleRef(f"k{i:03d}", (256, 256) if i % 2 else (256, 384), "edit" if i % 3 == 0 else "t2i", "a",
                      (256, 256) if i % 3 == 0 else None) for i in range(24)]
    settings = ServiceConfig(plan_ahead=8, control_max_connections=LIMIT, control_timeout_s=TIMEOUT_S)
    coordinator = Coordinator(Selection(refs), settings, 0, 2, 2, [DataVersion(0, 0, 0, task_weights={"t2i": 1.0, "edit": 1.0})])
    server = ControlServer(coordinator, "127.0.0.1", 0, tmp_path)
    dashboard.install(server, coordinator, coordinator.telemetry, tmp_path)
    yield server, coordinator
    server.close()


def connect(server) -> socket.socket:
    return socket.create_connection(server.httpd.server_address[:2], timeout=60)


def response(sock: socket.socket) -> tuple[int, dict, bytes]:
    """One HTTP response read from `sock` (status, headers with lower-case names, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the body"
        body += chunk
    return int(lines[0].split()[1]), headers, body


def ask(server, head: str, body: bytes = b"") -> tuple[int, dict, bytes]:
    """Send a raw request (no body beyond `body`, the write side left open) and read the answer."""
    with connect(server) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)
        return response(sock)


def closed_by_server(sock: socket.socket) -> bool:
    """Wait (up to the socket's timeout) for the server to close `sock`."""
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def bearer(server) -> str:
    return f"Authorization: Bearer {server.token}\r\n"


@pytest.mark.parametrize("method,path,length,status", [
    ("POST", "/config", "-1", 400),
    ("POST", "/config", "abc", 400),
    ("POST", "/config", "1e3", 400),
    ("POST", "/config", str(10 ** 12), 413),
    ("POST", "/config", str(MAX_BODY + 1), 413),
    ("POST", "/config", None, 411),
    ("GET", "/config", "-1", 400),
    ("GET", "/metrics", "-1", 400),
    ("GET", "/metrics", "abc", 400),
    ("GET", "/dashboard", str(10 ** 12), 413),
])
def test_a_bad_length_is_a_client_error_answered_at_once(endpoint, method, path, length, status):
    """No body follows and the client keeps its side open: before, `-1` read until the client
    stopped (a hang here) and `abc` was a 500."""
    server, coordinator = endpoint
    header = f"Content-Length: {length}\r\n" if length is not None else ""
    got, headers, body = ask(server, f"{method} {path} HTTP/1.1\r\nHost: x\r\n{bearer(server)}{header}")
    assert got == status, body
    assert "error" in json.loads(body) and headers.get("connection") == "close"
    assert len(coordinator.history_versions()) == 1


def test_two_different_lengths_and_chunked_bodies_are_refused(endpoint):
    server, _ = endpoint
    two = "Content-Length: 2\r\nContent-Length: 3\r\n"
    assert ask(server, f"POST /config HTTP/1.1\r\nHost: x\r\n{bearer(server)}{two}")[0] == 400
    chunked = "Transfer-Encoding: chunked\r\n"
    assert ask(server, f"POST /config HTTP/1.1\r\nHost: x\r\n{bearer(server)}{chunked}")[0] == 411


@pytest.mark.parametrize("token", ["", "Authorization: Bearer wrong\r\n"])
def test_a_write_without_the_token_is_refused_before_its_body_is_read(endpoint, token):
    """The client announces a body and sends none: the 401 can only come if the server did not
    wait for it."""
    server, coordinator = endpoint
    status, headers, body = ask(server, f"POST /config HTTP/1.1\r\nHost: x\r\n{token}Content-Length: 1000\r\n")
    assert status == 401 and "token" in json.loads(body)["error"] and headers.get("connection") == "close"
    assert len(coordinator.history_versions()) == 1


def test_a_valid_write_still_works_and_keep_alive_serves_several_requests(endpoint):
    server, coordinator = endpoint
    change = json.dumps({"changes": {"task_weights.edit": 2}, "why": "raw"}).encode()
    with connect(server) as sock:
        sock.sendall(f"POST /config HTTP/1.1\r\nHost: x\r\n{bearer(server)}Content-Length: {len(change)}\r\n\r\n"
                     .encode() + change)
        status, headers, body = response(sock)
        assert status == 200 and json.loads(body)["config_version"] == 1
        sock.sendall(b"GET /config HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        status, _, body = response(sock)
        assert status == 200 and json.loads(body)["task_weights"]["edit"] == 2.0
    assert len(coordinator.history_versions()) == 2


def test_idle_connections_do_not_take_a_thread_each_nor_block_a_request(endpoint):
    """300 connections that send nothing: at most `control_max_connections` threads serve them,
    and a real request (the 301st connection) is still answered."""
    server, _ = endpoint
    before = threading.active_count()
    idle = [connect(server) for _ in range(300)]
    try:
        # the server accepts in order: once this request is answered, all 300 were dealt with
        with urllib.request.urlopen(server.url + "/config", timeout=60) as reply:
            assert reply.status == 200 and json.loads(reply.read())["config_version"] == 0
        assert threading.active_count() - before <= LIMIT, threading.enumerate()
    finally:
        for sock in idle:
            sock.close()


def test_idle_and_slow_connections_are_closed_after_the_timeout(endpoint):
    server, _ = endpoint
    idle = [connect(server) for _ in range(3)]
    slow = connect(server)
    slow.sendall(b"GET /config HTTP/1.1\r\n")
    started = time.monotonic()
    try:
        for sock in idle:
            assert closed_by_server(sock), "an idle connection stayed open"
        # a client that drips one header line at a time never finishes its request: it is cut
        # however often it sends, not only when it falls silent
        cut = False
        while not cut and time.monotonic() - started < 60:
            try:
                slow.sendall(b"X-Drip: 1\r\n")
            except (BrokenPipeError, ConnectionResetError):
                cut = True
                break
            slow.settimeout(0.1)
            try:
                cut = slow.recv(65536) == b""
            except TimeoutError:
                pass
            except ConnectionResetError:
                cut = True
        assert cut, "a dripping client held its connection for 60 s"
    finally:
        for sock in idle + [slow]:
            sock.close()


# ----------------------------------------------------------------------------- names the job cannot draw


def post(server, changes) -> tuple[int, dict]:
    req = urllib.request.Request(server.url + "/config", data=json.dumps({"changes": changes}).encode(),
                                 method="POST", headers={"Authorization": f"Bearer {server.token}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("changes,words", [
    ({"bucket_weights.1x1": 1}, "1x1"),
    ({"bucket_weights.256X256": 1}, "256X256"),
    ({"bucket_weights": {"256x256": 1, "9x9": 2}}, "9x9"),
    ({"task_weights": {}}, "empty"),
])
def test_a_bucket_the_job_lacks_or_an_empty_task_table_is_rejected(endpoint, changes, words):
    server, coordinator = endpoint
    status, reply = post(server, changes)
    assert status == 400 and words in reply["error"], reply
    assert len(coordinator.history_versions()) == 1


def test_a_bucket_the_job_has_can_be_weighed(endpoint):
    server, coordinator = endpoint
    status, reply = post(server, {"bucket_weights.256x384": 0.5, "bucket_weights": {"256x256": 2}})
    assert status == 200, reply
    assert coordinator.history_versions()[-1].bucket_weights == {"256x256": 2.0}


@pytest.mark.slow
def test_ctl_set_reports_the_rejection_and_exits_2(endpoint, tmp_path):
    server, coordinator = endpoint
    for change, words in (("bucket_weights.1x1=1", "1x1"), ("task_weights={}", "empty")):
        done = subprocess.run([sys.executable, "-m", "mmdit.launch.cli", "ctl", "set", str(tmp_path), change],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "rejected" in done.stderr and words in done.stderr, done.stderr
    assert len(coordinator.history_versions()) == 1
