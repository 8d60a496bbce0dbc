"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric"), computed here rather than through the `lpips` package.

    d(x, y) = sum_l mean_hw( w_l . (f_l(x) / |f_l(x)| - f_l(y) / |f_l(y)|)^2 )

f_l: a frozen backbone's feature map at layer l (ReLU outputs before each pooling stage), unit-
normalized over channels; w_l: learned non-negative 1x1 weights per channel ("lin" layers).
Inputs are images in [-1, 1], shifted and scaled as the `lpips` package's ScalingLayer does.

Why not the `lpips` package: it imports torchvision, and no torchvision wheel installs beside the
CPU torch this project pins (the one that installs needs another, multi-GB torch); the whole
metric is the 40 lines below. The parameter names are the reference's, so real weights load
unchanged: the backbone's as torchvision names them (`features.N.weight`, e.g. torchvision's
`vgg16-397923af.pth`), the lin layers' as `lpips` names them (`lin{k}.model.1.weight`, its
`weights/v0.1/vgg.pth`). A weights directory holds:

    config.json                   {"net": "vgg16"} | {"net": "alexnet"} | {"net": "vgg", "layers": [8, "M", ...]}
    backbone.safetensors|.pth     features.N.weight / .bias (other keys, e.g. classifier.*, are ignored)
    lpips.safetensors|.pth        lin0.model.1.weight ... lin{L-1}.model.1.weight, each [1, C_l, 1, 1]

`write_random_lpips(dir)` writes a tiny random one as such a directory (tests, the demo).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
"""torchvision's VGG16 configuration "D": 3x3 convolutions (channels) and 2x2 max pools (M)."""
TINY_VGG = (8, "M", 16, "M", 16, "M")
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10


def vgg_features(layers) -> tuple[nn.Sequential, list[int]]:
    """torchvision's `make_layers(cfg)` (no batch norm), and the index of the ReLU ending each
    stage (the layer before each pool): LPIPS's taps (3, 8, 15, 22, 29 for VGG16)."""
    modules, taps, channels = [], [], 3
    for item in layers:
        if item == "M":
            taps.append(len(modules) - 1)
            modules.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            modules += [nn.Conv2d(channels, int(item), kernel_size=3, padding=1), nn.ReLU(inplace=False)]
            channels = int(item)
    return nn.Sequential(*modules), taps


def alexnet_features() -> tuple[nn.Sequential, list[int]]:
    """torchvision's AlexNet `features`; LPIPS taps the five ReLUs (1, 4, 7, 9, 11)."""
    features = nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(), nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(kernel_size=3, stride=2),
    )
    return features, [1, 4, 7, 9, 11]


def backbone(config: dict) -> tuple[nn.Sequential, list[int]]:
    net = config.get("net", "vgg16")
    if net == "vgg16":
        return vgg_features(VGG16)
    if net == "alexnet":
        return alexnet_features()
    if net == "vgg":
        return vgg_features(config["layers"])
    raise ValueError(f"LPIPS config.json: net must be vgg16, alexnet or vgg (with layers), got {net!r}")


class LinLayer(nn.Module):
    """lpips's NetLinLayer: Dropout (a no-op at inference; kept so the weight is `model.1`), 1x1 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(p=0.0), nn.Conv2d(channels, 1, kernel_size=1, bias=False))


class LPIPS(nn.Module):
    """`lpips(x, y) -> [B]` perceptual distances; x, y [B, 3, H, W] in [-1, 1]. Frozen: gradients
    reach the inputs only."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        self.features, self.taps = backbone(config)
        channels = [self.features[t - 1].out_channels for t in self.taps]  # the conv before each tapped ReLU
        for k, c in enumerate(channels):
            self.add_module(f"lin{k}", LinLayer(c))
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.features = self.features[: self.taps[-1] + 1]  # nothing after the last tap is used
        self.requires_grad_(False).eval()

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        x, out = (x - self.shift) / self.scale, []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = 0.0
        for k, (fx, fy) in enumerate(zip(self.feature_maps(x), self.feature_maps(y))):
            nx = fx / (fx.pow(2).sum(dim=1, keepdim=True).sqrt() + EPS)
            ny = fy / (fy.pow(2).sum(dim=1, keepdim=True).sqrt() + EPS)
            lin = getattr(self, f"lin{k}").model[1]
            total = total + lin((nx - ny) ** 2).mean(dim=(1, 2, 3))  # [B]: spatial mean of the weighted map
        return total

    @classmethod
    def load(cls, directory: str | Path) -> "LPIPS":
        """From a weights directory (module docstring); FileNotFoundError/ValueError naming what
        is missing or does not fit."""
        root = Path(directory)
        config = json.loads((root / "config.json").read_text()) if (root / "config.json").is_file() else {}
        model = cls(config)
        state = {k: v for k, v in _read_state(root, "backbone").items() if k.startswith("features.")}
        state |= _read_state(root, "lpips")
        wanted = set(model.state_dict())
        missing, extra = sorted(wanted - set(state)), sorted(k for k in state if k not in wanted)
        if missing or extra:
            raise ValueError(f"LPIPS weights in {root} do not fit net {model.config.get('net', 'vgg16')!r}: "
                             f"missing {missing[:4]}, unexpected {extra[:4]}")
        model.load_state_dict(state)
        if any((getattr(model, f"lin{k}").model[1].weight < 0).any() for k in range(len(model.taps))):
            raise ValueError(f"LPIPS lin weights in {root} must be non-negative (a distance)")
        return model


def _read_state(root: Path, stem: str) -> dict[str, torch.Tensor]:
    if (root / f"{stem}.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(root / f"{stem}.safetensors"))
    if (root / f"{stem}.pth").is_file():
        return torch.load(root / f"{stem}.pth", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"LPIPS weights: {root} has neither {stem}.safetensors nor {stem}.pth")


def write_random_lpips(directory: str | Path, layers=TINY_VGG, seed: int = 0) -> Path:
    """A random LPIPS of a small VGG-style backbone, saved as a real weights directory (the
    format real weights load from); its lin weights are non-negative, as trained ones are."""
    from mmdit.utils.atomic import atomic_save_safetensors, atomic_write_json

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    config = {"net": "vgg", "layers": list(layers)}
    torch.manual_seed(seed)
    model = LPIPS(config)
    state = model.state_dict()
    for name, value in state.items():
        if name.startswith("lin"):
            value.abs_()
    for stem, prefix in (("backbone", "features."), ("lpips", "lin")):
        atomic_save_safetensors({k: v for k, v in state.items() if k.startswith(prefix)}, root / f"{stem}.safetensors")
    atomic_write_json(root / "config.json", config)
    return root
