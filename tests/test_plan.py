"""The batch plan (pure) and the coordinator's lease/ack state machine (in process, no RPC)."""

from collections import Counter

import pytest

from mmdit.config.service import ServiceConfig
from mmdit.dataservice.coordinator import Coordinator
from mmdit.dataservice.plan import (
    Cursor,
    DataVersion,
    PlanError,
    Planner,
    PlanSpec,
    SampleRef,
    Selection,
    plan_epoch,
    shard_bounds,
)

BUCKETS = [(256, 256), (256, 512), (512, 256)]


def refs(n=103, sources=("a", "b")):
    """Samples over 3 buckets, t2i and edit (with a condition bucket), two sources."""
    out = []
    for i in range(n):
        edit = i % 4 == 0
        out.append(SampleRef(f"k{i:04d}", BUCKETS[i % 3], "edit" if edit else "t2i", sources[i % len(sources)],
                             (256, 256) if edit else None))
    return out


V0 = [DataVersion(0, 0, 0, task_weights={"t2i": 1.0, "edit": 1.0}, source_weights={})]
SEL = Selection(refs())


def keys_of(batches):
    return [k for b in batches for k in b.keys]


def test_every_key_once_per_epoch_each_batch_one_group():
    spec = PlanSpec(seed=3, global_batch_size=8, min_batch_size=2)
    for epoch in range(3):
        batches = plan_epoch(spec, epoch, SEL, V0)
        assert sorted(keys_of(batches)) == sorted(SEL.keys())  # exactly once: no loss, no duplicate
        by_key = {r.key: r for r in SEL.refs}
        for b in batches:
            assert {by_key[k].group for k in b.keys} == {(b.stage, b.bucket, b.task, b.cond_bucket or (0, 0))}
            assert spec.min_batch_size <= len(b.keys) < spec.global_batch_size + spec.min_batch_size
        assert [b.index for b in batches] == list(range(len(batches)))


def test_deterministic_and_epochs_differ():
    spec = PlanSpec(seed=3, global_batch_size=8, min_batch_size=2)
    a, b = plan_epoch(spec, 0, SEL, V0), plan_epoch(spec, 0, Selection(reversed(SEL.refs)), V0)
    assert a == b  # the input order of the selection does not matter
    assert keys_of(plan_epoch(spec, 1, SEL, V0)) != keys_of(a)
    assert keys_of(plan_epoch(PlanSpec(4, 8, 2), 0, SEL, V0)) != keys_of(a)


