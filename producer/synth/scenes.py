"""The compositional kind: text in perspective on a surface of a scene (Qwen-Image's
"compositional rendering").

A scene (a shop front, a brick wall, a park, a table, a roadside, a classroom) is drawn
procedurally with numpy (producer/synth/textures.py), or is an image from `synth.backgrounds`.
A surface (signboard, poster, wooden sign, cardboard box, billboard, chalkboard) is drawn flat with
its text fitted inside, shaded, then warped onto a quadrilateral by a perspective transform whose
coefficients are solved from the four corners, and composited through its alpha. The caption
names the scene and the surface and quotes the text verbatim.

Everything random is drawn in `sample` from the sample's `random.Random` (the noise too, through
`noise_seed`), so `render` is a pure function of the returned `Sign`.
"""

import functools
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from mmdit.config.produce import SynthConfig
from mmdit.producer.synth.draw import Block, draw_block, fit_block, font_spec, fonts_for
from mmdit.producer.synth.fonts import TextFitError
from mmdit.producer.synth.textures import brick, grass, plaster, smooth_noise, tint, to_image, vertical_gradient, wood
from mmdit.producer.synth.words import EN_SENTENCES, ZH_SENTENCES, readable_on, rgb, zh_name


@dataclass(frozen=True)
class SceneKind:
    en: str
    """Caption phrase; {color} is the scene colour's name."""
    zh: str
    where_en: str
    """Where the surface is, after its name ("above the door")."""
    where_zh: str
    surfaces: tuple[str, ...]
    colors: tuple[str, ...] = ()
    """Wall or facade colours to choose from (none: the scene has no coloured wall)."""


SCENES = {
    "shop_front": SceneKind("A shop front with a {color} facade on a city street", "街边一间{color}外墙的店铺门面",
                            "above the door", "门上方的", ("signboard",), ("beige", "light gray", "white", "light blue")),
    "brick_wall": SceneKind("A {color} brick wall", "一面{color}砖墙", "hanging on it", "墙上挂着的",
                            ("poster", "signboard"), ("red", "brown", "orange", "gray")),
    "park": SceneKind("A park with green grass under a blue sky", "蓝天下的草地公园", "standing on a wooden post",
                      "立在木桩上的", ("plank",)),
    "table": SceneKind("A wooden table in front of a {color} wall", "{color}墙前的一张木桌", "on the table", "桌上的",
                       ("box",), ("beige", "light gray", "white", "light blue", "pink")),
    "roadside": SceneKind("A roadside under a blue sky", "蓝天下的路边", "standing on two poles",
                          "立在两根柱子上的", ("billboard",)),
    "classroom": SceneKind("A classroom with a {color} wall", "一间{color}墙壁的教室", "on the wall", "墙上的",
                           ("chalkboard",), ("beige", "light gray", "white", "light blue")),
    "photo": SceneKind("A photo", "一张照片", "placed in the scene", "画面中的", ("signboard", "poster", "plank")),
}
PHOTO_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass(frozen=True)
class SurfaceKind:
    en: str
    """Caption phrase; {color} is the surface colour's name."""
    zh: str
    noun: str
    colors: tuple[str, ...]
    inks: tuple[str, ...] = ()
    """Text colours (chalk...); none: any palette colour readable on the surface."""
    frame: float = 0.0
    """Frame width as a fraction of the surface's shorter side."""
    frame_color: tuple[int, int, int] | None = None
    """None: a darker shade of the surface colour."""


SURFACES = {
    "signboard": SurfaceKind("{color} signboard", "{color}招牌", "signboard",
                             ("red", "dark blue", "dark green", "black", "white", "yellow", "teal", "purple"),
                             frame=0.07),
    "poster": SurfaceKind("{color} paper poster", "{color}纸质海报", "poster",
                          ("white", "beige", "light gray", "yellow", "pink", "light blue")),
    "plank": SurfaceKind("wooden sign", "木牌", "sign", ("brown", "beige", "orange")),
    "box": SurfaceKind("cardboard box", "纸箱", "box", ("beige", "brown")),
    "billboard": SurfaceKind("{color} billboard", "{color}广告牌", "billboard",
                             ("white", "yellow", "red", "dark blue", "teal", "orange"), frame=0.04,
                             frame_color=(95, 95, 100)),
    "chalkboard": SurfaceKind("{color} chalkboard", "{color}黑板", "chalkboard", ("dark green", "black"),
                              inks=("white", "yellow", "pink", "light blue"), frame=0.06,
                              frame_color=(130, 90, 50)),
}
MIN_SURFACE = (96, 48)
"""Smallest surface (width, height) in pixels, where the image is large enough to hold it."""
TEXT_PAD = (0.1, 0.14)
"""Padding between the frame and the text, as fractions of the surface's (width, height)."""


