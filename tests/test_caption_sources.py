"""Annotation captions in training (data.caption_sources): the plan's pick of a caption per sample
and epoch (exact across resume and a mid-run switch), the history that records it, `mmdit produce`
encoding the annotation captions after `mmdit annotate`, on-demand encoding, and (real processes)
a running service switched to annotation captions with `mmdit ctl set`, then replayed."""

import json
import os
import subprocess
import sys
import time
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from mmdit.cache.segment import ANNOTATION_CAPTION
from mmdit.dataservice.plan import (
    CACHED,
    FAILED,
    UNCACHED,
    Cursor,
    DataVersion,
    Planner,
    PlanSpec,
    SampleRef,
    Selection,
    caption_draw,
    plan_epoch,
    sample_of,
)

SEED = 7
SPEC = PlanSpec(SEED, global_batch_size=6, min_batch_size=2)
STATES = (CACHED, CACHED, CACHED, FAILED, "", UNCACHED)


def refs(n: int = 240) -> list[SampleRef]:
    """t2i samples in every annotation state (half of them cached), every 5th an edit."""
    out = []
    for i in range(n):
        edit = i % 5 == 0
        out.append(SampleRef(f"s/{i:04d}", (256, 256) if i % 2 else (256, 512), "edit" if edit else "t2i", "a",
                             (256, 256) if edit else None, annotation=CACHED if edit else STATES[i % len(STATES)]))
    return out


SEL = Selection(refs())
STATE = {r.key: r.annotation for r in SEL.refs}
TASK = {r.key: r.task for r in SEL.refs}


def version(number: int = 0, epoch: int = 0, index: int = 0, **captions) -> DataVersion:
    return DataVersion(number, epoch, index, task_weights={"t2i": 1.0, "edit": 1.0}, caption_sources=captions)


def served(batches) -> list[str]:
    return [k for b in batches for k in b.keys]


# ----------------------------------------------------------------------------- the plan


def test_the_annotation_share_follows_the_weights_and_only_servable_annotations_are_picked():
    for weights, share in (({}, 0.0), ({"annotation": 1.0}, 0.5), ({"annotation": 3.0}, 0.75),
                           ({"original": 0.0, "annotation": 1.0}, 1.0)):
        epoch = Planner(SPEC, SEL, [version(**weights)])._epoch
        keys = served(iter(epoch.next, None))
        assert sorted(sample_of(k) for k in keys) == sorted(SEL.keys())  # every sample once, whatever its caption
        variants = {sample_of(k) for k in keys if k.endswith(ANNOTATION_CAPTION)}
        drawn = {k for k in SEL.keys() if TASK[k] == "t2i" and caption_draw(SEED, 0, k) < share}
        # the pick is the draw of (seed, epoch, key), for the samples whose annotation can be served
        assert variants == {k for k in drawn if STATE[k] == CACHED}
        assert epoch.caption_fallbacks == len({k for k in drawn if STATE[k] in (FAILED, UNCACHED, "")})
        cached = [k for k in SEL.keys() if TASK[k] == "t2i" and STATE[k] == CACHED]
        assert abs(len(variants) / len(cached) - share) < 0.15
    # producers that encode on a miss make annotations not encoded yet servable too
    keys = served(plan_epoch(SPEC, 0, SEL, [DataVersion(0, 0, 0, caption_sources={"original": 0.0, "annotation": 1.0},
                                                           encode_missing=True)]))
    assert {sample_of(k) for k in keys if k.endswith(ANNOTATION_CAPTION)} == \
        {k for k in SEL.keys() if TASK[k] == "t2i" and STATE[k] in (CACHED, UNCACHED)}


def test_each_epoch_draws_again_and_a_raised_share_only_adds_annotations():
    half = [version(annotation=1.0)]
    pick = lambda e, h: {sample_of(k) for k in served(plan_epoch(SPEC, e, SEL, h)) if k.endswith(ANNOTATION_CAPTION)}  # noqa: E731
    assert pick(0, half) != pick(1, half) and pick(0, half) == pick(0, list(half))
    assert pick(0, half) < pick(0, [version(annotation=3.0)])  # the same draw against a larger share


