"""Synthetic text-rendering data: the Qwen-Image report's pure, compositional and complex rendering.

Three kinds, weighed by `synth.kinds`:
  pure           Chinese and English sentences on plain or gradient backgrounds with a dynamic
                 layout (font size fitted to a text box, line wrapping, alignment, colours),
                 captioned with the exact text and the layout; a fraction of them
                 (`synth.edit_fraction`) are edit triplets (change the text, the text colour or the
                 background). This module.
  compositional  a sentence on a surface (signboard, poster, wooden sign, box, billboard,
                 chalkboard) placed in perspective in a procedurally drawn scene or an image of
                 `synth.backgrounds`; the caption names the scene and the surface
                 (producer/synth/scenes.py).
  complex        slides, app screens, web pages and posters: shapes and several text boxes with
                 roles, filled from phrase banks (producer/synth/layouts.py).
Edit triplets are pure only. Every sample is a pure function of (seed, index) (its kind too), so a
shard can be regenerated bit-for-bit and two runs with one seed agree (with `synth.backgrounds`,
as long as that directory holds the same files).

Usage: `mmdit synth OUT num_samples=N [kinds.complex=1 edit_fraction=0.25 samples_per_shard=32 ...]`
(bare names are fields of `SynthConfig`, i.e. `synth.<name>`; any other Hydra override works too;
`kinds.<name>=w` sets one weight and keeps the others, as Hydra merges dictionaries).

Output: `OUT/synth-000000.tar`, ... (webdataset shards, each written to a temporary name and
renamed when complete, so a killed run leaves no torn shard under the final name); with
synth.pairs, `OUT/pairs-000000.tar`, ...: a key is its shard's stem and the sample's, so pairs never
share keys with renderings of the same seed in one cache. Members per
sample, keyed `%08d` (the sample index):

  text-to-image sample (json task="t2i"):
    <key>.png or <key>.jpg   the rendered image (RGB)
    <key>.txt                the caption (UTF-8), which quotes the rendered text verbatim (complex:
                             every text box's text, the title first)
    <key>.json               metadata, every kind: task, source="synth", category="synthetic",
                             kind ("pure" | "compositional" | "complex"), index, seed, lang
                             ("en" | "zh"), text (all rendered text, one box per line), layout
                             (the text boxes: [{role, text, box: [x0, y0, x1, y1] or quad:
                             [[x, y] x 4: top-left, top-right, bottom-right, bottom-left]}], in
                             pixels), width, height, caption_lang, image_ext ("png" | "jpg"); then
                             pure: lines (as wrapped), font, font_size, background (1 or 2 colour
                               names), gradient ("" | vertical | horizontal | diagonal),
                               text_color, halign, valign, box (fractions of the image); layout is
                               one box, role "text"
                             compositional: lines, font, font_size, scene, scene_color,
                               background_image ("" or a file of synth.backgrounds), surface,
                               surface_color, text_color, side ("left" | "right": the nearer
                               edge), surface_quad; layout is one quad, role = the surface
                             complex: template (slide | app_screen | web_page | poster),
                               background, accent, shapes ([{kind, box, fill}]); layout boxes
                               also carry font, font_size, lines, color; roles: title, subtitle,
                               bullet, button, nav, brand, search, item, price, date, heading,
                               status, footer
  edit triplet (json task="edit", kind "pure"):
    <key>.png                the target image (after the edit)
    <key>.src.png            the source image (before the edit), same size as the target
    <key>.txt                the edit instruction (UTF-8)
    <key>.json               the target's fields as above (image_ext "png"), plus edit ("text" |
                             "text_color" | "background"), instruction, source_text,
                             source_background, source_gradient, source_text_color, source_lines
  preference pair (synth.pairs=true; json task="pair", kind "pure"; every sample):
    <key>.win.png            the preferred image: the scene rendering the caption's text
    <key>.lose.png           the rejected image: the same scene with a corrupted string (`corrupt_text`)
    <key>.txt                the prompt (the caption, quoting the correct text)
    <key>.json               the preferred image's fields as above, plus rule ("text_correct") and
                             lose_text
"""

import io
import json
import math
import random
import string
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw

