"""`mmdit produce` end to end on real shards with the tiny encoders: bad input, exact latents,
the incremental rerun, two concurrent producer processes, and a SIGKILLed producer."""

import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
from badfiles import bomb_png, corrupt_jpeg, encode, good_t2i, shapes, write_shard
from PIL import Image

from mmdit.cache.buckets import assign_bucket, bucket_set
from mmdit.cache.manifest import read_manifest, select
from mmdit.cache.segment import stage_fingerprint
from mmdit.cache.store import LatentCache
from mmdit.config.data import DataConfig
from mmdit.config.produce import CacheConfig, EncodersConfig
from mmdit.producer.encoders import Encoders, preprocess_image
from mmdit.producer.produce import produce, to_pil

BASE = 64  # a small bucket set keeps the tiny VAE fast on CPU; the code path is the same at 1328


@pytest.fixture(scope="module")
def encoders(tiny_encoders_dir):
    return Encoders.load(EncodersConfig(dir=tiny_encoders_dir))


def edit_sample(i):
    return f"edit{i:03d}", {
        "png": encode(shapes(20 + i, 96, 64)), "src.png": encode(shapes(30 + i, 64, 80)),
        "txt": f"make the ellipses number {i} blue".encode(), "json": b'{"task": "edit", "source": "synth"}',
    }


def grey16(seed):
    a = np.asarray(shapes(seed, 80, 64).convert("L"), dtype=np.uint16) * 257
    return encode(Image.fromarray(a))