def test_picks_are_exact_across_resume_and_a_mid_run_switch():
    history = [version(0), version(1, 0, 9, annotation=1.0), version(2, 1, 4, annotation=0.25)]
    whole = Planner(SPEC, SEL, history)
    straight = [whole.next()[1] for _ in range(150)]
    assert not any(k.endswith(ANNOTATION_CAPTION) for b in straight[:9] for k in b.keys)  # before the switch
    assert any(k.endswith(ANNOTATION_CAPTION) for b in straight[9:] for k in b.keys)
    assert {b.config_version for b in straight[:9]} == {0} and straight[9].config_version == 1
    for at in (3, 9, 10, 45, 61):  # resumed from a cursor before, at and after each switch
        epoch, index = straight[at].epoch, straight[at].index
        resumed = Planner(SPEC, SEL, history, Cursor(at, epoch, index))
        assert [resumed.next()[1] for _ in range(150 - at)] == straight[at:], at


def test_caption_sources_are_a_table_of_the_recorded_history():
    from mmdit.config.data import DataConfig
    from mmdit.dataservice.data_config import ChangeError, apply_changes, describe, version_zero

    v0 = version_zero(DataConfig(), 256)
    assert v0.caption_sources == {"original": 1.0, "annotation": 0.0}
    old = {k: v for k, v in v0.to_dict().items() if k != "caption_sources"}  # a history saved before the table
    assert DataVersion.from_dict(old) == v0 and DataVersion.from_dict(v0.to_dict()) == v0
    v1, applied = apply_changes(v0, {"caption_sources.annotation": 1}, {256})
    assert applied == {"caption_sources.annotation": 1.0} and v1.annotation_share == 0.5
    assert not v1.same_plan(v0) and describe(v1)["caption_sources"] == {"original": 1.0, "annotation": 1.0}
    assert DataVersion.from_dict(json.loads(json.dumps(v1.to_dict()))) == v1
    for bad, why in (({"caption_sources.alt": 1}, "unknown caption source"),
                     ({"caption_sources.original": 0}, "every caption weight would be 0"),
                     ({"caption_sources.annotation": -1}, ">= 0")):
        with pytest.raises(ChangeError, match=why):
            apply_changes(v0, bad, {256})
    with pytest.raises(ValueError, match="data.caption_sources.alt: unknown caption source"):
        DataConfig(caption_sources={"alt": 1.0})


# ----------------------------------------------------------------------------- the producer side


class StandInAnnotator:
    """A VL model that answers valid JSON for two images in three and prose for the third, by the
    image's bytes (so the same sample gets the same answer in any order)."""

    name = "stand-in"

    def __call__(self, images):
        import hashlib

        out = []
        for img in images:
            h = int(hashlib.sha1(img.tobytes()).hexdigest()[:8], 16)
            if h % 3 == 0:
                out.append("I cannot describe this image.")
            else:
                out.append(json.dumps({"caption": f"a rendering of text, number {h % 997}", "category": "synthetic",
                                       "objects": ["text"], "text": "", "watermark": False, "qr_code": False,
                                       "mosaic": False, "style": "flat"}))
        return out


@pytest.fixture(scope="module")
def annotated(tmp_path_factory, tiny_encoders_dir):
    """A produced, annotated cache whose annotation captions `mmdit produce` encoded."""
    from mmdit.config.data import DataConfig
    from mmdit.config.produce import AnnotateConfig, CacheConfig, EncodersConfig, SynthConfig
    from mmdit.producer.annotate.run import annotate
    from mmdit.producer.encoders import Encoders
    from mmdit.producer.produce import produce
    from mmdit.producer.synth.shards import write_shards

    root = tmp_path_factory.mktemp("captions")
    shards = write_shards(str(root / "shards"), SynthConfig(num_samples=16, kinds={"pure": 1.0}, edit_fraction=0.25,
                                                            min_side=128, max_side=192, seed=3))
    data = DataConfig(shards=shards, caption_sources={"original": 1.0, "annotation": 1.0})
    cache = CacheConfig(dir=str(root / "cache"))
    enc = Encoders.load(EncodersConfig(dir=tiny_encoders_dir))
    before = produce(data, cache, enc, progress=False)
    annotated = annotate(data, cache.dir, AnnotateConfig(batch_size=4), vl=StandInAnnotator(), progress=False)
    after = produce(data, cache, enc, progress=False)
    again = produce(data, cache, enc, progress=False)
    return SimpleNamespace(root=root, data=data, cache=cache, enc=enc, reports=(before, annotated, after, again),
                           encoders_dir=tiny_encoders_dir)


