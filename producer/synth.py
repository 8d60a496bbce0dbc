"""Synthetic text-rendering data: the Qwen-Image report's "pure rendering" strategy.

Chinese and English sentences are rendered on plain or gradient backgrounds with a dynamic layout
(font size fitted to a text box, line wrapping, alignment, colours), captioned with the exact text
and the layout; a fraction of samples are edit triplets (change the text, the text colour or the
background). Every sample is a pure function of (seed, index), so a shard can be regenerated
bit-for-bit and two runs with one seed agree.

Usage: `mmdit synth OUT num_samples=N [edit_fraction=0.25 samples_per_shard=32 seed=0 ...]`
(bare names are fields of `SynthConfig`, i.e. `synth.<name>`; any other Hydra override works too).

Output: `OUT/synth-000000.tar`, ... (webdataset shards, each written to a temporary name and
renamed when complete, so a killed run leaves no torn shard under the final name). Members per
sample, keyed `%08d` (the sample index):

  text-to-image sample (json task="t2i"):
    <key>.png or <key>.jpg   the rendered image (RGB)
    <key>.txt                the caption (UTF-8), which quotes the rendered text verbatim
    <key>.json               metadata: task, source="synth", index, seed, lang ("en" | "zh"),
                             text, lines (as wrapped), width, height, font, font_size,
                             background (1 or 2 colour names), gradient ("" | vertical |
                             horizontal | diagonal), text_color, halign, valign, box,
                             caption_lang, image_ext ("png" | "jpg")
  edit triplet (json task="edit"):
    <key>.png                the target image (after the edit)
    <key>.src.png            the source image (before the edit), same size as the target
    <key>.txt                the edit instruction (UTF-8)
    <key>.json               the target's fields as above (image_ext "png"), plus edit ("text" |
                             "text_color" | "background"), instruction, source_text,
                             source_background, source_gradient, source_text_color, source_lines
"""

import io
import json
import math
import random
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw

from mmdit.producer.config import SynthConfig
from mmdit.producer.fonts import FONTS, FontSpec, TextFitError, fit_text, line_height, load_font, require_fonts
from mmdit.utils.atomic import atomic_path

EN_SENTENCES = (
    "Hello, world!",
    "Fresh coffee every morning",
    "The quick brown fox jumps over the lazy dog.",
    "Open 24 hours",
    "Welcome to the city library",
    "Summer sale: everything must go",
    "Keep calm and carry on",
    "Mind the gap between the train and the platform.",
    "Please recycle your bottles and cans",
    "Grand opening this Saturday at 10 AM",
    "Knowledge is power.",
    "Turn left at the next intersection",
    "Handmade bread and pastries",
    "No parking on weekdays",
    "The best way to predict the future is to invent it.",
    "Quiet please, exam in progress",
    "Live music every Friday night",
    "Today's special: tomato soup",
    "Think different, work together",
    "Exit only",
    "Happy birthday, Anna!",
    "Flight 372 to Tokyo is now boarding at gate 12.",
    "Fresh flowers for every occasion",
    "Do not feed the animals",
    "Learning never exhausts the mind.",
    "Train your model, then test it twice.",
    "All good things come to those who wait",
    "Reserved for guests of the hotel",
    "Wet paint, do not touch",
    "A journey of a thousand miles begins with a single step.",
    "Museum of modern art, second floor",
    "Bicycle repair and rental",
)

ZH_SENTENCES = (
    "你好，世界！",
    "欢迎光临",
    "今天天气很好，我们去公园散步吧。",
    "学而时习之，不亦说乎。",
    "新鲜咖啡，每日现磨",
    "请勿吸烟",
    "图书馆开放时间：上午九点至晚上九点",
    "前方施工，请绕行。",
    "春眠不觉晓，处处闻啼鸟。",
    "小心地滑",
    "知识就是力量",
    "全场商品八折优惠",
    "祝你生日快乐！",
    "地铁二号线换乘通道",
    "书山有路勤为径，学海无涯苦作舟。",
    "保持安静，考试进行中",
    "手工面包与甜点",
    "出口",
    "千里之行，始于足下。",
    "节约用水，人人有责",
    "周末音乐会，晚上八点开始",
    "床前明月光，疑是地上霜。",
    "欢迎来到北京",
    "营业时间：全天二十四小时",
    "熟能生巧",
    "海内存知己，天涯若比邻。",
    "请排队上车",
    "明天会更好",
    "山不在高，有仙则名。",
    "中文文字渲染测试",
    "人工智能改变生活",
    "一分耕耘，一分收获。",
)

