"""Sample categories: the Qwen-Image report's top-level taxonomy, and where a sample's comes from.

A sample's category is, in order of trust: its metadata's `category` (synthetic data knows what it
is), the annotation model's answer (`mmdit annotate`), or its source's entry in
`data.source_categories`. The manifest keeps the category and where it came from
(`category_source`), the data config weighs categories (`category_weights.<name>`, hot-swappable),
and `mmdit produce` reports how many accepted samples each category holds.
"""

from __future__ import annotations

from mmdit.config.data import CATEGORIES, UNKNOWN, CategoryError
from mmdit.config.data import normalize_category as normalize

__all__ = ["CATEGORIES", "UNKNOWN", "CategoryError", "normalize", "from_ingest", "overrides"]

FROM_METADATA, FROM_ANNOTATION, FROM_SOURCE = "metadata", "annotation", "source"
TRUST = {FROM_METADATA: 3, FROM_ANNOTATION: 2, FROM_SOURCE: 1, "": 0}


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
