"""Looking at a job from another host, without processes: `mmdit status` never judges another
host's pids by local ones, `mmdit ctl` says why a control endpoint on loopback cannot be reached,
and nothing mmdit hosts listens on a wildcard. (The real thing, across network namespaces, is in
test_multihost.py.)"""

import json
import os

import pytest

from mmdit.launch.ctl import Unreachable, request
from mmdit.launch.status import gather, render
from mmdit.utils.processes import ProcessTable, pidspace
from mmdit.utils.store import tcp_store


def test_status_marks_processes_of_another_pid_space_remote(tmp_path):
    table = ProcessTable(tmp_path)
    table.add("trainer", "trainer_rank0", os.getpid())  # this process: alive, here
    rows = table.read()
    # another host's coordinator, pid 1 (alive here, as every pid 1 is), and one whose pid is free here
    rows += [{**rows[0], "role": "coordinator", "name": "coordinator", "pid": 1, "host": "node7",
              "pidspace": "another-boot/pid:[1]"},
             {**rows[0], "role": "producer", "name": "producer_node8_99_0", "pid": 2 ** 22 - 3, "host": "node8",
              "pidspace": "other-boot/pid:[2]"}]
    (tmp_path / "processes.json").write_text(json.dumps(rows))
    info = gather(tmp_path)
    state = {p["role"]: (p["alive"], p["remote"]) for p in info["processes"]}
    assert state == {"trainer": (True, False), "coordinator": (None, True), "producer": (None, True)}
    assert rows[0]["pidspace"] == pidspace()
    shown = render(info)
    assert "node7" in shown and "remote" in shown and "exited" not in shown
    # a reconcile here never marks another host's rows gone
    assert not any(r.get("gone") for r in ProcessTable(tmp_path).reconcile())


def test_ctl_says_why_a_control_endpoint_on_another_hosts_loopback_is_unreachable(tmp_path):
    (tmp_path / "control.json").write_text(json.dumps(
        {"url": "http://127.0.0.1:1", "bind": "127.0.0.1:1", "host": "coordnode", "pid": 7}))
    with pytest.raises(Unreachable) as e:
        request(str(tmp_path), "GET", "/config")
    assert "listens on 127.0.0.1, which only its own host (coordnode) reaches" in str(e.value)
    assert "service.control_host" in str(e.value)


@pytest.mark.parametrize("host", ["0.0.0.0", "", "::"])
def test_no_store_listens_on_every_interface(host):
    with pytest.raises(OSError, match="not on every interface"):
        tcp_store(host, 0, server=True, timeout_s=5)


def test_the_control_endpoint_refuses_a_wildcard(tmp_path):
    from mmdit.config.service import CoordinatorSettings
    from mmdit.dataservice.control import ControlServer

    with pytest.raises(ValueError, match="never on every interface"):
        ControlServer(None, "0.0.0.0", 0, tmp_path, settings=CoordinatorSettings())
