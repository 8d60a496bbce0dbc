"""The cache's segment format: one immutable safetensors file per write and bucket.

A segment stacks its records' `latents` [N,16,H/8,W/8], concatenates their variable-length
`prompt_embeds` along tokens [sum L_i, D] and, when any record has one, their flattened
`cond_latents`, each in the dtype it was written in (latents fp32; prompt features bf16 by
default, fp32 in caches written before cache.feature_dtype: readers return what is stored, so
one cache may hold both); per-record metadata (key, task, caption, source, token count, cond shape, the
CRC-32 of its tensor bytes) sits in the safetensors header, so a segment describes itself and
any safetensors reader can mmap it. Tensor data starts on a page (the header is padded).
"""

from __future__ import annotations

import json
import os
import struct
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_save

from mmdit.cache.keys import key_problem
from mmdit.cache.layout import FINGERPRINT_RE
from mmdit.utils.atomic import host_id
from mmdit.utils.regular_files import open_regular_file
from mmdit.utils.safetensors_header import read_header

# ----------------------------------------------------------------------------- record schema

SCHEMA_VERSION = 2
"""2: records carry `crc` (CRC-32 of latents, prompt_embeds and cond_latents bytes, in order)."""
PAIR = "pair"
"""The task of a preference-pair record (Diffusion-DPO, consumer/dpo.py): `latents` hold the
preferred ("win") image, `cond_latents` the rejected ("lose") one, resized to the preferred
image's bucket, so both have one shape; `prompt_embeds` the prompt, encoded once. The pair is
one record, so the plan, the coordinator and the producers move it as one sample (exactly once,
resume) with no change to the segment format; the plan's groups (one task per batch) keep pairs
apart from edit samples, whose `cond_latents` are a condition image."""
TASKS = ("t2i", "edit", "reconstruction", PAIR)
RECONSTRUCTION = "#reconstruction"
"""Suffix of the key of a sample's reconstruction record (task "reconstruction"): the image is
both the condition (cond_latents, and vision tokens of its prompt) and the target."""
ANNOTATION_CAPTION = "#annotation"
"""Suffix of the key of a text-to-image sample's annotation-caption record: the sample's latents
with the features of the caption `mmdit annotate` wrote for it (data.caption_sources), a prompt
variant keyed of its own so the plan can pick it and any producer serve it."""
VARIANT_TASKS = {RECONSTRUCTION: "reconstruction", ANNOTATION_CAPTION: "t2i"}
"""A variant record's key suffix -> the only task its record may have."""
LATENT_CHANNELS = 16
VAE_SCALE = 8
META_FIELDS = ("key", "fingerprint", "bucket", "task", "caption", "source")
"""Per-record metadata; with the tensors `latents`, `prompt_embeds` and optional `cond_latents`
this is the whole record (design brief, "Cache record per sample")."""

DATA_ALIGN = 4096
"""Tensor data starts at a multiple of this file offset."""


def stage_fingerprint(encoders_fingerprint: str, base_resolution: int) -> str:
    """The fingerprint records are cached under: the encoders' (weights, templates, resize
    filter) plus the bucket set, since a sample's latents at the 256 stage are not its latents
    at the 640 stage. Producers write and trainers read with this."""
    return f"{encoders_fingerprint}-b{base_resolution}"


