"""Hot-swapping the data config of a running job: `mmdit ctl`, its HTTP endpoint, determinism.

In-process: the endpoint's answers to bad input (nothing changes), its token, serialized writes.
Real processes: a task-mixture change at about step 10 of a 40-step `mmdit consume` run; the
same history replayed from scratch and across a kill + resume; a loosened threshold whose newly
selected samples are encoded on demand by producers with encoders, and served once each.
"""

import json
import os
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from paused import paused, run_processes

from mmdit.config.service import ServiceConfig
from mmdit.consumer.sample_log import read_samples
from mmdit.dataservice.control import ControlServer
from mmdit.dataservice.coordinator import Coordinator
from mmdit.dataservice.plan import DataVersion, SampleRef, Selection
from mmdit.utils.processes import ServeProcess, free_port

# ----------------------------------------------------------------------------- the endpoint


@pytest.fixture
def endpoint(tmp_path):
    refs = [SampleRef(f"k{i:03d}", (256, 256), "edit" if i % 3 == 0 else "t2i", "a" if i % 2 else "b",
                      (256, 256) if i % 3 == 0 else None) for i in range(48)]
    coordinator = Coordinator(Selection(refs), ServiceConfig(plan_ahead=8), 0, 2, 2,
                              [DataVersion(0, 0, 0, task_weights={"t2i": 1.0, "edit": 1.0})])
    server = ControlServer(coordinator, "127.0.0.1", 0, tmp_path)
    yield server, coordinator
    server.close()


