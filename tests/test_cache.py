"""LatentCache: round trip, fingerprint isolation, concurrent writers, SIGKILLed writers."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors import safe_open

from mmdit.cache.store import LatentCache


def make_record(key, fp="fpA", bucket=(256, 128), task="t2i", tokens=5, dim=8, cond=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    rec = {
        "key": key, "fingerprint": fp, "bucket": bucket, "task": task, "caption": f"caption of {key} 中文",
        "source": "unit", "latents": torch.randn(16, bucket[0] // 8, bucket[1] // 8, generator=g),
        "prompt_embeds": torch.randn(tokens, dim, generator=g),
    }
    if cond is not None:
        rec["cond_latents"] = torch.randn(16, cond[0] // 8, cond[1] // 8, generator=g)
    return rec


def assert_same(got, want):
    for f in ("key", "fingerprint", "task", "caption", "source"):
        assert got[f] == want[f]
    assert tuple(got["bucket"]) == tuple(want["bucket"])
    assert torch.equal(got["latents"], want["latents"])
    assert torch.equal(got["prompt_embeds"], want["prompt_embeds"])
    assert ("cond_latents" in got) == ("cond_latents" in want)
    if "cond_latents" in want:
        assert torch.equal(got["cond_latents"], want["cond_latents"])


def test_round_trip_variable_lengths_and_cond(tmp_path):
    recs = [
        make_record("a", tokens=3, seed=1),
        make_record("b", tokens=11, task="edit", cond=(128, 256), seed=2),
        make_record("c", tokens=1, task="edit", cond=(256, 256), seed=3),
        make_record("d", bucket=(128, 128), tokens=7, seed=4),
        make_record("e", bucket=(128, 128), tokens=2, task="reconstruction", cond=(128, 128), seed=5),
    ]
    LatentCache(tmp_path).write(recs)
    reader = LatentCache(tmp_path)  # a fresh reader sees only what was published to disk
    for r in recs:
        assert_same(reader.read(r["key"], "fpA"), r)
    assert reader.buckets("fpA") == {(128, 128): ["d", "e"], (256, 128): ["a", "b", "c"]}
    assert reader.keys("fpA", (256, 128)) == ["a", "b", "c"]
    assert sorted(reader.keys("fpA")) == list("abcde")
    assert reader.meta("b", "fpA") == {
        "key": "b", "fingerprint": "fpA", "bucket": (256, 128), "task": "edit", "caption": recs[1]["caption"],
        "source": "unit", "tokens": 11, "cond_shape": [16, 16, 32],
    }
    got = reader.read_many(["e", "a", "c"], "fpA")
    assert [g["key"] for g in got] == ["e", "a", "c"]
    # segments are plain safetensors: any reader can mmap them
    seg = [p for p in reader.segment_paths("fpA") if "256x128" in p][0]
    with safe_open(seg, "pt") as f:
        assert f.get_slice("latents").get_shape() == [3, 16, 32, 16]


def test_read_batch_stacks_pads_and_keeps_key_order(tmp_path):
    cache = LatentCache(tmp_path)
    first = [make_record(f"a{i}", tokens=2 + i, seed=i) for i in range(4)]
    second = [make_record(f"b{i}", tokens=9 - i, seed=10 + i) for i in range(3)]
    cache.write(first)
    cache.write(second)
    cache.write([make_record("other", bucket=(128, 128))])
    keys = ["b1", "a0", "a1", "a3", "b0"]  # out of file order, across segments, with a gap
    batch = cache.read_batch(keys, "fpA")
    want = {r["key"]: r for r in first + second}
    assert batch["keys"] == keys and batch["bucket"] == (256, 128) and "cond_latents" not in batch
    lmax = max(want[k]["prompt_embeds"].shape[0] for k in keys)
    assert batch["latents"].shape == (5, 16, 32, 16) and batch["prompt_embeds"].shape == (5, lmax, 8)
    for b, k in enumerate(keys):
        n = want[k]["prompt_embeds"].shape[0]
        assert torch.equal(batch["latents"][b], want[k]["latents"])
        assert torch.equal(batch["prompt_embeds"][b, :n], want[k]["prompt_embeds"])
        assert batch["prompt_embeds"][b, n:].abs().sum() == 0
        assert batch["prompt_mask"][b].tolist() == [True] * n + [False] * (lmax - n)
        assert batch["caption"][b] == want[k]["caption"]
    with pytest.raises(ValueError, match="buckets"):
        cache.read_batch(["a0", "other"], "fpA")
    edits = [make_record(f"e{i}", task="edit", cond=(128, 256), tokens=3, seed=20 + i) for i in range(3)]
    cache.write(edits + [make_record("e-odd", task="edit", cond=(256, 256), seed=30)])
    batch = cache.read_batch(["e2", "e0"], "fpA")
    assert torch.equal(batch["cond_latents"], torch.stack([edits[2]["cond_latents"], edits[0]["cond_latents"]]))
    assert batch["task"] == ["edit", "edit"]
    with pytest.raises(ValueError, match="cond_latents"):
        cache.read_batch(["e0", "e-odd"], "fpA")
    with pytest.raises(ValueError, match="cond_latents"):
        cache.read_batch(["e0", "a0"], "fpA")


def test_fingerprint_is_part_of_the_key(tmp_path):
    cache = LatentCache(tmp_path)
    cache.write([make_record("a", fp="fpA")])
    assert cache.contains("a", "fpA")
    assert not cache.contains("a", "fpB")
    with pytest.raises(KeyError):
        cache.read("a", "fpB")
    assert cache.keys("fpB") == []
    (tmp_path / "manifest").mkdir()  # other things live in a cache dir too
    assert cache.fingerprints() == ["fpA"]


def test_bad_records_are_rejected_with_the_reason(tmp_path):
    cache = LatentCache(tmp_path)
    bad = make_record("x")
    bad["latents"] = torch.zeros(16, 8, 8)
    with pytest.raises(ValueError, match="latents shape"):
        cache.write([bad])
    with pytest.raises(ValueError, match="task"):
        cache.write([{**make_record("y"), "task": "video"}])
    with pytest.raises(ValueError, match="fingerprint"):
        cache.write([make_record("z", fp="../evil")])
    assert cache.fingerprints() == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_finiteness_check_is_exact(dtype):
    from mmdit.cache.segment import all_finite

    big = torch.finfo(dtype).max
    assert all_finite(torch.randn(64, 8).to(dtype)) and all_finite(torch.empty(0, 8, dtype=dtype))
    assert all_finite(torch.full((4,), big, dtype=dtype))  # finite values whose sum overflows
    assert all_finite(torch.tensor([big, -big, big, big], dtype=dtype))
    for bad in (float("nan"), float("inf"), -float("inf")):
        for where in (0, 37, 511):
            t = torch.randn(512).to(dtype)
            t[where] = bad
            assert not all_finite(t), (bad, where)
            assert not all_finite(torch.cat([torch.full((4,), big, dtype=dtype), t]))


def test_reader_sees_later_publications_on_miss(tmp_path):
    reader = LatentCache(tmp_path)
    assert not reader.contains("late", "fpA")
    LatentCache(tmp_path).write([make_record("late")])
    assert reader.contains("late", "fpA")
    assert reader.keys("fpA") == ["late"]


WRITER = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    from test_cache import make_record
    from mmdit.cache.store import LatentCache
    cache = LatentCache(sys.argv[1])
    name, n, per, big = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    for i in range(n):
        bucket = (512, 512) if big else ((256, 128) if i % 2 else (128, 128))
        cache.write([make_record(f"{{name}}-{{i}}-{{j}}", bucket=bucket, tokens=1 + j, seed=i * 100 + j,
                                 dim=4096 if big else 8) for j in range(per)])
        print(i, flush=True)
    """
).format(tests=os.path.dirname(__file__))


