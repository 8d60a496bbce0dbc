"""The frozen Qwen-Image encoders: VAE latents and Qwen2.5-VL prompt features, plus their fingerprint.

`Encoders.load(cfg)` reads a directory laid out like the public Qwen-Image release (`vae/`,
`text_encoder/`, `tokenizer/`, and `processor/` for edit prompts) with the release's own classes,
so the tiny test encoders (`mmdit make-tiny-encoders`) and the 20B weights go through one path.
Outputs are float32 on the CPU whatever the compute dtype, ready for the latent cache.

The fingerprint names everything that changes a cached feature (weights, tokenizer, templates,
token limits, preprocessing, compute dtype), so a cache keyed by it misses instead of serving
stale features. The dtype the cache *stores* features in (cache.feature_dtype) is not in it: a
bf16 copy of a feature is the same feature at storage precision, readers take either, so a cache
written in fp32 stays valid for a bf16 writer (the two mix) instead of being encoded again.
Weight identity is sampled, not a full hash: config, file names and sizes, every
safetensors header, and 3 x 4 KiB of every tensor. That costs milliseconds on 16 GB of weights and
changes whenever a tensor is retrained; an edit confined to the middle of one tensor would not.

The VAE's part covers what a cached latent depends on. A cached latent is the encoder's posterior
mode, so a fine-tuned *decoder* must not change it (`mmdit vae-train`, consumer/vae/): its export
writes `vae/mmdit_lineage.json`, naming the identity of the VAE it came from and the exact hash of
its encoder half (config + `encoder.*` + `quant_conv.*`, every byte). A VAE whose encoder half
matches its lineage takes the identity recorded there; any other VAE (every VAE before this rule)
is identified by its weights as before, so no cache made earlier changes its fingerprint.

Heavy libraries (diffusers, transformers) are imported when loading, so `preprocess_image` is
cheap to import for the bucketing code.
"""

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmdit.config.produce import EncodersConfig
from mmdit.producer.prompts import EDIT_CONDITIONINGS, T2I_TEMPLATE, EditConditioning, build_input_ids, check_drop
from mmdit.utils.dtypes import resolve_dtype
from mmdit.utils.safetensors_header import safetensors_identity

PREPROCESS_VERSION = 2
"""Bump when `preprocess_image` or the edit vision resize change behaviour (it is fingerprinted).
2: edit prompts follow a named diffusers pipeline (encoders.edit_template)."""
_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}
MIN_TRANSFORMERS = "4.56"
"""`from_pretrained(dtype=...)` and `Qwen2_5_VLForConditionalGeneration.model` taking pixel_values."""


class EncodersNotFoundError(FileNotFoundError):
    """`encoders.dir` is missing or lacks part of the Qwen-Image layout; the message lists what."""


def preprocess_image(img: Image.Image, size: tuple[int, int], resample: str = "bicubic") -> torch.Tensor:
    """Resize to cover `size` = (height, width) keeping the aspect, centre-crop, scale to [-1, 1].

    Returns float32 [3, height, width]. Images with alpha are composited on white first, so a
    transparent background does not become black.
    """
    height, width = size
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.new("RGB", rgba.size, (255, 255, 255))
        img.paste(rgba, mask=rgba.getchannel("A"))
    elif img.mode != "RGB":
        img = img.convert("RGB")
    scale = max(width / img.width, height / img.height)
    new_w, new_h = max(width, round(img.width * scale)), max(height, round(img.height * scale))
    if (new_w, new_h) != img.size:
        img = img.resize((new_w, new_h), _RESAMPLE[resample])
    left, top = (new_w - width) // 2, (new_h - height) // 2
    img = img.crop((left, top, left + width, top + height))
    array = np.asarray(img, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).div(127.5).sub(1.0).contiguous()


def vision_size(img: Image.Image, area: int) -> tuple[int, int]:
    """(width, height) with about `area` pixels, the image's aspect, sides multiples of 32.

    diffusers' `calculate_dimensions`, which the edit pipelines use for the image Qwen2.5-VL sees.
    """
    ratio = img.width / img.height
    width = math.sqrt(area * ratio)
    height = width / ratio
    return max(32, round(width / 32) * 32), max(32, round(height / 32) * 32)


def image_processor_class():
    """Qwen2VLImageProcessor's PIL backend: the same numbers with or without torchvision."""
    import transformers

    return getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor


