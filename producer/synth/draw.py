"""A block of text fitted into a box and drawn there: the step every `mmdit synth` kind shares.

`fit_block` chooses the font size and line breaks (producer/synth/fonts.py); `draw_block` draws the lines
aligned in their box and returns the pixel rectangle the text covers, which the metadata records.
"""

from dataclasses import dataclass
from pathlib import Path

from PIL import ImageDraw

from mmdit.producer.synth.fonts import FONTS, FontSpec, fit_text, line_height, load_font, wrap_text

LINE_SPACING = 1.15


def font_spec(name: str) -> FontSpec:
    return next(f for f in FONTS if f.name == name)


def font_path(font_dir: str, name: str) -> str:
    return str(Path(font_dir) / font_spec(name).relpath)


def fonts_for(lang: str) -> list[FontSpec]:
    """Faces that can draw this language (only the CJK face has Chinese glyphs)."""
    return [f for f in FONTS if f.cjk or lang == "en"]


@dataclass(frozen=True)
class Block:
    font_size: int
    lines: tuple[str, ...]


def fit_block(text: str, font_dir: str, font: str, width: int, height: int, max_size: int = 0) -> Block:
    """The largest size (at most `max_size` when given) whose wrapped lines fit; TextFitError if none."""
    path = font_path(font_dir, font)
    size, lines = fit_text(text, path, width, height, LINE_SPACING)
    if max_size and size > max_size:  # fitting is monotone in size, so a smaller size fits too
        size, lines = max_size, wrap_text(text, load_font(path, max_size), width)
    return Block(size, tuple(lines))


def draw_block(
    draw: ImageDraw.ImageDraw | None, block: Block, font_dir: str, font: str, box: tuple[int, int, int, int],
    fill: tuple[int, ...], halign: str = "center", valign: str = "middle",
) -> tuple[int, int, int, int]:
    """Draw the lines in `box` (x0, y0, x1, y1); returns the (x0, y0, x1, y1) the lines occupy.

    With `draw` None nothing is drawn: the same placement, measured only (for the metadata)."""
    face = load_font(font_path(font_dir, font), block.font_size)
    step = line_height(face, LINE_SPACING)
    x0, y0, x1, y1 = box
    used = step * len(block.lines)
    y = y0 + {"top": 0, "middle": (y1 - y0 - used) // 2, "bottom": y1 - y0 - used}[valign]
    top, left, right = y, x1, x0
    for line in block.lines:
        width = face.getlength(line)
        x = x0 + {"left": 0, "center": (x1 - x0 - width) / 2, "right": x1 - x0 - width}[halign]
        if draw is not None:
            draw.text((x, y), line, font=face, fill=fill)
        left, right = min(left, x), max(right, x + width)
        y += step
    return int(left), top, int(right + 0.999), top + used
