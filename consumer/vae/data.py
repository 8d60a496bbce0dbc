"""The decoder fine-tune's data: two pools of images read from webdataset shards, and seeded crops.

    pool = scan(shards, errors)          every image decoded once with producer/ingest.py's checks; a
                                         bad one (corrupt, truncated, zero-byte, bomb, bad key...) is
                                         counted under its reason in `errors` and never drawn
    sampler = CropSampler(text, general, seed, crop_size, text_fraction, global_batch)
    sampler.crop(step, index)            [3, S, S] in [-1, 1]: a pure function of (seed, step, index)

Global batch `step` holds round(text_fraction x B) text-rich crops (indices first) and the rest
general ones. Each pool is walked in a seeded permutation per epoch (every image once per epoch),
and each crop's position is drawn from (seed, step, index): any rank, any DP size and a resumed
run get the same crops, so the cursor a checkpoint needs is the step alone.

Images are kept as references: (shard, byte offset, size) of the image member in a local
uncompressed tar (read again at draw time), or the member's encoded bytes for shards that cannot be
seeked (compressed, remote, `pipe:`): those cost their compressed size in memory per rank.
"""

from __future__ import annotations

import hashlib
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from webdataset.tariterators import base_plus_ext

from mmdit.producer.encoders import preprocess_image
from mmdit.producer.ingest import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTS,
    SampleError,
    decode_image,
    sample_key,
    shard_urls,
    tar_samples,
)


@dataclass(frozen=True)
class ImageRef:
    key: str
    url: str
    member: str
    """The image member's extension (png, jpg, ...)."""
    offset: int = -1
    """Byte offset of the member's data in a local uncompressed tar; -1: `data` holds the bytes."""
    size: int = 0
    data: bytes | None = None

    def load(self, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
        if self.data is not None:
            raw = self.data
        else:
            with open(self.url, "rb") as f:
                f.seek(self.offset)
                raw = f.read(self.size)
        return decode_image(raw, max_pixels)[0]


def scan(shards: list[str], handler, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[ImageRef]:
    """References to every usable image of `shards`, sorted by key (the order the shards are
    listed in does not matter). Bad samples go to `handler` (producer/ingest.ErrorLog counts them
    by reason). Captions are not read: a decoder learns from pixels alone."""
    refs: dict[str, ImageRef] = {}
    for url in shard_urls(shards):
        found: dict[tuple[str, str], tuple[str, bytes]] = {}
        for raw in tar_samples([url], handler):
            key, ext = sample_key(raw), next((e for e in IMAGE_EXTS if e in raw), None)
            try:
                if ext is None:
                    raise SampleError("image_missing", f"no image member (members: {sorted(raw)})")
                decode_image(raw[ext], max_pixels)  # the producers' image checks, counted alike
            except SampleError as e:
                e.key, e.url = key, url
                if not handler(e):
                    break
                continue
            found[(raw["__key__"], ext)] = (key, raw[ext])
        offsets = _member_offsets(url, set(found))
        for (wds_key, ext), (key, data) in found.items():
            if key in refs:
                continue  # the same key twice: the first shard's sample, as the cache keeps it
            where = offsets.get((wds_key, ext))
            refs[key] = (ImageRef(key, url, ext, where[0], where[1]) if where
                         else ImageRef(key, url, ext, data=data))
    return [refs[k] for k in sorted(refs)]


def _member_offsets(url: str, wanted: set[tuple[str, str]]) -> dict[tuple[str, str], tuple[int, int]]:
    """(webdataset key, ext) -> (data offset, size) of each wanted member, when `url` is a local
    uncompressed tar; {} otherwise (the caller keeps the bytes)."""
    path = Path(url)
    if not wanted or "://" in url or url.startswith("pipe:") or not path.is_file():
        return {}
    out: dict[tuple[str, str], tuple[int, int]] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = base_plus_ext(member.name)
                ident = (key, (ext or "").lower())
                if ident in wanted and ident not in out:  # the first member of a name, as tar_samples
                    out[ident] = (member.offset_data, member.size)
    except (tarfile.TarError, OSError, EOFError):
        pass  # compressed or cut short: what was indexed stands, the rest keeps its bytes
    return out


def pool_identity(refs: list[ImageRef]) -> str:
    """A hash of a pool's keys, in order: a checkpoint records it, so a resume over other data says so."""
    return hashlib.sha256("\n".join(r.key for r in refs).encode()).hexdigest()[:16]


def cover_crop(img: Image.Image, size: int, left: float, top: float) -> torch.Tensor:
    """A size x size crop at native resolution (scaled up first only when a side is shorter):
    `left`/`top` in [0, 1] place it within the slack. Returns [3, size, size] in [-1, 1]."""
    if img.width < size or img.height < size:
        scale = max(size / img.width, size / img.height)
        img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))),
                         Image.Resampling.BICUBIC)
    x, y = round(left * (img.width - size)), round(top * (img.height - size))
    return preprocess_image(img.crop((x, y, x + size, y + size)), (size, size))


class CropSampler:
    """The crops of every step (module docstring)."""

    def __init__(self, text: list[ImageRef], general: list[ImageRef], seed: int, crop_size: int,
                 text_fraction: float, global_batch: int):
        if not text and text_fraction > 0:
            raise ValueError("no usable text-rich image to train on (vae.text_shards)")
        self.pools = (text, general)
        self.seed, self.crop_size, self.global_batch = seed, crop_size, global_batch
        self.text_per_batch = global_batch if not general else round(text_fraction * global_batch)
        if self.text_per_batch < global_batch and not general:
            raise ValueError("no usable general image to train on (vae.general_shards)")
        self._orders: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def ref(self, step: int, index: int) -> ImageRef:
        """The image of crop `index` of global batch `step`."""
        if index < self.text_per_batch:
            pool, per_batch, position = 0, self.text_per_batch, index
        else:
            pool, per_batch, position = 1, self.global_batch - self.text_per_batch, index - self.text_per_batch
        refs = self.pools[pool]
        epoch, at = divmod(step * per_batch + position, len(refs))
        return refs[self._order(pool, epoch)[at]]

    def crop(self, step: int, index: int) -> torch.Tensor:
        """[3, S, S] in [-1, 1]: crop `index` of global batch `step`."""
        rng = np.random.default_rng([self.seed, step, index])
        left, top = rng.random(2)
        return cover_crop(self.ref(step, index).load(), self.crop_size, float(left), float(top))

    def batch(self, step: int, indices: range) -> torch.Tensor:
        return torch.stack([self.crop(step, i) for i in indices])

    def _order(self, pool: int, epoch: int) -> np.ndarray:
        key = (pool, epoch)
        if key not in self._orders:
            self._orders[key] = np.random.default_rng([self.seed, pool, epoch]).permutation(len(self.pools[pool]))
            while len(self._orders) > 4:
                self._orders.popitem(last=False)
        return self._orders[key]


def micro_batch_indices(round_: int, rank: int, dp: int, micro: int) -> range:
    """The global-batch indices of one micro-batch: accumulation round `round_` of DP rank `rank`.
    Any (DP, accumulation) split of the same global batch covers the same indices."""
    start = (round_ * dp + rank) * micro
    return range(start, start + micro)