def check_layout(root: Path) -> None:
    """Raise EncodersNotFoundError naming every missing part of the Qwen-Image layout."""
    if not str(root) or not root.is_dir():
        raise EncodersNotFoundError(
            f"encoders.dir={str(root)!r} is not a directory; point it at a Qwen-Image checkout "
            "or run `mmdit make-tiny-encoders DIR`"
        )
    missing = []
    for sub in ("vae", "text_encoder"):
        if not (root / sub / "config.json").is_file():
            missing.append(f"{sub}/config.json")
        if not list((root / sub).glob("*.safetensors")):
            missing.append(f"{sub}/*.safetensors")
    if not ((root / "tokenizer" / "tokenizer.json").is_file() or (root / "tokenizer" / "vocab.json").is_file()):
        missing.append("tokenizer/tokenizer.json (or vocab.json + merges.txt)")
    if missing:
        raise EncodersNotFoundError(f"encoders.dir={str(root)!r} is incomplete, missing: {', '.join(missing)}")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def config_identity(folder: Path) -> str:
    """sha256 of a model folder's config.json, without the fields that say who saved it."""
    config = json.loads((folder / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.endswith("_version")}  # who saved it, not what
    return _sha(json.dumps(config, sort_keys=True).encode())


def weights_identity(folder: Path) -> dict:
    """Config + every safetensors file (name, size, sampled content) of one model folder."""
    files = {p.name: [p.stat().st_size, safetensors_identity(p)] for p in sorted(folder.glob("*.safetensors"))}
    return {"config": config_identity(folder), "files": files}


def files_identity(folder: Path) -> dict:
    return {p.name: _sha(p.read_bytes()) for p in sorted(folder.iterdir()) if p.is_file() and p.suffix != ".md"}


VAE_LINEAGE = "mmdit_lineage.json"
"""vae/mmdit_lineage.json: {"identity": the fingerprint identity this VAE inherits, "encoder_half":
`encoder_half_identity` of the encoder it inherits it with}. Written by `mmdit vae-train`'s export."""
ENCODER_HALF = ("encoder.", "quant_conv.")
"""The parameters that turn pixels into latents (the posterior); post_quant_conv and decoder do not."""


def encoder_half_identity(folder: Path) -> str:
    """Exact hash of what a VAE's latents depend on: its config (latents_mean/std, z_dim, ...) and
    every byte, dtype and shape of its encoder-half tensors, by name (not by file layout).
    Reads the encoder half only (about 100 MB at release size)."""
    from mmdit.utils.safetensors_header import read_header

    h = hashlib.sha256(config_identity(folder).encode())
    tensors = []
    for path in sorted(folder.glob("*.safetensors")):
        header, start, _ = read_header(path)
        tensors += [(name, info, path, start) for name, info in header.items()
                    if name != "__metadata__" and name.startswith(ENCODER_HALF)]
    for name, info, path, start in sorted(tensors, key=lambda t: t[0]):
        begin, end = info["data_offsets"]
        with open(path, "rb") as f:
            f.seek(start + begin)
            data = f.read(end - begin)
        h.update(json.dumps([name, info["dtype"], info["shape"], end - begin]).encode())
        h.update(data)
    if not tensors:
        raise ValueError(f"{folder}: no encoder tensors ({', '.join(ENCODER_HALF)}*) in its safetensors files")
    return h.hexdigest()


def vae_identity(folder: Path) -> dict:
    """The VAE's part of the encoder fingerprint (see the module docstring): its lineage's
    identity when its encoder half is the one the lineage names, else its weights' identity."""
    lineage_path = folder / VAE_LINEAGE
    if lineage_path.is_file():
        try:
            lineage = json.loads(lineage_path.read_text())
            if lineage["encoder_half"] == encoder_half_identity(folder):
                return lineage["identity"]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable or not this encoder's: identified by its own weights, a miss, never stale
    return weights_identity(folder)


def fingerprint_of(parts: dict) -> str:
    """16 hex digits naming the encoders' output; any change to `parts` changes it."""
    return _sha(json.dumps(parts, sort_keys=True, default=str).encode())[:16]


def resolve_device(cfg: EncodersConfig) -> tuple[torch.device, torch.dtype]:
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    return device, resolve_dtype(cfg.dtype, device.type)


@dataclass
class Encoders:
    cfg: EncodersConfig
    vae: "torch.nn.Module"
    text_encoder: "torch.nn.Module"
    tokenizer: object
    image_processor: object | None
    """None when the directory has no processor/ (the text-to-image release); edit prompts need it."""
    device: torch.device
    dtype: torch.dtype
    fingerprint_parts: dict = field(repr=False)

    @classmethod
    def load(cls, cfg: EncodersConfig) -> "Encoders":
        import transformers
        from diffusers import AutoencoderKLQwenImage
        from packaging.version import Version
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
            raise RuntimeError(f"the encoders need transformers>={MIN_TRANSFORMERS}, found {transformers.__version__}")
        root = Path(cfg.dir)
        check_layout(root)
        device, dtype = resolve_device(cfg)
        vae = AutoencoderKLQwenImage.from_pretrained(root, subfolder="vae", torch_dtype=dtype)
        text_encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(root, subfolder="text_encoder", dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(root, subfolder="tokenizer")
        tokenizer.padding_side = "right"
        edit = EDIT_CONDITIONINGS[cfg.edit_template]
        for template in (T2I_TEMPLATE, edit.template):
            check_drop(tokenizer, template)
        processor = None
        if (root / "processor" / "preprocessor_config.json").is_file():
            processor = image_processor_class().from_pretrained(root, subfolder="processor")
        parts = {
            "version": PREPROCESS_VERSION,
            "vae": vae_identity(root / "vae"),
            "text_encoder": weights_identity(root / "text_encoder"),
            "tokenizer": files_identity(root / "tokenizer"),
            "templates": {t.name: [t.template, t.drop] for t in (T2I_TEMPLATE, edit.template)},
            "max_text_tokens": cfg.max_text_tokens,
            "resample": cfg.resample,
            "edit_template": edit.name,
            "edit_vision_area": cfg.edit_vision_area or edit.vision_area,
            "image_processor": None if processor is None else processor.to_json_string(),
            "dtype": str(dtype),
        }
        vae.to(device).eval().requires_grad_(False)
        text_encoder.to(device).eval().requires_grad_(False)
        return cls(cfg, vae, text_encoder, tokenizer, processor, device, dtype, parts)

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.fingerprint_parts)

    @property
    def edit(self) -> EditConditioning:
        """The edit pipeline these encoders match (encoders.edit_template)."""
        return EDIT_CONDITIONINGS[self.cfg.edit_template]

    @property
    def edit_vision_area(self) -> int:
        return self.cfg.edit_vision_area or self.edit.vision_area

    def description(self) -> dict:
        """What a cache records of the encoders that wrote it (`record_cache_kind`): readable
        where the fingerprint is a hash."""
        return {"encoders_fingerprint": self.fingerprint, "edit_template": self.edit.name,
                "edit_pipeline": self.edit.pipeline, "edit_vision_area": self.edit_vision_area,
                "max_text_tokens": self.cfg.max_text_tokens, "resample": self.cfg.resample, "dtype": str(self.dtype)}

    @property
    def latent_channels(self) -> int:
        return self.vae.config.z_dim

    @property
    def text_dim(self) -> int:
        return self.text_encoder.config.text_config.hidden_size

    def preprocess_image(self, img: Image.Image, size: tuple[int, int]) -> torch.Tensor:
        """`preprocess_image` with this encoder's (fingerprinted) resample filter."""
        return preprocess_image(img, size, self.cfg.resample)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> normalized posterior mode [B, 16, H/8, W/8], float32 CPU."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"encode_images wants [B, 3, H, W], got {tuple(pixels.shape)}")
        if pixels.shape[2] % 16 or pixels.shape[3] % 16:
            raise ValueError(f"encode_images wants H and W multiples of 16, got {tuple(pixels.shape[2:])}")
        x = pixels.to(self.device, self.dtype).unsqueeze(2)  # [B, 3, 1, H, W]: one video frame
        z = self.vae.encode(x).latent_dist.mode()[:, :, 0].float()  # [B, 16, H/8, W/8]
        config = self.vae.config
        mean = torch.tensor(config.latents_mean, device=z.device).view(1, -1, 1, 1)
        std = torch.tensor(config.latents_std, device=z.device).view(1, -1, 1, 1)
        return ((z - mean) / std).cpu()

    def prompt_ids(self, captions: list[str]) -> list[list[int]]:
        """Text-to-image token ids per caption (the template applied, limits enforced)."""
        return [build_input_ids(self.tokenizer, T2I_TEMPLATE, c, self.cfg.max_text_tokens) for c in captions]

    def encode_prompts(self, captions: list[str]) -> list[torch.Tensor]:
        """Text-to-image prompt features: one float32 CPU [L_i, D] per caption, L_i <= max_text_tokens."""
        if not captions:
            return []
        return self._forward(self.prompt_ids(captions), T2I_TEMPLATE.drop)

    def edit_vision_inputs(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Qwen2.5-VL pixel patches, grid (t, h, w) per image, and image tokens per image."""
        if self.image_processor is None:
            raise EncodersNotFoundError(
                f"edit prompts need {self.cfg.dir}/processor/preprocessor_config.json "
                "(Qwen2VLImageProcessor config, as in the Qwen-Image-Edit release)"
            )
        # the pipelines' VaeImageProcessor.resize: PIL lanczos to calculate_dimensions(area, ratio)
        resized = [
            img.convert("RGB").resize(vision_size(img, self.edit_vision_area), Image.Resampling.LANCZOS)
            for img in images
        ]
        out = self.image_processor(images=resized, return_tensors="pt")
        grid = out["image_grid_thw"]
        merge = self.image_processor.merge_size
        return out["pixel_values"], grid, [int(g.prod()) // merge**2 for g in grid]

    def edit_prompt_ids(self, captions: list[str], image_tokens: list[int]) -> list[list[int]]:
        return [
            build_input_ids(self.tokenizer, self.edit.template, c, self.cfg.max_text_tokens, n)
            for c, n in zip(captions, image_tokens, strict=True)
        ]

    def encode_edit_prompts(self, captions: list[str], images: list[Image.Image]) -> list[torch.Tensor]:
        """Edit prompt features: the source image as vision tokens before the instruction, as
        `encoders.edit_template`'s diffusers pipeline computes them (producer/prompts.py)."""
        if len(captions) != len(images):
            raise ValueError(f"{len(captions)} edit instructions but {len(images)} source images")
        if not captions:
            return []
        pixel_values, grid, counts = self.edit_vision_inputs(images)
        ids = self.edit_prompt_ids(captions, counts)
        return self._forward(ids, self.edit.template.drop, pixel_values, grid)

    @torch.no_grad()
    def _forward(self, ids: list[list[int]], drop: int, pixel_values=None, grid=None) -> list[torch.Tensor]:
        """Right-padded batch through Qwen2.5-VL; per sample the valid last hidden states after `drop`."""
        lengths = [len(i) for i in ids]
        input_ids = torch.full((len(ids), max(lengths)), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, (seq, n) in enumerate(zip(ids, lengths)):
            input_ids[row, :n] = torch.tensor(seq)
            mask[row, :n] = 1
        kwargs = {}
        if pixel_values is not None:
            kwargs = dict(pixel_values=pixel_values.to(self.device, self.dtype), image_grid_thw=grid.to(self.device))
        # .model skips the LM head; its last_hidden_state is hidden_states[-1] (after the final norm).
        hidden = self.text_encoder.model(
            input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device), **kwargs
        ).last_hidden_state
        return [hidden[row, drop:n].float().cpu() for row, n in enumerate(lengths)]


# ----------------------------------------------------------------------------- a cache's kind

CACHE_KIND = "encoders.json"
"""<cache dir>/<fingerprint>/encoders.json: `Encoders.description()` of the encoders that wrote
the records under that fingerprint (the fingerprint itself is a hash that says nothing)."""


def record_cache_kind(cache_dir: str | Path, fingerprint: str, encoders: "Encoders") -> None:
    """Record which encoders (and which edit conditioning) write under `fingerprint`."""
    from mmdit.utils.atomic import atomic_write_json

    path = Path(cache_dir) / fingerprint / CACHE_KIND
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, encoders.description(), indent=1)


def cache_kinds(cache_dir: str | Path) -> dict[str, dict]:
    """fingerprint -> its recorded description, for every fingerprint of the cache that has one."""
    out = {}
    for path in sorted(Path(cache_dir).glob(f"*/{CACHE_KIND}")):
        try:
            out[path.parent.name] = json.loads(path.read_text())
        except (OSError, ValueError):  # unreadable: as if not recorded (caches before the record)
            continue
    return out


def other_edit_kinds(cache_dir: str | Path, encoders: "Encoders") -> list[str]:
    """Why these encoders must not add to the cache: one line per fingerprint recorded with
    another edit conditioning (a trainer drawing from both would be conditioned like neither
    pipeline); [] when none is."""
    mine = encoders.edit
    return [f"cache {cache_dir} holds edit features of encoders.edit_template={kind.get('edit_template')!r} "
            f"({kind.get('edit_pipeline')}, source image at {kind.get('edit_vision_area')} pixels) under {fp}; "
            f"these encoders make {mine.name!r} ({mine.pipeline}, {encoders.edit_vision_area} pixels)"
            for fp, kind in cache_kinds(cache_dir).items()
            if (kind.get("edit_template"), kind.get("edit_vision_area")) != (mine.name, encoders.edit_vision_area)]