from mmdit.config.produce import SynthConfig
from mmdit.producer.synth import layouts, scenes
from mmdit.producer.synth.fonts import FONTS, FontSpec, TextFitError, fit_text, line_height, load_font, require_fonts
from mmdit.producer.synth.words import COLORS, EN_SENTENCES, PALETTE, ZH_SENTENCES, luminance, readable_on
from mmdit.utils.atomic import atomic_path

GRADIENT_DIRECTIONS = {"vertical": "垂直", "horizontal": "水平", "diagonal": "对角"}
HALIGN_ZH = {"left": "左对齐", "center": "居中", "right": "右对齐"}
VALIGN_EN = {"top": "at the top", "middle": "in the middle", "bottom": "at the bottom"}
VALIGN_ZH = {"top": "顶部", "middle": "中部", "bottom": "底部"}
MIN_EDIT_DISTANCE = 80.0
"""Minimum RGB distance between a colour and its edited replacement (an edit must be visible)."""


@dataclass(frozen=True)
class Scene:
    """Everything that determines one rendered image (no pixels: cheap to make and compare)."""

    width: int
    height: int
    lang: str
    text: str
    font: str
    background: tuple[str, ...]
    """One colour name (plain) or two (gradient from the first to the second)."""
    gradient: str
    """"" for a plain background, else a key of GRADIENT_DIRECTIONS."""
    text_color: str
    halign: str
    valign: str
    box: tuple[float, float]
    """Text box size as fractions of (width, height); the box is centred."""

    @property
    def box_px(self) -> tuple[int, int]:
        return int(self.width * self.box[0]), int(self.height * self.box[1])

    @property
    def box_rect(self) -> tuple[int, int, int, int]:
        """The centred text box in pixels: x0, y0, x1, y1."""
        box_w, box_h = self.box_px
        x0, y0 = (self.width - box_w) // 2, (self.height - box_h) // 2
        return x0, y0, x0 + box_w, y0 + box_h


def _mean_color(background: tuple[str, ...]) -> tuple[float, ...]:
    rgbs = [COLORS[c][1] for c in background]
    return tuple(sum(ch) / len(rgbs) for ch in zip(*rgbs))


def _readable_colors(background: tuple[str, ...]) -> list[str]:
    return readable_on([COLORS[c][1] for c in background])


def _pick_text(rng: random.Random, lang: str) -> str:
    pool = ZH_SENTENCES if lang == "zh" else EN_SENTENCES
    parts = rng.sample(pool, rng.choice((1, 1, 1, 2, 3)))
    return ("" if lang == "zh" else " ").join(parts)


def _pick_background(rng: random.Random) -> tuple[tuple[str, ...], str]:
    names = [n for n, _, _ in PALETTE]
    while True:
        if rng.random() < 0.5:
            background, gradient = (rng.choice(names),), ""
        else:
            first = rng.choice(names)
            lum = luminance(COLORS[first][1])
            close = [n for n in names if n != first and abs(luminance(COLORS[n][1]) - lum) < 0.3]
            if not close:
                continue
            background, gradient = (first, rng.choice(close)), rng.choice(list(GRADIENT_DIRECTIONS))
        if _readable_colors(background):
            return background, gradient


def sample_scene(rng: random.Random, cfg: SynthConfig) -> Scene:
    lang = "zh" if rng.random() < cfg.zh_fraction else "en"
    text = _pick_text(rng, lang)
    fonts = [f for f in FONTS if f.cjk or lang == "en"]
    background, gradient = _pick_background(rng)
    return Scene(
        width=rng.randint(cfg.min_side, cfg.max_side),
        height=rng.randint(cfg.min_side, cfg.max_side),
        lang=lang,
        text=text,
        font=rng.choice(fonts).name,
        background=background,
        gradient=gradient,
        text_color=rng.choice(_readable_colors(background)),
        halign=rng.choice(("left", "center", "right")),
        valign=rng.choice(("top", "middle", "bottom")),
        box=(rng.uniform(0.6, 0.9), rng.uniform(0.3, 0.8)),
    )


def _font(name: str) -> FontSpec:
    return next(f for f in FONTS if f.name == name)


@dataclass(frozen=True)
class Layout:
    font_size: int
    lines: list[str]


def layout_scene(scene: Scene, font_dir: str) -> Layout:
    size, lines = fit_text(scene.text, str(Path(font_dir) / _font(scene.font).relpath), *scene.box_px)
    return Layout(size, lines)