# (English name, Chinese name, RGB)
PALETTE = (
    ("white", "白色", (250, 250, 250)),
    ("black", "黑色", (20, 20, 20)),
    ("red", "红色", (200, 30, 30)),
    ("dark blue", "深蓝色", (20, 40, 120)),
    ("light blue", "浅蓝色", (150, 200, 240)),
    ("green", "绿色", (30, 140, 60)),
    ("dark green", "深绿色", (20, 80, 40)),
    ("yellow", "黄色", (245, 210, 40)),
    ("orange", "橙色", (240, 130, 30)),
    ("purple", "紫色", (120, 50, 160)),
    ("pink", "粉色", (240, 160, 190)),
    ("gray", "灰色", (128, 128, 128)),
    ("light gray", "浅灰色", (220, 220, 220)),
    ("brown", "棕色", (120, 80, 40)),
    ("teal", "青色", (0, 128, 128)),
    ("beige", "米色", (235, 225, 200)),
)
COLORS = {en: (zh, rgb) for en, zh, rgb in PALETTE}
GRADIENT_DIRECTIONS = {"vertical": "垂直", "horizontal": "水平", "diagonal": "对角"}
HALIGN_ZH = {"left": "左对齐", "center": "居中", "right": "右对齐"}
VALIGN_EN = {"top": "at the top", "middle": "in the middle", "bottom": "at the bottom"}
VALIGN_ZH = {"top": "顶部", "middle": "中部", "bottom": "底部"}
MIN_CONTRAST = 0.35
"""Minimum luminance difference between text and every background colour (readable text)."""
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


def _luminance(rgb: tuple[int, int, int]) -> float:
    r, g, b = rgb
    return (0.299 * r + 0.587 * g + 0.114 * b) / 255.0


def _mean_color(background: tuple[str, ...]) -> tuple[float, ...]:
    rgbs = [COLORS[c][1] for c in background]
    return tuple(sum(ch) / len(rgbs) for ch in zip(*rgbs))


def _readable_colors(background: tuple[str, ...]) -> list[str]:
    lums = [_luminance(COLORS[c][1]) for c in background]
    return [n for n, (_, rgb) in COLORS.items() if all(abs(_luminance(rgb) - l) >= MIN_CONTRAST for l in lums)]


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
            lum = _luminance(COLORS[first][1])
            close = [n for n in names if n != first and abs(_luminance(COLORS[n][1]) - lum) < 0.3]
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
    x0, y0 = (scene.width - box_w) // 2, (scene.height - box_h) // 2
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


def make_sample(index: int, cfg: SynthConfig) -> dict:
    """The webdataset sample with this index (members as in the module docstring)."""
    rng = random.Random(f"mmdit-synth:{cfg.seed}:{index}")
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


def write_shards(out_dir: str, cfg: SynthConfig) -> list[str]:
    """Render `cfg.num_samples` samples into `out_dir/synth-%06d.tar`; returns the shard paths."""
    require_fonts(cfg.font_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(math.ceil(cfg.num_samples / cfg.samples_per_shard)):
        path = out / f"synth-{shard:06d}.tar"
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


SYNTH_FIELDS = ("num_samples", "edit_fraction", "samples_per_shard", "seed", "min_side", "max_side",
                "zh_fraction", "zh_caption_fraction", "font_dir")


def parse_args(argv: list[str]) -> tuple[str, list[str]]:
    """`OUT [name=value ...]`: bare SynthConfig field names become `synth.<name>` overrides."""
    if not argv or "=" in argv[0] or argv[0].startswith("-"):
        raise SystemExit("usage: mmdit synth OUT [num_samples=N] [synth.<field>=value ...]")
    overrides = []
    for arg in argv[1:]:
        name = arg.split("=", 1)[0].lstrip("+~")
        overrides.append(f"synth.{arg}" if name in SYNTH_FIELDS else arg)
    return argv[0], overrides


def main(argv: list[str]) -> int:
    from mmdit.launch.config import load_config
    from mmdit.producer.fonts import FontMissingError

    out, overrides = parse_args(argv)
    cfg = load_config(overrides).synth
    try:
        paths = write_shards(out, cfg)
    except (FontMissingError, TextFitError) as e:
        print(f"mmdit synth: {e}", file=sys.stderr)
        return 1
    print(f"wrote {cfg.num_samples} samples in {len(paths)} shard(s) to {out}")
    return 0
