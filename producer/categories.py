"""Sample categories: the Qwen-Image report's top-level taxonomy, and where a sample's comes from.

A sample's category is, in order of trust: its metadata's `category` (synthetic data knows what it
is), the annotation model's answer (`mmdit annotate`), or its source's entry in
`data.source_categories`. The manifest keeps the category and where it came from
(`category_source`), the data config weighs categories (`category_weights.<name>`, hot-swappable),
and `mmdit produce` reports how many accepted samples each category holds.
"""

from __future__ import annotations

import re

CATEGORIES = ("nature", "design", "people", "synthetic", "text_rendering")
"""Nature (scenes, animals, objects, food), Design (posters, UI, slides, art), People (portraits,
activities), Synthetic (generated data, e.g. `mmdit synth`), Text rendering (images whose subject
is their text: documents, signs, screenshots)."""

FROM_METADATA, FROM_ANNOTATION, FROM_SOURCE = "metadata", "annotation", "source"
TRUST = {FROM_METADATA: 3, FROM_ANNOTATION: 2, FROM_SOURCE: 1, "": 0}


class CategoryError(ValueError):
    pass


def normalize(name: object) -> str:
    """A category name as written by people or models ("Text rendering", "TEXT-RENDERING") ->
    its canonical form ("text_rendering"); CategoryError if it is not one of CATEGORIES."""
    if not isinstance(name, str):
        raise CategoryError(f"a category is a string, got {name!r}")
    canonical = re.sub(r"[\s\-]+", "_", name.strip().lower())
    if canonical not in CATEGORIES:
        raise CategoryError(f"unknown category {name!r} (one of {', '.join(CATEGORIES)})")
    return canonical


UNKNOWN = "unknown"
"""How weights name the samples without a category."""


def check_weights(table: dict, where: str = "category_weights") -> dict[str, float]:
    """Category weights with canonical names (UNKNOWN allowed); CategoryError naming the bad one."""
    out = {}
    for name, weight in table.items():
        try:
            out[UNKNOWN if str(name).strip().lower() == UNKNOWN else normalize(name)] = weight
        except CategoryError as e:
            raise CategoryError(f"{where}.{name}: {e} or {UNKNOWN!r}") from None
    return out


def check_source_categories(table: dict) -> dict[str, str]:
    """`data.source_categories` normalized; CategoryError naming the bad entry."""
    out = {}
    for source, name in table.items():
        try:
            out[str(source)] = normalize(name)
        except CategoryError as e:
            raise CategoryError(f"data.source_categories.{source}: {e}") from None
    return out


def from_ingest(meta: dict, source: str, source_categories: dict[str, str]) -> tuple[str, str]:
    """(category, where it came from) of a sample at ingest: its metadata, else its source's entry,
    else unknown (''). A metadata category that is not a known one is ignored, not guessed."""
    try:
        if meta.get("category") is not None:
            return normalize(meta["category"]), FROM_METADATA
    except CategoryError:
        pass
    if source in source_categories:
        return source_categories[source], FROM_SOURCE
    return "", ""


def overrides(current_source: str | None, new_source: str) -> bool:
    """Does a category from `new_source` replace one from `current_source`?"""
    return TRUST[new_source] >= TRUST[current_source or ""]
