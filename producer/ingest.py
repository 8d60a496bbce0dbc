"""Ingest: webdataset shards -> decoded samples, as a pipeline of small generator stages.

    urls = shard_urls(shards)                 # globs, brace patterns, '::' lists, pipe:/http
    raw = tar_samples(urls, handler)          # tar members grouped by key: {__key__, __url__, ext: bytes}
    samples = decode_samples(raw, handler)    # {key, image (RGB PIL), caption, task, source_image, ...}

Every stage takes a webdataset-style `handler(exn) -> bool` (True: go on, False: stop; raise to
abort). Failures are `SampleError`s that carry a short *reason* (what the report counts), the
sample key and the shard URL, so the run finishes, each bad input is counted once under its
reason, and no good sample in the same shard is lost. Images that are valid but unusual (CMYK,
16-bit, palette, alpha, grey) are converted to 8-bit RGB and the conversion is noted, not
rejected. `ErrorLog` is the handler the producer uses: it counts and keeps the examples.
"""

from __future__ import annotations

import glob
import io
import json
import re
import tarfile
import threading
import warnings
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

from mmdit.cache import BAD_KEY, PAIR, key_problem

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
"""Target image members, in order of preference; an edit sample's source is `src.<ext>`; a
preference pair (task "pair") has `win.<ext>` (preferred) and `lose.<ext>` (rejected) instead."""
CAPTION_EXTS = ("txt", "caption", "text")
DEFAULT_MAX_PIXELS = 100_000_000
WHITE = (255, 255, 255)


class SampleError(Exception):
    """A sample (or shard) that could not be used: `reason` is the counted category."""

    def __init__(self, reason: str, detail: str = "", key: str | None = None, url: str | None = None):
        super().__init__(f"{reason}: {detail} (key={key!r}, url={url!r})")
        self.reason, self.detail, self.key, self.url = reason, detail, key, url


class ErrorLog:
    """A thread-safe handler: counts each SampleError by reason, keeps them, continues.

    Unexpected exceptions (bugs, not bad data) are re-raised, so they are never hidden.
    """

    def __init__(self):
        self.counts: Counter[str] = Counter()
        self.errors: list[SampleError] = []
        self._lock = threading.Lock()

    def __call__(self, exn: Exception) -> bool:
        if not isinstance(exn, SampleError):
            raise exn
        with self._lock:
            self.counts[exn.reason] += 1
            self.errors.append(exn)
        return True


def reraise(exn: Exception) -> bool:
    raise exn


# ----------------------------------------------------------------------------- stage 0: urls


def expand_shards(shards: str | list[str]) -> list[str]:
    """Shard URLs from a spec: a string or list of strings, each with '::' lists, {a..b} braces
    and (for local paths) shell globs, which expand in sorted order."""
    specs = [shards] if isinstance(shards, str) else list(shards)
    urls: list[str] = []
    for spec in specs:
        for url in expand_urls(spec):
            if "://" not in url and not url.startswith("pipe:") and glob.has_magic(url):
                urls.extend(sorted(glob.glob(url)))
            else:
                urls.append(url)
    return urls


def shard_urls(shards: str | list[str]):
    yield from expand_shards(shards)


# ----------------------------------------------------------------------------- stage 1: tar -> raw samples


def _stream_error(e: Exception) -> str:
    if isinstance(e, FileNotFoundError):
        return "shard_missing"
    if isinstance(e, (tarfile.ReadError, EOFError, zlib.error, tarfile.HeaderError)):
        return "truncated_tar"
    return "shard_unreadable"


