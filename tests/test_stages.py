"""The seven data stages (conf/data/stage1..7.yaml) and switching between them in a running job."""

import dataclasses
import json
import subprocess
import sys
import time

import pytest
import torch
from paused import paused

from mmdit.config import ConfigError
from mmdit.config.data import FilterConfig, preset_changes
from mmdit.config.loader import load_config, load_data_preset
from mmdit.dataservice.data_config import ChangeError, apply_changes, describe, version_zero
from mmdit.dataservice.plan import DataVersion, SampleRef, Selection
from mmdit.utils.processes import ServeProcess

STAGES = [f"stage{i}" for i in range(1, 8)]


def stricter_or_equal(a: FilterConfig, b: FilterConfig) -> list[str]:
    """Fields where `b` is looser than `a` (a later stage may only tighten)."""
    looser = []
    for f in dataclasses.fields(FilterConfig):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name.startswith("min_") and y < x or f.name.startswith("max_") and f.name != "max_text_chars" and y > x:
            looser.append(f.name)
        if f.name.startswith("drop_") and x and not y:
            looser.append(f.name)
    return looser


def test_the_stages_follow_the_report():
    data = {name: load_data_preset(name) for name in STAGES}
    assert [data[s].base_resolution for s in STAGES] == [256, 256, 256, 256, 640, 640, 1328]
    for a, b in zip(STAGES, STAGES[1:]):  # each stage keeps what the previous one filtered out
        assert stricter_or_equal(data[a].filters, data[b].filters) == [], (a, b)
    assert data["stage1"].filters.duplicate_distance > 0  # near-duplicates go from the start
    assert data["stage2"].filters.min_blur > 0 and data["stage1"].filters.min_blur == 0  # quality
    assert data["stage3"].filters.min_alignment > -1 and data["stage2"].filters.min_alignment == -1  # alignment
    assert data["stage4"].category_weights["text_rendering"] > 1  # text rendering
    assert data["stage5"].filters.drop_watermark and data["stage5"].filters.min_side >= 640  # high resolution
    assert data["stage6"].category_weights["people"] > data["stage6"].category_weights["nature"]  # balance
    assert dict(data["stage7"].stage_weights) == {"640": 1.0, "1328": 1.0}  # multi-scale


def test_a_preset_replaces_every_table_and_threshold():
    start = version_zero(load_data_preset("stage4"), 256)
    assert start.category_weights["synthetic"] == 2.0
    new, applied = apply_changes(start, preset_changes(load_data_preset("stage2")), {256, 640})
    assert new.category_weights == {} and new.filters == dataclasses.asdict(load_data_preset("stage2").filters)
    assert describe(new)["filters"]["min_alignment"] == -1.0  # stage 4's threshold is gone, not kept
    assert applied["base_resolution"] == 256
    with pytest.raises(ChangeError, match="cached stage"):  # stage 7 draws 1328, which is not cached
        apply_changes(start, preset_changes(load_data_preset("stage7")), {256, 640})
    with pytest.raises(ConfigError, match="no data preset 'stage9'"):
        load_data_preset("stage9")


def test_whole_table_and_filter_changes_are_checked():
    v = DataVersion(0, 0, 0, category_weights={"people": 3.0}, filters={"min_blur": 5.0})
    new, applied = apply_changes(v, {"category_weights": {"Text rendering": 2, "unknown": 0}}, {256})
    assert new.category_weights == {"text_rendering": 2.0, "unknown": 0.0}
    assert applied == {"category_weights": {"text_rendering": 2.0, "unknown": 0.0}}
    assert apply_changes(v, {"filters": {"min_entropy": 2.0}}, {256})[0].filters["min_blur"] == 0.0
    for bad, words in [({"category_weights.animals": 1}, "unknown category"),
                       ({"category_weights": [1, 2]}, "mapping"),
                       ({"filters": {"min_blur": "high"}}, "must be a number"),
                       ({"filters": {"min_aspect": 2.0, "max_aspect": 1.0}}, "min_aspect <= max_aspect"),
                       ({"stage_weights.512": 1.0}, "not a cached stage"),
                       ({"stage_weights": {"256": -1}}, ">= 0")]:
        with pytest.raises(ChangeError, match=words):
            apply_changes(v, bad, {256})