def _background(scene: Scene) -> Image.Image:
    w, h = scene.width, scene.height
    first = COLORS[scene.background[0]][1]
    if not scene.gradient:
        return Image.new("RGB", (w, h), first)
    a, b = np.array(first, np.float32), np.array(COLORS[scene.background[1]][1], np.float32)
    ys, xs = np.linspace(0, 1, h, dtype=np.float32)[:, None], np.linspace(0, 1, w, dtype=np.float32)[None, :]
    t = {"vertical": ys + 0 * xs, "horizontal": xs + 0 * ys, "diagonal": (xs + ys) / 2}[scene.gradient]  # [h, w]
    pixels = a + t[..., None] * (b - a)
    return Image.fromarray((pixels + 0.5).astype(np.uint8), "RGB")


def render(scene: Scene, layout: Layout, font_dir: str) -> Image.Image:
    image = _background(scene)
    draw = ImageDraw.Draw(image)
    font = load_font(str(Path(font_dir) / _font(scene.font).relpath), layout.font_size)
    step = line_height(font, 1.15)
    box_w, box_h = scene.box_px
    x0, y0 = scene.box_rect[:2]
    used = step * len(layout.lines)
    y = y0 + {"top": 0, "middle": (box_h - used) // 2, "bottom": box_h - used}[scene.valign]
    for line in layout.lines:
        width = font.getlength(line)
        x = x0 + {"left": 0, "center": (box_w - width) / 2, "right": box_w - width}[scene.halign]
        draw.text((x, y), line, font=font, fill=COLORS[scene.text_color][1])
        y += step
    return image


def _background_words(scene: Scene, zh: bool) -> str:
    if zh:
        names = [COLORS[c][0] for c in scene.background]
        if not scene.gradient:
            return f"纯{names[0]}背景"
        return f"从{names[0]}到{names[1]}的{GRADIENT_DIRECTIONS[scene.gradient]}渐变背景"
    if not scene.gradient:
        return f"a plain {scene.background[0]} background"
    return f"a {scene.gradient} gradient background from {scene.background[0]} to {scene.background[1]}"


def caption(scene: Scene, n_lines: int, zh: bool) -> str:
    """A caption that quotes the text verbatim and states background, colour, font and layout."""
    style = _font(scene.font).style
    if zh:
        lines = f"，共{n_lines}行" if n_lines > 1 else ""
        return (
            f"一张{_background_words(scene, True)}的图片，{VALIGN_ZH[scene.valign]}{HALIGN_ZH[scene.halign]}"
            f"用{COLORS[scene.text_color][0]}字体写着“{scene.text}”{lines}。"
        )
    lang = "Chinese" if scene.lang == "zh" else "English"
    lines = f" on {n_lines} lines" if n_lines > 1 else " on one line"
    align = "centered" if scene.halign == "center" else f"{scene.halign}-aligned"
    return (
        f"A text image with {_background_words(scene, False)}. The {lang} text \"{scene.text}\" is written "
        f"in {scene.text_color} {style} letters, {align} {VALIGN_EN[scene.valign]} of the image{lines}."
    )


def _edit(rng: random.Random, source: Scene) -> tuple[Scene, str, str]:
    """A target scene, the edit kind, and the instruction that turns `source` into it."""
    zh = rng.random() < 0.5
    kind = rng.choice(("text", "text_color", "background"))
    if kind == "text":
        text = source.text
        while text == source.text:
            text = _pick_text(rng, source.lang)
        target = replace(source, text=text)
        instruction = f"把文字“{source.text}”改成“{text}”" if zh else f'Change the text "{source.text}" to "{text}".'
    elif kind == "text_color":
        old = COLORS[source.text_color][1]
        choices = [c for c in _readable_colors(source.background) if math.dist(COLORS[c][1], old) >= MIN_EDIT_DISTANCE]
        if not choices:
            return _edit(rng, source)
        target = replace(source, text_color=rng.choice(choices))
        color = COLORS[target.text_color][0] if zh else target.text_color
        instruction = f"把文字颜色改成{color}" if zh else f"Change the color of the text to {color}."
    else:
        for _ in range(100):
            background, gradient = _pick_background(rng)
            far = math.dist(_mean_color(background), _mean_color(source.background)) >= MIN_EDIT_DISTANCE
            if far and source.text_color in _readable_colors(background):
                break
        else:
            return _edit(rng, source)
        target = replace(source, background=background, gradient=gradient)
        words = _background_words(target, zh)
        instruction = f"把背景换成{words}" if zh else f"Replace the background with {words}."
    return target, kind, instruction


def _encode(image: Image.Image, ext: str) -> bytes:
    buf = io.BytesIO()
    if ext == "jpg":
        image.save(buf, format="JPEG", quality=92)
    else:
        image.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _metadata(scene: Scene, layout: Layout) -> dict:
    meta = asdict(scene)
    meta.update(background=list(scene.background), box=list(scene.box), font_size=layout.font_size, lines=layout.lines)
    meta.update(kind="pure", category="synthetic",
                layout=[{"role": "text", "text": scene.text, "box": list(scene.box_rect)}])
    return meta


MAX_TRIES = 20


def _fitting_scene(rng: random.Random, cfg: SynthConfig) -> tuple[Scene, Layout]:
    """A scene whose text fits its box (a long text in a small box is drawn again)."""
    for _ in range(MAX_TRIES):
        scene = sample_scene(rng, cfg)
        try:
            return scene, layout_scene(scene, cfg.font_dir)
        except TextFitError:
            continue
    raise TextFitError(f"no text fitted in {MAX_TRIES} tries: synth.min_side={cfg.min_side} is too small")


def _fitting_edit(rng: random.Random, source: Scene, cfg: SynthConfig) -> tuple[Scene, Layout, str, str]:
    for _ in range(MAX_TRIES):
        target, kind, instruction = _edit(rng, source)
        try:
            return target, layout_scene(target, cfg.font_dir), kind, instruction
        except TextFitError:
            continue
    raise TextFitError(f"no edited text fitted in {MAX_TRIES} tries: synth.min_side={cfg.min_side} is too small")


KINDS = {"compositional": scenes, "complex": layouts}
"""The kinds besides pure; each module has sample(rng, cfg), render(drawing, font_dir),
caption(drawing, zh) and metadata(drawing)."""


def pick_kind(index: int, cfg: SynthConfig) -> str:
    """The kind of sample `index`, from a random stream of its own: a pure sample draws exactly
    what it drew before there were other kinds."""
    rng = random.Random(f"mmdit-synth-kind:{cfg.seed}:{index}")
    return rng.choices(SynthConfig.KINDS, weights=[cfg.kinds.get(k, 0.0) for k in SynthConfig.KINDS])[0]


def corrupt_text(text: str, rng: random.Random) -> str:
    """The rejected image's text: about a third of the letters (at least one) each replaced by
    another of its script (Latin letters keep their case; Chinese characters come from the
    sentences the fonts are known to cover); spaces and punctuation stay."""
    zh_pool = sorted({c for s in ZH_SENTENCES for c in s if "\u4e00" <= c <= "\u9fff"})
    chars = list(text)
    letters = [i for i, c in enumerate(chars) if c.isalpha()]
    for i in rng.sample(letters, max(1, len(letters) // 3)) if letters else []:
        c = chars[i]
        pool = zh_pool if "\u4e00" <= c <= "\u9fff" else string.ascii_uppercase if c.isupper() else string.ascii_lowercase
        chars[i] = rng.choice([p for p in pool if p != c])
    return "".join(chars)


def make_pair(index: int, cfg: SynthConfig) -> dict:
    """Preference pair `index` (synth.pairs): a pure scene, its caption quoting the text; the
    preferred image renders the text, the rejected one the same scene with `corrupt_text`."""
    rng = random.Random(f"mmdit-synth-pair:{cfg.seed}:{index}")
    for _ in range(MAX_TRIES):
        scene, layout = _fitting_scene(rng, cfg)
        lose = replace(scene, text=corrupt_text(scene.text, rng))
        try:
            lose_layout = layout_scene(lose, cfg.font_dir)
            break
        except TextFitError:
            continue
    else:
        raise TextFitError(f"no corrupted text fitted in {MAX_TRIES} tries: synth.min_side={cfg.min_side} is too small")
    zh_caption = rng.random() < cfg.zh_caption_fraction
    meta = _metadata(scene, layout)
    meta.update(task="pair", source="synth", index=index, seed=cfg.seed, rule="text_correct", lose_text=lose.text,
                caption_lang="zh" if zh_caption else "en", image_ext="png")
    return {
        "__key__": f"{index:08d}",
        "win.png": _encode(render(scene, layout, cfg.font_dir), "png"),
        "lose.png": _encode(render(lose, lose_layout, cfg.font_dir), "png"),
        "txt": caption(scene, len(layout.lines), zh_caption).encode("utf-8"),
        "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"),
    }


def make_sample(index: int, cfg: SynthConfig) -> dict:
    """The webdataset sample with this index (members as in the module docstring)."""
    if cfg.pairs:
        return make_pair(index, cfg)
    rng = random.Random(f"mmdit-synth:{cfg.seed}:{index}")
    kind = pick_kind(index, cfg)
    if kind != "pure":
        return _drawn_sample(index, kind, rng, cfg)
    scene, layout = _fitting_scene(rng, cfg)
    key = f"{index:08d}"
    if rng.random() < cfg.edit_fraction:
        target, target_layout, kind, instruction = _fitting_edit(rng, scene, cfg)
        meta = _metadata(target, target_layout)
        meta.update(
            task="edit", source="synth", index=index, seed=cfg.seed, edit=kind, instruction=instruction,
            source_text=scene.text, source_background=list(scene.background), source_gradient=scene.gradient,
            source_text_color=scene.text_color, source_lines=layout.lines, image_ext="png",
        )
        return {
            "__key__": key,
            "png": _encode(render(target, target_layout, cfg.font_dir), "png"),
            "src.png": _encode(render(scene, layout, cfg.font_dir), "png"),
            "txt": instruction.encode("utf-8"),
            "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"),
        }
    zh_caption = rng.random() < cfg.zh_caption_fraction
    ext = "jpg" if rng.random() < 0.5 else "png"
    text = caption(scene, len(layout.lines), zh_caption)
    meta = _metadata(scene, layout)
    meta.update(
        task="t2i", source="synth", index=index, seed=cfg.seed, caption_lang="zh" if zh_caption else "en", image_ext=ext
    )
    return {
        "__key__": key,
        ext: _encode(render(scene, layout, cfg.font_dir), ext),
        "txt": text.encode("utf-8"),
        "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"),
    }