def alpha(seed):
    img = shapes(seed, 64, 96).convert("RGBA")
    img.putalpha(Image.fromarray(np.where(np.arange(64)[None, :] < 32, 0, 255).repeat(96, 0).astype(np.uint8)))
    return encode(img)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    sizes = [(96, 64), (64, 96), (64, 64), (128, 64), (80, 80), (100, 70)]
    good = [good_t2i(i, w, h) for i, (w, h) in enumerate(sizes)]
    write_shard(d / "web-000000.tar", [
        good[0], good[1],
        ("corrupt", {"jpg": corrupt_jpeg(), "txt": b"corrupt jpeg"}),
        ("zero", {"png": b"", "txt": b"zero-byte member"}),
        ("bomb", {"png": bomb_png(), "txt": b"50000x50000"}),
        ("latin1", {"png": encode(shapes(50)), "txt": b"caf\xe9 cr\xe8me"}),
        ("nocap", {"png": encode(shapes(51))}),
        good[2],
        ("cmyk", {"jpg": encode(shapes(52, 96, 64).convert("CMYK"), "JPEG", quality=95), "txt": b"a cmyk jpeg"}),
        ("grey16", {"png": grey16(53), "txt": b"a 16-bit grey png"}),
        ("palette", {"png": encode(shapes(54, 64, 64).quantize(32)), "txt": b"a palette png"}),
        ("alpha", {"png": alpha(55), "txt": b"an rgba png"}),
        ("dup", {"png": good[0][1]["png"], "txt": b"the same picture again"}),
        ("small", {"png": encode(shapes(56, 40, 40)), "txt": b"too small"}),
        good[3], good[4], good[5],
    ])
    write_shard(d / "edit-000000.tar", [edit_sample(i) for i in range(3)])
    cut = good_t2i(98, 256, 256)
    write_shard(d / "broken-000000.tar", [good_t2i(97), cut])
    data = (d / "broken-000000.tar").read_bytes()
    (d / "broken-000000.tar").write_bytes(data[: data.index(b"good0098.png") + 512 + len(cut[1]["png"]) // 2])
    return d


EXPECTED_ERRORS = {
    "corrupt_image": 1, "empty_member": 1, "decompression_bomb": 1, "caption_not_utf8": 1,
    "caption_missing": 1, "truncated_tar": 1,
}


def direct_vae_latents(vae, img, bucket):
    """What the cache must hold: AutoencoderKLQwenImage on the resized image, normalized."""
    x = preprocess_image(img, bucket)[None, :, None]
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()[:, :, 0]
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)
    return ((z - mean) / std)[0]


def test_produce_bad_input_exact_latents_and_incremental_rerun(tmp_path, shards, encoders, tiny_encoders_dir):
    from diffusers import AutoencoderKLQwenImage

    data = DataConfig(shards=[str(shards / "*.tar")], base_resolution=BASE, encode_batch_size=4, decode_workers=2)
    cache_cfg = CacheConfig(dir=str(tmp_path / "cache"))
    report = produce(data, cache_cfg, encoders, progress=False)
    assert report["errors"] == EXPECTED_ERRORS
    assert report["rejected"] == {"duplicate": 1, "min_side": 1}
    assert report["converted"] == {"16bit": 1, "alpha": 1, "cmyk": 1, "palette": 1}
    assert report["accepted"] == 6 + 4 + 3 + 1 and report["encoded"] == 14 and report["cache_hits"] == 0
    assert report["seen"] == 14 + 2 + 6 and report["tasks"] == {"edit": 3, "t2i": 11}
    assert json.loads((tmp_path / "cache" / "report.json").read_text()) == report

    fp = stage_fingerprint(encoders.fingerprint, BASE)
    assert report["fingerprint"] == fp
    cache = LatentCache(tmp_path / "cache")
    keys = cache.keys(fp)
    assert len(keys) == 14 and "broken-000000/good0097" in keys and "web-000000/cmyk" in keys
    manifest = read_manifest(tmp_path / "cache" / "manifest")
    assert manifest.num_rows == 22
    assert sorted(select(manifest, data.filters)["key"].to_pylist()) == sorted(keys)

    # latents equal a direct AutoencoderKLQwenImage encode of the same resized image
    vae = AutoencoderKLQwenImage.from_pretrained(tiny_encoders_dir, subfolder="vae").eval()
    for key, (w, h) in [("web-000000/good0003", (128, 64)), ("web-000000/good0005", (100, 70))]:
        rec = cache.read(key, fp)
        bucket = assign_bucket(w, h, bucket_set(BASE))
        assert rec["bucket"] == bucket and rec["task"] == "t2i" and rec["source"] == "web"
        img = Image.open(io.BytesIO(good_t2i(int(key[-1]), w, h)[1]["png"])).convert("RGB")
        torch.testing.assert_close(rec["latents"], direct_vae_latents(vae, img, bucket), rtol=1e-4, atol=1e-4)
        # prompt features are stored in bf16 (cache.feature_dtype): the direct forward, rounded once
        assert rec["prompt_embeds"].dtype == torch.bfloat16
        torch.testing.assert_close(rec["prompt_embeds"], encoders.encode_prompts([rec["caption"]])[0].bfloat16())
    # edit: target -> latents, source -> cond_latents at the source's own bucket, instruction with the source image
    rec = cache.read("edit-000000/edit001", fp)
    src = shapes(31, 64, 80)
    src_bucket = assign_bucket(64, 80, bucket_set(BASE))
    assert rec["task"] == "edit" and rec["source"] == "synth" and rec["cond_latents"].shape[1:] == (src_bucket[0] // 8, src_bucket[1] // 8)
    torch.testing.assert_close(rec["latents"], direct_vae_latents(vae, shapes(21, 96, 64), rec["bucket"]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rec["cond_latents"], direct_vae_latents(vae, src, src_bucket), rtol=1e-4, atol=1e-4)
    want = encoders.encode_edit_prompts([rec["caption"]], [to_pil(preprocess_image(src, src_bucket))])[0]
    torch.testing.assert_close(rec["prompt_embeds"], want.bfloat16())

    # the incremental second run encodes nothing and counts the same
    again = produce(data, cache_cfg, encoders, progress=False)
    assert again["encoded"] == 0 and again["cache_hits"] == 14
    for field in ("seen", "accepted", "rejected", "errors"):
        assert again[field] == report[field]
    assert LatentCache(tmp_path / "cache").keys(fp) == keys
    edit_row = read_manifest(tmp_path / "cache" / "manifest").filter(pc.equal(pc.field("key"), "edit-000000/edit001"))
    assert (edit_row["src_bucket_h"][0].as_py(), edit_row["src_bucket_w"][0].as_py()) == src_bucket

    # another curriculum stage (bucket set) is a miss, never a stale hit
    stage2 = produce(DataConfig(shards=data.shards, base_resolution=96, encode_batch_size=8), cache_cfg, encoders, progress=False)
    assert stage2["encoded"] == 14 and stage2["cache_hits"] == 0 and stage2["fingerprint"] != fp
    for rec in LatentCache(tmp_path / "cache").read_many(keys, stage2["fingerprint"]):
        assert rec["bucket"] in bucket_set(96) and rec["latents"].shape[1:] == (rec["bucket"][0] // 8, rec["bucket"][1] // 8)


def cli(*args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "mmdit.launch.cli", "produce", *args], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


@pytest.mark.slow
def test_two_producer_processes_write_one_cache(tmp_path, shards, encoders, tiny_encoders_dir):
    cache_dir = tmp_path / "cache"
    common = [f"cache.dir={cache_dir}", f"encoders.dir={tiny_encoders_dir}", f"data.base_resolution={BASE}",
              "data.encode_batch_size=2"]
    # overlapping shard sets: both encode the edit shard at the same time
    a = cli(f"data.shards={shards}/web-000000.tar", f"data.shards={shards}/edit-000000.tar", *common)
    b = cli(f"data.shards={shards}/edit-000000.tar", f"data.shards={shards}/broken-000000.tar", *common)
    outs = [p.communicate(timeout=240) for p in (a, b)]
    assert a.returncode == 0 and b.returncode == 0, outs
    ra, rb = (json.loads(out[out.index("{"):]) for out, _ in outs)
    assert ra["accepted"] == 13 and rb["accepted"] == 4
    assert ra["encoded"] + ra["cache_hits"] == 13 and rb["encoded"] + rb["cache_hits"] == 4
    assert ra["encoded"] + rb["encoded"] == 14  # the shared shard was claimed by one: nothing encoded twice
    cache = LatentCache(cache_dir)
    fp = stage_fingerprint(encoders.fingerprint, BASE)
    keys = cache.keys(fp)
    assert len(keys) == len(set(keys)) == 14
    for k in keys:
        assert cache.read(k, fp)["latents"].isfinite().all()
    assert not list(cache_dir.rglob(".tmp-*"))
    assert len(read_manifest(cache_dir / "manifest")) == 22  # both writers' parts, one table
    rerun = produce(DataConfig(shards=[str(shards / "*.tar")], base_resolution=BASE), CacheConfig(dir=str(cache_dir)),
                    encoders, progress=False)
    assert rerun["encoded"] == 0 and rerun["cache_hits"] == 14


@pytest.mark.slow
def test_sigkilled_producer_leaves_a_clean_cache_and_the_rerun_finishes(tmp_path, encoders, tiny_encoders_dir):
    d = tmp_path / "shards"
    d.mkdir()
    n = 48  # enough that a test descheduled for a few seconds still kills it mid-run
    write_shard(d / "many-000000.tar", [good_t2i(i, 256 + 16 * (i % 3), 256) for i in range(n)])
    cache_dir = tmp_path / "cache"
    args = [f"data.shards={d}/many-000000.tar", f"cache.dir={cache_dir}", f"encoders.dir={tiny_encoders_dir}",
            "data.base_resolution=256", "data.encode_batch_size=1", "cache.segment_records=1"]
    proc = cli(*args)
    deadline = time.monotonic() + 120
    while not list(cache_dir.glob("*/*/seg-*.safetensors")):  # kill it as soon as it has published
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    cache = LatentCache(cache_dir)
    fp = stage_fingerprint(encoders.fingerprint, 256)
    done = cache.keys(fp)
    assert 1 <= len(done) < n
    for k in done:
        rec = cache.read(k, fp)
        assert rec["latents"].shape == (16, rec["bucket"][0] // 8, rec["bucket"][1] // 8)
        assert rec["latents"].isfinite().all() and rec["prompt_embeds"].shape[0] > 0
    report = produce(DataConfig(shards=[str(d / "many-000000.tar")], base_resolution=256, encode_batch_size=4),
                     CacheConfig(dir=str(cache_dir)), encoders, progress=False)
    assert report["cache_hits"] == len(done) and report["encoded"] == n - len(done)
    assert sorted(LatentCache(cache_dir).keys(fp)) == sorted(f"many-000000/good{i:04d}" for i in range(n))
    assert not list(cache_dir.rglob(".tmp-*"))  # the dead writer's tmp files were cleaned


def test_bare_shard_patterns_on_the_command_line():
    from mmdit.config.loader import load_config
    from mmdit.launch.args import parse
    from mmdit.launch.produce import COMMAND

    def overrides(*argv):
        return parse(COMMAND, list(argv)).overrides

    # braces and globs pass through Hydra untouched; a shell-expanded list adds up
    cfg = load_config(overrides("data.shards=/d/web-{000000..000009}.tar", "data.shards=/e/*.tar", "seed=3"))
    assert cfg.data.shards == ["/d/web-{000000..000009}.tar", "/e/*.tar"] and cfg.seed == 3
    assert load_config(overrides("data.shards=[a.tar,b.tar]")).data.shards == ["a.tar", "b.tar"]


@pytest.mark.slow
def test_reconstruction_records_condition_on_the_image_itself(tmp_path, shards, encoders):
    from mmdit.cache.segment import RECONSTRUCTION
    from mmdit.producer.produce import to_pil

    data = DataConfig(shards=[str(shards / "web-000000.tar")], base_resolution=BASE, reconstruction=True)
    report = produce(data, CacheConfig(dir=str(tmp_path / "cache")), encoders, progress=False)
    fp = stage_fingerprint(encoders.fingerprint, BASE)
    cache = LatentCache(tmp_path / "cache")
    keys = cache.keys(fp)
    samples = [k for k in keys if not k.endswith(RECONSTRUCTION)]
    assert sorted(k for k in keys if k.endswith(RECONSTRUCTION)) == sorted(k + RECONSTRUCTION for k in samples)
    assert report["reconstruction"] == report["encoded"] == len(samples) > 0
    key = "web-000000/good0000"  # good_t2i(0, 96, 64) in the fixture
    base, rec = cache.read(key, fp), cache.read(key + RECONSTRUCTION, fp)
    assert rec["task"] == "reconstruction" and rec["bucket"] == base["bucket"]
    torch.testing.assert_close(rec["latents"], base["latents"])
    torch.testing.assert_close(rec["cond_latents"], base["latents"])  # the image is its own condition
    image = Image.open(io.BytesIO(good_t2i(0, 96, 64)[1]["png"])).convert("RGB")
    vision = to_pil(encoders.preprocess_image(image, base["bucket"]))  # what the VAE encoded
    expected = encoders.encode_edit_prompts([rec["caption"]], [vision])[0]
    torch.testing.assert_close(rec["prompt_embeds"], expected.bfloat16())
    again = produce(data, CacheConfig(dir=str(tmp_path / "cache")), encoders, progress=False)
    assert again["encoded"] == 0 and again["cache_hits"] == report["encoded"]  # complete: nothing redone