def validate_record(rec: dict) -> None:
    """Raise ValueError naming the key and the field when a record breaks the schema."""
    key = rec.get("key", "<no key>")
    for f in META_FIELDS + ("latents", "prompt_embeds"):
        if f not in rec:
            raise ValueError(f"cache record {key!r}: missing field {f!r}")
    if (why := key_problem(rec["key"])) is not None:  # cache/keys.py: one rule for every store
        raise ValueError(f"cache record {key!r}: bad key ({why})")
    if not FINGERPRINT_RE.match(rec["fingerprint"]):
        raise ValueError(f"cache record {key!r}: fingerprint {rec['fingerprint']!r} must match {FINGERPRINT_RE.pattern}")
    if rec["task"] not in TASKS:
        raise ValueError(f"cache record {key!r}: task {rec['task']!r} not in {TASKS}")
    for suffix, task in VARIANT_TASKS.items():
        if rec["key"].endswith(suffix) and rec["task"] != task:
            raise ValueError(f"cache record {key!r}: a {suffix} record has task {task!r}, not {rec['task']!r}")
    h, w = (int(v) for v in rec["bucket"])
    if h % 16 or w % 16 or h <= 0 or w <= 0:
        raise ValueError(f"cache record {key!r}: bucket {(h, w)} sides must be positive multiples of 16")
    want = (LATENT_CHANNELS, h // VAE_SCALE, w // VAE_SCALE)
    if tuple(rec["latents"].shape) != want:
        raise ValueError(f"cache record {key!r}: latents shape {tuple(rec['latents'].shape)} != {want} for bucket {(h, w)}")
    if rec["prompt_embeds"].dim() != 2:
        raise ValueError(f"cache record {key!r}: prompt_embeds must be [L, D], got {tuple(rec['prompt_embeds'].shape)}")
    cond = rec.get("cond_latents")
    if cond is not None and (cond.dim() != 3 or cond.shape[0] != LATENT_CHANNELS):
        raise ValueError(f"cache record {key!r}: cond_latents must be [16, h, w], got {tuple(cond.shape)}")
    if rec["task"] == PAIR and (cond is None or cond.shape != rec["latents"].shape):
        raise ValueError(f"cache record {key!r}: a pair record's cond_latents (the rejected image) must have its "
                         f"latents' shape {want}, got {None if cond is None else tuple(cond.shape)}")
    for name in ("latents", "prompt_embeds", "cond_latents"):
        t = rec.get(name)
        if t is not None and not all_finite(t):
            raise ValueError(f"cache record {key!r}: {name} holds non-finite values")


# ----------------------------------------------------------------------------- segment format

_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8,
}


@dataclass
class Segment:
    """A published segment's parsed header: where each tensor lies and each record's metadata."""

    path: str
    fingerprint: str
    bucket: tuple[int, int]
    records: list[dict]
    tensors: dict[str, tuple[torch.dtype, tuple[int, ...], int]]
    """name -> (dtype, shape, absolute byte offset in the file)."""
    token_offsets: list[int]
    cond_offsets: list[int]