def call(server, method, path, body=None, token=True, raw=None):
    headers = {"Authorization": f"Bearer {server.token}"} if token is True else ({"Authorization": token} if token else {})
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(server.url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_endpoint_files_binding_and_token(endpoint, tmp_path):
    server, _ = endpoint
    assert json.loads((tmp_path / "control.json").read_text())["url"] == server.url
    assert server.httpd.server_address[0] == "127.0.0.1"
    assert stat.S_IMODE(os.stat(tmp_path / "control.token").st_mode) == 0o600
    assert (tmp_path / "control.token").read_text() == server.token
    status, config = call(server, "GET", "/config", token=None)  # reads need no token
    assert status == 200 and config["config_version"] == 0 and config["task_weights"] == {"t2i": 1.0, "edit": 1.0}
    assert call(server, "POST", "/config", {"changes": {"task_weights.edit": 2}}, token=None)[0] == 401
    assert call(server, "POST", "/config", {"changes": {"task_weights.edit": 2}}, token="Bearer nope")[0] == 401
    status, reply = call(server, "POST", "/config", {"changes": {"task_weights.edit": 2}, "why": "more edits"})
    assert status == 200 and reply["config_version"] == 1 and reply["from_step"] >= 1
    history = call(server, "GET", "/history")[1]
    assert [(v["version"], v["why"]) for v in history] == [(0, ""), (1, "more edits")]


@pytest.mark.parametrize("body,words", [
    ({"changes": {"task_weights.t2i": "heavy"}}, "must be a number"),
    ({"changes": {"task_weights.t2i": -0.5}}, ">= 0"),
    ({"changes": {"task_weights.t2i": float("inf")}}, "finite"),
    ({"changes": {"colour": 1}}, "unknown key"),
    ({"changes": {"filters.min_sharpness": 1}}, "unknown key"),
    ({"changes": {"filters.min_side": "big"}}, "must be an integer"),
    ({"changes": {"filters.min_aspect": 9.0}}, "min_aspect"),
    ({"changes": {"task_weights.t2i": 0, "task_weights.edit": 0}}, "every task weight"),
    ({"changes": {"source_weights.a": 0, "source_weights.b": 0}}, "selects no sample"),
    ({"changes": {"base_resolution": 640}}, "cached stages"),
    ({"changes": {}}, "no change"),
    ({"changes": [1, 2]}, "expected"),
    ({"why": "no changes key"}, "expected"),
    ({"changes": {"task_weights.t2i": 2}, "why": 5}, "why"),
])
def test_bad_changes_are_rejected_with_the_reason_and_change_nothing(endpoint, body, words):
    server, coordinator = endpoint
    before = coordinator.history_versions()
    status, reply = call(server, "POST", "/config", body=body)
    assert status == 400 and words in reply["error"], reply
    assert coordinator.history_versions() == before


def test_malformed_bodies_and_unknown_routes(endpoint):
    server, coordinator = endpoint
    assert call(server, "POST", "/config", raw=b"{not json")[0] == 400
    assert call(server, "GET", "/nowhere")[0] == 404
    assert len(coordinator.history_versions()) == 1


def test_concurrent_changes_are_serialized(endpoint):
    server, coordinator = endpoint
    replies = []

    def change(weight):
        replies.append(call(server, "POST", "/config", {"changes": {"task_weights.edit": weight}}))

    threads = [threading.Thread(target=change, args=(w,)) for w in (0.5, 1.5, 2.5, 3.5, 4.5, 5.5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r[1]["config_version"] for r in replies) == [1, 2, 3, 4, 5, 6]
    assert [v.version for v in coordinator.history_versions()] == list(range(7))


# ----------------------------------------------------------------------------- real processes


def ctl(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmdit.launch.cli", "ctl", *args], capture_output=True, text=True,
                          timeout=60)


def test_ctl_exit_codes(tmp_path):
    assert ctl("get", str(tmp_path)).returncode == 1  # nothing runs there
    (tmp_path / "control.json").write_text(json.dumps({"url": f"http://127.0.0.1:{free_port()}"}))
    gone = ctl("get", str(tmp_path))
    assert gone.returncode == 1 and "cannot reach" in gone.stderr
    assert ctl("set", str(tmp_path), "no-equals-sign").returncode == 2


def consume(args, run_dir, steps, *extra, wait=True):
    cmd = [sys.executable, "-m", "mmdit.launch.cli", "consume", *args, f"run.dir={run_dir}", f"train.steps={steps}",
           "train.log_samples=true", *extra]
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def sequence(run_dir) -> list[tuple]:
    rows = sorted(read_samples(run_dir), key=lambda r: (r["step"], r["dp_rank"]))
    return [(r["step"], r["dp_rank"], tuple(r["keys"]), r["config_version"]) for r in rows]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    from test_data_service import RECORDS

    from mmdit.cache.store import LatentCache

    path = tmp_path_factory.mktemp("cache")
    LatentCache(path).write(RECORDS)
    return path


def service_args(cache_dir, run_dir, **extra):
    """A service on any free port, published in run_dir, where its consumers find it."""
    base = {"cache.dir": cache_dir, "run.dir": run_dir, "seed": 5, "service.port": 0, "service.address_from": run_dir,
            "service.dp_size": 2, "train.micro_batch_size": 2, "service.producers": 2, "service.heartbeat_s": 0.5,
            "service.consumer_timeout_s": 120, "service.join_timeout_s": 120}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_mixture_change_mid_run_is_exact_recorded_and_replayable(cache_dir, tmp_path):
    from test_data_service import BY_KEY

    service = tmp_path / "service"
    args = service_args(cache_dir, service)
    serve = ServeProcess(args)
    try:
        run = tmp_path / "run"
        proc = consume(args, run, 40, "service.step_time_s=0.15", wait=False)
        deadline = time.monotonic() + 300
        while len({r["step"] for r in read_samples(run)}) < 8:
            assert time.monotonic() < deadline and proc.poll() is None, "the consumers never reached step 8"
            time.sleep(0.1)
        with paused(proc.pid, *run_processes(run, "consumer")):  # the change lands mid-run however slowly ctl starts
            done = ctl("set", str(service), "task_weights.edit=0", "--why", "text-to-image only")
        resumed = time.time()
        assert done.returncode == 0, done.stderr
        reply = json.loads(done.stdout)
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        history = json.loads(ctl("history", str(service)).stdout)
    finally:
        serve.stop()
        serve.kill()
    first = reply["from_step"]
    assert reply["config_version"] == 1 and 8 < first <= 40
    rows = read_samples(run)
    assert {r["config_version"] for r in rows if r["step"] < first} == {0}
    assert {r["config_version"] for r in rows if r["step"] >= first} == {1}
    assert all(BY_KEY[k]["task"] == "t2i" for r in rows if r["step"] >= first for k in r["keys"])
    assert any(BY_KEY[k]["task"] == "edit" for r in rows if r["step"] < first for k in r["keys"])
    assert [(v["version"], v["from_step"], v["why"]) for v in history][1] == (1, first, "text-to-image only")
    latency = min(r["time"] for r in rows if r["config_version"] == 1) - resumed
    print(json.dumps({"resume_after_ctl_set_to_first_batch_of_the_new_version_s": round(latency, 3)}))

    # Replay: a fresh service and a fresh run that start from the recorded history see the same
    # batches; so does a run killed after the change and resumed from its saved state. The two
    # are independent: they run at once (each mostly starts processes, which two cores overlap).
    def replay(name, stops):
        out = tmp_path / name
        out.mkdir()
        for dp in range(2):
            (out / f"consume_state_dp{dp}.json").write_text(json.dumps(
                {"step": 0, "data": {"cursor": {"seq": 0, "epoch": 0, "index": 0}, "history": history}}))
        for steps in stops:
            again = ServeProcess(service_args(cache_dir, tmp_path / f"{name}-service"))
            try:
                done = consume(service_args(cache_dir, out, **{"service.address_from": again.info["address_file"]}),
                               out, steps)
                assert done.returncode == 0, done.stderr[-3000:]
            finally:
                again.stop()
                again.kill()
        return out

    with ThreadPoolExecutor(2) as pool:
        replays = {name: pool.submit(replay, name, stops) for name, stops in (("replay", [40]),
                                                                            ("resumed", [first + 3, 40]))}
        for name, future in replays.items():
            assert sequence(future.result()) == sequence(run), name


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_loosened_threshold_is_encoded_on_demand_and_served_once(tiny_encoders_dir, tmp_path):
    def mmdit(*args):
        done = subprocess.run([sys.executable, "-m", "mmdit.launch.cli", *args], capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    mmdit("synth", str(tmp_path / "shards"), "synth.num_samples=24", "synth.edit_fraction=0")
    strict = ["data.filters.max_text_chars=25"]
    common = [f"cache.dir={tmp_path / 'cache'}", f"encoders.dir={tiny_encoders_dir}", *strict]
    report = json.loads(mmdit("produce", f"data.shards={tmp_path}/shards/*.tar", *common).stdout)
    kept, rejected = report["encoded"], report["rejected"].get("text_length", 0)
    assert kept >= 4 and rejected >= 4, report
    service = tmp_path / "service"
    args = [*common, f"run.dir={service}", "service.port=0", f"service.address_from={service}", "service.producers=2",
            "service.dp_size=1", "train.micro_batch_size=2", "service.consumer_timeout_s=300"]
    serve = ServeProcess(args)
    try:
        run = tmp_path / "run"
        steps = 80  # the change lands at about step 3: then more than five epochs of 24 samples
        proc = consume(args, run, steps, "service.step_time_s=0.05", wait=False)
        deadline = time.monotonic() + 300
        while len(read_samples(run)) < 3:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        with paused(proc.pid, *run_processes(run, "consumer")):  # the change lands early however slowly ctl starts
            done = ctl("set", str(service), "filters.max_text_chars=-1", "--why", "paragraphs too")
        assert done.returncode == 0, done.stderr
        reply = json.loads(done.stdout)
        assert reply["missing"] == rejected and reply["missing_planned"] == rejected
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    finally:
        serve.stop()
        serve.kill()
    rows = read_samples(run)
    after = [r for r in rows if r["step"] >= reply["from_step"]]
    epochs = {}
    for r in after:
        epochs.setdefault(r["batch_id"][0], []).extend(r["keys"])
    full = [keys for e, keys in epochs.items() if min(epochs) < e < max(epochs)]  # wholly under the new version
    assert full, "the run never reached a whole epoch after the change"
    for keys in full:
        counts = Counter(keys)
        assert len(counts) == kept + rejected and set(counts.values()) == {1}  # every sample, once
    from mmdit.cache.store import LatentCache

    fp = report["fingerprint"]
    assert len(LatentCache(tmp_path / "cache").keys(fp)) == kept + rejected  # encoded and published
