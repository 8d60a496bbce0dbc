"""LoRA adapters on disk: mmdit's checkpoints of them, and the diffusers/PEFT files others load.

Names are diffusers', as PEFT writes them for a `QwenImageTransformer2DModel`:
`transformer_blocks.0.attn.to_q.lora_A.weight` [r, in] and `...lora_B.weight` [out, r] (the
fused q/k/v adapter of model/lora.py is three such pairs).

- mmdit LoRA checkpoint: the model checkpoint format (model/checkpoint.py: `mmdit.json` + one
  safetensors file of slices per TP rank, reshardable at any TP size) holding the adapters only,
  its index with a `lora` record: rank, alpha, targets, the adapted modules, and the base weights
  the adapters apply to (`base`: checkpoint.init_from of the run; "" = init_weights(seed)).
- diffusers file (`mmdit convert lora-to-diffusers`): `pytorch_lora_weights.safetensors`, keys
  prefixed `transformer.`, the scale alpha/rank folded into B and `lora_alpha = r` in the
  `lora_adapter_metadata` diffusers reads, so `QwenImagePipeline.load_lora_weights` (and any
  loader that ignores the metadata) applies exactly what mmdit trained.
- Import (`train.lora.init_from`): such a file, a PEFT adapter dir (adapter_model.safetensors +
  adapter_config.json) or an mmdit LoRA checkpoint; alpha from the metadata, the PEFT config or
  kohya-style `.alpha` keys (else alpha = rank). Refused with a ValueError naming the file (and
  the key): a path that is not a regular file or directory (a FIFO is never opened), a file that
  is not safetensors or is truncated, a B without its A, tensors whose shapes do not fit the
  model's adapters (both shapes named), NaN or infinite values.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mmdit.config.lora import LoraConfig
from mmdit.model.lora import adapters, diffusers_module_names

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
PEFT_FILE, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
METADATA_KEY = "lora_adapter_metadata"
PREFIXES = ("transformer.", "base_model.model.", "diffusion_model.")


def adapter_tensors(model) -> Iterator[tuple[str, torch.Tensor, int | None]]:
    """(diffusers name, this rank's tensor, its TP split dim) of every adapter weight."""
    for module_name, adapter in adapters(model):
        names = diffusers_module_names(module_name)
        for part, weights in adapter.parts.items():
            for key in ("lora_A", "lora_B"):
                yield f"{names[part]}.{key}.weight", getattr(weights, key), weights.lora_partition_dims[key]


def lora_record(model) -> dict:
    """What a LoRA checkpoint's index says of its adapters (set on the model by `parallelize`)."""
    return dict(model.lora_info)


@torch.no_grad()
def load_adapter_state(model, full: dict[str, torch.Tensor], strict: bool = True) -> list[str]:
    """Copy this rank's slice of each full adapter tensor (diffusers names) into the model's
    adapters; returns the names the model has but `full` lacks (strict: none may be missing).
    Tensors of modules the model does not adapt are an error: they would be lost."""
    from mmdit.model.sharding import shard

    local = {name: (t, dim) for name, t, dim in adapter_tensors(model)}
    unexpected = sorted(set(full) - set(local))
    if unexpected:
        raise KeyError(f"adapter weights for modules this model does not adapt (train.lora.targets): {unexpected[:6]}")
    missing = sorted(set(local) - set(full))
    if strict and missing:
        raise KeyError(f"adapter weights missing: {missing[:6]}")
    for name, (param, dim) in local.items():  # every tensor checked before any is copied
        if name not in full:
            continue
        expected = list(param.shape)
        if dim is not None:
            expected[dim] *= model.tp_size
        if tuple(full[name].shape) != tuple(expected):
            raise ValueError(f"{name}: shape {tuple(full[name].shape)} in the file, but this model's adapter is "
                             f"{tuple(expected)} (train.lora.rank, train.lora.targets?)")
        if not torch.isfinite(full[name]).all():
            raise ValueError(f"{name}: NaN or infinite values")
    for name, (param, dim) in local.items():
        if name in full:
            param.copy_(shard(full[name], dim, model.tp_rank, model.tp_size).to(param.dtype))
    return missing


# ----------------------------------------------------------------------------- diffusers / PEFT files


def _strip(name: str) -> str:
    for prefix in PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def read_lora_file(src: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A diffusers or PEFT LoRA -> {diffusers name: tensor}, the scale alpha / rank folded into
    each B, the names without prefix."""
    src = Path(src)
    config = {}
    if _kind(src) == "directory":
        for name in (DIFFUSERS_FILE, PEFT_FILE):
            if _kind(src / name) == "file":
                if _kind(src / PEFT_CONFIG) == "file":
                    config = _json(src / PEFT_CONFIG, (src / PEFT_CONFIG).read_text())
                src = src / name
                break
        else:
            raise FileNotFoundError(f"{src} holds neither {DIFFUSERS_FILE} nor {PEFT_FILE}")
    elif _kind(src) == "missing":
        raise ValueError(f"{src}: no such LoRA file or directory")
    elif _kind(src) != "file":
        raise ValueError(f"{src}: {_kind(src)}, not a LoRA file or directory")
    try:
        with safe_open(str(src), framework="pt") as f:
            raw = {_strip(k): f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{src}: not a readable safetensors file ({e})") from None
    if METADATA_KEY in metadata:
        packed = _json(src, metadata[METADATA_KEY])
        config = {k.removeprefix("transformer."): v for k, v in packed.items()}
    alphas = {k.removesuffix(".alpha"): float(v) for k, v in raw.items() if k.endswith(".alpha")}
    state = {}
    for name, tensor in raw.items():
        if name.endswith(".alpha"):
            continue
        if not (name.endswith(".lora_A.weight") or name.endswith(".lora_B.weight")):
            raise ValueError(f"{src}: {name} is not a LoRA weight (lora_A/lora_B); only LoRA files are read")
        state[name] = tensor.float()
    for name in [n for n in state if n.endswith(".lora_B.weight")]:
        module = name.removesuffix(".lora_B.weight")
        if f"{module}.lora_A.weight" not in state:
            raise ValueError(f"{src}: {name} has no {module}.lora_A.weight")
        rank = state[f"{module}.lora_A.weight"].shape[0]
        alpha = alphas.get(module, config.get("alpha_pattern", {}).get(module, config.get("lora_alpha", rank)))
        state[name] = state[name] * (float(alpha) / rank)
    return state


def _kind(path: Path) -> str:
    """file | directory | missing | what else the path is (never opened: a FIFO would block)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return "missing"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "directory"
    return "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"


def _json(src: Path, text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{src}: its LoRA config is not JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{src}: its LoRA config is not a JSON object")
    return value


def write_diffusers_lora(full: dict[str, torch.Tensor], scale: float, dst: str | os.PathLike) -> Path:
    """Full adapter tensors (mmdit scale `scale`) -> the file `QwenImagePipeline.load_lora_weights`
    reads; `dst` a .safetensors path or a dir (which gets pytorch_lora_weights.safetensors)."""
    dst = Path(dst)
    if dst.suffix != ".safetensors":
        dst.mkdir(parents=True, exist_ok=True)
        dst = dst / DIFFUSERS_FILE
    tensors = {f"transformer.{n}": (t.float() * scale if n.endswith(".lora_B.weight") else t.float()).contiguous()
               for n, t in full.items()}
    ranks = {t.shape[0] for n, t in full.items() if n.endswith(".lora_A.weight")}
    if len(ranks) != 1:
        raise ValueError(f"adapters of ranks {sorted(ranks)}: expected one rank")
    rank = ranks.pop()
    modules = sorted({n.removesuffix(".lora_A.weight") for n in full if n.endswith(".lora_A.weight")})
    config = {"r": rank, "lora_alpha": rank, "target_modules": modules, "lora_dropout": 0.0, "bias": "none"}
    metadata = {"format": "pt", METADATA_KEY: json.dumps({f"transformer.{k}": v for k, v in config.items()},
                                                         sort_keys=True)}
    save_file(tensors, str(dst), metadata=metadata)
    return dst


def lora_deltas(full: dict[str, torch.Tensor], scale: float) -> Iterator[tuple[str, torch.Tensor]]:
    """(diffusers weight name, scale * B @ A) of each adapted module, full tensors in fp32."""
    for name in sorted(full):
        if name.endswith(".lora_A.weight"):
            module = name.removesuffix(".lora_A.weight")
            yield f"{module}.weight", scale * full[f"{module}.lora_B.weight"].float() @ full[name].float()


def merge_into(state: dict[str, torch.Tensor], full: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A full diffusers state dict with the adapters folded in (each weight keeps its dtype)."""
    merged = dict(state)
    for name, delta in lora_deltas(full, scale):
        if name not in merged:
            raise KeyError(f"the base weights have no {name} for its adapter")
        merged[name] = (merged[name].float() + delta).to(merged[name].dtype)
    return merged


def config_of(record: dict) -> LoraConfig:
    """The LoraConfig a checkpoint's `lora` record was trained with (its adapted modules as targets)."""
    return LoraConfig(rank=record["rank"], alpha=record["alpha"], targets=list(record["modules"]))

