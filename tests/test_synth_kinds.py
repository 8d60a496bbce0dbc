"""`mmdit synth` kinds: pure, compositional (text in perspective in a scene), complex (layouts)."""

import io
import json
import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mmdit.config import ConfigError
from mmdit.config.loader import load_config
from mmdit.config.produce import SynthConfig
from mmdit.producer.synth import scenes
from mmdit.producer.synth.scenes import BackgroundsError, homography, project
from mmdit.launch.args import parse
from mmdit.launch.synth import COMMAND as SYNTH
from mmdit.producer.synth.shards import make_sample, pick_kind, write_shards

KINDS = ("pure", "compositional", "complex")
SMALL = dict(min_side=192, max_side=320, edit_fraction=0.0)


def _only(kind: str, **kw) -> SynthConfig:
    return SynthConfig(kinds={kind: 1.0}, **{**SMALL, **kw})


def _decode(sample: dict) -> tuple[Image.Image, dict, str]:
    meta = json.loads(sample["json"])
    image = Image.open(io.BytesIO(sample[meta["image_ext"]]))
    image.load()
    return image, meta, sample["txt"].decode("utf-8")


def _inside(points: list, width: int, height: int) -> bool:
    return all(0 <= x <= width and 0 <= y <= height for x, y in points)


def _corners(entry: dict) -> list:
    if "quad" in entry:
        return entry["quad"]
    x0, y0, x1, y1 = entry["box"]
    assert x0 < x1 and y0 < y1
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_makes_captioned_images_with_a_layout(kind):
    cfg = _only(kind, seed=5, zh_caption_fraction=0.5)
    for index in range(6):
        image, meta, caption = _decode(make_sample(index, cfg))
        assert image.mode == "RGB" and image.size == (meta["width"], meta["height"])
        assert cfg.min_side <= min(image.size) and max(image.size) <= cfg.max_side
        assert (meta["kind"], meta["category"], meta["task"], meta["source"]) == (kind, "synthetic", "t2i", "synth")
        assert meta["layout"] and all(e["role"] and e["text"] for e in meta["layout"])
        assert meta["text"] == "\n".join(e["text"] for e in meta["layout"])  # what scores.text_chars counts
        for entry in meta["layout"]:
            assert _inside(_corners(entry), *image.size), entry
            assert entry["text"] in caption  # quoted verbatim
        assert np.asarray(image).std() > 10  # something drawn, not a flat page
        if kind == "complex":
            title = [e["text"] for e in meta["layout"] if e["role"] == "title"]
            assert len(title) == 1 and f"{title[0]}" in caption and len(meta["layout"]) >= 4
            assert meta["template"] in ("slide", "app_screen", "web_page", "poster")
            assert all(_inside(_corners(s), *image.size) for s in meta["shapes"])
        if kind == "compositional":
            assert meta["scene"] in scenes.SCENES and meta["surface"] in scenes.SURFACES
            assert _inside(meta["surface_quad"], *image.size)


@pytest.mark.parametrize("kind", KINDS)
def test_samples_are_a_function_of_seed_and_index(kind):
    cfg = _only(kind, seed=11)
    first = [make_sample(i, cfg) for i in range(3)]
    assert first == [make_sample(i, cfg) for i in range(3)]
    images = [_decode(s)[0].tobytes() for s in first]
    assert len(set(images)) == 3  # another index, another image
    assert make_sample(0, _only(kind, seed=12)) != first[0]


def test_kind_weights_choose_the_kinds():
    assert {_decode(make_sample(i, _only("complex")))[1]["kind"] for i in range(8)} == {"complex"}
    default = SynthConfig()
    counts = Counter(pick_kind(i, default) for i in range(2000))
    assert abs(counts["pure"] / 2000 - 0.5) < 0.05 and abs(counts["complex"] / 2000 - 0.25) < 0.05
    no_pure = SynthConfig(kinds={"pure": 0, "compositional": 3, "complex": 1})
    counts = Counter(pick_kind(i, no_pure) for i in range(400))
    assert counts["pure"] == 0 and counts["compositional"] > 2 * counts["complex"] > 0


