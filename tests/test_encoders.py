"""Encoders: features equal direct forwards of the release classes; templates; the fingerprint."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

from mmdit.config.produce import EncodersConfig
from mmdit.producer.encoders import (
    Encoders,
    EncodersNotFoundError,
    fingerprint_of,
    image_processor_class,
    preprocess_image,
    vision_size,
)
from mmdit.producer.prompts import EDIT_TEMPLATE, IMAGE_PAD, T2I_SYSTEM, T2I_TEMPLATE, VISION_START, check_drop

CAPTIONS = [
    "A red sign that says \"Open 24 hours\".",
    "一张纯深蓝色背景的图片，中部居中用白色字体写着“欢迎光临”。",
    "Short.",
]


@pytest.fixture(scope="module")
def enc(tiny_encoders_dir) -> Encoders:
    enc = Encoders.load(EncodersConfig(dir=tiny_encoders_dir))
    assert (enc.device.type, enc.dtype) == ("cpu", torch.float32)  # auto: fp32 on a CPU-only machine
    return enc


@pytest.fixture(scope="module")
def direct_model(tiny_encoders_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_encoders_dir, subfolder="text_encoder").eval()


def _picture(w: int, h: int, seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    img = Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy(), "RGB")
    ImageDraw.Draw(img).rectangle((w // 4, h // 4, w // 2, h // 2), fill=(255, 0, 0))
    return img


def test_layout_is_the_release_layout(tiny_encoders_dir):
    from transformers import AutoTokenizer

    root = Path(tiny_encoders_dir)
    vae = json.loads((root / "vae" / "config.json").read_text())
    assert vae["_class_name"] == "AutoencoderKLQwenImage" and vae["z_dim"] == 16
    assert len(vae["latents_mean"]) == len(vae["latents_std"]) == 16
    te = json.loads((root / "text_encoder" / "config.json").read_text())
    assert te["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert te["vision_config"]["out_hidden_size"] == te["text_config"]["hidden_size"]
    tok = AutoTokenizer.from_pretrained(root, subfolder="tokenizer")
    assert type(tok).__name__.startswith("Qwen2Tokenizer")
    specials = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>", "<|vision_end|>", IMAGE_PAD, "<|video_pad|>")
    for special in specials:
        assert tok.tokenize(special) == [special]
    assert te["image_token_id"] == tok.convert_tokens_to_ids(IMAGE_PAD)
    # The chat template reproduces Qwen-Image's prompt format exactly.
    chat = [{"role": "system", "content": T2I_SYSTEM}, {"role": "user", "content": "a cat"}]
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == T2I_TEMPLATE.format("a cat")
    assert (root / "processor" / "preprocessor_config.json").is_file()
    assert sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) < 8 * 2**20


def test_templates_are_the_diffusers_pipelines_templates():
    from diffusers import QwenImageEditPipeline, QwenImagePipeline

    t2i = QwenImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=None)
    assert (t2i.prompt_template_encode, t2i.prompt_template_encode_start_idx) == (T2I_TEMPLATE.template, 34)
    assert t2i.tokenizer_max_length == EncodersConfig().max_text_tokens == 1024
    edit = QwenImageEditPipeline(
        scheduler=None, vae=None, text_encoder=None, tokenizer=None, processor=None, transformer=None
    )
    assert (edit.prompt_template_encode, edit.prompt_template_encode_start_idx) == (EDIT_TEMPLATE.template, 64)


def test_template_prefixes_are_34_and_64_tokens(enc):
    tok = enc.tokenizer
    assert len(tok(T2I_TEMPLATE.prefix, add_special_tokens=False)["input_ids"]) == 34
    assert len(tok(EDIT_TEMPLATE.prefix, add_special_tokens=False)["input_ids"]) == 64
    check_drop(tok, T2I_TEMPLATE)
    with pytest.raises(ValueError, match="tokens"):
        longer = T2I_TEMPLATE.template.replace("detailing", "carefully detailing")
        check_drop(tok, replace(T2I_TEMPLATE, template=longer))


def test_prompt_embeds_equal_direct_forward(enc, direct_model):
    feats = enc.encode_prompts(CAPTIONS)
    for caption, feat in zip(CAPTIONS, feats):
        # The pipeline's own tokenizer call, one prompt at a time (no padding).
        ids = enc.tokenizer(T2I_TEMPLATE.format(caption))["input_ids"]
        assert enc.prompt_ids([caption])[0] == ids
        # The caption's own tokens start right after the 34 dropped ones.
        caption_ids = enc.tokenizer(caption, add_special_tokens=False)["input_ids"]
        assert ids[34 : 34 + len(caption_ids)] == caption_ids
        with torch.no_grad():
            out = direct_model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        expected = out.hidden_states[-1][0, 34:]
        assert feat.dtype == torch.float32 and feat.shape == (len(ids) - 34, enc.text_dim)
        torch.testing.assert_close(feat, expected, atol=1e-5, rtol=1e-5)


def test_long_prompt_keeps_max_tokens_and_chat_suffix(tiny_encoders_dir):
    enc = Encoders.load(EncodersConfig(dir=tiny_encoders_dir, max_text_tokens=48))
    long_caption = " ".join(["The quick brown fox jumps over the lazy dog."] * 20)
    ids = enc.prompt_ids([long_caption])[0]
    suffix = enc.tokenizer(T2I_TEMPLATE.suffix, add_special_tokens=False)["input_ids"]
    assert len(ids) == 34 + 48 and ids[-len(suffix):] == suffix
    (feat,) = enc.encode_prompts([long_caption])
    assert feat.shape[0] == 48


def test_edit_prompts_have_image_tokens_and_equal_direct_forward(enc, direct_model):
    images = [_picture(300, 200, 1), _picture(180, 260, 2)]
    # A literal <|image_pad|> in an instruction must not add an image token (it would break the batch).
    instructions = ["Change the text to \"Exit\".", "把背景换成红色 <|image_pad|>"]
    feats = enc.encode_edit_prompts(instructions, images)
    processor = image_processor_class().from_pretrained(enc.cfg.dir, subfolder="processor")
    pad_id = enc.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    for instruction, img, feat in zip(instructions, images, feats):
        resized = img.resize(vision_size(img, enc.edit_vision_area), Image.Resampling.LANCZOS)
        vl = processor(images=[resized], return_tensors="pt")
        n_image = int(vl["image_grid_thw"][0].prod()) // processor.merge_size**2
        assert n_image > 50
        ids = enc.edit_prompt_ids([instruction], [n_image])[0]
        assert ids == enc.tokenizer(enc.edit.template.format(instruction, n_image))["input_ids"]
        start = ids.index(enc.tokenizer.convert_tokens_to_ids(VISION_START))  # after "Picture 1: " in edit_plus
        assert start >= 64 and ids[start + 1 : start + 1 + n_image] == [pad_id] * n_image
        assert ids.count(pad_id) == n_image
        with torch.no_grad():
            out = direct_model(
                input_ids=torch.tensor([ids]), pixel_values=vl["pixel_values"], image_grid_thw=vl["image_grid_thw"],
                output_hidden_states=True,
            )
        assert feat.shape == (len(ids) - 64, enc.text_dim)
        torch.testing.assert_close(feat, out.hidden_states[-1][0, 64:], atol=1e-5, rtol=1e-5)


def test_latents_equal_direct_vae_encode(enc, tiny_encoders_dir):
    from diffusers import AutoencoderKLQwenImage

    images = [_picture(200, 130, 3), _picture(90, 160, 4)]
    pixels = torch.stack([preprocess_image(img, (64, 96)) for img in images])
    assert pixels.shape == (2, 3, 64, 96) and pixels.min() >= -1 and pixels.max() <= 1
    latents = enc.encode_images(pixels)
    vae = AutoencoderKLQwenImage.from_pretrained(tiny_encoders_dir, subfolder="vae").eval()
    with torch.no_grad():
        z = vae.encode(pixels.unsqueeze(2)).latent_dist.mode()[:, :, 0]
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 16, 1, 1)
    assert latents.shape == (2, 16, 8, 12) and latents.dtype == torch.float32
    torch.testing.assert_close(latents, (z - mean) / std, atol=1e-5, rtol=1e-5)
    # Posterior mode, not a sample: deterministic.
    torch.testing.assert_close(enc.encode_images(pixels), latents, atol=0, rtol=0)
    with pytest.raises(ValueError, match="multiples of 16"):
        enc.encode_images(torch.zeros(1, 3, 40, 64))


def test_preprocess_image_covers_and_centre_crops():
    img = Image.new("RGB", (300, 100), (0, 0, 255))
    ImageDraw.Draw(img).rectangle((0, 0, 99, 99), fill=(255, 0, 0))  # left third red
    out = preprocess_image(img, (32, 32))  # cover: 96x32, crop keeps the middle (blue) third
    assert out.shape == (3, 32, 32)
    assert torch.allclose(out[:, :, 4:28].mean(dim=(1, 2)), torch.tensor([-1.0, -1.0, 1.0]), atol=0.05)
    rgba = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    assert torch.allclose(preprocess_image(rgba, (16, 16)), torch.ones(3, 16, 16))  # alpha -> white


def _scale_tensor(path: Path, factor: float) -> None:
    tensors = load_file(path)
    name = sorted(tensors)[len(tensors) // 2]
    tensors[name] = tensors[name] * factor
    save_file(tensors, path, metadata={"format": "pt"})


def test_fingerprint_names_weights_templates_and_preprocessing(enc, tiny_encoders_dir, tmp_path):
    base = enc.fingerprint
    assert len(base) == 16 and int(base, 16) >= 0
    # A copy elsewhere (other path, other mtimes) is the same encoder: shared caches keep hitting.
    copy = tmp_path / "copy"
    shutil.copytree(tiny_encoders_dir, copy)
    assert Encoders.load(EncodersConfig(dir=str(copy))).fingerprint == base
    seen = {base}
    for cfg in (
        EncodersConfig(dir=str(copy), resample="lanczos"),
        EncodersConfig(dir=str(copy), edit_vision_area=256 * 256),
        EncodersConfig(dir=str(copy), max_text_tokens=512),
    ):
        fp = Encoders.load(cfg).fingerprint
        assert fp not in seen, cfg
        seen.add(fp)
    for weights in (copy / "vae" / "diffusion_pytorch_model.safetensors", copy / "text_encoder" / "model.safetensors"):
        _scale_tensor(weights, 1.5)
        fp = Encoders.load(EncodersConfig(dir=str(copy))).fingerprint
        assert fp not in seen, weights
        seen.add(fp)
    parts = dict(enc.fingerprint_parts)
    parts["templates"] = {**parts["templates"], "t2i": [T2I_TEMPLATE.template.replace("color", "colour"), 34]}
    assert fingerprint_of(parts) != base


def test_missing_or_incomplete_dir_is_a_clear_error(tiny_encoders_dir, tmp_path):
    with pytest.raises(EncodersNotFoundError, match="not a directory"):
        Encoders.load(EncodersConfig(dir=str(tmp_path / "nope")))
    partial = tmp_path / "partial"
    shutil.copytree(tiny_encoders_dir, partial)
    (partial / "text_encoder" / "model.safetensors").unlink()
    shutil.rmtree(partial / "tokenizer")
    with pytest.raises(EncodersNotFoundError, match=r"text_encoder/\*\.safetensors.*tokenizer/tokenizer\.json"):
        Encoders.load(EncodersConfig(dir=str(partial)))


def test_edit_without_processor_is_a_clear_error(tiny_encoders_dir, tmp_path):
    t2i_only = tmp_path / "t2i_only"
    shutil.copytree(tiny_encoders_dir, t2i_only)
    shutil.rmtree(t2i_only / "processor")
    enc = Encoders.load(EncodersConfig(dir=str(t2i_only)))
    assert enc.encode_prompts(["ok"])[0].shape[1] == enc.text_dim
    with pytest.raises(EncodersNotFoundError, match="processor/preprocessor_config.json"):
        enc.encode_edit_prompts(["make it red"], [_picture(64, 64)])
