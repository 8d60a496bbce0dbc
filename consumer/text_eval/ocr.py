"""The OCR engine that reads generated images: RapidOCR (PP-OCR detection and recognition for
Chinese and English, run by onnxruntime).

Its wheel carries the models (PP-OCRv6 small det/rec, a PP-OCR direction classifier), so it reads
offline, on any CPU, with nothing to download; a reading depends only on the image and the
engine's version. Its logging (INFO lines per model load, a WARNING per image without text: most
of a young model's images) is silenced to errors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from PIL import Image


@dataclass(frozen=True)
class Reading:
    """What the engine read in one image: text lines in its reading order (top to bottom)."""

    lines: tuple[str, ...]
    scores: tuple[float, ...]
    """Recognition confidence per line, 0..1."""
    boxes: tuple[tuple[tuple[float, float], ...], ...]
    """Each line's quadrilateral, (x, y) pixel corners clockwise from the top left."""

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def to_dict(self) -> dict:
        return {"lines": list(self.lines), "scores": [round(s, 4) for s in self.scores],
                "boxes": [[[round(x, 1), round(y, 1)] for x, y in box] for box in self.boxes]}


class OcrEngine:
    """`engine.read(image) -> Reading`. Loads its models once (about a second); reuse one."""

    def __init__(self, threads: int = 0):
        from rapidocr import RapidOCR

        logging.getLogger("RapidOCR").setLevel(logging.ERROR)
        params = {"Global.log_level": "error"}
        if threads:
            params["EngineConfig.onnxruntime.intra_op_num_threads"] = threads
            params["EngineConfig.onnxruntime.inter_op_num_threads"] = 1
        self._engine = RapidOCR(params=params)
        cfg = self._engine.cfg
        self.name = (f"rapidocr {_version()} ({_name(cfg.Det.ocr_version)} det {_name(cfg.Det.model_type)}, "
                     f"rec {_name(cfg.Rec.model_type)} {_name(cfg.Rec.lang_type)})")

    def read(self, image: Image.Image) -> Reading:
        out = self._engine(image.convert("RGB"))
        lines = tuple(getattr(out, "txts", None) or ())
        scores = tuple(float(s) for s in (getattr(out, "scores", None) or ()))
        boxes = getattr(out, "boxes", None)
        if boxes is None or not lines:
            boxes = ()
        quads = tuple(tuple((float(x), float(y)) for x, y in box) for box in boxes)
        return Reading(lines, scores, quads)


def _name(setting) -> str:
    return str(getattr(setting, "value", setting))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rapidocr")
    except PackageNotFoundError:
        return "?"
