"""The data service's RPC group (dataservice/rpc.py) with real processes on loopback."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmdit.utils.processes import free_port

pytestmark = pytest.mark.slow  # real processes

MEMBERS = Path(__file__).with_name("rpc_members.py")


def wait_for(path: Path, procs: list[subprocess.Popen], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        dead = [p.args[2] for p in procs if p.poll() is not None]
        assert not dead and time.monotonic() < deadline, f"waiting for {path.name}; exited: {dead}"
        time.sleep(0.05)


def test_a_graceful_leave_abandons_a_call_to_a_hung_member(tmp_path):
    """A member with a call out to a hung (SIGSTOPped) member leaves gracefully at once: it
    neither waits for that call (600 s RPC timeout) nor for the hung member to take its notice,
    and its name leaves the group's member list, so later joiners never wait on it."""
    port = free_port()
    start = lambda role: subprocess.Popen([sys.executable, str(MEMBERS), role, str(port), str(tmp_path)])  # noqa: E731
    procs = [start("host")]
    try:
        wait_for(tmp_path / "host.joined", procs)
        procs.append(start("member"))
        wait_for(tmp_path / "member.joined", procs)
        procs.append(start("leaver"))
        wait_for(tmp_path / "leaver.joined", procs)
        os.kill(procs[1].pid, signal.SIGSTOP)
        (tmp_path / "go").touch()
        assert procs[2].wait(timeout=300) == 0  # far less than the abandoned call's 600 s
        result = json.loads((tmp_path / "leaver.json").read_text())
        assert result["graceful"] and result["call"].startswith("abandoned"), result
    finally:
        if len(procs) > 1:
            os.kill(procs[1].pid, signal.SIGCONT)
        (tmp_path / "stop").touch()
        for p in procs:
            try:
                p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()
    members = (tmp_path / "members.txt").read_text()
    assert "member_1-" in members and "leaver_1-" not in members, members
