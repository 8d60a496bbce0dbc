"""Ingest, scores and manifest: every bad input is counted under its reason; good samples survive."""

import io
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from badfiles import bomb_png, corrupt_jpeg, encode, good_t2i, gradient, raw_png, rgb16_png, shapes, write_shard
from PIL import Image

from mmdit.cache.manifest import ManifestWriter, hamming, read_manifest, rejection_reasons, select, select_mask
from mmdit.config.data import FilterConfig
from mmdit.producer.ingest import (
    ErrorLog,
    SampleError,
    decode_image,
    decode_sample,
    expand_shards,
    samples,
    source_name,
    tar_samples,
)
from mmdit.producer.scores import phash, score_image


def raw(key="k", url="/data/web-000001.tar", **members):
    return {"__key__": key, "__url__": url, **{k.replace("_", "."): v for k, v in members.items()}}


@pytest.mark.parametrize(
    "data, reason",
    [
        (corrupt_jpeg(), "corrupt_image"),
        (b"", "empty_member"),
        (bomb_png(), "decompression_bomb"),
        (b"this is not an image at all", "not_an_image"),
        (raw_png(64, 64, 8, 2, b"\x00" * 10), "corrupt_image"),  # valid header, IDAT too short
    ],
)
def test_bad_images_are_rejected_with_reason(data, reason):
    with pytest.raises(SampleError) as e:
        decode_image(data)
    assert e.value.reason == reason


def test_bomb_is_rejected_from_the_header_by_our_limit():
    big = raw_png(5000, 5000, 8, 2, b"\x00" * 16)  # under PIL's own limit, over ours
    with pytest.raises(SampleError, match="5000x5000") as e:
        decode_image(big, max_pixels=10_000_000)
    assert e.value.reason == "decompression_bomb"


def test_unusual_modes_convert_to_rgb():
    cmyk, conv = decode_image(encode(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG", quality=95))
    assert (cmyk.mode, conv) == ("RGB", "cmyk")
    assert np.allclose(np.asarray(cmyk)[15, 20], (255, 0, 0), atol=12)  # cyan-free, magenta+yellow = red

    grey16 = Image.fromarray((np.arange(64, dtype=np.uint16)[None, :].repeat(8, 0) * 1024 + 1023).astype(np.uint16))
    img, conv = decode_image(encode(grey16))
    a = np.asarray(img)
    assert conv == "16bit" and img.mode == "RGB"
    assert a[0, 0, 0] == 3 and a[0, -1, 0] == 255  # rescaled, not clipped to white
    assert np.all(np.diff(a[0, :, 0].astype(int)) >= 0)

    img, conv = decode_image(rgb16_png(16, 8))
    assert img.mode == "RGB" and tuple(np.asarray(img)[0, -1]) == (255, 0, 255)

    pal = gradient(32, 32).quantize(16)
    img, conv = decode_image(encode(pal))
    assert (img.mode, conv) == ("RGB", "palette")

    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 255))
    rgba.paste((0, 0, 255, 0), (0, 0, 10, 20))  # left half fully transparent
    img, conv = decode_image(encode(rgba))
    assert conv == "alpha"
    assert tuple(np.asarray(img)[5, 2]) == (255, 255, 255)  # composited on white, not black
    assert tuple(np.asarray(img)[5, 15]) == (255, 0, 0)

    pal_t = Image.new("P", (8, 8), 0)
    pal_t.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal_t.paste(1, (4, 0, 8, 8))
    buf = io.BytesIO()
    pal_t.save(buf, "PNG", transparency=0)
    img, conv = decode_image(buf.getvalue())
    assert conv == "palette_alpha" and tuple(np.asarray(img)[0, 0]) == (255, 255, 255)
    assert tuple(np.asarray(img)[0, 6]) == (0, 255, 0)

    img, conv = decode_image(encode(Image.new("LA", (8, 8), (0, 255))))
    assert conv == "alpha" and tuple(np.asarray(img)[0, 0]) == (0, 0, 0)


