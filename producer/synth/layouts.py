"""The complex kind: structured layouts (slides, app screens, web pages, posters) (Qwen-Image's
"complex rendering").

A template places simple shapes (header bars, rounded buttons, cards, image placeholders drawn as
coloured blocks) and several text boxes with roles (title, subtitle, bullet, button, nav, item,
price, date, footer...) on a page, in fractions of the page size. Each box takes a phrase of its
role (producer/synth/words.py), fitted to the box; a box whose phrase does not fit is left out,
except the title (then the design is drawn again). The caption names the layout type and colours
and quotes every text verbatim, the title first.

`sample` draws every choice from the sample's `random.Random`; `render` is a pure function of
the returned `Design`.
"""

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from mmdit.config.produce import SynthConfig
from mmdit.producer.synth.draw import Block, draw_block, fit_block, fonts_for
from mmdit.producer.synth.fonts import TextFitError
from mmdit.producer.synth.words import PHRASES, readable_on, rgb, zh_name

TEMPLATES = {
    # name: (English caption words, Chinese caption words, portrait page)
    "slide": ("A presentation slide", "一张演示文稿幻灯片", False),
    "app_screen": ("A mobile app screen", "一个手机应用界面", True),
    "web_page": ("A web page", "一个网页", False),
    "poster": ("A poster", "一张海报", True),
}
ROLE_WORDS = {
    # role: (English, Chinese), in caption order
    "brand": ("the brand name", "品牌名"),
    "subtitle": ("the subtitle", "副标题"),
    "nav": ("navigation links", "导航链接"),
    "search": ("a search box saying", "搜索框提示"),
    "bullet": ("bullet points", "要点"),
    "heading": ("feature headings", "特色标题"),
    "item": ("list items", "列表项"),
    "price": ("prices", "价格"),
    "date": ("the date", "日期"),
    "button": ("buttons labelled", "按钮"),
    "status": ("the time", "状态栏时间"),
    "footer": ("the footer", "页脚"),
}
LIGHT = ("white", "light gray", "beige", "light blue")
ACCENTS = ("dark blue", "red", "green", "purple", "teal", "dark green", "orange", "black", "brown")


@dataclass(frozen=True)
class Shape:
    kind: str
    """rect | rounded | ellipse | image (a placeholder: a block with hills and a sun)."""
    box: tuple[int, int, int, int]
    fill: str
    outline: str = ""


@dataclass(frozen=True)
class TextBox:
    role: str
    text: str
    box: tuple[int, int, int, int]
    color: str
    font: str
    halign: str
    block: Block


@dataclass(frozen=True)
class Design:
    template: str
    width: int
    height: int
    lang: str
    background: tuple[str, ...]
    """One colour, or two for a vertical gradient."""
    accent: str
    shapes: tuple[Shape, ...]
    texts: tuple[TextBox, ...]

    @property
    def title(self) -> str:
        return next(t.text for t in self.texts if t.role == "title")


class _Page:
    """Collects one design's shapes and text boxes; templates place them in fractions of the page."""

    def __init__(self, rng: random.Random, cfg: SynthConfig, width: int, height: int, lang: str):
        self.rng, self.font_dir, self.width, self.height, self.lang = rng, cfg.font_dir, width, height, lang
        faces = [f.name for f in fonts_for(lang)]
        bold = [f for f in faces if "Bold" in f]
        self.body = rng.choice([f for f in faces if "Bold" not in f])
        # One body-text colour for the page (where readable): a design, not confetti.
        self.ink = rng.choice(("black", "dark blue", "gray", "brown", "dark green"))
        self.heavy = rng.choice(bold) if bold else self.body
        self.shapes: list[Shape] = []
        self.texts: list[TextBox] = []
        self.used: set[str] = set()

    def px(self, x0: float, y0: float, x1: float, y1: float) -> tuple[int, int, int, int]:
        w, h = self.width, self.height
        return round(x0 * w), round(y0 * h), round(x1 * w), round(y1 * h)

    def shape(self, kind: str, frac: tuple[float, ...], fill: str, outline: str = "") -> None:
        self.shapes.append(Shape(kind, self.px(*frac), fill, outline))

    def text(self, role: str, frac: tuple[float, ...], on: str | tuple[str, ...], halign: str = "left",
             heavy: bool = False, color: str = "") -> bool:
        """A phrase of `role` in the box, in the first of `color`, the page's ink, black and white
        readable on the colour(s) `on`; False if it does not fit (a title that does not fit is a
        TextFitError: the design is drawn again)."""
        pool = [p for p in PHRASES[self.lang][role] if p not in self.used]
        text = self.rng.choice(pool)
        inks = readable_on([rgb(c) for c in ((on,) if isinstance(on, str) else on)])
        color = next(c for c in (color, self.ink, "black", "white", *inks) if c in inks)
        font = self.heavy if heavy else self.body
        box = self.px(*frac)
        try:
            block = fit_block(text, self.font_dir, font, box[2] - box[0], box[3] - box[1])
        except TextFitError:
            if role == "title":
                raise
            return False
        self.used.add(text)
        self.texts.append(TextBox(role, text, box, color, font, halign, block))
        return True


