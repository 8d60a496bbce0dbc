"""MMDiT model arguments: the shape of a Qwen-Image-class transformer, and what follows from it."""

from dataclasses import dataclass, field


@dataclass
class MMDiTArgs:
    """Architecture of a dual-stream MMDiT. Defaults are the released Qwen-Image (20.43B)."""

    patch_size: int = 2
    """Side of the square latent patch packed into one image token."""
    in_channels: int = 64
    """Channels of one packed image token: latent_channels * patch_size**2."""
    out_channels: int = 16
    """Latent channels predicted per pixel of the latent (velocity)."""
    num_layers: int = 60
    """Dual-stream blocks."""
    num_attention_heads: int = 24
    """Attention heads per stream; parallel.tp must divide it (each TP rank owns whole heads)."""
    attention_head_dim: int = 128
    """Width of one head; hidden size = num_attention_heads * attention_head_dim."""
    joint_attention_dim: int = 3584
    """Width of the condition encoder's (Qwen2.5-VL) hidden states."""
    mlp_ratio: float = 4.0
    """MLP hidden width / hidden size (GELU-tanh MLP in both streams)."""
    axes_dims_rope: list[int] = field(default_factory=lambda: [16, 56, 56])
    """MSRoPE dims per axis (frame, row, col); they sum to attention_head_dim."""
    rope_theta: int = 10000
    """MSRoPE base frequency."""
    eps: float = 1e-6
    """Epsilon of the LayerNorms (no affine) and the q/k RMSNorms."""

    def __post_init__(self):
        for name in ("patch_size", "in_channels", "out_channels", "num_layers", "num_attention_heads",
                     "attention_head_dim", "joint_attention_dim", "rope_theta"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if not self.mlp_ratio > 0 or not self.eps > 0:
            raise ValueError(f"model.mlp_ratio and model.eps must be > 0, got {self.mlp_ratio}, {self.eps}")
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                f"axes_dims_rope {list(self.axes_dims_rope)} must sum to attention_head_dim "
                f"{self.attention_head_dim}"
            )
        if any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(f"axes_dims_rope {list(self.axes_dims_rope)} must all be even")
        if self.in_channels != self.latent_channels * self.patch_size**2:
            raise ValueError(
                f"in_channels {self.in_channels} must be out_channels * patch_size**2 = "
                f"{self.latent_channels * self.patch_size**2}"
            )

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_hidden_size(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def latent_channels(self) -> int:
        return self.out_channels

    def diffusers_config(self) -> dict:
        """The `QwenImageTransformer2DModel` config with this shape."""
        return {
            "_class_name": "QwenImageTransformer2DModel",
            "patch_size": self.patch_size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "num_layers": self.num_layers,
            "attention_head_dim": self.attention_head_dim,
            "num_attention_heads": self.num_attention_heads,
            "joint_attention_dim": self.joint_attention_dim,
            "guidance_embeds": False,
            "axes_dims_rope": list(self.axes_dims_rope),
        }

    @classmethod
    def from_diffusers_config(cls, config: dict) -> "MMDiTArgs":
        unsupported = [k for k in ("guidance_embeds", "zero_cond_t", "use_additional_t_cond",
                                   "use_layer3d_rope") if config.get(k)]
        if unsupported:
            raise ValueError(f"diffusers config options not supported by mmdit: {unsupported}")
        return cls(
            patch_size=config.get("patch_size", 2),
            in_channels=config.get("in_channels", 64),
            out_channels=config.get("out_channels") or config.get("in_channels", 64),
            num_layers=config["num_layers"],
            num_attention_heads=config["num_attention_heads"],
            attention_head_dim=config["attention_head_dim"],
            joint_attention_dim=config["joint_attention_dim"],
            axes_dims_rope=list(config.get("axes_dims_rope", (16, 56, 56))),
        )