@dataclass(frozen=True)
class Sign:
    """Everything that determines one compositional image, fitted text included."""

    width: int
    height: int
    lang: str
    text: str
    font: str
    scene: str
    scene_color: str
    horizon: float
    """Where the scene's upper part ends (sky, wall), as a fraction of the height."""
    background_image: str
    """A file of `synth.backgrounds` (scene "photo"), else ""."""
    surface: str
    surface_color: str
    text_color: str
    side: str
    """"left" or "right": the nearer edge of the surface (the taller one)."""
    quad: tuple[tuple[float, float], ...]
    """The surface's corners in the image: top-left, top-right, bottom-right, bottom-left."""
    block: Block
    text_quad: tuple[tuple[float, float], ...]
    """The corners of the rectangle the text covers, carried into the image."""
    noise_seed: int

    @property
    def flat_size(self) -> tuple[int, int]:
        return flat_size_of(np.array(self.quad))


def flat_size_of(quad: np.ndarray) -> tuple[int, int]:
    """The surface drawn flat: as long as its longest edges, so warping does not magnify."""
    tl, tr, br, bl = quad
    w = max(np.linalg.norm(tr - tl), np.linalg.norm(br - bl))
    h = max(np.linalg.norm(bl - tl), np.linalg.norm(br - tr))
    return max(16, round(w)), max(16, round(h))


# --- perspective -----------------------------------------------------------------------------


def homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 3x3 projective map taking the 4 points `src` [4, 2] to `dst` [4, 2] (least squares)."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows += [[x, y, 1, 0, 0, 0, -u * x, -u * y], [0, 0, 0, x, y, 1, -v * x, -v * y]]
        rhs += [u, v]
    h = np.linalg.lstsq(np.array(rows, np.float64), np.array(rhs, np.float64), rcond=None)[0]
    return np.append(h, 1.0).reshape(3, 3)


def project(h: np.ndarray, points: np.ndarray) -> np.ndarray:
    p = np.c_[points, np.ones(len(points))] @ h.T  # [n, 3]
    return p[:, :2] / p[:, 2:]


def _corners(w: float, h: float) -> np.ndarray:
    return np.array([(0, 0), (w, 0), (w, h), (0, h)], np.float64)


def warp_onto(image: Image.Image, flat: Image.Image, quad: np.ndarray) -> Image.Image:
    """`flat` composited onto `image` with its corners at `quad`; the warped alpha is the mask."""
    # PIL maps each output pixel back to the input, so it wants the image -> flat direction.
    coeffs = homography(quad, _corners(*flat.size)).flatten()[:8]
    # Premultiplied alpha: the bicubic edge blends toward transparent, not toward black.
    warped = flat.convert("RGBA").convert("RGBa").transform(image.size, Image.PERSPECTIVE, tuple(coeffs),
                                                            Image.BICUBIC)
    warped = warped.convert("RGBA")
    out = image.copy()
    out.paste(warped, (0, 0), warped)
    return out


def _tilt(rng: random.Random, width: int, height: int, anchor: tuple[float, ...]) -> tuple[np.ndarray, str]:
    """A rectangle (cx, cy, w, h as fractions) seen at an angle: the nearer side taller, the top
    and bottom of different widths, a slight roll; shrunk about its centre to stay in the image."""
    cx, cy, w, h = anchor[0] * width, anchor[1] * height, anchor[2] * width, anchor[3] * height
    # A floor in pixels, so that a small image still has room for a line of 8-pixel text.
    w, h = max(w, min(0.85 * width, MIN_SURFACE[0])), max(h, min(0.6 * height, MIN_SURFACE[1]))
    yaw = rng.uniform(0.14, 0.34) * rng.choice((-1, 1))
    pitch, roll = rng.uniform(-0.15, 0.15), rng.uniform(-0.06, 0.06)
    hl, hr = h * (1 + yaw / 2), h * (1 - yaw / 2)
    wt, wb = w * (1 - pitch / 2), w * (1 + pitch / 2)
    pts = np.array([(-wt / 2, -hl / 2), (wt / 2, -hr / 2), (wb / 2, hr / 2), (-wb / 2, hl / 2)])
    c, s = math.cos(roll), math.sin(roll)
    pts = pts @ np.array([[c, s], [-s, c]])
    margin = 0.03 * min(width, height)
    scale = 1.0
    for px, py in pts:
        for d, centre, size in ((px, cx, width), (py, cy, height)):
            room = (size - margin - centre) if d > 0 else (centre - margin)
            if abs(d) > 1e-9:
                scale = min(scale, room / abs(d))
    return pts * scale + (cx, cy), "left" if yaw > 0 else "right"