def test_dp_split_is_even_and_covers_the_batch():
    for n in range(1, 20):
        for dp in range(1, 6):
            bounds = [shard_bounds(n, r, dp) for r in range(dp)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(bounds[r][1] == bounds[r + 1][0] for r in range(dp - 1))
            sizes = [hi - lo for lo, hi in bounds]
            assert max(sizes) - min(sizes) <= 1
    batch = plan_epoch(PlanSpec(0, 8, 2), 0, SEL, V0)[0]
    assert sum((batch.shard(r, 2) for r in range(2)), ()) == batch.keys


def test_remainders_merge_or_drop():
    # one group of 10: gbs 4, min 3 -> 4, 6 (the remainder 2 < 3 joins the last batch)
    one = Selection([SampleRef(f"x{i}", (256, 256), "t2i") for i in range(10)])
    assert [len(b.keys) for b in plan_epoch(PlanSpec(0, 4, 3), 0, one, V0)] == [4, 6]
    assert [len(b.keys) for b in plan_epoch(PlanSpec(0, 4, 2), 0, one, V0)] == [4, 4, 2]
    dropped = plan_epoch(PlanSpec(0, 4, 2, drop_last=True), 0, one, V0)
    assert [len(b.keys) for b in dropped] == [4, 4]
    # a group smaller than min_batch_size is padded with its own samples: every DP rank gets one,
    # and every selected sample is served in every epoch
    tiny = Selection([*one.refs, SampleRef("lonely", (512, 512), "t2i")])
    planner = Planner(PlanSpec(0, 4, 2), tiny, V0)
    planned = [planner.next()[1] for _ in range(4)]
    assert ("lonely", "lonely") in [b.keys for b in planned] and planner._epoch.next() is None
    assert planner._epoch.skipped == [] and planner._epoch.padded == 1
    # with drop_last a group smaller than a batch is left out (reported as skipped)
    strict = Planner(PlanSpec(0, 4, 2, drop_last=True), tiny, V0)
    assert "lonely" not in keys_of([strict.next()[1] for _ in range(2)]) and strict._epoch.next() is None
    assert "lonely" in strict._epoch.skipped  # (beside the remainders drop_last drops)


@pytest.mark.parametrize("dp", [1, 2, 3, 4, 8])
def test_every_selected_sample_is_served_each_epoch_at_any_dp_size(dp):
    """Groups of every size (1 sample up), any DP size: each key at least once per epoch, only
    tiny groups repeat, and every batch splits into non-empty DP shares."""
    sizes = [1, 2, 3, 5, 7, 8, 13]
    sel = Selection([SampleRef(f"g{g}-{i}", (256, 256 + 16 * g), "t2i") for g, n in enumerate(sizes) for i in range(n)])
    for mbs in (1, 2, 3):
        spec = PlanSpec(seed=dp, global_batch_size=dp * mbs, min_batch_size=dp)
        for epoch in range(2):
            batches = plan_epoch(spec, epoch, sel, V0)
            served = Counter(keys_of(batches))
            assert set(served) == sel.keys()
            assert all(c == 1 for k, c in served.items() if sizes[int(k[1:].split("-")[0])] >= dp)
            assert all(len(b.keys) >= dp for b in batches)


def test_weights_order_the_epoch_without_changing_its_content():
    sel = Selection(refs(400, sources=("a", "b")))
    heavy = [DataVersion(0, 0, 0, task_weights={}, source_weights={"a": 20.0, "b": 1.0})]
    batches = plan_epoch(PlanSpec(1, 4, 1), 0, sel, heavy)
    assert sorted(keys_of(batches)) == sorted(sel.keys())
    source = {r.key: r.source for r in sel.refs}
    first_half = Counter(source[k] for k in keys_of(batches[:len(batches) // 2]))
    assert first_half["a"] > 3 * first_half["b"]  # weight 20:1 puts source a first
    tasks = [DataVersion(0, 0, 0, task_weights={"edit": 50.0, "t2i": 1.0}, source_weights={})]
    first = plan_epoch(PlanSpec(1, 4, 1), 0, sel, tasks)[:10]
    assert Counter(b.task for b in first)["edit"] >= 8


def test_zero_weight_leaves_samples_out():
    no_edit = [DataVersion(0, 0, 0, task_weights={"edit": 0.0}, source_weights={})]
    batches = plan_epoch(PlanSpec(0, 8, 2), 0, SEL, no_edit)
    assert {b.task for b in batches} == {"t2i"}
    assert sorted(keys_of(batches)) == sorted(r.key for r in SEL.refs if r.task == "t2i")


def test_mixture_change_mid_epoch_keeps_prefix_and_coverage():
    spec = PlanSpec(5, 8, 2)
    base = plan_epoch(spec, 0, SEL, V0)
    swapped = V0 + [DataVersion(1, 0, 4, task_weights={"edit": 30.0}, source_weights={})]
    changed = plan_epoch(spec, 0, SEL, swapped)
    assert changed[:4] == base[:4]  # batches before the swap are untouched
    assert all(b.config_version == 1 for b in changed[4:])
    assert sorted(keys_of(changed)) == sorted(SEL.keys())  # still exactly once
    assert keys_of(changed) != keys_of(base)
    # a version from an earlier epoch is in force from the start of later ones
    later = plan_epoch(spec, 1, SEL, swapped)
    assert all(b.config_version == 1 for b in later)


def test_planner_resumes_from_any_cursor():
    spec = PlanSpec(7, 8, 2)
    full = Planner(spec, SEL, V0)
    sequence = [full.next() for _ in range(40)]  # crosses into epoch 1 (~15 batches per epoch)
    assert {b.epoch for _, b in sequence} == {0, 1, 2}
    for stop in (0, 5, 14, 15, 16, 33):
        seq, batch = sequence[stop - 1] if stop else (-1, None)
        cursor = Cursor(stop, batch.epoch, batch.index + 1) if batch else Cursor()
        resumed = Planner(spec, SEL, V0, cursor)
        assert [resumed.next() for _ in range(40 - stop)] == sequence[stop:]


def test_bad_inputs_are_clear_errors():
    with pytest.raises(PlanError, match="empty"):
        Selection([])
    with pytest.raises(PlanError, match="twice"):
        Selection([SampleRef("a", (256, 256), "t2i"), SampleRef("a", (256, 256), "t2i")])
    with pytest.raises(PlanError, match="start at"):
        plan_epoch(PlanSpec(0, 4), 0, SEL, [DataVersion(0, 0, 3)])
    with pytest.raises(PlanError, match=">= 0"):
        plan_epoch(PlanSpec(0, 4), 0, SEL, [DataVersion(0, 0, 0, task_weights={"t2i": -1.0})])
    with pytest.raises(PlanError, match="past the end"):
        Planner(PlanSpec(0, 8, 2), SEL, V0, Cursor(999, 0, 999))
    with pytest.raises(PlanError, match="plans no batch"):
        Planner(PlanSpec(0, 8, 2), SEL, [DataVersion(0, 0, 0, task_weights={"t2i": 0.0, "edit": 0.0})]).next()


# ----------------------------------------------------------------------------- coordinator (no RPC)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def coordinator(**svc):
    clock = Clock()
    svc = ServiceConfig(plan_ahead=8, heartbeat_s=1.0, lease_timeout_s=5.0, **svc)
    c = Coordinator(SEL, svc, seed=1, dp_size=2, micro_batch_size=2, history=list(V0), clock=clock)
    for dp_rank in range(2):
        c.register_consumer(f"t{dp_rank}", 10 + dp_rank, dp_rank, 2, 2, None, None)
    return c, clock


def test_coordinator_leases_acks_and_revokes():
    c, clock = coordinator()
    a = c.lease("pa", 1, 2, []).wait()
    assert [s for s, _ in a.new] == [0] and a.keep == [0]
    b = c.lease("pb", 2, 2, []).wait()
    assert [s for s, _ in b.new] == [1]  # consecutive batches spread over producers
    loc = c.locate("t0", c.gen, 0).wait()
    assert loc.status == "ok" and loc.owner == "pa" and loc.uid == (c.gen, 0)
    a2 = c.lease("pa", 1, 2, [(c.gen, 0)]).wait()
    assert [s for s, _ in a2.new] == [2]
    parked = c.lease("pa", 1, 2, [(c.gen, 0), (c.gen, 2)])  # full: parks until something changes
    assert not parked.done()
    assert c.ack("t0", 0, c.gen, [0]) == 1 and not parked.done()  # one DP rank of two
    assert c.ack("t1", 1, c.gen, [0]) == 1
    reply = parked.wait()  # batch 0 done everywhere: pa drops it and gets batch 3
    assert reply.keep == [2, 3] and [s for s, _ in reply.new] == [3]
    assert c.status()["base"] == 1
    # pb goes silent while pa keeps polling: after lease_timeout_s, pb's batch 1 goes back to the
    # queue; it is older than batches already leased (a gap), so pa gets it at once, beyond its
    # prepare_depth of 2 (the liveness rule)
    polling = c.lease("pa", 1, 2, [(c.gen, 2), (c.gen, 3)])
    clock.now += 6.0
    c.reap()
    reply = polling.wait()
    assert reply.keep == [1, 2, 3] and [s for s, _ in reply.new] == [1]
    assert not c.status()["producers"]["pb"]["alive"]
    assert c.status()["counters"]["revoked"] == 1
    assert c.locate("t0", c.gen, 1).wait().owner == "pa"
    # capacity still bounds new work: pa (3 held, depth 2) gets batch 4 only once two are done
    full = c.lease("pa", 1, 2, [(c.gen, 1), (c.gen, 2), (c.gen, 3)])
    c.ack("t0", 0, c.gen, [1])
    c.ack("t1", 1, c.gen, [1])
    reply = full.wait()
    assert reply.keep == [2, 3] and reply.new == []  # drop 1; still full
    full = c.lease("pa", 1, 2, [(c.gen, 2), (c.gen, 3)])
    assert not full.done()
    c.ack("t0", 0, c.gen, [2])
    c.ack("t1", 1, c.gen, [2])
    reply = full.wait()
    assert reply.keep == [3, 4] and [s for s, _ in reply.new] == [4]


def test_coordinator_reports_waiting_and_resets():
    c, clock = coordinator()
    waiting = c.locate("t0", c.gen, 0)  # no producer yet
    assert not waiting.done()
    clock.now += 1.5
    c.reap()
    assert waiting.wait().status == "waiting" and waiting.wait().producers_alive == 0
    c.lease("pa", 1, 4, []).wait()
    gen = c.gen
    # a rank that joins at a later position of the same plan implies its acks before it
    assert c.register_consumer("t0b", 5, 0, 2, 2, Cursor(2, 0, 2).to_dict(), None).gen == gen
    c.ack("t1", 1, gen, [0, 1])
    assert c.status()["base"] == 2
    # a cursor behind what is done everywhere (a restart from an older checkpoint) starts a new
    # generation there; the other rank's next call is `stale`, and it registers again
    reply = c.register_consumer("t0c", 6, 0, 2, 2, Cursor(1, 0, 1).to_dict(), None)
    assert reply.gen == gen + 1 and reply.cursor["seq"] == 1
    assert c.locate("t1", gen, 3).wait().status == "stale"
    assert c.lease("pa", 1, 4, [(gen, 0)]).wait().keep == [1]  # old holdings dropped, new lease
    assert c.register_consumer("t1b", 7, 1, 2, 2, Cursor(3, 0, 3).to_dict(), None).gen == gen + 1
    assert c.ack("t0", 0, gen + 1, [1]) == 0  # an earlier incarnation of rank 0: ignored
    # a different DP layout is a new plan
    assert c.register_consumer("t2", 8, 0, 3, 2, Cursor(3, 0, 3).to_dict(), None).gen == gen + 2


def test_coordinator_hot_swap_applies_from_the_first_batch_no_producer_holds():
    from mmdit.dataservice.data_config import ChangeError

    c, _ = coordinator()
    c.lease("pa", 1, 3, []).wait()
    c.lease("pa", 1, 3, [(c.gen, 0)]).wait()
    assert c.leased_to == 1
    before = {s: e.batch for s, e in c.entries.items()}
    reply = c.update_data({"task_weights.edit": 9.0}, why="more edits")
    assert reply["config_version"] == 1 and reply["from_step"] == 3 and reply["changes"] == {"task_weights.edit": 9.0}
    assert c.entries[0].batch == before[0] and c.entries[1].batch == before[1]  # leased: unchanged
    assert all(e.batch.config_version == 1 for s, e in c.entries.items() if s >= 2)
    edits = sum(e.batch.task == "edit" for s, e in c.entries.items() if s >= 2)
    assert edits > sum(b.task == "edit" for s, b in before.items() if s >= 2)
    v1 = c.history[-1]
    assert (v1.why, v1.from_step, v1.task_weights["edit"]) == ("more edits", 3, 9.0)
    # the same history replayed from scratch plans the same batches
    fresh = Planner(c.spec, SEL, list(c.history))
    assert [fresh.next()[1] for _ in range(c.planner.seq)] == [c.entries[s].batch for s in range(c.planner.seq)]
    # bad changes are rejected with the reason, and change nothing
    for bad, words in [({"task_weights.t2i": -1}, ">= 0"), ({"task_weights.t2i": "lots"}, "must be a number"),
                       ({"nonsense": 1}, "unknown key"), ({"filters.min_blur": True}, "must be a number"),
                       ({"filters.min_side": 1.5}, "integer"), ({"base_resolution": 640}, "cached stages"),
                       ({"task_weights.t2i": 0.0, "task_weights.edit": 0.0}, "every task weight"),
                       ({}, "no change"), ({"filters.min_aspect": 5.0}, "min_aspect")]:
        with pytest.raises(ChangeError, match=words):
            c.update_data(bad)
    assert c.history[-1] == v1 and len(c.history) == 2
    # a checkpoint whose history predates the swap merges with it: the swap survives
    merged = c._merge_history([V0[0]], Cursor())
    assert [v.version for v in merged] == [0, 1]


# ----------------------------------------------------------------------------- the selection


def test_selection_from_cache_headers_and_manifest_thresholds(tmp_path):
    import torch

    from mmdit.cache.manifest import ManifestWriter
    from mmdit.cache.store import LatentCache
    from mmdit.config.data import FilterConfig
    from mmdit.dataservice.selection import build_selection, resolve_fingerprint

    g = torch.Generator().manual_seed(0)
    records = []
    for i in range(6):
        rec = {"key": f"m{i}", "fingerprint": "fpm", "bucket": (64, 128), "task": "edit" if i < 2 else "t2i",
               "caption": "c", "source": f"src{i % 2}", "latents": torch.randn(16, 8, 16, generator=g),
               "prompt_embeds": torch.randn(4, 8, generator=g)}
        if i < 2:
            rec["cond_latents"] = torch.randn(16, 4, 4, generator=g)
        records.append(rec)
    LatentCache(tmp_path).write(records)
    cache = LatentCache(tmp_path)
    assert resolve_fingerprint(cache, "") == "fpm"
    sel, counts = build_selection(cache, {0: "fpm"}, FilterConfig(min_blur=10.0))
    assert counts == {"cached": 6, "damaged": 0, "selected": 6, "missing": 0}  # no manifest: all cached
    by_key = {r.key: r for r in sel.refs}
    assert by_key["m0"] == SampleRef("m0", (64, 128), "edit", "src0", (32, 32))
    assert by_key["m3"] == SampleRef("m3", (64, 128), "t2i", "src1", None)
    with ManifestWriter(tmp_path / "manifest") as manifest:
        for i in range(7):  # m6: in the manifest, not in the cache
            manifest.add({"key": f"m{i}", "status": "ok", "width": 128, "height": 64, "caption_chars": 10,
                          "blur": 5.0 if i in (1, 4) else 50.0, "brightness": 0.5, "contrast": 0.5, "entropy": 5.0,
                          "phash": i, "task": "t2i", "source": "src0", "bucket_h": 64, "bucket_w": 128})
    sel, counts = build_selection(cache, {0: "fpm"}, FilterConfig(min_blur=10.0))
    assert counts == {"cached": 6, "selected": 4, "missing": 1, "damaged": 0}
    assert sel.keys() == {f"m{i}" for i in range(7)}  # the universe: thresholds are a version's business
    strict = DataVersion(0, 0, 0, filters={"min_blur": 10.0})
    assert {r.key for r, w in zip(sel.refs, sel.weights(strict)) if w} == {"m0", "m2", "m3", "m5"}
    loose = DataVersion(0, 0, 0, filters={"min_blur": 0.0}, encode_missing=True)
    assert {r.key for r, w in zip(sel.refs, sel.weights(loose)) if w} == {f"m{i}" for i in range(7)}
