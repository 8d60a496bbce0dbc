"""`service.port=0`: the coordinator binds any free port and publishes the address it got in its
run dir (address.json); clients find it with `service.address_from`.

In-process: a client needs address_from with port 0; it waits for the address to be published;
the file is withdrawn only by the service that wrote it. Real processes: two services started
at once on port 0 on one machine each serve their own consumer, and remove their address on stop.
"""

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from mmdit.cache.store import LatentCache
from mmdit.config import ConfigError
from mmdit.config.loader import load_config
from mmdit.config.service import ClientSettings
from mmdit.dataservice.address import (
    ADDRESS_JSON,
    ServiceAddress,
    ServiceUnreachable,
    publish,
    reach,
    resolve,
    withdraw,
)
from mmdit.utils.processes import ServeProcess, free_port


def test_port_0_is_a_valid_setting_and_a_client_must_be_told_where_to_look():
    assert load_config(["service.port=0"]).service.port == 0
    with pytest.raises(ConfigError, match="service.address_from"):
        resolve(ClientSettings(port=0), timeout_s=1)
    assert resolve(ClientSettings(port=1234), timeout_s=1) == ServiceAddress("127.0.0.1", 1234)


def test_a_client_waits_for_the_published_address_and_only_its_publisher_withdraws_it(tmp_path):
    mine = ServiceAddress("127.0.0.1", 4321, "id-mine")
    later = threading.Timer(0.3, publish, args=(tmp_path, mine, "http://127.0.0.1:1"))
    later.start()
    try:
        got = resolve(ClientSettings(port=0, address_from=str(tmp_path)), timeout_s=60)
    finally:
        later.join()
    assert (got.host, got.port, got.service_id) == ("127.0.0.1", 4321, "id-mine")
    assert got.source == str(tmp_path / ADDRESS_JSON)
    # the file itself may be given too
    assert resolve(ClientSettings(address_from=str(tmp_path / ADDRESS_JSON)), timeout_s=1).port == 4321
    withdraw(tmp_path, "id-of-another-service")
    assert (tmp_path / ADDRESS_JSON).exists()
    withdraw(tmp_path, "id-mine")
    assert not (tmp_path / ADDRESS_JSON).exists()
    with pytest.raises(ServiceUnreachable, match="no data service address in"):
        resolve(ClientSettings(address_from=str(tmp_path)), timeout_s=0.3)


def test_a_published_address_where_nothing_listens_names_the_file(tmp_path):
    publish(tmp_path, ServiceAddress("127.0.0.1", free_port(), "gone"), "")
    with pytest.raises(ServiceUnreachable, match=f"published in {tmp_path / ADDRESS_JSON}.*may be gone"):
        reach(ClientSettings(address_from=str(tmp_path)), timeout_s=0.5)


# ----------------------------------------------------------------------------- real processes


def records(prefix: str, n: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(len(prefix))
    return [{"key": f"{prefix}{i:03d}", "fingerprint": "fp_addr", "bucket": (64, 64), "task": "t2i",
             "caption": f"caption {i}", "source": "s", "latents": torch.randn(16, 8, 8, generator=g),
             "prompt_embeds": torch.randn(3 + i % 3, 16, generator=g)} for i in range(n)]


def args(cache: Path, run: Path) -> list[str]:
    return [f"cache.dir={cache}", f"run.dir={run}", "service.producers=1", "service.dp_size=1",
            "train.micro_batch_size=2", "service.heartbeat_s=0.5", "service.join_timeout_s=120",
            "service.consumer_timeout_s=120", "service.shutdown_timeout_s=20"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_services_on_port_0_each_serve_their_own_consumer(tmp_path):
    names = ("alpha", "beta")
    for name in names:  # each service its own cache: a consumer's keys say which one fed it
        LatentCache(tmp_path / f"cache-{name}").write(records(name))
    # started at once (by this thread: a child dies with the thread that started it)
    services = {n: ServeProcess(args(tmp_path / f"cache-{n}", tmp_path / n), wait=False) for n in names}
    try:
        for s in services.values():
            s.wait_serving(timeout=300)
        ports = {name: s.info["port"] for name, s in services.items()}
        assert 0 not in ports.values() and len(set(ports.values())) == 2, ports
        for name, s in services.items():
            published = json.loads((tmp_path / name / ADDRESS_JSON).read_text())
            assert s.info["address_file"] == str(tmp_path / name / ADDRESS_JSON)
            assert (published["host"], published["port"]) == (s.info["host"], s.info["port"])
            assert published["control"] == s.info["control"] and published["pid"] == s.proc.pid
            lock = json.loads((tmp_path / name / "service.lock").read_text())
            assert lock["rpc"] == published["rpc"] == f"{s.info['host']}:{s.info['port']}"
        consumers = {name: subprocess.Popen(
            [sys.executable, "-m", "mmdit.launch.cli", "consume", *args(tmp_path / "unused", tmp_path / f"c-{name}"),
             "train.steps=3", "train.log_samples=true", f"service.address_from={tmp_path / name}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in names}
        for name, proc in consumers.items():
            out, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err[-3000:]
            keys = [k for line in (tmp_path / f"c-{name}" / "samples.jsonl").read_text().splitlines()
                    for k in json.loads(line)["keys"]]
            assert len(keys) == 6 and all(k.startswith(name) for k in keys), (name, keys)
        # a client refuses a store that is not the one the address file names (a stale file
        # whose port another service took): alpha's port under beta's id
        from mmdit.dataservice import rpc

        beta_id = json.loads((tmp_path / "beta" / ADDRESS_JSON).read_text())["service_id"]
        with pytest.raises(rpc.RpcError, match="not the one whose address was published"):
            rpc.allocate_rank("127.0.0.1", ports["alpha"], 30, service_id=beta_id)
        for name, s in services.items():
            code, stopped = s.stop(timeout=300)
            assert code == 0 and stopped["event"] == "stopped"
            assert not (tmp_path / name / ADDRESS_JSON).exists()  # withdrawn: no client finds a stopped service
    finally:
        for s in services.values():
            s.kill()