def tar_samples(urls, handler=reraise):
    """Group consecutive tar members by key (webdataset's convention: key = path up to the first
    dot of the basename, extension = the rest, lower-cased). A shard that breaks off (truncated,
    corrupt) drops only the sample being read; samples completed before it are kept. A sample
    whose key breaks cache/keys.py's rule (`../x`, `/abs`, `a//b`, control characters, bytes
    that are not UTF-8) is counted once as `bad_key`, named, and its members are not read."""
    for url in urls:
        group = refused = None
        try:
            stream = gopen(url)
            try:
                with tarfile.open(fileobj=stream, mode="r|*") as tar:
                    for member in tar:
                        if not member.isfile():
                            continue
                        key, ext = base_plus_ext(member.name)
                        if key is None or Path(key).name.startswith("."):
                            continue
                        if key == refused:  # another member of a sample already counted
                            continue
                        full = sample_key({"__url__": url, "__key__": key})
                        if (why := key_problem(full)) is not None:
                            refused = key
                            if not handler(SampleError(BAD_KEY, f"{why} (member {member.name!r})", full, url)):
                                return
                            continue
                        if group is not None and group["__key__"] != key:
                            yield group  # complete before this member's data is read
                            group = None
                        if group is None:
                            group = {"__key__": key, "__url__": url}
                        group.setdefault(ext.lower(), tar.extractfile(member).read())
            finally:
                stream.close()
        except SampleError:  # raised by the handler: its decision, not a broken shard
            raise
        except Exception as e:  # the shard is bad from here on: count it, keep what was read
            key = sample_key(group) if group else None
            group = None
            if not handler(SampleError(_stream_error(e), f"{type(e).__name__}: {e}", key, url)):
                return
            continue
        if group is not None:
            yield group