def test_captions_and_metadata():
    png = encode(gradient(32, 32))
    s = decode_sample(raw(png=png, txt="  un café 中文 \n".encode()))
    assert s["caption"] == "un café 中文" and s["task"] == "t2i" and s["source"] == "web"
    assert s["key"] == "web-000001/k"
    with pytest.raises(SampleError) as e:
        decode_sample(raw(png=png, txt=b"caf\xe9 latin-1"))
    assert e.value.reason == "caption_not_utf8" and e.value.key == "web-000001/k"
    with pytest.raises(SampleError) as e:
        decode_sample(raw(png=png))
    assert e.value.reason == "caption_missing"
    with pytest.raises(SampleError) as e:
        decode_sample(raw(png=png, txt=b"   "))
    assert e.value.reason == "caption_empty"
    with pytest.raises(SampleError) as e:
        decode_sample(raw(png=png, txt=b"x", json=b"{not json"))
    assert e.value.reason == "bad_json"
    with pytest.raises(SampleError) as e:
        decode_sample(raw(txt=b"x"))
    assert e.value.reason == "image_missing"
    with pytest.raises(SampleError) as e:
        decode_sample(raw(png=png, txt=b"x", json=b'{"task": "edit"}'))
    assert e.value.reason == "edit_source_missing"
    s = decode_sample(raw(png=png, src_png=encode(gradient(48, 32, 3)), txt=b"make it red", json=b'{"task":"edit","source":"synth"}'))
    assert s["task"] == "edit" and s["source"] == "synth" and s["source_image"].size == (48, 32)
    assert source_name("/x/laion_00012.tar") == "laion" and source_name("pipe:cat /x/cc12m-3.tar") == "cc12m"


def test_shard_stream_counts_bad_data_and_keeps_good(tmp_path):
    good = [good_t2i(i) for i in range(6)]
    bad = [
        ("corrupt", {"jpg": corrupt_jpeg(), "txt": b"corrupt"}),
        ("zero", {"png": b"", "txt": b"zero-byte member"}),
        ("bomb", {"png": bomb_png(), "txt": b"bomb"}),
        ("latin1", {"png": encode(gradient(32, 32)), "txt": b"\xff\xfe caf\xe9"}),
        ("nocap", {"png": encode(gradient(32, 32))}),
        ("cmyk", {"jpg": encode(Image.new("CMYK", (40, 30), (0, 200, 0, 0)), "JPEG"), "txt": b"cmyk"}),
    ]
    write_shard(tmp_path / "mixed-000000.tar", [good[0], *bad[:3], good[1], *bad[3:], good[2]])
    # a truncated shard: two complete samples, then one cut inside its image member
    cut_sample = good_t2i(99, 256, 256)
    write_shard(tmp_path / "mixed-000001.tar", [good[3], good[4], cut_sample])
    data = (tmp_path / "mixed-000001.tar").read_bytes()
    cut = data.index(b"good0099.png") + 512 + len(cut_sample[1]["png"]) // 2
    (tmp_path / "mixed-000001.tar").write_bytes(data[:cut])
    write_shard(tmp_path / "mixed-000002.tar", [good[5]])

    log = ErrorLog()
    out = list(samples(str(tmp_path / "mixed-{000000..000002}.tar"), log))
    keys = [s["key"].split("/")[1] for s in out]
    assert keys == ["good0000", "good0001", "cmyk", "good0002", "good0003", "good0004", "good0005"]
    assert dict(log.counts) == {
        "corrupt_image": 1, "empty_member": 1, "decompression_bomb": 1, "caption_not_utf8": 1,
        "caption_missing": 1, "truncated_tar": 1,
    }
    trunc = [e for e in log.errors if e.reason == "truncated_tar"][0]
    assert trunc.key == "mixed-000001/good0099" and trunc.url.endswith("mixed-000001.tar")
    assert [s["converted"] for s in out if s["key"].endswith("cmyk")] == [["cmyk"]]


def test_shard_specs_expand(tmp_path):
    for i in range(3):
        write_shard(tmp_path / f"s-{i}.tar", [good_t2i(i)])
    assert expand_shards(str(tmp_path / "s-*.tar")) == [str(tmp_path / f"s-{i}.tar") for i in range(3)]
    assert expand_shards(str(tmp_path / "s-{0..1}.tar")) == [str(tmp_path / f"s-{i}.tar") for i in range(2)]
    assert len(expand_shards([str(tmp_path / "s-0.tar"), f"{tmp_path}/s-1.tar::{tmp_path}/s-2.tar"])) == 3
    log = ErrorLog()
    got = list(tar_samples([str(tmp_path / "missing.tar"), str(tmp_path / "s-2.tar")], log))
    assert [g["__key__"] for g in got] == ["good0002"] and dict(log.counts) == {"shard_missing": 1}
    # pipe: URLs work (anything webdataset takes)
    got = list(tar_samples([f"pipe:cat {tmp_path / 's-1.tar'}"], log))
    assert [g["__key__"] for g in got] == ["good0001"]


