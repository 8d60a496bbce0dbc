"""Procedural textures for synthetic scenes (numpy only): gradients, smooth noise, brick, wood.

Every function takes a `numpy.random.Generator` and returns float32 RGB arrays [h, w, 3] in 0..255,
so a scene is a pure function of the generator's seed. Nothing here knows about text.
"""

import numpy as np
from PIL import Image


def smooth_noise(gen: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise [h, w] in about -1..1: a coarse random grid upsampled bicubically."""
    gh, gw = max(2, cells * h // max(h, w)), max(2, cells * w // max(h, w))
    grid = gen.standard_normal((gh, gw)).astype(np.float32)
    return np.asarray(Image.fromarray(grid, "F").resize((w, h), Image.BICUBIC)) / 1.5


def vertical_gradient(h: int, w: int, top: tuple[int, ...], bottom: tuple[int, ...]) -> np.ndarray:
    t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]  # [h, 1, 1]
    a, b = np.array(top, np.float32), np.array(bottom, np.float32)
    return np.broadcast_to(a + t * (b - a), (h, w, 3)).copy()


def tint(color: tuple[int, ...], shade: np.ndarray) -> np.ndarray:
    """`color` scaled by a [h, w] brightness map (1 = unchanged)."""
    return np.array(color, np.float32) * shade[..., None]


def plaster(gen: np.random.Generator, h: int, w: int, color: tuple[int, ...]) -> np.ndarray:
    """A painted wall: blotchy low-frequency shading plus fine grain."""
    shade = 1.0 + 0.03 * smooth_noise(gen, h, w, 6) + 0.02 * gen.standard_normal((h, w)).astype(np.float32)
    return tint(color, shade)


def grass(gen: np.random.Generator, h: int, w: int) -> np.ndarray:
    base = tint((70, 140, 55), 1.0 + 0.12 * smooth_noise(gen, h, w, 10))
    return base + 14 * gen.standard_normal((h, w, 1)).astype(np.float32)


def brick(gen: np.random.Generator, h: int, w: int, color: tuple[int, ...], brick_h: int) -> np.ndarray:
    """Running-bond brick: rows offset by half a brick, each brick a little lighter or darker."""
    brick_h = max(6, brick_h)
    brick_w, mortar = int(brick_h * 2.2), max(1, brick_h // 7)
    ys, xs = np.arange(h)[:, None], np.arange(w)[None, :]
    row = ys // brick_h
    shifted = xs + (row % 2) * (brick_w // 2)
    col = shifted // brick_w
    shades = 0.82 + 0.3 * gen.random((h // brick_h + 1, w // brick_w + 2)).astype(np.float32)
    shade = shades[row, col] + 0.04 * gen.standard_normal((h, w)).astype(np.float32)
    out = tint(color, shade)
    joint = ((ys % brick_h) < mortar) | ((shifted % brick_w) < mortar)  # [h, w]
    out[joint] = (200, 195, 185)
    return out


def wood(gen: np.random.Generator, h: int, w: int, color: tuple[int, ...], planks: int = 1) -> np.ndarray:
    """Horizontal wood grain (warped sine rings) in `planks` boards with dark seams between them."""
    ys = np.arange(h, dtype=np.float32)[:, None]
    rings = np.sin(ys * (0.25 + 0.2 * gen.random()) + 5.0 * smooth_noise(gen, h, w, 4))  # [h, w]
    out = tint(color, 0.9 + 0.08 * rings + 0.03 * gen.standard_normal((h, w)).astype(np.float32))
    for k in range(1, planks):
        y = k * h // planks
        out[max(0, y - 1):y + 1] *= 0.55
    return out


def to_image(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8), "RGB")
