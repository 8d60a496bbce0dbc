"""Three hosts for real: the data service, producers and a DP=2 trainer in three network
namespaces (tests/netns.py), with this machine's hostname resolving to 127.0.0.1 everywhere, as
on many cluster images. Nothing here may depend on that name, and nothing may listen on a
wildcard or on loopback.

One job runs for the module (`job`), and the tests check what it did:
- h1 runs `mmdit serve` (service.host = h1's address); h2 and h3 run a producer each
  (service.address_from: the address the service published on the shared file system);
- misconfigured producers try to join from h3 while the job runs: one advertising loopback, one
  advertising an address the coordinator cannot reach. Each exits 2 with one line naming the
  address and service.advertise_host, and the group's member list is as it was;
- h2 and h3 each run the trainer node shell `mmdit submit` renders (torchrun through
  launch/agent.py, rendezvous on h2's address as the job script computes it), DP=2;
- mid-run the producer on h3 is SIGKILLed; `mmdit ctl` steers the job from h3; `mmdit status`
  on another pid space marks the service's processes remote.
Then: every sample of the epoch was trained on exactly once, in plan order, across the ranks.

A second, smaller rendezvous (`test_a_named_rendezvous_endpoint...`) gives the endpoint as a
host name, and one whose name resolves to loopback on its node fails in one line.

Needs root and iproute2 (CI has both): elsewhere the module is skipped, saying why; under CI it fails.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import netns
import pytest
import torch
from paused import paused

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

KEYS = 32  # one bucket: 16 global batches of 2 (DP=2 x micro-batch 1) per epoch
STEPS = KEYS // 2
SERVICE = ["service.dp_size=2", "train.micro_batch_size=1", "service.heartbeat_s=0.5", "service.lease_timeout_s=3",
           "service.prefetch=1", "service.prepare_depth=2", "service.join_timeout_s=120", "seed=3"]
TRAIN = ["train.random_height=64", "train.random_width=64", "optimizer.warmup_steps=1", "train.tensorboard=false",
         "train.log_samples=true", "checkpoint.every=1000", f"train.steps={STEPS}"]


def wait_until(predicate, timeout: float, what: str, procs=()):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"{what}: a process exited with {p.returncode} first: {p.args[-6:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def trainer_node_shell(run: Path, cache: Path) -> str:
    """The shell `mmdit submit` runs on every trainer node (from the rendered job script)."""
    from mmdit.config.loader import load_config
    from mmdit.launch.slurm import render

    overrides = [f"run.dir={run}", f"cache.dir={cache}", "launch.trainer_nodes=2", "launch.gpus_per_node=1",
                 "launch.slurm.gpus=false", *SERVICE, *TRAIN]
    script = render(load_config(overrides), overrides)
    line = next(x for x in script.splitlines() if x.startswith("srun") and " bash -c " in x)
    words = shlex.split(line.rstrip(" &"))
    return words[words.index("-c") + 1]


@pytest.fixture(scope="module")
def hosts():
    why = netns.available()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"the multi-host tier cannot run: {why}")
        pytest.skip(f"the multi-host tier needs network namespaces: {why}")
    with netns.hosts(3) as made:
        yield made


@pytest.fixture(scope="module")
def job(hosts, tmp_path_factory):
    from mmdit.cache.store import LatentCache

    h1, h2, h3 = hosts
    root = tmp_path_factory.mktemp("multihost")
    cache, run = root / "cache", root / "run"
    svc = run / "service"
    g = torch.Generator().manual_seed(0)
    LatentCache(cache).write([
        {"key": f"k{i:03d}", "fingerprint": "fp_mh", "bucket": (128, 128), "task": "t2i", "caption": f"c{i}",
         "source": "s", "latents": torch.randn(16, 16, 16, generator=g),
         "prompt_embeds": torch.randn(4 + i % 3, 64, generator=g)} for i in range(KEYS)])
    (run / "logs").mkdir(parents=True)
    common = [f"cache.dir={cache}", *SERVICE]
    out = {"root": root, "run": run, "svc": svc}
    procs: list[subprocess.Popen] = []

    def start(host, args, log, **kw):
        with open(run / "logs" / log, "w") as out_file:  # the child keeps its own descriptor
            proc = host.popen(args, stdout=out_file, stderr=subprocess.STDOUT, cwd=root, **kw)
        procs.append(proc)
        return proc

    try:
        serve = start(h1, h1.mmdit("serve", *common, f"run.dir={svc}", f"service.host={h1.ip}", "service.port=0",
                                   "service.producers=0"), "serve.log")
        wait_until(lambda: (svc / "address.json").exists(), 180, "the service's address", [serve])
        producers = [start(h, h.mmdit("producer", *common, f"run.dir={svc}", f"service.address_from={svc}"),
                           f"producer-{h.name}.log") for h in (h2, h3)]
        members = lambda: (read_json(svc / "service.json") or {}).get("rpc_members", [])  # noqa: E731
        wait_until(lambda: len((read_json(svc / "service.json") or {}).get("producers", {})) == 2, 180,
                   "both producers", [serve, *producers])
        out["members_before"] = members()

        # misconfigured joiners, while the service runs: loopback, and an address h1 has no route to
        for cmd in (["link", "add", "side0", "type", "veth", "peer", "name", "side1"],  # a network only h3 is on
                    ["addr", "add", "10.99.0.3/24", "dev", "side0"], ["link", "set", "side0", "up"],
                    ["link", "set", "side1", "up"]):
            h3.run(["ip", *cmd], check=True)
        out["bad"] = {setting: h3.run(h3.mmdit("producer", *common, f"run.dir={svc}", f"service.address_from={svc}",
                                                f"service.advertise_host={setting}"),
                                      capture_output=True, text=True, timeout=300, cwd=root)
                      for setting in ("127.0.0.1", "side0")}
        refused = time.time()
        wait_until(lambda: (read_json(svc / "service.json") or {}).get("time", 0) > refused, 60,
                   "a status written after them")
        out["members_after_bad"] = members()

        # the trainers: the job script's node shell on h2 and h3, rendezvous on h2's address
        head = h2.run([sys.executable, "-m", "mmdit.launch.address", h3.name], capture_output=True, text=True,
                      check=True).stdout.strip()
        out["head"] = head
        shell = trainer_node_shell(run, cache)
        env = {"HEAD_ADDR": head, "SLURM_JOB_ID": "4242"}
        trainers = [start(h, ["bash", "-c", shell], f"trainer-{h.name}.log", env=env) for h in (h2, h3)]
        wait_until(lambda: len(jsonl(run / "metrics.jsonl")) >= 3, 300, "the trainers' third step",
                   [serve, *trainers])
        out["listening"] = {h.name: h.listening() for h in hosts}
        out["hosts"] = {h.name: h.ip for h in hosts}

        # the trainer ranks (not their agents) wait while the test acts: a tiny model trains an
        # epoch in seconds, and "mid-run" must be an event, not a race with these commands
        ranks = [pid for h in (h2, h3) for pid in h.pids("mmdit.launch.cli train")
                 if not any(w in Path(f"/proc/{pid}/cmdline").read_bytes() for w in (b"agent", b"bash"))]
        assert len(ranks) == 2, ranks
        with paused(*ranks):
            producers[1].send_signal(signal.SIGKILL)  # the producer on h3, mid-run
            out["killed_at_step"] = len(jsonl(run / "metrics.jsonl"))
            out["ctl_get"] = h3.run(h3.mmdit("ctl", "get", str(svc)), capture_output=True, text=True, timeout=120)
            out["ctl_set"] = h3.run(h3.mmdit("ctl", "set", str(svc), "task_weights.t2i=2", "--why", "from h3"),
                                    capture_output=True, text=True, timeout=120)
            out["status_remote"] = h2.run(h2.mmdit("status", str(svc), "--json"), own_pids=True,
                                          capture_output=True, text=True, timeout=120)
            out["status_local"] = h1.run(h1.mmdit("status", str(svc), "--json"), capture_output=True, text=True,
                                         timeout=120)
        for t in trainers:
            t.wait(timeout=600)
        out["trainer_codes"] = [t.returncode for t in trainers]
        out["service"] = read_json(svc / "service.json")
        out["members_end"] = members()
        yield out
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()


def logs(job) -> str:
    return "".join(f"\n--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in (job["run"] / "logs").glob("*"))


def test_the_trainers_on_two_hosts_train_every_sample_once(job):
    assert job["trainer_codes"] == [0, 0], logs(job)
    rows = jsonl(job["run"] / "samples.jsonl")
    assert sorted((r["step"], r["dp_rank"]) for r in rows) == [(s, d) for s in range(1, STEPS + 1) for d in (0, 1)]
    keys = [k for r in rows for k in r["keys"]]
    assert sorted(keys) == [f"k{i:03d}" for i in range(KEYS)]  # every sample once, none twice
    for d in (0, 1):  # in plan order on each rank
        seqs = [r["seq"] for r in sorted(rows, key=lambda r: r["step"]) if r["dp_rank"] == d]
        assert seqs == sorted(seqs) and len(set(seqs)) == STEPS


def test_a_producer_killed_mid_run_is_replaced_and_training_goes_on(job):
    service = job["service"]
    assert service["counters"]["producers_lost"] >= 1, service["counters"]
    alive = [n for n, p in service["producers"].items() if p["alive"]]
    assert len(alive) == 1, service["producers"]
    assert job["killed_at_step"] < STEPS  # it died mid-run


def test_ctl_steers_the_job_from_a_trainer_node(job):
    get, done = job["ctl_get"], job["ctl_set"]
    assert get.returncode == 0 and "config_version" in json.loads(get.stdout), get.stderr
    assert done.returncode == 0, done.stderr
    version = json.loads(done.stdout)["config_version"]
    rows = jsonl(job["run"] / "samples.jsonl")
    assert version == 1 and any(r["config_version"] == 1 for r in rows)
    control = json.loads((job["svc"] / "control.json").read_text())
    assert control["bind"].startswith(job["hosts"]["h1"] + ":") and control["url"] == f"http://{control['bind']}"


def test_misconfigured_joiners_are_refused_in_one_line_and_change_no_member_list(job):
    for setting, done in job["bad"].items():
        lines = [x for x in done.stderr.splitlines() if x.startswith("mmdit producer:")]
        assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
        assert "service.advertise_host" in lines[0]
    assert "advertises 127.0.0.1, a loopback address" in job["bad"]["127.0.0.1"].stderr
    assert "cannot reach" in job["bad"]["side0"].stderr and "10.99.0.3" in job["bad"]["side0"].stderr
    before = job["members_before"]
    assert len(before) == 3 and any(m.startswith("coordinator-") for m in before), before
    assert job["members_after_bad"] == before
    # and every running member stayed: the trainers joined after them, and all left again
    end = job["members_end"]
    assert set(before) <= set(end) and not any(m.startswith("trainer_") for m in end), end


def test_nothing_listens_on_a_wildcard_or_on_loopback(job):
    listening, addresses = job["listening"], job["hosts"]
    assert all(listening[h] for h in ("h1", "h2", "h3")), listening  # service, producers, trainers, rendezvous
    for host, sockets in listening.items():
        elsewhere = [s for s in sockets if s[0] != addresses[host]]
        assert not elsewhere, f"{host} listens beyond {addresses[host]}: {elsewhere}"
    assert any(port == 29400 for _, port, _ in listening["h2"])  # the rendezvous, on the first trainer node
    assert job["head"] == addresses["h2"]


def test_status_on_another_host_marks_the_service_remote(job):
    remote, local = (json.loads(job[k].stdout) for k in ("status_remote", "status_local"))
    by_role = lambda info: {p["role"]: p for p in info["processes"]}  # noqa: E731
    coordinator = by_role(remote)["coordinator"]
    assert coordinator["remote"] and coordinator["alive"] is None, coordinator
    assert by_role(local)["coordinator"]["alive"] is True


WORKER = """
import os, torch, torch.distributed as dist
from mmdit.utils.store import join_process_group
join_process_group("gloo", timeout_s=120)
t = torch.ones(1) * (dist.get_rank() + 1)
dist.all_reduce(t)
print("sum", t.item(), os.environ["MASTER_ADDR"], flush=True)
dist.destroy_process_group()
"""


def agent(host, endpoint: str, script: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mmdit.launch.agent", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={endpoint}", "--rdzv-id=named", *extra, str(script)]


def test_a_named_rendezvous_endpoint_is_hosted_by_its_node(hosts, tmp_path):
    h1, h2, h3 = hosts
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    procs = [h.popen(agent(h, f"{h2.name}:29411", script), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                     text=True) for h in (h2, h3)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert all(f"sum 3.0 {h2.ip}" in o or f"sum 3.0 {h3.ip}" in o for o in outs), outs
    # a name that resolves to loopback on its node (this machine's hostname) cannot host a multi-node rendezvous
    bad = h2.run(agent(h2, f"{socket.gethostname()}:29412", script), capture_output=True, text=True, timeout=120)
    lines = [x for x in bad.stderr.splitlines() if x.startswith("mmdit agent:")]
    assert bad.returncode == 2 and len(lines) == 1 and "resolves to 127.0.0.1 (loopback)" in lines[0], bad.stderr
