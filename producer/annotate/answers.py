"""What `mmdit annotate` asks the VL model, and how its answer is read.

The model is asked for one JSON object (`PROMPT`, keys in `KEYS`). `parse` finds that object in
the output (code fences and prose around it are tolerated: instruction-tuned models add them),
validates it against `SCHEMA` with jsonschema and normalizes the category name. It never guesses
or repairs a value: "yes" is not a boolean, a missing key is not an empty one. Outcomes:

  ok           the object, validated, with the canonical category
  unparseable  no JSON object in the output (nothing, prose only, truncated, malformed)
  invalid      a JSON object that breaks the schema (the first error is kept)
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from mmdit.cache.categories import CATEGORIES, CategoryError, normalize

OK, UNPARSEABLE, INVALID = "ok", "unparseable", "invalid"
STATUSES = (OK, UNPARSEABLE, INVALID)
KEYS = ("caption", "category", "objects", "text", "watermark", "qr_code", "mosaic", "style")
MAX_STORED = 2000
"""Characters of a failed output kept in the manifest (enough to see what went wrong)."""

_CATEGORY_HELP = {
    "nature": "scenes, landscapes, animals, plants, objects, food",
    "design": "posters, UI, slides, illustrations, art",
    "people": "portraits, people doing things",
    "synthetic": "rendered or generated images",
    "text_rendering": "images whose subject is their text: documents, signs, screenshots",
}

PROMPT = (
    "Annotate this image for a text-to-image training set. Answer with a single JSON object and "
    "nothing else, with exactly these keys:\n"
    '"caption": a detailed description of the image (string),\n'
    '"category": one of ' + ", ".join(f'"{c}" ({_CATEGORY_HELP.get(c, c)})' for c in CATEGORIES) + ",\n"
    '"objects": the main objects (list of strings),\n'
    '"text": all visible text, transcribed verbatim in its own language ("" if none),\n'
    '"watermark": true if a watermark or a stamped logo overlays the image, else false,\n'
    '"qr_code": true if a QR code is visible, else false,\n'
    '"mosaic": true if part of the image is pixelated or mosaicked, else false,\n'
    '"style": the visual style in a few words (e.g. "photograph", "flat vector illustration").'
)

SCHEMA = {
    "type": "object",
    "required": list(KEYS),
    "properties": {
        "caption": {"type": "string", "pattern": r"\S"},
        "category": {"type": "string"},  # the name is checked by categories.normalize
        "objects": {"type": "array", "items": {"type": "string"}},
        "text": {"type": "string"},
        "watermark": {"type": "boolean"},
        "qr_code": {"type": "boolean"},
        "mosaic": {"type": "boolean"},
        "style": {"type": "string"},
    },
}
"""Extra keys are allowed and dropped: only KEYS are stored."""
_VALIDATOR = Draft202012Validator(SCHEMA)


@dataclass(frozen=True)
class Parsed:
    status: str
    value: dict | None
    """The validated annotation (KEYS only, canonical category) when ok, else None."""
    error: str
    """Why it is not ok ('' when ok)."""
    raw: str

    def columns(self) -> dict:
        """The manifest columns it fills (the category is the caller's: it depends on the row)."""
        if self.status != OK:
            return {"annotation_status": self.status, "annotation": self.raw[:MAX_STORED], "watermark": None,
                    "qr_code": None, "mosaic": None, "visible_text": None, "style": None}
        v = self.value
        return {"annotation_status": OK, "annotation": json.dumps(v, ensure_ascii=False),
                "watermark": v["watermark"], "qr_code": v["qr_code"], "mosaic": v["mosaic"],
                "visible_text": v["text"], "style": v["style"]}


def find_object(text: str) -> tuple[dict | None, str]:
    """(the first JSON object in `text`, '') or (None, why not). Fences and prose are skipped
    simply by trying every '{' in order: they are not JSON."""
    decoder = json.JSONDecoder()
    first_error = ""
    start = text.find("{")
    while start >= 0:
        try:
            obj, _ = decoder.raw_decode(text, start)
            if isinstance(obj, dict):
                return obj, ""
        except json.JSONDecodeError as e:
            first_error = first_error or f"malformed JSON: {e}"
        start = text.find("{", start + 1)
    return None, first_error or "no JSON object in the output"


def _message(error) -> str:
    where = ".".join(str(p) for p in error.absolute_path)
    return (f"{where}: {error.message}" if where else error.message)[:300]


def parse(output: str) -> Parsed:
    obj, why = find_object(output)
    if obj is None:
        return Parsed(UNPARSEABLE, None, why, output)
    error = best_match(_VALIDATOR.iter_errors(obj))
    if error is not None:
        return Parsed(INVALID, None, _message(error), output)
    try:
        category = normalize(obj["category"])
    except CategoryError as e:
        return Parsed(INVALID, None, f"category: {e}"[:300], output)
    return Parsed(OK, {**{k: obj[k] for k in KEYS}, "category": category}, "", output)


def annotation_caption(row: dict) -> str | None:
    """The caption of a manifest row's annotation when it parsed (status ok), else None: what a
    sample is trained with when data.caption_sources picks its annotation."""
    if row.get("annotation_status") != OK or not row.get("annotation"):
        return None
    try:
        caption = json.loads(row["annotation"]).get("caption")
    except (ValueError, AttributeError):
        return None
    return caption if isinstance(caption, str) and caption.strip() else None