@pytest.mark.parametrize("kinds, field", [
    ({"pure": -1.0}, "synth.kinds.pure"),
    ({"pure": float("nan")}, "synth.kinds.pure"),
    ({"complex": float("inf")}, "synth.kinds.complex"),
    ({"pure": "lots"}, "synth.kinds.pure"),
    ({"fancy": 1.0}, "synth.kinds.fancy"),
    ({"pure": 0.0, "complex": 0.0}, "synth.kinds needs a weight > 0"),
])
def test_bad_kind_weights_are_refused_by_name(kinds, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        SynthConfig(kinds=kinds)


def test_kind_weights_from_the_command_line():
    overrides = parse(SYNTH, ["out", "kinds.complex=2", "kinds.pure=0", "backgrounds=/x"]).overrides
    assert overrides == ["synth.kinds.complex=2", "synth.kinds.pure=0", "synth.backgrounds=/x"]
    assert load_config(overrides[:2]).synth.kinds == {"pure": 0.0, "compositional": 0.25, "complex": 2.0}
    with pytest.raises(ConfigError, match=r"synth\.kinds\.pure must be a finite weight >= 0"):
        load_config(["synth.kinds.pure=-1"])


def test_homography_carries_corners_exactly():
    flat = np.array([(0, 0), (200, 0), (200, 80), (0, 80)], np.float64)
    quad = np.array([(31.5, 40), (170, 62), (160, 130), (25, 150)], np.float64)
    assert np.allclose(project(homography(flat, quad), flat), quad, atol=1e-6)
    assert np.allclose(project(homography(quad, flat), quad), flat, atol=1e-6)


def _mask(size: tuple[int, int], quad: list, grow: int = 0) -> np.ndarray:
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).polygon([tuple(p) for p in quad], fill=255, outline=255, width=1 + 2 * grow)
    return np.asarray(mask) > 0


def test_compositional_text_is_drawn_in_perspective_on_its_surface():
    cfg = _only("compositional")
    for seed in range(6):
        sign = scenes.sample(random.Random(seed), cfg)
        quad = np.array(sign.text_quad)
        left, right = np.linalg.norm(quad[3] - quad[0]), np.linalg.norm(quad[2] - quad[1])
        top, bottom = quad[1] - quad[0], quad[2] - quad[3]
        # Perspective, not a rotated rectangle: the near edge is taller, top and bottom not parallel.
        assert abs(left - right) / max(left, right) > 0.05
        cross = top[0] * bottom[1] - top[1] * bottom[0]
        assert abs(cross) / (np.linalg.norm(top) * np.linalg.norm(bottom)) > 1e-3
        with_text = np.asarray(scenes.render(sign, cfg.font_dir), np.int16)
        without = np.asarray(scenes.render(sign, cfg.font_dir, with_text=False), np.int16)
        diff = np.abs(with_text - without).max(axis=2)  # [h, w]
        inside = _mask((sign.width, sign.height), sign.text_quad)
        assert (diff[inside] > 40).mean() > 0.03, seed  # glyph strokes inside the text quad
        surface = _mask((sign.width, sign.height), sign.quad, grow=2)
        assert diff[~surface].max() == 0  # and nothing outside the surface changed


def test_backgrounds_directory_supplies_the_scenes(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, color in enumerate(((200, 60, 60), (60, 160, 90))):
        Image.new("RGB", (300 + 50 * i, 200), color).save(photos / f"p{i}.png")
    (photos / "notes.txt").write_text("not an image")
    cfg = _only("compositional", backgrounds=str(photos))
    metas = [_decode(make_sample(i, cfg))[1] for i in range(6)]
    assert {m["scene"] for m in metas} == {"photo"}
    assert {m["background_image"] for m in metas} <= {str(photos / "p0.png"), str(photos / "p1.png")}
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BackgroundsError, match="holds no images"):
        write_shards(str(tmp_path / "out"), _only("compositional", backgrounds=str(empty), num_samples=1))