# ----------------------------------------------------------------------------- stage 2: decode


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, str | None]:
    """Bytes -> (8-bit RGB image, conversion applied or None); SampleError on bad data.

    The pixel count is checked from the header, before any pixel is decoded, so a small file
    claiming a huge image costs nothing.
    """
    if not data:
        raise SampleError("empty_member", "zero-byte image member")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise SampleError("decompression_bomb", str(e)) from None
    except UnidentifiedImageError:
        raise SampleError("not_an_image", f"unrecognised image data ({len(data)} bytes)") from None
    except Exception as e:  # malformed headers raise many types
        raise SampleError("corrupt_image", f"{type(e).__name__}: {e}") from None
    w, h = img.size
    if w * h > max_pixels:
        raise SampleError("decompression_bomb", f"header claims {w}x{h} = {w * h} pixels > limit {max_pixels}")
    if w <= 0 or h <= 0:
        raise SampleError("corrupt_image", f"header claims {w}x{h}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
            img = ImageOps.exif_transpose(img) or img
    except Exception as e:  # truncated/corrupt streams: OSError, SyntaxError, ValueError, zlib.error...
        raise SampleError("corrupt_image", f"{type(e).__name__}: {e}") from None
    return to_rgb(img)


def to_rgb(img: Image.Image) -> tuple[Image.Image, str | None]:
    """Any PIL mode -> 8-bit RGB. Alpha is composited on white (the usual backdrop of cut-outs);
    16-bit and 32-bit integer images keep their top 8 bits of range instead of clipping."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img, None
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img)
        if mode == "F":
            a = np.clip(a, 0.0, 255.0).astype(np.uint8)
            conv = "float"
        else:
            hi = 65535 if mode != "I" or a.max(initial=0) > 255 else 255
            a = (np.clip(a, 0, hi).astype(np.uint32) * 255 // hi).astype(np.uint8)
            conv = "16bit"
        return Image.fromarray(a, "L").convert("RGB"), conv
    if mode == "P":
        if "transparency" in img.info:
            return _composite(img.convert("RGBA")), "palette_alpha"
        return img.convert("RGB"), "palette"
    if "transparency" in img.info and mode in ("L", "RGB", "1"):
        return _composite(img.convert("RGBA")), "alpha"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _composite(img.convert("RGBA")), "alpha"
    if mode == "CMYK":
        return img.convert("RGB"), "cmyk"
    if mode in ("L", "1"):
        return img.convert("RGB"), "grey"
    return img.convert("RGB"), mode.lower().replace(";", "")


def _composite(rgba: Image.Image) -> Image.Image:
    bg = Image.new("RGB", rgba.size, WHITE)
    bg.paste(rgba, mask=rgba.getchannel("A"))
    return bg


def decode_caption(raw: dict) -> str:
    for ext in CAPTION_EXTS:
        if ext in raw:
            try:
                text = raw[ext].decode("utf-8-sig")
            except UnicodeDecodeError as e:
                raise SampleError("caption_not_utf8", f".{ext} member: {e}") from None
            text = text.strip()
            if not text:
                raise SampleError("caption_empty", f".{ext} member is blank")
            return text
    raise SampleError("caption_missing", f"no {'/'.join(CAPTION_EXTS)} member (members: {sorted(_members(raw))})")


def _members(raw: dict) -> list[str]:
    return [k for k in raw if not k.startswith("__")]


def source_name(url: str) -> str:
    """Data source of a shard: its file stem without a trailing shard number (synth-000003 -> synth)."""
    stem = Path(url.split("::")[-1]).name.split(".")[0]
    return re.sub(r"[-_]?\d+$", "", stem) or stem


def sample_key(raw: dict) -> str:
    """Globally unique sample key: shard stem + webdataset key (keys repeat across datasets)."""
    stem = Path(raw["__url__"]).name.split(".")[0]
    return f"{stem}/{raw['__key__']}"


def decode_sample(raw: dict, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """One raw webdataset sample -> a decoded sample dict; SampleError (with key and url) if unusable.

    Returns keys: key, url, source, task, caption, image, source_image (edit: the source image;
    pair: the rejected image, `image` the preferred one), meta (the sample's JSON), converted
    (list of conversions applied).
    """
    key, url = sample_key(raw), raw["__url__"]
    try:
        meta = {}
        if "json" in raw:
            try:
                meta = json.loads(raw["json"].decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as e:
                raise SampleError("bad_json", str(e)) from None
            if not isinstance(meta, dict):
                raise SampleError("bad_json", f"expected an object, got {type(meta).__name__}")
        src_ext = next((f"src.{e}" for e in IMAGE_EXTS if f"src.{e}" in raw), None)
        win_ext = next((f"win.{e}" for e in IMAGE_EXTS if f"win.{e}" in raw), None)
        task = meta.get("task") or ("edit" if src_ext else PAIR if win_ext else "t2i")
        if task not in ("t2i", "edit", PAIR):
            raise SampleError("unknown_task", f"task {task!r}")
        if task == PAIR:  # a preference pair: the preferred image as the target, the rejected as the source
            lose_ext = next((f"lose.{e}" for e in IMAGE_EXTS if f"lose.{e}" in raw), None)
            if win_ext is None or lose_ext is None:
                raise SampleError("pair_image_missing", f"a pair needs win.<ext> and lose.<ext> members "
                                                        f"(members: {sorted(_members(raw))})")
            img_ext, src_ext = win_ext, lose_ext
        else:
            img_ext = next((e for e in IMAGE_EXTS if e in raw), None)
        if img_ext is None:
            raise SampleError("image_missing", f"no image member (members: {sorted(_members(raw))})")
        if task == "edit" and src_ext is None:
            raise SampleError("edit_source_missing", "edit sample without a src.<ext> member")
        if "caption" in meta and not any(e in raw for e in CAPTION_EXTS):
            caption = str(meta["caption"]).strip()
            if not caption:
                raise SampleError("caption_empty", "json caption is blank")
        else:
            caption = decode_caption(raw)
        image, conv = decode_image(raw[img_ext], max_pixels)
        converted = [conv] if conv else []
        source_image = None
        if task in ("edit", PAIR):  # one unreadable image of a pair fails the pair as a unit
            source_image, sconv = decode_image(raw[src_ext], max_pixels)
            converted += [f"src_{sconv}"] if sconv else []
    except SampleError as e:
        e.key, e.url = key, url
        e.args = (f"{e.reason}: {e.detail} (key={key!r}, url={url!r})",)
        raise
    return {
        "key": key, "url": url, "source": str(meta.get("source") or source_name(url)), "task": task,
        "caption": caption, "image": image, "source_image": source_image, "meta": meta, "converted": converted,
    }


def decode_samples(raws, handler=reraise, max_pixels: int = DEFAULT_MAX_PIXELS):
    for raw in raws:
        try:
            yield decode_sample(raw, max_pixels)
        except SampleError as e:
            if not handler(e):
                return


def samples(shards: str | list[str], handler=reraise, max_pixels: int = DEFAULT_MAX_PIXELS):
    """The whole ingest pipeline: shard spec -> decoded samples."""
    return decode_samples(tar_samples(shard_urls(shards), handler), handler, max_pixels)