def _slide(page: _Page, rng: random.Random, bg: str, accent: str) -> None:
    page.shape("rect", (0, 0, 1, 0.2), accent)
    page.text("title", (0.05, 0.04, 0.95, 0.17), accent, heavy=True, color="white")
    if rng.random() < 0.7:
        page.text("subtitle", (0.05, 0.22, 0.95, 0.29), bg, color=accent)
    picture = rng.random() < 0.6
    right = 0.58 if picture else 0.92
    n = rng.randint(3, 5)
    step = 0.56 / n
    for k in range(n):
        y = 0.32 + k * step
        if page.text("bullet", (0.1, y + step * 0.1, right, y + step * 0.9), bg):
            dot = min(0.3 * step * page.height, 0.025 * page.width)  # pixels
            x, mid = 0.05, y + step / 2
            page.shape("ellipse", (x, mid - dot / 2 / page.height, x + dot / page.width, mid + dot / 2 / page.height),
                       accent)
    if picture:
        page.shape("image", (0.63, 0.33, 0.95, 0.85), rng.choice([c for c in LIGHT if c != bg]))
    page.shape("rect", (0, 0.9, 1, 0.905), accent)
    page.text("footer", (0.05, 0.92, 0.6, 0.98), bg)


def _app_screen(page: _Page, rng: random.Random, bg: str, accent: str) -> None:
    page.text("status", (0.05, 0.005, 0.3, 0.04), bg)
    page.shape("rect", (0, 0.045, 1, 0.13), accent)
    page.text("title", (0.06, 0.055, 0.94, 0.12), accent, heavy=True, color="white")
    page.shape("rounded", (0.05, 0.15, 0.95, 0.21), "white", outline="gray")
    page.text("search", (0.1, 0.16, 0.9, 0.2), "white", color="gray")
    for k in range(3):
        y = 0.24 + k * 0.17
        page.shape("rounded", (0.05, y, 0.95, y + 0.15), "white", outline="light gray")
        page.shape("image", (0.08, y + 0.02, 0.3, y + 0.13), rng.choice([c for c in LIGHT if c != "white"]))
        page.text("item", (0.34, y + 0.02, 0.92, y + 0.08), "white")
        page.text("price", (0.34, y + 0.09, 0.7, y + 0.135), "white", heavy=True, color=accent)
    if page.text("button", (0.14, 0.77, 0.86, 0.83), accent, halign="center", color="white"):
        page.shape("rounded", (0.1, 0.76, 0.9, 0.84), accent)
    page.shape("rect", (0, 0.89, 1, 1), "light gray")
    tabs = rng.randint(3, 4)
    for k in range(tabs):
        page.text("nav", (k / tabs + 0.02, 0.91, (k + 1) / tabs - 0.02, 0.97), "light gray", halign="center")


