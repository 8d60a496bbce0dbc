"""One spelling of dtypes in every config: `auto`, `bf16`, `fp16`, `fp32`."""

from __future__ import annotations

DTYPE_NAMES = ("bf16", "fp16", "fp32")


def check_dtype(key: str, name: str, allowed: tuple[str, ...] = ("auto", *DTYPE_NAMES)) -> None:
    """Raise ValueError naming `key` when `name` is not one of `allowed`."""
    if name not in allowed:
        raise ValueError(f"{key} must be one of {', '.join(allowed)}, got {name!r}")


def resolve_dtype(name: str, device_type: str):
    """The torch dtype of a config name; `auto` is bf16 on a GPU and fp32 elsewhere."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device_type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