class DamagedRecord(ValueError):
    """A cached record (or its segment) that cannot be read back intact; names file and key."""

    def __init__(self, path: str, key: str | None, reason: str):
        super().__init__(f"{path}" + (f" record {key!r}" if key else "") + f": {reason}")
        self.path, self.key, self.reason = path, key, reason


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value of `t` is finite. A sum is finite only if every value is (an inf or a
    nan makes it inf or nan), and costs a small fraction of an element-wise check (about 1/40 on
    a CPU, where that check dominated reading a record); an overflowing sum of finite values
    falls back to the exact check."""
    return bool(torch.isfinite(t.sum())) or bool(t.isfinite().all())


def tensor_crc(*tensors) -> int:
    crc = 0
    for t in tensors:
        if t is not None and t.numel():
            crc = zlib.crc32(memoryview(t.contiguous().view(-1).view(torch.uint8).numpy()), crc)
    return crc


def read_segment_header(path: str) -> Segment:
    """Parse a segment's header; DamagedRecord (naming the file) unless it is a whole segment
    whose header agrees with its data and its directory, so any record it lists can be read."""
    try:
        with open_regular_file(path) as f:  # never blocks: a FIFO swapped in is refused
            header, base, size = read_header(f)
        return parse_header(path, header, base, size)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error) as e:
        raise DamagedRecord(path, None, f"unreadable segment ({type(e).__name__}: {e})") from None


_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _ints(value, n: int | None = None) -> tuple[int, ...]:
    """`value` as a tuple of non-negative ints (of length `n`); TypeError/ValueError otherwise."""
    if not isinstance(value, list) or (n is not None and len(value) != n):
        raise TypeError(f"expected a list of {n or 'some'} ints, got {value!r}")
    if not all(type(v) is int and v >= 0 for v in value):
        raise ValueError(f"expected non-negative ints, got {value!r}")
    return tuple(value)


def parse_header(path: str, header: dict, base: int, size: int) -> Segment:
    """Check everything a reader relies on: a bit flipped in a header that still parses as JSON
    must make the segment damaged, never an exception or a wrong read later."""
    meta = json.loads(header.pop("__metadata__")["mmdit"])
    tensors = {}
    for name, t in header.items():
        dtype, shape, (begin, end) = _DTYPES[t["dtype"]], _ints(t["shape"]), _ints(t["data_offsets"], 2)
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * dtype.itemsize:
            raise ValueError(f"tensor {name}: {end - begin} bytes for shape {shape}")
        if base + end > size:
            raise ValueError(f"data cut short: {size} of {base + end} bytes")
        tensors[name] = (dtype, shape, base + begin)
    records, bucket = meta["records"], _ints(meta["bucket"], 2)
    if bucket[0] % 16 or bucket[1] % 16 or 0 in bucket:
        raise ValueError(f"bucket {bucket}")
    where = (Path(path).parent.parent.name, Path(path).parent.name)
    if (meta["fingerprint"], f"{bucket[0]}x{bucket[1]}") != where:
        raise ValueError(f"header says {meta['fingerprint']!r} {bucket}, the file lies in {'/'.join(where)}")
    tokens, conds = [], []
    for r in records:
        if (why := key_problem(r["key"])) is not None:
            raise ValueError(f"record key {r['key']!r}: {why}")
        if r["task"] not in TASKS or not isinstance(r["caption"], str) or not isinstance(r["source"], str):
            raise ValueError(f"record {r['key']!r}: bad task, caption or source")
        tokens.append(_ints([r["tokens"]], 1)[0])
        cond = r["cond_shape"]
        if cond is not None and (_ints(cond, 3)[0] != LATENT_CHANNELS or 0 in cond):
            raise ValueError(f"record {r['key']!r}: cond_shape {cond}")
        conds.append(cond[0] * cond[1] * cond[2] if cond else 0)
    lat, emb = tensors["latents"], tensors["prompt_embeds"]
    if lat[0] not in _FLOATS or lat[1] != (len(records), LATENT_CHANNELS, bucket[0] // VAE_SCALE, bucket[1] // VAE_SCALE):
        raise ValueError(f"latents {lat[0]} {lat[1]} for {len(records)} records of bucket {bucket}")
    if emb[0] not in _FLOATS or len(emb[1]) != 2 or emb[1][0] != sum(tokens):
        raise ValueError(f"prompt_embeds {emb[0]} {emb[1]} for {sum(tokens)} tokens")
    cond = tensors.get("cond_latents")
    if sum(conds) and (cond is None or cond[0] != lat[0] or cond[1] != (sum(conds),)):
        raise ValueError(f"cond_latents {cond and cond[:2]} for {sum(conds)} values")
    token_offsets, cond_offsets = [0], [0]
    for n, c in zip(tokens, conds):
        token_offsets.append(token_offsets[-1] + n)
        cond_offsets.append(cond_offsets[-1] + c)
    return Segment(path, meta["fingerprint"], bucket, records, tensors, token_offsets, cond_offsets)


def encode_segment(fingerprint: str, bucket: tuple[int, int], records: list[dict]) -> list:
    """The segment file's bytes, as chunks to write in order. Tensors keep their records' dtype
    (records of mixed dtypes are stored in the wider), and each record's CRC covers the bytes
    as stored."""
    latents = torch.stack([r["latents"].contiguous() for r in records])
    embeds = torch.cat([r["prompt_embeds"].contiguous() for r in records])
    tensors = {"latents": latents, "prompt_embeds": embeds}
    conds = [r["cond_latents"].reshape(-1) for r in records if r.get("cond_latents") is not None]
    if conds:
        tensors["cond_latents"] = torch.cat(conds).to(latents.dtype)
    meta = {
        "schema_version": SCHEMA_VERSION,
        "fingerprint": fingerprint,
        "bucket": list(bucket),
        "records": [
            {
                "key": r["key"], "task": r["task"], "caption": r["caption"], "source": r["source"],
                "tokens": int(r["prompt_embeds"].shape[0]),
                "cond_shape": list(r["cond_latents"].shape) if r.get("cond_latents") is not None else None,
                "crc": tensor_crc(r["latents"].to(latents.dtype), r["prompt_embeds"].to(embeds.dtype),
                            r["cond_latents"].to(latents.dtype) if r.get("cond_latents") is not None else None),
            }
            for r in records
        ],
    }
    raw = safetensors_save(tensors, metadata={"mmdit": json.dumps(meta, ensure_ascii=False)})
    # Pad the header (safetensors allows trailing spaces) so tensor data starts on a page: reads
    # whose file offset is not 64-byte aligned copy about 30% slower, and mmap wants pages.
    n = struct.unpack("<Q", raw[:8])[0]
    padded = -(-(8 + n) // DATA_ALIGN) * DATA_ALIGN - 8
    return [struct.pack("<Q", padded), raw[8:8 + n], b" " * (padded - n), memoryview(raw)[8 + n:]]


def writer_id() -> str:
    return f"{host_id()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
