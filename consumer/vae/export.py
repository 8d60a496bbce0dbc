"""Export the fine-tuned decoder back to the diffusers layout.

    export_vae(base_vae_dir, decoder_weights, out_vae_dir)
        out/config.json                           the base's, byte for byte (latents_mean/std too)
        out/diffusion_pytorch_model.safetensors   the base's tensors with the decoder path replaced,
                                                  each in the base file's dtype; every other
                                                  tensor (the encoder half) written back as read:
                                                  same dtype, same bytes (checked)
        out/mmdit_lineage.json                    the base's fingerprint identity and this encoder
                                                  half's hash (producer/encoders.py): caches made
                                                  with the base stay valid

    export_layout(base_root, decoder_weights, out_root)
        a Qwen-Image-layout base: out_root/vae/ as above, every other component (text_encoder/,
        tokenizer/, transformer/, ...) linked to the base's (copied where links fail), so
        `encoders.dir=out_root`, `mmdit sample` and `QwenImagePipeline.from_pretrained(out_root)`
        take the new decoder.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from mmdit.consumer.vae.model import TRAINABLE
from mmdit.producer.encoders import VAE_LINEAGE, encoder_half_identity, vae_identity
from mmdit.utils.atomic import atomic_path, atomic_save_safetensors, atomic_write_json
from mmdit.utils.safetensors_header import read_header


def export_vae(base: Path, decoder_weights: dict[str, torch.Tensor], out: Path) -> Path:
    from safetensors.torch import load_file

    base, out = Path(base), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    replaced = set()
    for path in sorted(base.glob("*.safetensors")):
        tensors = load_file(str(path))
        for name in tensors:
            if name.startswith(TRAINABLE):
                if name not in decoder_weights:
                    raise KeyError(f"the fine-tuned decoder lacks {name!r} of {path}")
                tensors[name] = decoder_weights[name].detach().to(tensors[name].dtype).cpu()
                replaced.add(name)
        metadata = read_header(path)[0].get("__metadata__")
        atomic_save_safetensors(tensors, out / path.name, metadata=metadata)
    if missing := sorted(set(decoder_weights) - replaced):
        raise KeyError(f"{base} has no {missing[:3]}: not the VAE the decoder was trained from")
    for path in sorted(base.iterdir()):  # config.json and anything else but the weights, verbatim
        if path.is_file() and path.suffix != ".safetensors" and path.name != VAE_LINEAGE:
            with atomic_path(out / path.name) as tmp:
                shutil.copyfile(path, tmp)
    atomic_write_json(out / VAE_LINEAGE, {"identity": vae_identity(base), "encoder_half": encoder_half_identity(base),
                                          "note": "written by `mmdit vae-train`: the decoder was fine-tuned, the "
                                                  "encoder half is the base's, so are its cached latents"})
    if encoder_half_identity(out) != encoder_half_identity(base):
        raise RuntimeError(f"export to {out}: the encoder half changed (a bug: it must be copied bit for bit)")
    return out


def export_layout(base_root: Path, decoder_weights: dict[str, torch.Tensor], out_root: Path) -> Path:
    """A Qwen-Image layout with the new vae/ (module docstring); a bare VAE base gives out_root/vae only."""
    from mmdit.consumer.vae.model import vae_folder

    base_root, out_root = Path(base_root), Path(out_root)
    base_vae = vae_folder(base_root)
    export_vae(base_vae, decoder_weights, out_root / "vae")
    if base_vae == base_root:
        return out_root
    for entry in sorted(base_root.iterdir()):
        target = out_root / entry.name
        if entry.name == "vae" or target.exists() or target.is_symlink():
            continue
        try:
            target.symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
        except OSError:  # no links on this file system: a copy
            (shutil.copytree if entry.is_dir() else shutil.copyfile)(entry, target)
    return out_root

