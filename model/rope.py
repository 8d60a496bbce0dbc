"""MSRoPE: Qwen-Image's multimodal scalable rotary position embedding.

Each image token sits at (frame, row, col): frame 0 is the target image, 1..n the condition
images of an edit; rows and columns are centred on the image (row r of h gets r - ceil(h/2)),
so one image's positions do not depend on its resolution's corner. Text token j sits at
max(h//2, w//2 over all images) + j on all three axes, i.e. on the diagonal just past the
images. The head dimension is split into axes_dims (frame, row, col), each rotated as
interleaved (even, odd) pairs. Matches diffusers' `QwenEmbedRope` with scale_rope=True.
"""

import functools

import torch

ImageShape = tuple[int, int, int]  # (frames, rows, cols) in packed tokens


def axis_inverse_frequencies(axes_dims: list[int], theta: float) -> list[torch.Tensor]:
    return [1.0 / torch.pow(theta, torch.arange(0, d, 2, dtype=torch.float32).div(d)) for d in axes_dims]


def image_positions(image_shapes: list[ImageShape]) -> torch.Tensor:
    """[N_img, 3] (frame, row, col) positions of the packed image tokens, image after image."""
    positions = []
    for index, (frames, rows, cols) in enumerate(image_shapes):
        f = torch.arange(index, index + frames)
        r = torch.arange(rows) - (rows - rows // 2)
        c = torch.arange(cols) - (cols - cols // 2)
        grid = torch.stack(torch.meshgrid(f, r, c, indexing="ij"), dim=-1)
        positions.append(grid.reshape(-1, 3))
    return torch.cat(positions)


def text_positions(image_shapes: list[ImageShape], text_len: int) -> torch.Tensor:
    """[L, 3] positions of text tokens: on the diagonal, after the largest image half-side."""
    start = max(max(rows // 2, cols // 2) for _, rows, cols in image_shapes)
    return (torch.arange(text_len) + start).unsqueeze(-1).expand(text_len, 3)


def rotary_angles(positions: torch.Tensor, axes_dims: list[int], theta: float) -> torch.Tensor:
    """[S, head_dim/2] rotation angles for positions [S, 3]."""
    inv = axis_inverse_frequencies(axes_dims, theta)
    return torch.cat([positions[:, i, None].float() * inv[i][None, :] for i in range(3)], dim=-1)


def msrope(image_shapes: list[ImageShape], text_len: int, axes_dims: list[int], theta: float = 10000,
           device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each [L + N_img, head_dim/2], for the joint sequence [text, images].

    Cached per (shapes, text length, device): a bucketed run sees few distinct shapes, and the
    tables are built on the host, so rebuilding them every step would cost a copy and a sync."""
    key = (tuple(tuple(s) for s in image_shapes), text_len, tuple(axes_dims), theta, str(device or "cpu"))
    return _cached_tables(*key)


@functools.lru_cache(maxsize=64)
def _cached_tables(image_shapes, text_len, axes_dims, theta, device):
    angles = torch.cat([
        rotary_angles(text_positions(list(image_shapes), text_len), list(axes_dims), theta),
        rotary_angles(image_positions(list(image_shapes)), list(axes_dims), theta),
    ]).to(device)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [B, S, H, D] by angles (cos, sin) [S, D/2], in fp32."""
    pairs = x.float().unflatten(-1, (-1, 2))  # [B, S, H, D/2, 2]
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)