def manifest_rows(cache_dir) -> dict[str, dict]:
    from pathlib import Path

    from mmdit.cache import read_manifest_table

    return {r["key"]: r for r in read_manifest_table(Path(cache_dir)).to_pylist() if r["status"] == "ok"}


def test_produce_encodes_each_parsed_annotation_caption_once(annotated):
    from mmdit.cache import LatentCache
    from mmdit.producer.annotate.answers import annotation_caption

    before, notes, after, again = annotated.reports
    rows = manifest_rows(annotated.cache.dir)
    t2i = [k for k, r in rows.items() if r["task"] == "t2i"]
    ok = sorted(k for k in t2i if rows[k]["annotation_status"] == "ok")
    assert notes["annotated"]["ok"] and notes["annotated"]["unparseable"] and len(t2i) < len(rows)  # edits too
    assert before["caption_variants"] == {"encoded": 0, "cached": 0, "annotation_failed": 0, "not_annotated": len(t2i)}
    assert after["caption_variants"] == {"encoded": len(ok), "cached": 0, "annotation_failed": len(t2i) - len(ok),
                                         "not_annotated": 0}
    assert again["caption_variants"]["encoded"] == 0 and again["caption_variants"]["cached"] == len(ok)
    assert after["encoded"] == again["encoded"] == 0  # no sample encoded again, only captions
    cache, fp = LatentCache(annotated.cache.dir), after["fingerprint"]
    variants = sorted(k for k in cache.keys(fp) if k.endswith(ANNOTATION_CAPTION))
    assert variants == [k + ANNOTATION_CAPTION for k in ok]  # no edit sample, no failed annotation
    for key in ok[:3]:
        rec, orig = cache.read(key + ANNOTATION_CAPTION, fp), cache.read(key, fp)
        assert rec["caption"] == annotation_caption(rows[key]) != orig["caption"] and rec["task"] == "t2i"
        assert torch.equal(rec["latents"], orig["latents"]) and rec["bucket"] == orig["bucket"]
        want = annotated.enc.encode_prompts([rec["caption"]])[0].to(torch.bfloat16)
        assert torch.equal(rec["prompt_embeds"], want)


def test_the_selection_knows_each_samples_annotation_caption(annotated):
    from mmdit.cache import LatentCache
    from mmdit.dataservice.selection import build_selection, resolve_fingerprint, resolve_stages

    cache = LatentCache(annotated.cache.dir)
    stages = resolve_stages(cache, resolve_fingerprint(cache, ""))
    selection, counts = build_selection(cache, stages, annotated.data.filters)
    rows = manifest_rows(annotated.cache.dir)
    assert not any(k.endswith(ANNOTATION_CAPTION) for k in selection.keys())  # variants are not samples
    for r in selection.refs:
        status = rows[r.key]["annotation_status"]
        assert r.annotation == ("" if r.task != "t2i" else CACHED if status == "ok" else FAILED), r.key
    states = Counter(r.annotation for r in selection.refs if r.task == "t2i")
    assert counts["annotation_captions"] == {"cached": states[CACHED], "uncached": 0, "failed": states[FAILED],
                                             "not_annotated": 0}


def test_a_missing_annotation_caption_is_encoded_on_demand(annotated, tmp_path):
    import shutil

    from mmdit.cache import LatentCache
    from mmdit.cache.segment import read_segment_header
    from mmdit.config.loader import load_config
    from mmdit.producer.on_demand import OnDemandEncoder

    copy = tmp_path / "cache"
    shutil.copytree(annotated.cache.dir, copy)
    fp = annotated.reports[2]["fingerprint"]
    want = {k: v for k, v in ((k, LatentCache(copy).read(k, fp)) for k in LatentCache(copy).keys(fp))
            if k.endswith(ANNOTATION_CAPTION)}
    for path in LatentCache(copy).segment_paths(fp):  # drop the caption records: a cache before them
        if all(r["key"].endswith(ANNOTATION_CAPTION) for r in read_segment_header(path).records):
            os.unlink(path)
    cache = LatentCache(copy)
    assert not [k for k in cache.keys(fp) if k.endswith(ANNOTATION_CAPTION)]
    cfg = load_config([f"cache.dir={copy}", f"encoders.dir={annotated.encoders_dir}", "data.base_resolution=256"])
    hook = OnDemandEncoder(cfg, cache)
    failed = next(k for k, r in manifest_rows(copy).items() if r["task"] == "t2i" and r["annotation_status"] != "ok")
    asked = sorted(want)[:2] + [failed + ANNOTATION_CAPTION]
    got = {r["key"]: r for r in hook(asked, 256)}
    assert set(got) == set(sorted(want)[:2])  # the failed annotation has no caption to encode
    for key in sorted(want)[:2]:
        assert got[key]["caption"] == want[key]["caption"]
        assert torch.equal(got[key]["latents"], want[key]["latents"])
        assert torch.equal(got[key]["prompt_embeds"], want[key]["prompt_embeds"])
    assert set(sorted(want)[:2]) <= set(LatentCache(copy).keys(fp))  # published for every producer