def _web_page(page: _Page, rng: random.Random, bg: str, accent: str) -> None:
    page.shape("rect", (0, 0, 1, 0.11), accent)
    page.text("brand", (0.03, 0.02, 0.3, 0.09), accent, heavy=True, color="white")
    links = rng.randint(3, 4)
    for k in range(links):
        x = 0.42 + k * 0.55 / links
        page.text("nav", (x, 0.03, x + 0.55 / links - 0.02, 0.08), accent, halign="center", color="white")
    page.text("title", (0.05, 0.16, 0.58, 0.36), bg, heavy=True, color=accent)
    page.text("subtitle", (0.05, 0.38, 0.58, 0.46), bg)
    if page.text("button", (0.07, 0.51, 0.26, 0.57), accent, halign="center", color="white"):
        page.shape("rounded", (0.05, 0.5, 0.28, 0.58), accent)
    if page.text("button", (0.33, 0.51, 0.52, 0.57), bg, halign="center", color=accent):
        page.shape("rounded", (0.31, 0.5, 0.54, 0.58), bg, outline=accent)
    page.shape("image", (0.63, 0.16, 0.95, 0.6), rng.choice([c for c in LIGHT if c != bg]))
    for k in range(3):
        x = 0.05 + k * 0.31
        page.shape("rounded", (x, 0.65, x + 0.28, 0.87), "white", outline="light gray")
        page.text("heading", (x + 0.02, 0.67, x + 0.26, 0.74), "white", heavy=True, color=accent)
        page.text("bullet", (x + 0.02, 0.76, x + 0.26, 0.85), "white")
    page.shape("rect", (0, 0.91, 1, 1), "black")
    page.text("footer", (0.05, 0.925, 0.7, 0.985), "black", color="light gray")


def _poster(page: _Page, rng: random.Random, ground: tuple[str, ...], accent: str) -> None:
    page.text("title", (0.08, 0.05, 0.92, 0.3), ground, halign="center", heavy=True, color=accent)
    page.text("subtitle", (0.1, 0.31, 0.9, 0.39), ground, halign="center")
    kind = rng.choice(("image", "ellipse"))
    page.shape(kind, (0.2, 0.42, 0.8, 0.7), rng.choice([c for c in LIGHT if c not in ground]), outline=accent)
    page.text("date", (0.1, 0.73, 0.9, 0.8), ground, halign="center")
    if page.text("price", (0.31, 0.83, 0.69, 0.89), accent, halign="center", heavy=True, color="white"):
        page.shape("rounded", (0.28, 0.82, 0.72, 0.9), accent)
    page.text("footer", (0.1, 0.93, 0.9, 0.98), ground, halign="center")


BUILDERS = {"slide": _slide, "app_screen": _app_screen, "web_page": _web_page, "poster": _poster}
"""Each takes the page, the rng, the page colour (the poster: its 1 or 2 gradient colours) and the accent."""


def _designed(rng: random.Random, cfg: SynthConfig) -> Design:
    template = rng.choice(list(TEMPLATES))
    a, b = rng.randint(cfg.min_side, cfg.max_side), rng.randint(cfg.min_side, cfg.max_side)
    portrait = TEMPLATES[template][2]
    width, height = (min(a, b), max(a, b)) if portrait else (max(a, b), min(a, b))
    lang = "zh" if rng.random() < cfg.zh_fraction else "en"
    background = tuple(rng.sample(LIGHT, 2 if template == "poster" and rng.random() < 0.5 else 1))
    accent = rng.choice([c for c in ACCENTS if c in readable_on([rgb(c) for c in background])])
    page = _Page(rng, cfg, width, height, lang)
    BUILDERS[template](page, rng, background if template == "poster" else background[0], accent)
    return Design(template, width, height, lang, background, accent, tuple(page.shapes), tuple(page.texts))


MAX_TRIES = 20


def sample(rng: random.Random, cfg: SynthConfig) -> Design:
    """A design whose title fits (a long title in a small page is drawn again)."""
    for _ in range(MAX_TRIES):
        try:
            return _designed(rng, cfg)
        except TextFitError:
            continue
    raise TextFitError(f"no layout title fitted in {MAX_TRIES} tries: synth.min_side={cfg.min_side} is too small")