def _anchor(rng: random.Random, scene: str, horizon: float) -> tuple[float, float, float, float]:
    """Centre and size of the surface, as fractions of the image, where the scene puts it."""
    u = rng.uniform
    if scene == "shop_front":
        return u(0.42, 0.58), horizon + u(0.12, 0.18), u(0.5, 0.7), u(0.14, 0.2)
    if scene == "park":
        return u(0.35, 0.65), u(0.28, 0.4), u(0.45, 0.65), u(0.22, 0.3)
    if scene == "table":
        return u(0.42, 0.58), horizon + u(0.0, 0.05), u(0.4, 0.55), u(0.25, 0.32)
    if scene == "roadside":
        return u(0.4, 0.6), u(0.28, 0.4), u(0.6, 0.8), u(0.26, 0.34)
    if scene == "classroom":
        return u(0.42, 0.58), u(0.38, 0.48), u(0.6, 0.78), u(0.36, 0.5)
    return u(0.38, 0.62), u(0.38, 0.62), u(0.45, 0.7), u(0.28, 0.45)


# --- sampling --------------------------------------------------------------------------------


class BackgroundsError(FileNotFoundError):
    """`synth.backgrounds` is not a directory, or holds no images."""


@functools.lru_cache(maxsize=8)
def background_files(directory: str) -> tuple[str, ...]:
    """The images of `synth.backgrounds`, sorted (a sample's choice depends on this order)."""
    if not Path(directory).is_dir():
        raise BackgroundsError(f"synth.backgrounds={directory!r} is not a directory")
    files = sorted(str(p) for p in Path(directory).rglob("*") if p.suffix.lower() in PHOTO_EXTS and p.is_file())
    if not files:
        raise BackgroundsError(f"synth.backgrounds={directory!r} holds no images ({', '.join(PHOTO_EXTS)})")
    return tuple(files)


def _short_text(rng: random.Random, lang: str) -> str:
    """One sentence short enough for a sign."""
    pool = [s for s in (ZH_SENTENCES if lang == "zh" else EN_SENTENCES) if len(s) <= (14 if lang == "zh" else 36)]
    return rng.choice(pool)


def _fitted(rng: random.Random, cfg: SynthConfig) -> Sign:
    width, height = rng.randint(cfg.min_side, cfg.max_side), rng.randint(cfg.min_side, cfg.max_side)
    lang = "zh" if rng.random() < cfg.zh_fraction else "en"
    text, font = _short_text(rng, lang), rng.choice(fonts_for(lang)).name
    photo = rng.choice(background_files(cfg.backgrounds)) if cfg.backgrounds else ""
    scene = "photo" if photo else rng.choice([s for s in SCENES if s != "photo"])
    horizon = {"shop_front": rng.uniform(0.08, 0.2), "park": rng.uniform(0.5, 0.62), "table": rng.uniform(0.52, 0.62),
               "roadside": rng.uniform(0.68, 0.78), "classroom": rng.uniform(0.84, 0.9)}.get(scene, 0.0)
    surface = rng.choice(SCENES[scene].surfaces)
    surface_color = rng.choice(SURFACES[surface].colors)
    inks = readable_on([rgb(surface_color)])
    inks = [c for c in SURFACES[surface].inks if c in inks] if SURFACES[surface].inks else inks
    quad, side = _tilt(rng, width, height, _anchor(rng, scene, horizon))
    quad = quad.round(2)
    fw, fh = flat_size_of(quad)
    box = _text_box(surface, fw, fh)
    block = fit_block(text, cfg.font_dir, font, box[2] - box[0], box[3] - box[1])
    x0, y0, x1, y1 = draw_block(None, block, cfg.font_dir, font, box, (0, 0, 0))
    text_quad = project(homography(_corners(fw, fh), quad), np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)]))
    return Sign(
        width=width, height=height, lang=lang, text=text, font=font, scene=scene,
        scene_color=rng.choice(SCENES[scene].colors) if SCENES[scene].colors else "", horizon=horizon,
        background_image=photo, surface=surface, surface_color=surface_color, text_color=rng.choice(inks), side=side,
        quad=tuple(map(tuple, quad.tolist())), block=block, text_quad=tuple(map(tuple, text_quad.round(2).tolist())),
        noise_seed=rng.getrandbits(63),
    )


