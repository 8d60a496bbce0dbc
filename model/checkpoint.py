"""mmdit model checkpoints: one safetensors file per tensor-parallel rank, reshardable.

Layout of a checkpoint directory:
    mmdit.json                          format, model args, TP size, per-parameter split dim
    model-tp00-of-02.safetensors        rank 0's slices (diffusers parameter names)
    model-tp01-of-02.safetensors        ...
A reader at any TP size joins the slices along each parameter's split dim and cuts its own, so a
checkpoint written at TP=2 loads at TP=1 or TP=4. `mmdit.json` is written last (after every
shard is in place), so a directory without it is an incomplete checkpoint and is never loaded.

A LoRA model's checkpoint (model/lora.py) has the same layout with its adapters only, and a
`lora` record in `mmdit.json` (model/lora_io.py): loaded into a LoRA model it resumes the
adapters; into a plain one, it loads the base weights it names and merges the adapters in.
"""

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open

from mmdit.config.model import MMDiTArgs
from mmdit.model.qkv import to_diffusers
from mmdit.utils.atomic import atomic_save_safetensors, atomic_write_json

# mmdit.model.sharding (megatron's layers, seconds to import) is imported where it is used, so
# reading an index (`mmdit checkpoint verify`, `mmdit sample`'s first checks) stays light.

FORMAT = "mmdit-model/1"
INDEX = "mmdit.json"


def shard_file(rank: int, size: int) -> str:
    return f"model-tp{rank:02d}-of-{size:02d}.safetensors"


def _write_index(path: Path, args: MMDiTArgs, tp: int, dims: dict, dtype: torch.dtype, lora: dict | None = None) -> None:
    index = {"format": FORMAT, "model": asdict(args), "tp": tp, "dtype": str(dtype).removeprefix("torch."),
             "partition_dims": dims, "files": [shard_file(r, tp) for r in range(tp)]}
    if lora is not None:  # a LoRA checkpoint: the adapters only (model/lora_io.py)
        index["lora"] = lora
    atomic_write_json(path / INDEX, index)


def is_lora(model) -> bool:
    """Does `model` train LoRA adapters (model/lora.py), so that its checkpoints hold them only?"""
    return getattr(model, "lora_info", None) is not None


def checkpoint_tensors(model) -> dict[str, torch.Tensor]:
    """This TP rank's part of a checkpoint of `model`: its slices of every parameter (diffusers
    names), or of its LoRA adapters only."""
    if is_lora(model):
        from mmdit.model.lora_io import adapter_tensors

        return {name: t for name, t, _ in adapter_tensors(model)}
    return dict(to_diffusers(model.named_parameters(), model.args.attention_head_dim))


def write_model_shard(model, path: str | os.PathLike) -> None:
    """This TP rank's slices of every parameter (of the adapters, for a LoRA model)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    local = checkpoint_tensors(model)
    atomic_save_safetensors(local, path / shard_file(model.tp_rank, model.tp_size), {"format": FORMAT})


def write_model_index(model, path: str | os.PathLike) -> None:
    """The index that makes a checkpoint loadable: write it once every shard is in place."""
    if is_lora(model):
        from mmdit.model.lora_io import adapter_tensors, lora_record

        dims = {name: dim for name, _, dim in adapter_tensors(model)}
        dtype = next(t for _, t, _ in adapter_tensors(model)).dtype
        _write_index(Path(path), model.args, model.tp_size, dims, dtype, lora_record(model))
        return
    from mmdit.model.sharding import diffusers_partition_dims

    dtype = next(model.parameters()).dtype
    _write_index(Path(path), model.args, model.tp_size, diffusers_partition_dims(model), dtype)


def save_model(model, path: str | os.PathLike, barrier=None) -> None:
    """Collective over the TP group: every TP rank writes its slices; after `barrier()` (all
    shards written), TP rank 0 writes the index."""
    write_model_shard(model, path)
    if barrier is not None:
        barrier()
    if model.tp_rank == 0:
        write_model_index(model, path)


def save_full_state_dict(full: dict[str, torch.Tensor], args: MMDiTArgs, dims: dict, path: str | os.PathLike,
                         tp: int) -> None:
    """Write a full (unsharded) state dict as a TP=tp checkpoint, from one process."""
    from mmdit.model.sharding import shard

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for rank in range(tp):
        atomic_save_safetensors({k: shard(v, dims[k], rank, tp) for k, v in full.items()}, path / shard_file(rank, tp),
                     {"format": FORMAT})
    _write_index(path, args, tp, dims, next(iter(full.values())).dtype)


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / INDEX).is_file()


def read_index(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not is_checkpoint(path):
        raise FileNotFoundError(f"{path} is not an mmdit checkpoint (no {INDEX})")
    index = json.loads((path / INDEX).read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported checkpoint format {index.get('format')!r}")
    return index


def checkpoint_args(path: str | os.PathLike) -> MMDiTArgs:
    return MMDiTArgs(**read_index(path)["model"])


def iter_full_tensors(path: str | os.PathLike):
    """Yield (name, full tensor) for every parameter, joining the TP slices one tensor at a time."""
    from mmdit.model.sharding import unshard

    path = Path(path)
    index = read_index(path)
    handles = [safe_open(str(path / f), framework="pt") for f in index["files"]]
    for name, dim in index["partition_dims"].items():
        parts = [h.get_tensor(name) for h in (handles if dim is not None else handles[:1])]
        yield name, unshard(parts, dim)


def load_full_state_dict_from(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    return dict(iter_full_tensors(path))


@torch.no_grad()
def load_model(model, path: str | os.PathLike) -> None:
    """Load a checkpoint of any TP size into this rank's shard of `model`."""
    from mmdit.model.sharding import diffusers_partition_dims, local_from_parts, shard, unshard

    index = read_index(path)
    if MMDiTArgs(**index["model"]) != model.args:
        raise ValueError(f"checkpoint {path} has model {index['model']}, not {asdict(model.args)}")
    if "lora" in index:
        load_lora_checkpoint(model, path, index["lora"])
        return
    dims = diffusers_partition_dims(model)
    missing = sorted(set(dims) - set(index["partition_dims"]))
    if missing:
        raise KeyError(f"checkpoint {path} lacks parameters {missing[:8]}")
    same_layout = index["tp"] == model.tp_size
    files = [index["files"][model.tp_rank]] if same_layout else index["files"]
    handles = [safe_open(str(Path(path) / f), framework="pt") for f in files]

    def local_part(name: str) -> torch.Tensor:
        if same_layout:
            return handles[0].get_tensor(name)
        saved_dim = index["partition_dims"][name]
        parts = [h.get_tensor(name) for h in (handles if saved_dim is not None else handles[:1])]
        return shard(unshard(parts, saved_dim), dims[name], model.tp_rank, model.tp_size)

    for name, p in model.named_parameters():
        local = local_from_parts(model, name, local_part)
        if local.shape != p.shape:
            raise ValueError(f"{name}: checkpoint gives {tuple(local.shape)}, model has {tuple(p.shape)}")
        p.copy_(local.to(device=p.device, dtype=p.dtype))


