"""What the service can serve: the curriculum stages of the cache, and the universe of samples.

A cache written by `mmdit produce` holds one fingerprint per stage, `<encoders>-b<base>` (256,
640, 1328: the latents of one sample differ per stage). The universe the plan draws from is every
record cached at any stage, plus, when the cache has a manifest, the manifest's decodable samples
that are not cached (yet): a data-config version may plan them when a producer can encode on a
miss. Which samples a version actually draws is decided by its weights, stage and filters
(`Selection.weights`); changing a threshold needs no rebuild.

A text-to-image sample's annotation caption is a record of its own (`<key>#annotation`): not a
sample of the universe, but a state of its sample (`SampleRef.annotation`: cached, uncached,
failed), from which the plan picks the caption each epoch (data.caption_sources).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from mmdit.cache import read_manifest_table
from mmdit.cache.segment import ANNOTATION_CAPTION
from mmdit.dataservice.plan import CACHED, FAILED, UNCACHED, PlanError, SampleRef, Selection, held_out

log = logging.getLogger("mmdit.selection")

_STAGED = re.compile(r"^(?P<encoders>.+)-b(?P<base>\d+)$")


def resolve_fingerprint(cache, wanted: str) -> str:
    """The encoder fingerprint to serve: `wanted`, or the only one in the cache (a cache written
    by `mmdit produce` at several stages counts as one: its stage fingerprints share a prefix)."""
    found = cache.fingerprints()
    if not found:
        raise PlanError(f"cache {cache.path} is empty: fill it with `mmdit produce` first")
    if wanted:
        if wanted not in found:
            raise PlanError(f"fingerprint {wanted!r} not in cache {cache.path} (found {found})")
        return wanted
    families = {(m.group("encoders") if (m := _STAGED.match(fp)) else fp) for fp in found}
    if len(families) != 1:
        raise PlanError(f"cache {cache.path} holds fingerprints {found}: set service.fingerprint to pick one")
    return sorted(found)[0]


def resolve_stages(cache, fingerprint: str) -> dict[int, str]:
    """stage (base resolution) -> cache fingerprint: every stage of `fingerprint`'s encoders, or
    {0: fingerprint} for a cache without stages."""
    m = _STAGED.match(fingerprint)
    if m is None:
        return {0: fingerprint}
    stages = {}
    for fp in cache.fingerprints():
        other = _STAGED.match(fp)
        if other is not None and other.group("encoders") == m.group("encoders"):
            stages[int(other.group("base"))] = fp
    return stages


def build_selection(cache, stages: dict[int, str], filters=None, stage: int | None = None,
                    eval_fraction: float = 0.0) -> tuple[Selection, dict]:
    """The universe over `stages`, and counts for the status report: cached (records), selected
    (what `filters` select of it at `stage`, default the first), missing (selected by the
    manifest but not cached), damaged (unreadable files and records met while indexing), and,
    once any sample is annotated, annotation_captions (the text-to-image samples of that stage by
    the state of their annotation caption: cached, uncached, failed to parse, not annotated)."""
    manifest = read_manifest_table(Path(cache.path))
    rows = {k: r for k, r in _manifest_rows(manifest).items() if not held_out(k, eval_fraction)}
    refs, counts = [], {"cached": 0}
    for at, fp in sorted(stages.items()):
        cached, captions = set(), set()
        for bucket, keys in cache.buckets(fp).items():
            for key in keys:
                if held_out(key, eval_fraction):  # the evaluation split: never trained on
                    continue
                if key.endswith(ANNOTATION_CAPTION):  # a caption variant of its sample, not a sample
                    captions.add(key.removesuffix(ANNOTATION_CAPTION))
                    continue
                meta = cache.meta(key, fp)  # from the segment header: no tensor is read
                cond = meta.get("cond_shape")
                row = rows.get(key, {})
                refs.append(SampleRef(key, tuple(bucket), meta["task"], meta.get("source", ""),
                                      (cond[1] * 8, cond[2] * 8) if cond else None, at, row.get("category") or ""))
                cached.add(key)
        counts["cached"] += len(cached)
        for key, row in rows.items():
            if key not in cached and (ref := _uncached_ref(row, at)) is not None:
                refs.append(ref)
        refs[:] = [_with_annotation(r, rows.get(r.key), captions) if r.stage == at else r for r in refs]
    selection = Selection(refs, manifest)
    first = min(stages) if stage is None else stage
    states = [r.annotation or "not_annotated" for r in selection.refs if r.task == "t2i" and r.stage == first]
    if any(s != "not_annotated" for s in states):
        counts["annotation_captions"] = {s: states.count(s) for s in (CACHED, UNCACHED, FAILED, "not_annotated")}
    if filters is not None:
        from dataclasses import asdict

        from mmdit.dataservice.plan import DataVersion

        weights = selection.weights(DataVersion(0, 0, 0, stage=first, filters=asdict(filters), encode_missing=True))
        wanted = {selection.refs[i].key for i in weights.nonzero()[0]}
        have = {r.key for r in selection.refs if r.cached and r.stage == first}
        counts["selected"] = len(wanted & have)
        counts["missing"] = len(wanted - have)
        if counts["missing"]:
            log.warning("%d samples the manifest selects are not in the cache (first: %s): producers with encoders "
                        "encode them on demand, `mmdit produce` ahead of time", counts["missing"],
                        sorted(wanted - have)[0])
    counts["damaged"] = len(cache.damage)
    return selection, counts


def _manifest_rows(manifest) -> dict[str, dict]:
    """key -> manifest row, for the rows that decoded (status ok)."""
    if manifest is None:
        return {}
    from mmdit.cache import OK

    return {r["key"]: r for r in manifest.to_pylist() if r.get("status") == OK}


def _with_annotation(ref: SampleRef, row: dict | None, captions: set[str]) -> SampleRef:
    """`ref` with the state of its annotation caption (SampleRef.annotation): its manifest row's
    annotation status, and whether its `#annotation` record is among `captions` (cached keys)."""
    from dataclasses import replace

    from mmdit.cache import OK

    status = (row or {}).get("annotation_status")
    if ref.task != "t2i" or status is None:
        return ref
    state = FAILED if status != OK else CACHED if ref.key in captions else UNCACHED
    return replace(ref, annotation=state)


def _uncached_ref(row: dict, stage: int) -> SampleRef | None:
    """A manifest sample not in the cache, as it would be encoded at `stage` (its bucket there)."""
    from mmdit.cache import PAIR, assign_bucket, bucket_set

    if stage:
        buckets = bucket_set(stage)
        bucket = assign_bucket(row["width"], row["height"], buckets)
        cond = assign_bucket(row["src_width"], row["src_height"], buckets) if row.get("src_width") else None
        if row["task"] == PAIR:  # the rejected image is encoded in the preferred one's bucket (producer/produce.py)
            cond = bucket
    elif row.get("bucket_h"):
        bucket = (row["bucket_h"], row["bucket_w"])
        cond = (row["src_bucket_h"], row["src_bucket_w"]) if row.get("src_bucket_h") else None
    else:
        return None
    return SampleRef(row["key"], tuple(bucket), row["task"], row.get("source") or "", tuple(cond) if cond else None,
                     stage, row.get("category") or "", cached=False)
