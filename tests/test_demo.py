"""`mmdit demo`: the whole local pipeline, as the README's first command runs it."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # real processes


def test_demo_trains_from_synthetic_shards_through_the_data_service(tmp_path):
    run = tmp_path / "demo"
    cmd = [sys.executable, "-m", "mmdit.launch.cli", "demo", f"run.dir={run}", "train.steps=5",
           "synth.num_samples=24", "train.log_samples=true"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    report = json.loads((run / "cache" / "report.json").read_text())
    assert report["seen"] == 24 and report["encoded"] == report["accepted"] > 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    steps = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    keys = [k for s in steps for k in s["keys"]]
    assert len(keys) == len(set(keys)), "a sample was served twice within the first epoch"
    assert (run / "checkpoints" / "latest").read_text() == "step_00000005"
    services = json.loads((run / "service" / "processes.json").read_text())
    assert sorted(p["role"] for p in services) == ["coordinator", "producer", "producer"]

    # A second run reuses everything: nothing is encoded again, training resumes at step 5.
    again = subprocess.run(cmd[:-3] + ["train.steps=7", "synth.num_samples=24"], capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((run / "cache" / "report.json").read_text())["encoded"] == 0
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()][-2:] == [6, 7]