MAX_TRIES = 20


def sample(rng: random.Random, cfg: SynthConfig) -> Sign:
    """A sign whose text fits its surface (a long text on a small surface is drawn again)."""
    for _ in range(MAX_TRIES):
        try:
            return _fitted(rng, cfg)
        except TextFitError:
            continue
    raise TextFitError(f"no sign text fitted in {MAX_TRIES} tries: synth.min_side={cfg.min_side} is too small")


def _text_box(surface: str, fw: int, fh: int) -> tuple[int, int, int, int]:
    """Where the text goes on the flat surface: inside the frame and the padding."""
    frame = round(SURFACES[surface].frame * min(fw, fh))
    px, py = frame + round(TEXT_PAD[0] * fw), frame + round(TEXT_PAD[1] * fh)
    return px, py, fw - px, fh - py


# --- rendering -------------------------------------------------------------------------------


def _sky(gen: np.random.Generator, h: int, w: int) -> np.ndarray:
    top = np.array((70, 130, 210)) + gen.integers(-15, 16, 3)
    return vertical_gradient(h, w, tuple(top), (205, 225, 245))


def _scene_pixels(sign: Sign, gen: np.random.Generator) -> np.ndarray:
    """The scene without its surface and props: [h, w, 3] float."""
    w, h, split = sign.width, sign.height, int(sign.horizon * sign.height)
    color = rgb(sign.scene_color) if sign.scene_color else (0, 0, 0)
    if sign.scene == "photo":
        with Image.open(sign.background_image) as photo:
            photo = ImageOps.exif_transpose(photo).convert("RGB")
        return np.asarray(ImageOps.fit(photo, (w, h), Image.BICUBIC), np.float32)
    if sign.scene == "brick_wall":
        return brick(gen, h, w, color, h // gen.integers(10, 18))
    if sign.scene in ("park", "roadside"):
        return np.concatenate([_sky(gen, split, w), grass(gen, h - split, w)])
    if sign.scene == "shop_front":
        street = int(h * 0.88)
        return np.concatenate([_sky(gen, split, w), plaster(gen, street - split, w, color),
                               plaster(gen, h - street, w, (150, 150, 150))])
    if sign.scene == "table":
        return np.concatenate([plaster(gen, split, w, color), wood(gen, h - split, w, (150, 100, 60), planks=3)])
    return np.concatenate([plaster(gen, split, w, color), wood(gen, h - split, w, (140, 95, 55), planks=4)])


def _props(sign: Sign, draw: ImageDraw.ImageDraw) -> None:
    """What holds the surface up or frames it, drawn before the surface (door, post, box sides)."""
    w, h = sign.width, sign.height
    tl, tr, br, bl = (np.array(p) for p in sign.quad)
    bottom = max(bl[1], br[1])
    if sign.scene == "shop_front":
        cx, street = (bl[0] + br[0]) / 2, h * 0.88
        door_w, top = 0.16 * w, bottom + 0.04 * h
        if top < street - 0.1 * h:
            draw.rectangle((cx - door_w / 2, top, cx + door_w / 2, street), fill=(70, 50, 40), outline=(40, 30, 25))
            for dx in (-0.27 * w, 0.27 * w):
                box = (cx + dx - 0.1 * w, top, cx + dx + 0.1 * w, top + 0.45 * (street - top))
                draw.rectangle(box, fill=(160, 200, 225), outline=(60, 60, 60), width=max(2, w // 150))
    elif sign.scene == "park":
        cx, post_w = (bl[0] + br[0]) / 2, max(4, 0.035 * w)
        draw.rectangle((cx - post_w / 2, bottom - 2, cx + post_w / 2, min(h - 1, bottom + 0.35 * h)),
                       fill=(100, 70, 40))
        crown, r = (sign.horizon - 0.15) * h, 0.09 * min(w, h)
        for x in (0.1 * w, 0.9 * w):  # two trees at the edges
            draw.rectangle((x - 0.015 * w, crown, x + 0.015 * w, crown + 0.2 * h), fill=(90, 60, 35))
            draw.ellipse((x - r, crown - r, x + r, crown + r), fill=(40, 100, 45))
    elif sign.scene == "roadside":
        for t in (0.25, 0.75):
            x = bl[0] + t * (br[0] - bl[0])
            leg = max(3, 0.02 * w)
            draw.rectangle((x - leg / 2, bottom - 2, x + leg / 2, h - 1), fill=(80, 80, 85))
    elif sign.scene == "table":
        # The box's top and the side facing the viewer: the front face moved back and up.
        depth = np.array((-0.12 if sign.side == "left" else 0.12, -0.1)) * np.linalg.norm(tr - tl)
        base = np.array(rgb(sign.surface_color), np.float64)
        top = (tl, tr, tr + depth, tl + depth)
        draw.polygon([tuple(p) for p in top], fill=tuple((base * 1.08).clip(0, 255).astype(int)))
        side = (tr, tr + depth, br + depth, br) if depth[0] > 0 else (tl, tl + depth, bl + depth, bl)
        draw.polygon([tuple(p) for p in side], fill=tuple((base * 0.7).astype(int)))


def _surface(sign: Sign, gen: np.random.Generator, with_text: bool, font_dir: str) -> Image.Image:
    """The surface drawn flat, its text on it, lit from one side."""
    fw, fh = sign.flat_size
    kind, color = SURFACES[sign.surface], rgb(sign.surface_color)
    if sign.surface == "plank":
        pixels = wood(gen, fh, fw, color, planks=int(gen.integers(2, 4)))
    elif sign.surface in ("box", "chalkboard"):
        pixels = tint(color, 1 + 0.06 * smooth_noise(gen, fh, fw, 5))
    else:
        pixels = tint(color, 1 + 0.02 * smooth_noise(gen, fh, fw, 3))
    frame = round(kind.frame * min(fw, fh))
    if frame:
        edge = np.ones((fh, fw), bool)
        edge[frame:fh - frame, frame:fw - frame] = False
        pixels[edge] = kind.frame_color or tuple(0.55 * c for c in color)
    image = to_image(pixels)
    if with_text:
        box = _text_box(sign.surface, fw, fh)
        draw_block(ImageDraw.Draw(image), sign.block, font_dir, sign.font, box, rgb(sign.text_color))
    light = gen.uniform(-0.3, 0.3)
    shade = 1 + light * (np.linspace(0, 1, fw, dtype=np.float32)[None, :] - 0.5)  # [1, fw]
    lit = np.asarray(image, np.float32) * shade[..., None] + 3 * gen.standard_normal((fh, fw, 1)).astype(np.float32)
    return to_image(lit)


def render(sign: Sign, font_dir: str, with_text: bool = True) -> Image.Image:
    """The image; with_text=False gives the same image without the text (same noise, same surface)."""
    gen = np.random.default_rng(sign.noise_seed)
    image = to_image(_scene_pixels(sign, gen))
    _props(sign, ImageDraw.Draw(image))
    image = warp_onto(image, _surface(sign, gen, with_text, font_dir), np.array(sign.quad))
    noisy = np.asarray(image, np.float32) + 2 * gen.standard_normal((sign.height, sign.width, 1)).astype(np.float32)
    return to_image(noisy)


# --- caption and metadata --------------------------------------------------------------------


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def caption(sign: Sign, zh: bool) -> str:
    """Names the scene and the surface, and quotes the text verbatim."""
    scene, surface = SCENES[sign.scene], SURFACES[sign.surface]
    if zh:
        where = scene.zh.format(color=zh_name(sign.scene_color) if sign.scene_color else "")
        thing = surface.zh.format(color=zh_name(sign.surface_color))
        side = "左" if sign.side == "left" else "右"
        ink = zh_name(sign.text_color)
        return f"{where}，{scene.where_zh}{thing}从{side}侧斜看过去，上面用{ink}字体写着“{sign.text}”。"
    where = scene.en.format(color=sign.scene_color)
    thing = _article(surface.en.format(color=sign.surface_color))
    lang = "Chinese" if sign.lang == "zh" else "English"
    lines = f" on {len(sign.block.lines)} lines" if len(sign.block.lines) > 1 else ""
    return (
        f"{where}, with {thing} {scene.where_en}, seen at an angle from the {sign.side}. The {surface.noun} carries "
        f"the {lang} text \"{sign.text}\" in {sign.text_color} {font_spec(sign.font).style} letters{lines}."
    )


def metadata(sign: Sign) -> dict:
    return {
        "lang": sign.lang, "text": sign.text, "lines": list(sign.block.lines), "width": sign.width,
        "height": sign.height, "font": sign.font, "font_size": sign.block.font_size, "scene": sign.scene,
        "scene_color": sign.scene_color, "background_image": sign.background_image, "surface": sign.surface,
        "surface_color": sign.surface_color, "text_color": sign.text_color, "side": sign.side,
        "surface_quad": [list(p) for p in sign.quad],
        "layout": [{"role": sign.surface, "text": sign.text, "quad": [list(p) for p in sign.text_quad]}],
    }