def _drawn_sample(index: int, kind: str, rng: random.Random, cfg: SynthConfig) -> dict:
    """A compositional or complex sample (text-to-image only)."""
    module = KINDS[kind]
    drawing = module.sample(rng, cfg)
    zh_caption = rng.random() < cfg.zh_caption_fraction
    ext = "jpg" if rng.random() < 0.5 else "png"
    meta = module.metadata(drawing)
    meta.update(kind=kind, category="synthetic", task="t2i", source="synth", index=index, seed=cfg.seed,
                caption_lang="zh" if zh_caption else "en", image_ext=ext)
    return {
        "__key__": f"{index:08d}",
        ext: _encode(module.render(drawing, cfg.font_dir), ext),
        "txt": module.caption(drawing, zh_caption).encode("utf-8"),
        "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"),
    }


def write_shards(out_dir: str, cfg: SynthConfig) -> list[str]:
    """Render `cfg.num_samples` samples into `out_dir/synth-%06d.tar` (pairs: `pairs-%06d.tar`);
    returns the shard paths."""
    require_fonts(cfg.font_dir)
    if cfg.backgrounds and cfg.kinds.get("compositional"):
        scenes.background_files(cfg.backgrounds)  # no images: fail before writing anything
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(math.ceil(cfg.num_samples / cfg.samples_per_shard)):
        path = out / f"{'pairs' if cfg.pairs else 'synth'}-{shard:06d}.tar"
        start = shard * cfg.samples_per_shard
        with atomic_path(path) as tmp, open(tmp, "wb") as stream:
            writer = wds.TarWriter(stream, mtime=0)
            try:
                for index in range(start, min(start + cfg.samples_per_shard, cfg.num_samples)):
                    writer.write(make_sample(index, cfg))
            finally:
                writer.close()
        paths.append(str(path))
    return paths


def text_corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Captions and instructions like the ones synth writes, without rendering (tokenizer training)."""
    cfg = SynthConfig(seed=seed)
    rng = random.Random(f"mmdit-corpus:{seed}")
    texts = list(EN_SENTENCES) + list(ZH_SENTENCES)
    for _ in range(n):
        scene = sample_scene(rng, cfg)
        texts.append(caption(scene, rng.randint(1, 4), rng.random() < 0.3))
        texts.append(_edit(rng, scene)[2])
    return texts