def test_stage_weights_draw_several_stages_and_round_trip():
    refs = [SampleRef(f"k{i}", (b, b), "t2i", stage=b) for b in (256, 640, 1328) for i in range(3)]
    sel = Selection(refs)
    only = sel.weights(DataVersion(0, 0, 0, stage=640))
    both = sel.weights(DataVersion(0, 0, 0, stage=1328, stage_weights={"640": 1.0, "1328": 2.0}))
    assert [int(w) for w in only] == [0] * 3 + [1] * 3 + [0] * 3
    assert [float(w) for w in both] == [0.0] * 3 + [1.0] * 3 + [2.0] * 3
    v = DataVersion(3, 1, 2, stage_weights={"640": 1.0}, why="multi-scale")
    assert DataVersion.from_dict(json.loads(json.dumps(v.to_dict()))) == v
    old = {k: x for k, x in v.to_dict().items() if k != "stage_weights"}  # a checkpoint from before the field
    assert DataVersion.from_dict(old).stage_weights == {}


def test_a_curriculum_entry_can_name_a_preset():
    cfg = load_config(["+data.curriculum=[{step: 50, preset: stage2}, {step: 90, preset: stage5, filters.min_blur: 1}]"])
    first, second = cfg.data.curriculum
    assert first["step"] == 50 and first["filters"]["min_blur"] == 20.0 and first["base_resolution"] == 256
    assert second["base_resolution"] == 640 and second["filters.min_blur"] == 1
    with pytest.raises(ConfigError, match="no data preset"):
        load_config(["+data.curriculum=[{step: 5, preset: nope}]"])


def test_bad_category_names_are_config_errors():
    with pytest.raises(ConfigError, match="unknown category 'animals'"):
        load_config(["+data.category_weights.animals=2"])
    with pytest.raises(ConfigError, match="source_categories.web"):
        load_config(["+data.source_categories.web=cats"])
    assert load_config(["+data.source_categories.web=Text-Rendering"]).data.source_categories == {"web": "text_rendering"}


# ----------------------------------------------------------------------------- a running job


def ctl(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmdit.launch.cli", "ctl", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def staged_cache(tmp_path_factory):
    """The same 48 samples cached at stages 256 and 640 (latents of the 640 stage are larger)."""
    from mmdit.cache.store import LatentCache

    path = tmp_path_factory.mktemp("staged")
    g = torch.Generator().manual_seed(0)
    records = []
    for base, scale in ((256, 1), (640, 2)):
        for i in range(48):
            side = 64 * scale
            records.append({"key": f"k{i:03d}", "fingerprint": f"fp_stages-b{base}", "bucket": (side, side),
                            "task": "t2i", "caption": f"caption {i}", "source": "s",
                            "latents": torch.randn(16, side // 8, side // 8, generator=g),
                            "prompt_embeds": torch.randn(4, 32, generator=g)})
    LatentCache(path).write(records)
    return path


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_switching_stage_mid_run_through_the_hot_swap_path(staged_cache, tmp_path):
    from mmdit.consumer.sample_log import read_samples

    service = tmp_path / "service"
    args = [f"cache.dir={staged_cache}", f"run.dir={service}", "service.port=0", f"service.address_from={service}",
            "service.dp_size=1",
            "train.micro_batch_size=2", "service.producers=1", "service.heartbeat_s=0.5",
            "service.consumer_timeout_s=120", "data.base_resolution=256"]
    serve = ServeProcess(args)
    try:
        run = tmp_path / "run"
        proc = subprocess.Popen([sys.executable, "-m", "mmdit.launch.cli", "consume", *args, f"run.dir={run}",
                                 "train.steps=60", "train.log_samples=true", "service.step_time_s=0.1"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while len(read_samples(run)) < 5:
            assert time.monotonic() < deadline and proc.poll() is None, "the consumer never reached step 5"
            time.sleep(0.1)
        with paused(proc.pid):  # the switch lands mid-run however slowly `ctl` starts
            refused = ctl("set", str(service), "--preset", "stage7")  # 1328 is not cached: nothing changes
            done = ctl("set", str(service), "--preset", "stage5")
        assert refused.returncode == 2 and "not a cached stage" in refused.stderr, refused.stderr
        assert done.returncode == 0, done.stderr
        reply = json.loads(done.stdout)
        now = json.loads(ctl("get", str(service)).stdout)
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    finally:
        serve.stop()
        serve.kill()
    assert reply["config_version"] == 1 and now["base_resolution"] == 640
    assert now["filters"]["drop_watermark"] is True and now["category_weights"]["synthetic"] == 2.0
    rows = read_samples(run)
    first = reply["from_step"]
    assert 5 < first <= 60
    assert {r["config_version"] for r in rows if r["step"] < first} == {0}
    assert {r["config_version"] for r in rows if r["step"] >= first} == {1}
    after = {tuple(r["shape"][2:]) for r in rows if r["step"] >= first}
    assert after == {(16, 16)}, after  # every batch after the switch comes from the 640 stage (128 px here)
    assert {tuple(r["shape"][2:]) for r in rows if r["step"] < first} == {(8, 8)}