def load_weights(model, src: str | os.PathLike) -> None:
    """Load an mmdit checkpoint (any TP size) or a diffusers transformer dir into `model`."""
    if is_checkpoint(src):
        load_model(model, src)
        return
    from mmdit.model.diffusers_io import read_diffusers
    from mmdit.model.sharding import load_full_state_dict

    args, state = read_diffusers(src)
    if args != model.args:
        raise ValueError(f"{src} has model {asdict(args)}, not {asdict(model.args)}")
    load_full_state_dict(model, state)


def weights_args(src: str | os.PathLike) -> MMDiTArgs:
    """Model args of an mmdit checkpoint or a diffusers transformer dir."""
    if is_checkpoint(src):
        return checkpoint_args(src)
    from mmdit.model.diffusers_io import read_config

    return MMDiTArgs.from_diffusers_config(read_config(src))


def load_lora_checkpoint(model, path: str | os.PathLike, record: dict) -> None:
    """Load an mmdit LoRA checkpoint (any TP size): into the model's adapters when it has them
    (resume), else on top of its base weights, merged (sampling, evaluation: the model the run trained)."""
    from mmdit.model.lora import apply_lora, merge
    from mmdit.model.lora_io import config_of, load_adapter_state

    full = dict(iter_full_tensors(path))
    if is_lora(model):
        if record["scale"] != model.lora_info["scale"] or record["rank"] != model.lora_info["rank"]:
            raise ValueError(f"{path} holds adapters of rank {record['rank']} scale {record['scale']}; this run "
                             f"trains rank {model.lora_info['rank']} scale {model.lora_info['scale']} (train.lora)")
        load_adapter_state(model, full)
        return
    if not record.get("base"):
        raise ValueError(f"{path} holds LoRA adapters of a run that started from init_weights(seed="
                         f"{record.get('seed')}), no base weights on disk: load them into a model with train.lora")
    load_weights(model, record["base"])
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    apply_lora(model, config_of(record), seed=0, dtype=torch.float32)
    load_adapter_state(model, full)
    merge(model)
    for name, p in model.named_parameters():
        p.requires_grad_(trainable[name])


def import_lora(model, src: str | os.PathLike, scale: float) -> list[str]:
    """Load an existing LoRA (diffusers/PEFT file or dir, or an mmdit LoRA checkpoint) into the
    model's adapters, whose forward multiplies B by `scale`; returns the adapter weights the
    source lacks (they keep their initialization)."""
    from mmdit.model.lora_io import load_adapter_state, read_lora_file

    if is_checkpoint(src):
        saved = read_index(src).get("lora")
        if saved is None:
            raise ValueError(f"{src} is a full mmdit checkpoint, not a LoRA one (checkpoint.init_from takes it)")
        full = {n: t.float() * (saved["scale"] / scale if n.endswith(".lora_B.weight") else 1.0)
                for n, t in iter_full_tensors(src)}
    else:
        folded = read_lora_file(src)
        full = {n: t / scale if n.endswith(".lora_B.weight") else t for n, t in folded.items()}
    return load_adapter_state(model, full, strict=False)
