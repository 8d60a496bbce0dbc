"""Synthetic text rendering: readable shards, faithful captions, complete edit triplets, fonts."""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from mmdit.config.produce import SynthConfig
from mmdit.producer.synth.fonts import DEFAULT_FONT_DIR, FONTS, FontMissingError, fit_text, load_font, require_fonts
from mmdit.producer.synth.shards import Layout, Scene, layout_scene, make_sample, render, write_shards

CJK_FONT = str(Path(DEFAULT_FONT_DIR) / FONTS[0].relpath)


def _image(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    cfg = SynthConfig(num_samples=30, samples_per_shard=12, edit_fraction=0.4, seed=1)
    return write_shards(str(out), cfg), cfg


def test_shards_are_readable_by_webdataset(shards):
    paths, cfg = shards
    assert [Path(p).name for p in paths] == ["synth-000000.tar", "synth-000001.tar", "synth-000002.tar"]
    assert not list(Path(paths[0]).parent.glob(".*tmp*"))
    samples = list(wds.WebDataset(paths, shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"{i:08d}" for i in range(cfg.num_samples)]
    tasks = {json.loads(s["json"])["task"] for s in samples}
    assert tasks == {"t2i", "edit"}
    sizes = set()
    for s in samples:
        meta = json.loads(s["json"])
        members = sorted(k for k in s if not k.startswith("__"))
        assert meta["source"] == "synth"
        if meta["task"] == "t2i":
            assert members == sorted([meta["image_ext"], "txt", "json"])
            img = _image(s[meta["image_ext"]])
            caption = s["txt"].decode("utf-8")
            # The caption quotes the rendered text verbatim (each box's, for the layouts of several).
            assert all(box["text"] in caption for box in meta["layout"])
            assert meta["text"] == "\n".join(box["text"] for box in meta["layout"])
        else:
            assert members == ["json", "png", "src.png", "txt"]
            img, src = _image(s["png"]), _image(s["src.png"])
            assert src.size == img.size and src.mode == img.mode == "RGB"
            assert np.abs(np.asarray(src, np.int16) - np.asarray(img, np.int16)).max() > 50  # the edit shows
            instruction = s["txt"].decode("utf-8")
            assert instruction == meta["instruction"] and meta["edit"] in ("text", "text_color", "background")
            if meta["edit"] == "text":
                assert meta["source_text"] in instruction and meta["text"] in instruction
        assert img.mode == "RGB" and img.size == (meta["width"], meta["height"])
        assert cfg.min_side <= min(img.size) and max(img.size) <= cfg.max_side
        sizes.add(img.size)
    assert len({round(w / h, 1) for w, h in sizes}) >= 5  # varied aspects: bucketing has work to do


def test_samples_are_deterministic():
    cfg = SynthConfig(seed=7, edit_fraction=0.5)
    assert all(make_sample(i, cfg) == make_sample(i, cfg) for i in range(4))
    other = SynthConfig(seed=8, edit_fraction=0.5)
    assert [make_sample(i, cfg)["json"] for i in range(4)] != [make_sample(i, other)["json"] for i in range(4)]


def _scene(text: str, lang: str) -> Scene:
    return Scene(width=320, height=240, lang=lang, text=text, font=FONTS[0].name, background=("white",),
                 gradient="", text_color="black", halign="center", valign="middle", box=(0.8, 0.6))


def test_cjk_text_renders_real_glyphs():
    images = []
    for text in ("你好世界", "欢迎光临"):
        scene = _scene(text, "zh")
        images.append(np.asarray(render(scene, layout_scene(scene, DEFAULT_FONT_DIR), DEFAULT_FONT_DIR)))
    for a in images:
        ink = (a < 128).all(axis=2).mean()
        assert 0.02 < ink < 0.6  # black glyphs on white, not blank
    # Different characters give different pixels (a font without CJK draws identical boxes).
    assert (images[0] != images[1]).any(axis=2).mean() > 0.01


def test_fit_text_wraps_inside_the_box():
    text = "Mind the gap between the train and the platform."
    size, lines = fit_text(text, CJK_FONT, 200, 150)
    font = load_font(CJK_FONT, size)
    assert len(lines) > 1 and all(font.getlength(line) <= 200 for line in lines)
    assert " ".join(lines) == text
    bigger = fit_text(text, CJK_FONT, 400, 150)[0]
    assert bigger > size
    zh_size, zh_lines = fit_text("书山有路勤为径，学海无涯苦作舟。", CJK_FONT, 120, 200)
    assert "".join(zh_lines) == "书山有路勤为径，学海无涯苦作舟。"
    assert not any(line[0] in "，。" for line in zh_lines)  # no line starts with closing punctuation
    layout = Layout(zh_size, zh_lines)
    assert layout.font_size >= 8


def test_missing_font_is_a_clear_error(tmp_path):
    with pytest.raises(FontMissingError, match="fonts-dejavu-core fonts-wqy-microhei"):
        require_fonts(str(tmp_path))
    with pytest.raises(FontMissingError, match="wqy-microhei.ttc"):
        write_shards(str(tmp_path / "out"), SynthConfig(num_samples=1, font_dir=str(tmp_path)))
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


@pytest.mark.slow
def test_cli_writes_shards_and_reports_missing_fonts(tmp_path):
    cli = [sys.executable, "-m", "mmdit.launch.cli", "synth"]
    run = dict(capture_output=True, text=True, timeout=120)
    ok = subprocess.run([*cli, str(tmp_path / "a"), "num_samples=3", "samples_per_shard=2"], **run)
    assert ok.returncode == 0, ok.stderr
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["synth-000000.tar", "synth-000001.tar"]
    bad = subprocess.run([*cli, str(tmp_path / "b"), "num_samples=2", f"synth.font_dir={tmp_path}"], **run)
    assert bad.returncode != 0 and "apt-get install -y fonts-dejavu-core fonts-wqy-microhei" in bad.stderr
