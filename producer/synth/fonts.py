"""Fonts for synthetic text rendering, and fitting a text into a box (size + line wrapping).

The fonts come from Debian packages (`make sysdeps` installs them): `fonts-wqy-microhei` covers
Chinese and Latin, `fonts-dejavu-core` gives Latin sans, serif and monospace faces. A missing
file is a `FontMissingError` that names the package to install, never a silent fallback to PIL's
bitmap font (which cannot draw Chinese and would teach the model blank boxes).
"""

import functools
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import ImageFont

DEFAULT_FONT_DIR = "/usr/share/fonts/truetype"


@dataclass(frozen=True)
class FontSpec:
    name: str
    relpath: str
    """Path under the font directory (`synth.font_dir`)."""
    package: str
    """Debian package that ships the file."""
    style: str
    """Caption word for the face: sans-serif, serif, monospace, bold sans-serif..."""
    cjk: bool
    """Has Chinese glyphs."""


FONTS: tuple[FontSpec, ...] = (
    FontSpec("WenQuanYi Micro Hei", "wqy/wqy-microhei.ttc", "fonts-wqy-microhei", "sans-serif", True),
    FontSpec("DejaVu Sans", "dejavu/DejaVuSans.ttf", "fonts-dejavu-core", "sans-serif", False),
    FontSpec("DejaVu Sans Bold", "dejavu/DejaVuSans-Bold.ttf", "fonts-dejavu-core", "bold sans-serif", False),
    FontSpec("DejaVu Serif", "dejavu/DejaVuSerif.ttf", "fonts-dejavu-core", "serif", False),
    FontSpec("DejaVu Serif Bold", "dejavu/DejaVuSerif-Bold.ttf", "fonts-dejavu-core", "bold serif", False),
    FontSpec("DejaVu Sans Mono", "dejavu/DejaVuSansMono.ttf", "fonts-dejavu-core", "monospace", False),
)


class FontMissingError(FileNotFoundError):
    """A font file the renderer needs is not installed; the message names the package."""


class TextFitError(ValueError):
    """The text does not fit its box even at the smallest font size."""


def require_fonts(font_dir: str = DEFAULT_FONT_DIR, fonts: tuple[FontSpec, ...] = FONTS) -> None:
    """Raise `FontMissingError` listing every missing file and the packages that provide them."""
    missing = [f for f in fonts if not (Path(font_dir) / f.relpath).is_file()]
    if missing:
        files = ", ".join(str(Path(font_dir) / f.relpath) for f in missing)
        packages = " ".join(sorted({f.package for f in missing}))
        raise FontMissingError(
            f"missing font file(s): {files}. Install them with `make sysdeps` or "
            f"`apt-get install -y {packages}` (or point synth.font_dir at a directory that has them)"
        )


@functools.lru_cache(maxsize=512)
def load_font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


# A wrap unit: a Latin word (with trailing ASCII punctuation), a run of spaces, or one other
# character (a CJK character, with closing punctuation glued on so no line starts with it).
_UNIT = re.compile(r"[A-Za-z0-9'’\-]+[.,!?;:\"')]*|\s+|.[，。！？、；：”’）》」』]*")


def wrap_units(text: str) -> list[str]:
    return _UNIT.findall(text)


def wrap_text(text: str, font: ImageFont.FreeTypeFont, max_width: float) -> list[str] | None:
    """Greedy line breaking at word (Latin) or character (CJK) boundaries.

    Returns None when a single unit is wider than `max_width` (the size does not fit).
    """
    lines: list[str] = []
    line = ""
    for unit in wrap_units(text):
        candidate = line + unit
        if font.getlength(candidate) <= max_width:
            line = candidate
            continue
        if unit.isspace():
            lines.append(line)
            line = ""
            continue
        if line.strip():
            lines.append(line.rstrip())
        if font.getlength(unit) > max_width:
            return None
        line = unit
    if line.strip():
        lines.append(line.rstrip())
    return lines


def line_height(font: ImageFont.FreeTypeFont, spacing: float) -> int:
    ascent, descent = font.getmetrics()
    return int(round((ascent + descent) * spacing))


def fit_text(
    text: str, font_path: str, box_w: int, box_h: int, spacing: float = 1.15, min_size: int = 8
) -> tuple[int, list[str]]:
    """The largest font size whose wrapped lines fit in (box_w, box_h), and those lines.

    Binary search over integer sizes: line count only grows as the size grows, so "fits" is
    monotone. Raises TextFitError if even `min_size` does not fit.
    """

    def layout(size: int) -> list[str] | None:
        font = load_font(font_path, size)
        lines = wrap_text(text, font, box_w)
        if lines is None or len(lines) * line_height(font, spacing) > box_h:
            return None
        return lines

    lo, hi = min_size, max(min_size, box_h)
    best = layout(lo)
    if best is None:
        raise TextFitError(f"text of {len(text)} characters does not fit a {box_w}x{box_h} box at size {min_size}")
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lines = layout(mid)
        if lines is None:
            hi = mid - 1
        else:
            lo, best = mid, lines
    return lo, best
