"""The latent cache: mmdit's central artifact, written once by producers, read by everyone.

    store.py       LatentCache: write, index and read records; verify and repair
    segment.py     the on-disk segment format (safetensors, a CRC-32 per record), the record
                   schema and the encoder fingerprint per stage
    layout.py      the directory layout and what counts as a stray entry (never opened)
    manifest.py    the Parquet manifest: per-sample scores, buckets, annotations; selection by
                   thresholds; near-duplicates
    buckets.py     the resolution bucket sets (256, 640, 1328)
    categories.py  sample categories and where each comes from
    keys.py        the one rule for sample keys (never a path outside their shard)
    claims.py      shard claims, so two `mmdit produce` runs split the work

Everything above the cache imports it from here.
"""

from mmdit.cache.buckets import BASE_RESOLUTIONS, assign_bucket, bucket_set
from mmdit.cache.claims import ShardClaims
from mmdit.cache.keys import BAD_KEY, check_key, key_problem
from mmdit.cache.manifest import (
    ANNOTATION_COLUMNS,
    OK,
    ManifestWriter,
    PhashIndex,
    carry_annotations,
    duplicates,
    ingest_filters,
    read_manifest,
    read_manifest_table,
    rejection_reasons,
    select,
    select_mask,
)
from mmdit.cache.segment import (
    LATENT_CHANNELS,
    PAIR,
    RECONSTRUCTION,
    TASKS,
    VAE_SCALE,
    DamagedRecord,
    stage_fingerprint,
    validate_record,
)
from mmdit.cache.store import LatentCache

__all__ = [
    "BASE_RESOLUTIONS", "assign_bucket", "bucket_set", "ShardClaims", "BAD_KEY", "check_key", "key_problem",
    "ANNOTATION_COLUMNS", "OK", "ManifestWriter", "PhashIndex", "carry_annotations", "duplicates", "ingest_filters",
    "read_manifest", "read_manifest_table", "rejection_reasons", "select", "select_mask", "LATENT_CHANNELS",
    "PAIR", "RECONSTRUCTION", "TASKS", "VAE_SCALE", "DamagedRecord", "stage_fingerprint", "validate_record", "LatentCache",
]