def test_scores_measure_what_they_say():
    sharp = gradient(256, 256, seed=1)
    blurry = sharp.resize((32, 32), Image.BILINEAR).resize((256, 256), Image.BILINEAR)
    flat = Image.new("RGB", (128, 64), (200, 200, 200))
    s, b, f = score_image(sharp), score_image(blurry), score_image(flat)
    assert s["blur"] > 10 * b["blur"]
    assert f["blur"] == 0.0 and f["contrast"] == 0.0 and f["entropy"] == 0.0 and f["saturation"] == 0.0
    assert f["brightness"] == pytest.approx(200 / 255, abs=1e-3) and f["aspect"] == 2.0
    assert score_image(Image.new("RGB", (8, 8), (255, 0, 0)))["saturation"] == pytest.approx(1.0)
    assert s["entropy"] > 6.0
    # the perceptual hash survives re-encoding and resizing; different images differ
    pic = shapes(1)
    recoded = Image.open(io.BytesIO(encode(pic, "JPEG", quality=85))).convert("RGB")
    assert hamming(phash(pic), phash(recoded)) <= 2
    assert hamming(phash(pic), phash(pic.resize((180, 150), Image.BICUBIC))) <= 4
    assert min(hamming(phash(pic), phash(shapes(s))) for s in range(2, 8)) > 10


def rows(n, **over):
    base = dict(status="ok", width=512, height=512, blur=100.0, brightness=0.5, contrast=0.2, entropy=6.0,
                caption_chars=20, phash=0)
    out = []
    for i in range(n):
        r = {**base, "key": f"k{i}", "phash": i}
        r.update({k: v[i] if isinstance(v, list) else v for k, v in over.items()})
        out.append(r)
    return out


def test_select_applies_each_threshold_and_duplicates(tmp_path):
    table = pa.Table.from_pylist(rows(
        10,
        width=[512, 40, 2000, 512, 512, 512, 512, 512, 512, 512],
        blur=[100.0, 100.0, 100.0, 1.0, 100.0, 100.0, 100.0, 100.0, 100.0, 100.0],
        brightness=[0.5, 0.5, 0.5, 0.5, 0.99, 0.5, 0.5, 0.5, 0.5, 0.5],
        entropy=[6.0, 6.0, 6.0, 6.0, 6.0, 0.5, 6.0, 6.0, 6.0, 6.0],
        caption_chars=[20, 20, 20, 20, 20, 20, 2, 20, 20, 20],
        phash=[7, 1, 2, 3, 4, 5, 6, 7, 8, 9],
        status=["ok"] * 8 + ["corrupt_image", "ok"],
    ))
    f = FilterConfig(min_side=64, max_aspect=3.0, min_blur=5.0, max_brightness=0.9, min_entropy=2.0, min_caption_chars=5)
    mask, reasons = select_mask(table, f)
    assert list(reasons) == ["", "min_side", "aspect", "blur", "brightness", "entropy", "caption_length",
                             "duplicate", "corrupt_image", ""]
    assert select(table, f)["key"].to_pylist() == ["k0", "k9"]
    f.drop_duplicates = False
    assert select(table, f)["key"].to_pylist() == ["k0", "k7", "k9"]
    assert list(rejection_reasons({k: [v] for k, v in rows(1)[0].items()}, FilterConfig())) == [""]


def test_manifest_parts_from_several_writers_read_as_one(tmp_path):
    w1, w2 = ManifestWriter(tmp_path, flush_rows=3), ManifestWriter(tmp_path)
    for r in rows(7):
        w1.add(r)
    for r in rows(2, key=["x0", "x1"]):
        w2.add(r)
    w2.close()
    assert len(read_manifest(tmp_path)) == 6 + 2  # w1's last row is not flushed yet: invisible
    w1.close()
    w3 = ManifestWriter(tmp_path)
    w3.add({**rows(1)[0], "blur": 1.0})  # a rerun re-describes k0: the newest row wins
    w3.close()
    t = read_manifest(tmp_path)
    assert sorted(t["key"].to_pylist()) == sorted([f"k{i}" for i in range(7)] + ["x0", "x1"])
    assert t.filter(pc.equal(t["key"], "k0"))["blur"].to_pylist() == [1.0]
    assert not list(tmp_path.glob(".tmp-*"))
    assert read_manifest(tmp_path / "nothing").num_rows == 0


def test_truncated_tar_reports_truncation_not_a_silent_end(tmp_path):
    write_shard(tmp_path / "t.tar", [good_t2i(0, 200, 200), good_t2i(1, 200, 200)])
    data = (tmp_path / "t.tar").read_bytes()
    (tmp_path / "t.tar").write_bytes(data[: len(data) // 2])
    log = ErrorLog()
    got = list(tar_samples([str(tmp_path / "t.tar")], log))
    assert sum(log.counts.values()) == 1 and log.counts["truncated_tar"] == 1
    assert all(isinstance(g[k], bytes) for g in got for k in g if not k.startswith("__"))
    with tarfile.open(tmp_path / "ok.tar", "w"):
        pass
    assert list(tar_samples([str(tmp_path / "ok.tar")], log)) == []
