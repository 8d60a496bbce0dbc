"""What the service serves: the encoder fingerprint, and the selected samples of the cache.

The selection is every record cached under the fingerprint, intersected with what the manifest's
thresholds select (when the cache has a manifest). The coordinator plans over it; producers only
need the fingerprint.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mmdit.dataservice.plan import PlanError, SampleRef, Selection

log = logging.getLogger("mmdit.selection")


def resolve_fingerprint(cache, wanted: str) -> str:
    """The encoder fingerprint to serve: `wanted`, or the only one in the cache."""
    found = cache.fingerprints()
    if not found:
        raise PlanError(f"cache {cache.path} is empty: fill it with `mmdit produce` first")
    if wanted:
        if wanted not in found:
            raise PlanError(f"fingerprint {wanted!r} not in cache {cache.path} (found {found})")
        return wanted
    if len(found) != 1:
        raise PlanError(f"cache {cache.path} holds fingerprints {found}: set service.fingerprint to pick one")
    return found[0]


def _manifest_keys(cache_dir: Path, filters) -> set[str] | None:
    """Keys the manifest's thresholds select, or None when the cache has no manifest."""
    from mmdit.producer.manifest import read_manifest, select

    manifest_dir = cache_dir / "manifest"
    if not manifest_dir.is_dir():
        return None
    table = read_manifest(manifest_dir)
    if not table.num_rows:
        return None
    return set(select(table, filters).column("key").to_pylist())


def build_selection(cache, fingerprint: str, filters=None) -> tuple[Selection, dict]:
    """The samples to plan. Returns (selection, counts for the status report)."""
    allowed = _manifest_keys(Path(cache.path), filters) if filters is not None else None
    refs, counts = [], {"cached": 0, "filtered_out": 0}
    for bucket, keys in cache.buckets(fingerprint).items():
        for key in keys:
            counts["cached"] += 1
            if allowed is not None and key not in allowed:
                counts["filtered_out"] += 1
                continue
            meta = cache.meta(key, fingerprint)  # from the segment header: no tensor is read
            cond = meta.get("cond_shape")
            refs.append(SampleRef(key, tuple(bucket), meta["task"], meta.get("source", ""),
                                  (cond[1] * 8, cond[2] * 8) if cond else None))
    counts["selected"] = len(refs)
    counts["damaged"] = len(cache.damage)
    if allowed is not None:  # selected by the manifest but not cached: a deleted or damaged segment
        cached = {r.key for r in refs}
        missing = sorted(allowed - cached)
        counts["missing"] = len(missing)
        if missing:
            log.warning("%d samples the manifest selects are not in the cache (first: %s): `mmdit produce` encodes "
                        "them again", len(missing), missing[0])
    return Selection(refs), counts