def _background(design: Design) -> Image.Image:
    top = rgb(design.background[0])
    image = Image.new("RGB", (design.width, design.height), top)
    if len(design.background) == 2:
        bottom = rgb(design.background[1])
        draw = ImageDraw.Draw(image)
        for y in range(design.height):
            t = y / max(1, design.height - 1)
            draw.line((0, y, design.width, y), fill=tuple(round(p + t * (q - p)) for p, q in zip(top, bottom)))
    return image


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape) -> None:
    x0, y0, x1, y1 = shape.box
    fill, outline = rgb(shape.fill), rgb(shape.outline) if shape.outline else None
    line = max(1, min(x1 - x0, y1 - y0) // 40)
    if shape.kind == "rect":
        draw.rectangle(shape.box, fill=fill, outline=outline, width=line)
    elif shape.kind == "rounded":
        draw.rounded_rectangle(shape.box, radius=max(2, (y1 - y0) // 3), fill=fill, outline=outline, width=line)
    elif shape.kind == "ellipse":
        draw.ellipse(shape.box, fill=fill, outline=outline, width=line)
    else:  # an image placeholder: block, hills, sun
        draw.rectangle(shape.box, fill=fill, outline=outline, width=line)
        w, h = x1 - x0, y1 - y0
        shade = tuple(int(c * 0.75) for c in fill)
        draw.polygon([(x0, y1), (x0 + 0.35 * w, y0 + 0.45 * h), (x0 + 0.6 * w, y0 + 0.75 * h),
                      (x0 + 0.8 * w, y0 + 0.55 * h), (x1, y1)], fill=shade)
        r = 0.1 * min(w, h)
        draw.ellipse((x0 + 0.72 * w - r, y0 + 0.25 * h - r, x0 + 0.72 * w + r, y0 + 0.25 * h + r), fill=shade)


def render(design: Design, font_dir: str) -> Image.Image:
    image = _background(design)
    draw = ImageDraw.Draw(image)
    for shape in design.shapes:
        _draw_shape(draw, shape)
    for box in design.texts:
        draw_block(draw, box.block, font_dir, box.font, box.box, rgb(box.color), box.halign)
    return image


def _quoted(texts: list[str], zh: bool) -> str:
    if zh:
        return "".join(f"“{t}”" for t in texts)
    quoted = [f'"{t}"' for t in texts]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


def caption(design: Design, zh: bool) -> str:
    """Names the layout type and its colours and quotes every text verbatim, the title first."""
    by_role: dict[str, list[str]] = {}
    for box in design.texts:
        by_role.setdefault(box.role, []).append(box.text)
    en, zh_words, _ = TEMPLATES[design.template]
    parts = [(ROLE_WORDS[r][zh], _quoted(by_role[r], zh)) for r in ROLE_WORDS if r in by_role]  # zh: 0 or 1
    if zh:
        bg = "到".join(zh_name(c) for c in design.background) + ("渐变" if len(design.background) > 1 else "")
        shows = "；".join(f"{words}{texts}" for words, texts in parts)
        return f"{zh_words}，{bg}背景，{zh_name(design.accent)}主色调，标题为“{design.title}”" + (
            f"，包含{shows}。" if shows else "。")
    bg = " to ".join(design.background) + (" gradient" if len(design.background) > 1 else "")
    shows = "; ".join(f"{words} {texts}" for words, texts in parts)
    return f"{en} with a {bg} background and {design.accent} accents, titled \"{design.title}\"." + (
        f" It shows {shows}." if shows else "")


def metadata(design: Design) -> dict:
    return {
        "lang": design.lang, "text": "\n".join(t.text for t in design.texts), "width": design.width,
        "height": design.height, "template": design.template, "background": list(design.background),
        "accent": design.accent,
        "layout": [
            {"role": t.role, "text": t.text, "box": list(t.box), "font": t.font, "font_size": t.block.font_size,
             "lines": list(t.block.lines), "color": t.color}
            for t in design.texts
        ],
        "shapes": [{"kind": s.kind, "box": list(s.box), "fill": s.fill} for s in design.shapes],
    }
