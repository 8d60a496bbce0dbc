"""`mmdit vae-train` on the tiny VAE: LPIPS, the decoder path, seeded crops and bad input, the
learning test, resume, the export (encoder bit-identical, a cache made before stays valid) and
`mmdit status` on the run. In-process; the DP=2 test is in test_vae_dp.py."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from badfiles import corrupt_jpeg, encode, shapes, write_shard

from mmdit.config.data import DataConfig
from mmdit.config.loader import load_config
from mmdit.config.produce import CacheConfig, EncodersConfig, SynthConfig
from mmdit.consumer.vae.data import CropSampler, micro_batch_indices, scan
from mmdit.consumer.vae.model import DecoderPath, encode as vae_encode, load_vae, vae_folder
from mmdit.consumer.vae.perceptual import LPIPS, VGG16, vgg_features, write_random_lpips
from mmdit.producer.encoders import ENCODER_HALF, VAE_LINEAGE, Encoders, vae_identity, weights_identity
from mmdit.producer.ingest import ErrorLog

CROP = 64


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """240 text renderings of `mmdit synth` (64-128 px) in two shards, and one shard of bad input."""
    from mmdit.producer.synth.shards import write_shards

    d = tmp_path_factory.mktemp("vae_shards")
    write_shards(str(d), SynthConfig(num_samples=240, min_side=64, max_side=128, edit_fraction=0.0,
                                     kinds={"pure": 0.5, "complex": 0.5}, samples_per_shard=120))
    write_shard(d / "bad-000000.tar", [
        ("corrupt", {"jpg": corrupt_jpeg()}),
        ("zero", {"png": b""}),
        ("fine", {"png": encode(shapes(7, 80, 72))}),  # no caption: a decoder needs none
    ])
    return d


@pytest.fixture(scope="module")
def lpips_dir(tmp_path_factory) -> Path:
    return write_random_lpips(tmp_path_factory.mktemp("lpips"))


def train(run_dir: Path, encoders_dir: str, shards: Path, lpips_dir: Path, *overrides: str) -> dict:
    """One in-process `mmdit vae-train` run (a one-process group, destroyed after)."""
    from mmdit.consumer.vae.trainer import VaeTrainer

    cfg = load_config([f"run.dir={run_dir}", f"encoders.dir={encoders_dir}", f"vae.text_shards=['{shards}/*.tar']",
                       "vae.text_fraction=1", f"vae.perceptual_dir={lpips_dir}", f"vae.crop_size={CROP}",
                       f"vae.eval_size={CROP}", "vae.micro_batch_size=8", "vae.optimizer.lr=2e-3",
                       "vae.optimizer.warmup_steps=0", "vae.perceptual_weight_start=0.2", "vae.perceptual_weight=0.05",
                       "vae.perceptual_ramp_steps=20", "vae.eval_fraction=0.1", "vae.eval_ocr=false",
                       "vae.tensorboard=false", *overrides])
    try:
        return VaeTrainer(cfg).run()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def learned(tmp_path_factory, tiny_encoders_dir, shards, lpips_dir) -> Path:
    """30 steps on the synthetic renderings, evaluated before and after, exported."""
    run = tmp_path_factory.mktemp("vae_run")
    train(run, tiny_encoders_dir, shards, lpips_dir, "vae.steps=30", "vae.eval_max_samples=16")
    return run


# ----------------------------------------------------------------------------- LPIPS


def test_lpips_has_the_reference_names_and_formula(tmp_path, lpips_dir):
    features, taps = vgg_features(VGG16)  # torchvision's vgg16().features, LPIPS's relu1_2 ... relu5_3
    convs = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    assert [k for k in features.state_dict()] == [f"{i}.{w}" for i in convs for w in ("weight", "bias")]
    assert taps == [3, 8, 15, 22, 29]
    model = LPIPS({"net": "vgg16"})
    assert sorted(k for k in model.state_dict() if k.startswith("lin")) == [f"lin{k}.model.1.weight" for k in range(5)]

    lpips = LPIPS.load(lpips_dir)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    d = lpips(x, y)
    assert d.shape == (2,) and (d > 0).all()
    assert torch.allclose(lpips(x, x), torch.zeros(2)) and torch.allclose(lpips(y, x), d)
    # the formula written out: unit-normalized features, squared difference, lin weights, spatial mean, summed
    want = torch.zeros(2)
    fx, fy = lpips.feature_maps(x), lpips.feature_maps(y)
    for k, (a, b) in enumerate(zip(fx, fy)):
        a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
        b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
        w = getattr(lpips, f"lin{k}").model[1].weight.view(1, -1, 1, 1)
        want += ((a - b) ** 2 * w).sum(dim=1).mean(dim=(1, 2))
    torch.testing.assert_close(d, want)
    # the same weights as .pth files (how torchvision and lpips ship theirs) load the same
    from safetensors.torch import load_file

    shutil.copy(lpips_dir / "config.json", tmp_path / "config.json")
    for stem in ("backbone", "lpips"):
        torch.save(load_file(str(lpips_dir / f"{stem}.safetensors")), tmp_path / f"{stem}.pth")
    torch.testing.assert_close(LPIPS.load(tmp_path)(x, y), d)
    # weights of another backbone, or negative lin weights, are refused naming the problem
    (tmp_path / "config.json").write_text(json.dumps({"net": "vgg16"}))
    with pytest.raises(ValueError, match="do not fit net 'vgg16'"):
        LPIPS.load(tmp_path)


# ----------------------------------------------------------------------------- model and data


def test_decoder_path_is_vae_decode_and_the_encoder_half_is_frozen(tiny_encoders_dir):
    vae = load_vae(vae_folder(tiny_encoders_dir))
    x = torch.rand(2, 3, CROP, CROP, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = vae_encode(vae, x)
    with torch.no_grad():
        reference = vae.decode(z.unsqueeze(2)).sample[:, :, 0]
        assert torch.equal(DecoderPath(vae)(z).clamp(-1, 1), reference)
    assert all(not p.requires_grad for n, p in vae.named_parameters() if n.startswith(ENCODER_HALF))
    # activation checkpointing changes neither the output nor a gradient
    grads = []
    for recompute in (False, True):
        vae.zero_grad(set_to_none=True)
        DecoderPath(vae, recompute)(z).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in vae.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)


def test_bad_input_is_counted_and_skipped_and_crops_are_seeded(shards):
    errors = ErrorLog()
    refs = scan([str(shards / "*.tar")], errors)
    assert dict(errors.counts) == {"corrupt_image": 1, "empty_member": 1}
    assert len(refs) == 241 and "bad-000000/fine" in {r.key for r in refs}
    assert all(r.data is None and r.offset > 0 for r in refs)  # local tars: read again by offset
    listed_otherwise = scan(sorted(map(str, shards.glob("*.tar")), reverse=True), ErrorLog())
    assert [r.key for r in listed_otherwise] == [r.key for r in refs]  # pools do not depend on listing order
    text, general = refs[:200], refs[200:]
    a = CropSampler(text, general, seed=3, crop_size=CROP, text_fraction=0.75, global_batch=8)
    b = CropSampler(listed_otherwise[:200], listed_otherwise[200:], seed=3, crop_size=CROP, text_fraction=0.75,
                    global_batch=8)
    assert a.text_per_batch == 6  # an exact count per batch: the first 6 crops text-rich, 2 general
    assert [a.ref(5, i) in text for i in range(8)] == [True] * 6 + [False] * 2
    assert torch.equal(a.crop(5, 7), b.crop(5, 7))
    assert not torch.equal(a.crop(5, 7), a.crop(6, 7))
    assert a.crop(0, 0).shape == (3, CROP, CROP) and a.crop(0, 0).abs().max() <= 1
    # an epoch walks every text-rich image once
    seen = [a.ref(step, i).key for step in range(200 // 6) for i in range(6)]
    assert len(set(seen)) == len(seen) == 198
    # any DP x accumulation split covers the global batch's indices once
    for dp, micro in ((1, 8), (2, 4), (4, 2), (2, 2)):
        rounds = 8 // (dp * micro)
        covered = sorted(i for r in range(rounds) for rank in range(dp)
                         for i in micro_batch_indices(r, rank, dp, micro))
        assert covered == list(range(8))


def test_bad_command_lines_exit_2_naming_the_key(tmp_path, tiny_encoders_dir, capsys):
    from mmdit.launch.cli import main

    assert main(["vae-train", f"run.dir={tmp_path}", f"encoders.dir={tiny_encoders_dir}"]) == 2
    assert "vae.text_shards" in capsys.readouterr().err
    assert main(["vae-train", f"run.dir={tmp_path}", f"encoders.dir={tiny_encoders_dir}", "vae.text_shards=[x.tar]",
                 "vae.text_fraction=0.5", "vae.perceptual_weight=0", "vae.perceptual_weight_start=0"]) == 2
    assert "vae.general_shards" in capsys.readouterr().err
    assert main(["vae-train", "vae.crop_size=50"]) == 2
    assert "vae.crop_size" in capsys.readouterr().err


# ----------------------------------------------------------------------------- training


def eval_records(run: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r.get("eval") == "vae_reconstruction"]


def test_the_decoder_learns_and_the_encoder_does_not_change(learned, tiny_encoders_dir):
    from safetensors.torch import load_file

    before, after = eval_records(learned)
    assert (before["step"], after["step"]) == (0, 30) and after["samples"] == before["samples"] == 16
    # the tiny random VAE's held-out PSNR: 10.84 -> 12.4 dB (the figures README's note shows)
    assert after["psnr"] > before["psnr"] + 1.0, (before, after)
    assert after["psnr_before"] == before["psnr"] and after["ssim"] > before["ssim"]
    summary = json.loads((learned / "summary.json").read_text())
    assert summary["data"]["errors"] == {"corrupt_image": 1, "empty_member": 1} and summary["final_step"] == 30
    pairs = sorted((learned / "vae_eval" / "step_00000030").glob("pair_*.png"))
    assert len(pairs) == 4 and json.loads((pairs[0].parent / "results.json").read_text())["images"]
    # the encoder half of the exported weights is the base's, bit for bit; the decoder moved
    base = {k: v for f in Path(tiny_encoders_dir, "vae").glob("*.safetensors") for k, v in load_file(str(f)).items()}
    new = {k: v for f in (learned / "export" / "vae").glob("*.safetensors") for k, v in load_file(str(f)).items()}
    assert base.keys() == new.keys()
    for name in base:
        if name.startswith(ENCODER_HALF):
            assert new[name].dtype == base[name].dtype and torch.equal(new[name], base[name]), name
    assert not all(torch.equal(new[k], base[k]) for k in base if k.startswith("decoder."))
    config = (learned / "export" / "vae" / "config.json").read_bytes()  # latents_mean/std included
    assert config == Path(tiny_encoders_dir, "vae", "config.json").read_bytes()


def test_ocr_word_accuracy_scores_reconstructions_against_the_originals_reading(tmp_path):
    from mmdit.consumer.text_eval.ocr import OcrEngine
    from mmdit.consumer.vae.data import cover_crop
    from mmdit.consumer.vae.evaluation import ReconstructionEval
    from PIL import Image, ImageDraw

    from mmdit.producer.synth.fonts import load_font

    font = load_font(str(Path(SynthConfig().font_dir) / "dejavu" / "DejaVuSans-Bold.ttf"), 26)
    images = []
    for text in ("HELLO WORLD", "OPEN 24"):
        img = Image.new("RGB", (192, 96), "white")
        ImageDraw.Draw(img).text((8, 30), text, fill="black", font=font)
        images.append(cover_crop(img, 96, 0.0, 0.5))
    images = torch.stack(images)
    evaluator = ReconstructionEval(["a", "b"], images, tmp_path, pairs=1, ocr=OcrEngine(threads=1))
    perfect, rows = evaluator.score(images)
    assert perfect["ocr_images"] == 2 and perfect["word_accuracy"] == 1.0 and perfect["psnr"] > 100
    blank, _ = evaluator.score(torch.ones_like(images))  # a white page: every word lost
    assert blank["word_accuracy"] == 0.0 and blank["ssim"] < perfect["ssim"]


def test_resume_equals_uninterrupted(tmp_path, tiny_encoders_dir, shards, lpips_dir):
    common = ("vae.steps=6", "vae.eval_max_samples=0", "vae.export=false", "vae.micro_batch_size=4",
              "vae.global_batch_size=8", "vae.optimizer.warmup_steps=2")  # accumulation and the lr ramp too
    train(tmp_path / "straight", tiny_encoders_dir, shards, lpips_dir, *common)
    train(tmp_path / "resumed", tiny_encoders_dir, shards, lpips_dir, *common[1:], "vae.steps=3")
    train(tmp_path / "resumed", tiny_encoders_dir, shards, lpips_dir, *common)

    def steps(run):
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    straight, resumed = steps(tmp_path / "straight"), steps(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(straight, resumed):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 and abs(a["grad_norm"] - b["grad_norm"]) <= 1e-6 * a["grad_norm"]
        assert a["objective"] == pytest.approx(b["objective"], abs=1e-6)
    from safetensors.torch import load_file

    final = [load_file(str(run / "checkpoints" / "step_00000006" / "decoder.safetensors"))
             for run in (tmp_path / "straight", tmp_path / "resumed")]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])


# ----------------------------------------------------------------------------- export and the cache


def test_a_cache_made_before_the_fine_tune_is_accepted_after_it(tmp_path, learned, tiny_encoders_dir, shards):
    from mmdit.producer.produce import produce

    base = Encoders.load(EncodersConfig(dir=tiny_encoders_dir))
    tuned = Encoders.load(EncodersConfig(dir=str(learned / "export")))
    assert base.fingerprint == tuned.fingerprint
    # a pristine VAE keeps the identity it always had: caches made before this rule stay valid
    assert vae_identity(Path(tiny_encoders_dir, "vae")) == weights_identity(Path(tiny_encoders_dir, "vae"))
    data = DataConfig(shards=[str(shards / "synth-000000.tar")], base_resolution=64, encode_batch_size=8)
    cache = CacheConfig(dir=str(tmp_path / "cache"))
    first = produce(data, cache, base, progress=False)
    assert first["encoded"] > 0
    again = produce(data, cache, tuned, progress=False)
    assert again["encoded"] == 0 and again["cache_hits"] == first["encoded"]

    # a VAE whose encoder half changed is not the lineage's: its own identity, a miss
    changed = tmp_path / "changed"
    shutil.copytree(learned / "export" / "vae", changed)
    from safetensors.torch import load_file, save_file

    path = next(changed.glob("*.safetensors"))
    tensors = load_file(str(path))
    name = next(k for k in tensors if k.startswith("encoder."))
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, str(path), metadata={"format": "pt"})
    assert (changed / VAE_LINEAGE).is_file()
    assert vae_identity(changed) == weights_identity(changed) != vae_identity(learned / "export" / "vae")


def test_status_shows_a_vae_run(learned):
    from mmdit.launch.status import gather, render

    text = render(gather(learned))
    assert "step 30 | loss" in text and "last checkpoint: step_00000030" in text


@pytest.mark.slow
def test_two_data_parallel_ranks_equal_one_with_the_same_global_batch(tmp_path, tiny_encoders_dir, shards, lpips_dir):
    """Real gloo ranks on loopback (`launch.nproc=2`) against one process accumulating the same two
    micro-batches of 4: the same crops, per-sample losses and gradient mean, so the same steps."""
    import os
    import subprocess
    import sys

    def run(name: str, nproc: int) -> list[dict]:
        argv = [f"run.dir={tmp_path / name}", f"encoders.dir={tiny_encoders_dir}",
                f"vae.text_shards=['{shards}/*.tar']", "vae.text_fraction=1", f"vae.perceptual_dir={lpips_dir}",
                f"vae.crop_size={CROP}", "vae.micro_batch_size=4", "vae.global_batch_size=8", "vae.steps=4",
                "vae.optimizer.lr=2e-3", "vae.optimizer.warmup_steps=0", "vae.eval_max_samples=0",
                "vae.export=false", "vae.tensorboard=false", f"launch.nproc={nproc}"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # each rank's kernels as the single process's
        done = subprocess.run([sys.executable, "-m", "mmdit.launch.cli", "vae-train", *argv], capture_output=True,
                              text=True, timeout=600, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        assert ("DP=2 (torch-ddp (gloo))" if nproc == 2 else "DP=1 (single)") in done.stdout
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:  # independent runs, mostly starting up: two cores overlap them
        one, two = pool.map(run, ("dp1", "dp2"), (1, 2))
    assert [r["step"] for r in two] == [1, 2, 3, 4] and all(r["global_batch_size"] == 8 for r in one + two)
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-6)
    from safetensors.torch import load_file

    w1, w2 = (load_file(str(tmp_path / name / "checkpoints" / "step_00000004" / "decoder.safetensors"))
              for name in ("dp1", "dp2"))
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-6, atol=1e-7)