def spawn_writer(cache_dir, name, n, per, big=False):
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(cache_dir), name, str(n), str(per), str(int(big))],
        stdout=subprocess.PIPE, text=True,
    )


@pytest.mark.slow
def test_concurrent_writer_processes(tmp_path):
    procs = [spawn_writer(tmp_path, name, 20, 3) for name in ("p0", "p1")]
    reader = LatentCache(tmp_path)
    seen_during = 0
    while any(p.poll() is None for p in procs):  # read while they write: never a torn record
        for k in reader.keys("fpA"):
            assert reader.read(k, "fpA")["key"] == k
            seen_during += 1
        time.sleep(0.01)
    assert all(p.wait() == 0 for p in procs)
    keys = reader.keys("fpA")
    assert sorted(keys) == sorted(f"{n}-{i}-{j}" for n in ("p0", "p1") for i in range(20) for j in range(3))
    for name in ("p0", "p1"):
        for i in (0, 7, 19):
            want = make_record(f"{name}-{i}-2", bucket=(256, 128) if i % 2 else (128, 128), tokens=3, seed=i * 100 + 2)
            assert_same(reader.read(want["key"], "fpA"), want)
    assert not list(tmp_path.rglob(".tmp-*"))


@pytest.mark.slow
def test_sigkilled_writer_leaves_no_torn_record(tmp_path):
    proc = spawn_writer(tmp_path, "victim", 10_000, 4, big=True)
    # let it publish a few segments, then kill it mid-stream (most of its time is spent writing)
    for _ in range(3):
        proc.stdout.readline()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # a torn tmp file as a crash at any byte would leave one; readers must ignore it
    seg_dir = tmp_path / "fpA" / "512x512"
    torn = seg_dir / ".tmp-deadhost-999999-abcdef00-seg-x-000001.safetensors"
    torn.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"trunc")
    reader = LatentCache(tmp_path)
    keys = reader.keys("fpA")
    assert len(keys) >= 12 and len(keys) % 4 == 0  # whole segments only
    for k in keys:
        rec = reader.read(k, "fpA")
        i, j = (int(x) for x in k.split("-")[1:])
        assert torch.equal(rec["prompt_embeds"], make_record(k, bucket=(512, 512), tokens=1 + j, seed=i * 100 + j, dim=4096)["prompt_embeds"])
    # the dead writer's tmp files (if any) and the old torn one are cleaned, published data kept
    os.utime(torn, (time.time() - 7200, time.time() - 7200))
    reader.remove_stale_tmp(max_age_s=3600)
    assert not list(tmp_path.rglob(".tmp-*"))
    assert LatentCache(tmp_path).keys("fpA") == keys


def test_threads_read_correct_bytes_while_descriptors_are_evicted(tmp_path):
    """A descriptor evicted from the pool while another thread reads through it must not be
    closed under that read (its number could be reused by the next open: wrong bytes)."""
    import threading

    expected = {}
    for writer in range(12):  # one segment per writer
        cache = LatentCache(tmp_path)
        records = [make_record(f"w{writer}-{i}", seed=writer * 10 + i) for i in range(4)]
        cache.write(records)
        cache.close()
        expected.update({r["key"]: r for r in records})
    reader = LatentCache(tmp_path)
    reader.MAX_OPEN_FILES = 2
    keys = sorted(expected)
    errors = []

    def work(seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(300):
            writer = int(torch.randint(12, (1,), generator=g))
            batch_keys = [f"w{writer}-{i}" for i in range(4)]
            try:
                batch = reader.read_batch(batch_keys, "fpA")
                for j, k in enumerate(batch_keys):
                    if not torch.equal(batch["latents"][j], expected[k]["latents"]):
                        errors.append(f"wrong latents for {k}")
            except OSError as e:
                errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(keys) == 48 and not errors, errors[:5]
