"""Read and write the diffusers `QwenImageTransformer2DModel` format (config.json + safetensors).

mmdit parameter names equal diffusers', so a diffusers state dict is an mmdit full state dict.
"""

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mmdit.config.model import MMDiTArgs

WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
CLASS_NAME = "QwenImageTransformer2DModel"


def transformer_dir(src: str | os.PathLike) -> Path:
    """The transformer folder of a diffusers model dir or of a whole Qwen-Image repo."""
    src = Path(src)
    for candidate in (src, src / "transformer"):
        config = candidate / "config.json"
        if config.is_file() and json.loads(config.read_text()).get("_class_name") == CLASS_NAME:
            return candidate
    raise FileNotFoundError(f"{src} holds no {CLASS_NAME} (expected config.json here or in transformer/)")


def read_config(src: str | os.PathLike) -> dict:
    return json.loads((transformer_dir(src) / "config.json").read_text())


def weight_files(src: str | os.PathLike) -> list[Path]:
    folder = transformer_dir(src)
    if (folder / WEIGHTS_INDEX).is_file():
        weight_map = json.loads((folder / WEIGHTS_INDEX).read_text())["weight_map"]
        return [folder / f for f in sorted(set(weight_map.values()))]
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    raise FileNotFoundError(f"{folder} has neither {WEIGHTS} nor {WEIGHTS_INDEX}")


def read_diffusers(src: str | os.PathLike) -> tuple[MMDiTArgs, dict[str, torch.Tensor]]:
    """(model args, full state dict); errors name the file that could not be read."""
    config = transformer_dir(src) / "config.json"
    try:
        args = MMDiTArgs.from_diffusers_config(read_config(src))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{config}: not a usable {CLASS_NAME} config ({type(e).__name__}: {e})") from None
    state = {}
    for file in weight_files(src):
        try:
            with safe_open(str(file), framework="pt") as f:
                state.update({k: f.get_tensor(k) for k in f.keys()})
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types, naming no file
            raise ValueError(f"{file}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    return args, state


def write_diffusers(state: dict[str, torch.Tensor], args: MMDiTArgs, dst: str | os.PathLike,
                    max_shard_bytes: int = 5 * 1024**3) -> None:
    """Write config.json and the weights, split into <= max_shard_bytes files with an index
    (the layout `from_pretrained` reads) when they do not fit in one."""
    import diffusers

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    config = {**args.diffusers_config(), "_diffusers_version": diffusers.__version__}
    shards, current, size = [], {}, 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name], size = tensor.contiguous(), size + nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(dst / WEIGHTS), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, part in enumerate(shards):
            name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(part, str(dst / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in part})
        total = sum(t.numel() * t.element_size() for t in state.values())
        (dst / WEIGHTS_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                    indent=1))
    (dst / "config.json").write_text(json.dumps(config, indent=1))
