"""Supervised fine-tuning (conf/train/sft.yaml, conf/data/sft.yaml): the curated key list selects
the plan's samples and hot-swaps mid-epoch; a run from checkpoint.init_from records its lineage in
the run and in every checkpoint, and DPO from SFT chains it back to pre-training."""

import json

import numpy as np
import pyarrow as pa
import pytest

from mmdit.cache.manifest import ingest_filters, select_mask
from mmdit.config.data import FilterConfig
from mmdit.config.loader import load_config
from mmdit.dataservice.plan import DataVersion, EpochPlanner, PlanSpec, SampleRef, Selection

KEYS = [f"web-000000/s{i:02d}" for i in range(12)]
OPEN = {"min_side": 0, "min_caption_chars": 0, "drop_duplicates": False}


def manifest() -> pa.Table:
    return pa.table({"key": KEYS, "status": ["ok"] * 12, "width": [64] * 12, "height": [64] * 12,
                     "caption_chars": [10] * 12})


def key_list(path, keys, comment=True):
    path.write_text(("# curated by hand\n" if comment else "") + "\n".join(keys) + "\n\n")
    return str(path)


def test_only_samples_on_the_curated_list_pass_and_producers_ignore_it(tmp_path):
    listed = key_list(tmp_path / "a.txt", KEYS[:3] + ["web-000000/not-in-the-manifest"])
    mask, reasons = select_mask(manifest(), FilterConfig(**OPEN, curated_list=listed))
    assert [k for k, ok in zip(KEYS, mask) if ok] == KEYS[:3]
    assert set(reasons[3:]) == {"not_curated"}
    assert ingest_filters(FilterConfig(**OPEN, curated_list=listed)).curated_list == ""
    with pytest.raises(ValueError, match="curated_list"):
        FilterConfig(curated_list=str(tmp_path / "missing.txt"))


def test_the_curated_list_hot_swaps_mid_epoch_without_repeating_a_sample(tmp_path):
    first = key_list(tmp_path / "a.txt", KEYS[:6])
    second = key_list(tmp_path / "b.txt", KEYS[4:10], comment=False)
    refs = [SampleRef(k, (64, 64), "t2i") for k in KEYS]
    history = [DataVersion(0, 0, 0, filters={**OPEN, "curated_list": first}),
               DataVersion(1, 0, 2, filters={**OPEN, "curated_list": second})]
    planner = EpochPlanner(PlanSpec(seed=1, global_batch_size=2), 0, Selection(refs, manifest()), history)
    batches = []
    while (batch := planner.next()) is not None:
        batches.append(batch)
    before = [k for b in batches[:2] for k in b.keys]
    after = [k for b in batches[2:] for k in b.keys]
    assert set(before) <= set(KEYS[:6]) and len(before) == 4
    assert set(after) == set(KEYS[4:10]) - set(before)  # the new list, minus what this epoch served
    assert len(before + after) == len(set(before + after))  # once per epoch across the swap
    assert {b.config_version for b in batches} == {0, 1}


def test_mmdit_ctl_set_swaps_the_curated_list_and_refuses_a_missing_file(tmp_path):
    from mmdit.config.loader import load_data_preset
    from mmdit.dataservice.data_config import ChangeError, apply_changes, version_zero

    start = version_zero(load_data_preset("sft"), 256)  # conf/data/sft.yaml: no list until one is given
    assert start.filters["curated_list"] == "" and start.task_weights["edit"] == 0
    listed = key_list(tmp_path / "b.txt", KEYS[:2])
    new, applied = apply_changes(start, {"filters.curated_list": listed}, {256})
    assert new.filters["curated_list"] == listed and applied == {"filters.curated_list": listed}
    for bad in (str(tmp_path / "missing.txt"), 3):
        with pytest.raises(ChangeError, match="curated_list"):
            apply_changes(start, {"filters.curated_list": bad}, {256})


def test_sft_records_its_lineage_in_the_run_and_every_checkpoint(tmp_path):
    from mmdit.consumer.checkpoint import checkpoint_dir
    from mmdit.consumer.lineage import weights_fingerprint
    from mmdit.consumer.trainer import Trainer
    from mmdit.parallel.state import destroy_parallel

    tiny = ["train.random_height=32", "train.random_width=32", "train.tensorboard=false", "train.micro_batch_size=1"]

    def train(run, *overrides):
        try:
            Trainer(load_config([f"run.dir={run}", *tiny, *overrides])).run()
        finally:
            destroy_parallel()
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    train(tmp_path / "pre", "train.steps=2", "optimizer.lr=1e-2")
    assert not (tmp_path / "pre" / "lineage.json").exists()  # from its seed: nothing to record
    source = checkpoint_dir(tmp_path / "pre", 2) / "model"
    records = train(tmp_path / "sft", "train=sft", f"checkpoint.init_from={source}", "train.steps=2",
                    "checkpoint.every=1", "checkpoint.async_save=false")
    assert [r["lr"] for r in records] == [1e-4, 1e-4]  # the preset's lower constant rate
    lineage = json.loads((tmp_path / "sft" / "lineage.json").read_text())
    assert lineage == {"source": str(source), "kind": "mmdit", "step": 2, "run": str(tmp_path / "pre"),
                       "fingerprint": weights_fingerprint(source)}
    for step in (1, 2):
        trainer = json.loads((checkpoint_dir(tmp_path / "sft", step) / "trainer.json").read_text())
        assert trainer["lineage"] == lineage
    sft_model = checkpoint_dir(tmp_path / "sft", 2) / "model"
    assert weights_fingerprint(sft_model) != lineage["fingerprint"]  # fine-tuned weights are other weights
    train(tmp_path / "dpo", "train.objective=dpo", f"checkpoint.init_from={sft_model}", "train.steps=1")
    chained = json.loads((tmp_path / "dpo" / "lineage.json").read_text())
    assert chained["run"] == str(tmp_path / "sft") and chained["parent"] == lineage
    assert np.isclose(json.loads((tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()[0])["loss"],
                      np.log(2), atol=1e-6)  # the reference is the init_from model: the policy starts equal