# ----------------------------------------------------------------------------- real processes


def ctl(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmdit.launch.cli", "ctl", *args], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_running_service_switched_to_annotation_captions_serves_the_plans_pick_and_replays_it(annotated, tmp_path):
    from paused import paused, run_processes

    from mmdit.consumer.sample_log import read_samples
    from mmdit.utils.processes import ServeProcess

    def args(service, **extra):
        base = {"cache.dir": annotated.cache.dir, "run.dir": service, "seed": SEED, "service.port": 0,
                "service.address_from": service, "service.dp_size": 2, "train.micro_batch_size": 2,
                "service.producers": 2, "service.heartbeat_s": 0.5, "service.consumer_timeout_s": 120,
                "service.join_timeout_s": 120}
        return [f"{k}={v}" for k, v in {**base, **extra}.items()]

    def consume(service_args, run, steps, wait=True, *extra):
        cmd = [sys.executable, "-m", "mmdit.launch.cli", "consume", *service_args, f"run.dir={run}",
               f"train.steps={steps}", "train.log_samples=true", *extra]
        if wait:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def sequence(run):
        return sorted((r["step"], r["dp_rank"], tuple(r["keys"]), r["config_version"]) for r in read_samples(run))

    service, run, steps = tmp_path / "service", tmp_path / "run", 30
    serve = ServeProcess(args(service))
    try:
        proc = consume(args(service), run, steps, False, "service.step_time_s=0.15")
        deadline = time.monotonic() + 300
        while len({r["step"] for r in read_samples(run)}) < 6:
            assert time.monotonic() < deadline and proc.poll() is None, "the consumers never reached step 6"
            time.sleep(0.1)
        with paused(proc.pid, *run_processes(run, "consumer")):  # the switch lands mid-run
            done = ctl("set", str(service), "caption_sources.annotation=1", "--why", "annotation captions")
        assert done.returncode == 0, done.stderr
        reply = json.loads(done.stdout)
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        history = json.loads(ctl("history", str(service)).stdout)
        status = json.loads((service / "service.json").read_text())
    finally:
        serve.stop()
        serve.kill()
    first = reply["from_step"]
    assert 6 < first <= steps and history[1]["caption_sources"] == {"original": 1.0, "annotation": 1.0}
    assert status["selection_counts"]["annotation_captions"]["failed"] > 0  # counted
    rows = manifest_rows(annotated.cache.dir)
    served_rows = read_samples(run)
    assert not any(k.endswith(ANNOTATION_CAPTION) for r in served_rows if r["step"] < first for k in r["keys"])
    after = [(r["batch_id"][0], k) for r in served_rows if r["step"] >= first for k in r["keys"]]
    for epoch, key in after:  # each sample as the plan picks it: the draw, where its annotation parsed
        sample = sample_of(key)
        wanted = rows[sample]["task"] == "t2i" and rows[sample]["annotation_status"] == "ok" \
            and caption_draw(SEED, epoch, sample) < 0.5
        assert key.endswith(ANNOTATION_CAPTION) == wanted, (epoch, key)
    assert any(k.endswith(ANNOTATION_CAPTION) for _, k in after)

    replay = tmp_path / "replay"  # a fresh service and run given the recorded history see the same batches
    replay.mkdir()
    for dp in range(2):
        (replay / f"consume_state_dp{dp}.json").write_text(json.dumps(
            {"step": 0, "data": {"cursor": {"seq": 0, "epoch": 0, "index": 0}, "history": history}}))
    again = ServeProcess(args(tmp_path / "replay-service"))
    try:
        done = consume(args(tmp_path / "replay-service"), replay, steps)
        assert done.returncode == 0, done.stderr[-3000:]
    finally:
        again.stop()
        again.kill()
    assert sequence(replay) == sequence(run)
