"""`train.lora`: low-rank adapters on the tensor-parallel linears instead of full training (model/lora.py)."""

from dataclasses import dataclass, field

DEFAULT_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                   "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
                   "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")
"""The attention projections and the MLPs of both streams (what Qwen-Image LoRA trainers adapt)."""


@dataclass
class LoraConfig:
    """LoRA: W x + (alpha / rank) B A x on each targeted linear, the base weights frozen (and
    kept in the compute dtype: bf16 on GPU), only A and B trained, optimized and checkpointed."""

    rank: int = 0
    """Adapter rank r (0: LoRA off, full training)."""
    alpha: float = 0.0
    """Scale numerator: the adapter's output is multiplied by alpha / rank (0: alpha = rank)."""
    dropout: float = 0.0
    """Dropout on the adapter's input (as peft's lora_dropout). The ranks of a TP group draw the
    same masks (one torch seed per DP rank); masks are not part of a checkpoint, so a resumed run
    equals an uninterrupted one exactly only without dropout."""
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    """Linears to adapt, by diffusers module name: a name matches a pattern when it ends with
    "." + pattern or matches it as a glob (`transformer_blocks.1*.attn.to_q`). The attention
    projections, the MLPs and the modulation (`img_mod.1`, `txt_mod.1`) can be adapted."""
    init_from: str = ""
    """Start from an existing adapter: a diffusers/PEFT LoRA safetensors file (or a dir holding
    pytorch_lora_weights.safetensors) or an mmdit LoRA checkpoint; its rank must equal `rank`."""

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return (self.alpha or self.rank) / self.rank

    def __post_init__(self):
        if self.rank < 0 or self.alpha < 0 or not 0 <= self.dropout < 1:
            raise ValueError("train.lora.rank and train.lora.alpha must be >= 0, train.lora.dropout in [0, 1)")
        if self.rank and not self.targets:
            raise ValueError("train.lora.targets must name at least one linear")
