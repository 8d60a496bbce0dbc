"""The batch plan: a pure function of (seed, epoch, selection, data-config history) -> global batches.

Every trainer step consumes one *global batch*: `global_batch_size` samples of ONE group (same
resolution bucket, same task, same condition-image bucket, because MSRoPE tables and tensor
shapes are built per batch), split as evenly as possible over the data-parallel ranks. The plan
depends on nothing else (not on producers, their number, their speed or their crashes), so any
coordinator can rebuild it and a trainer resumes from a cursor exactly.

How an epoch is drawn (weighted sampling without replacement, exactly once per epoch):
- A *data-config version* (`DataVersion`) gives each sample a weight: task x source x category x
  bucket weight (unnamed ones weigh 1), times 0 for samples outside its curriculum stage, outside
  its manifest filters, or not cached when nothing can encode them. Weight 0 leaves a sample out
  while that version is in force.
- When a version becomes active (at the epoch start, or at the batch where the coordinator put a
  hot-swapped version), every group orders its not-yet-planned samples by exponential clocks
  `E / w` (Efraimidis-Spirakis: the order of weighted sampling without replacement).
- Each batch: pick a group with probability proportional to the weight its remaining samples
  carry, and take the next `global_batch_size` samples of its order. A group's remainder smaller
  than `min_batch_size` joins its last batch (a batch never splits into empty DP shares); with
  `drop_last`, remainders are dropped instead and every batch is full.
- A group with fewer samples than `min_batch_size` in all (say one 1664x928 edit pair with 8 DP
  ranks) is *padded*: its order repeats until `min_batch_size` samples, so each DP rank gets one.
  Every selected sample is thus served in every epoch; only such tiny groups repeat samples
  (`EpochPlanner.padded` counts the repeats). With `drop_last` they are left out instead.
- The epoch ends when no group has samples of positive weight left; the next epoch starts over
  with fresh clocks.

What "exactly once per epoch" means across a change: an epoch is one pass over the samples of
positive weight. A version that starts mid-epoch re-weighs the samples this epoch has not served
yet: samples it leaves out are not drawn for the rest of the epoch, samples it adds join the rest
of the epoch; no sample is served twice in one epoch (but for the padding of tiny groups above).

Which caption a text-to-image sample is trained with (`DataVersion.caption_sources`: original,
annotation) is picked when its batch is planned, from a uniform number drawn from (seed, epoch,
key) against the annotation's share of the version in force: the batch then names the variant's
record (`<key>#annotation`, cache/segment.py), which any producer serves like any record. A
sample whose annotation cannot be served (it failed to parse, or is not encoded and no producer
can encode) keeps its original caption, counted in `EpochPlanner.caption_fallbacks`. The draw
does not depend on the batch, so raising the annotation weight only moves samples from the
original to the annotation, and a resumed or replayed run picks the same variants.

Randomness comes from counter-based seeds: the batch choice from (seed, epoch, index), the
clocks from (seed, epoch, version), the caption from (seed, epoch, key). So the plan can be
replayed from any cursor, and a change alters only batches from its start position on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from mmdit.cache.segment import ANNOTATION_CAPTION
from mmdit.config.data import Mixture


class PlanError(ValueError):
    """A selection, history or cursor the plan cannot be built from; the message says why."""


CACHED, UNCACHED, FAILED = "cached", "uncached", "failed"
"""`SampleRef.annotation` states."""


@dataclass(frozen=True)
class SampleRef:
    """What the plan needs to know of one sample of the universe it draws from."""

    key: str
    bucket: tuple[int, int]
    task: str
    source: str = ""
    cond_bucket: tuple[int, int] | None = None
    """(H, W) in pixels of the condition image (edit/reconstruction), None for text-to-image."""
    stage: int = 0
    """The base resolution (256, 640, 1328) the sample is encoded at; 0 where there is one stage."""
    category: str = ""
    cached: bool = True
    """False: selected by the manifest but not in the cache; planned only by versions whose
    producers can encode on a miss (`DataVersion.encode_missing`)."""
    annotation: str = ""
    """Its annotation caption (text-to-image samples): CACHED (its `#annotation` record is in the
    cache), UNCACHED (annotated, not encoded yet), FAILED (the annotation did not parse), or ""
    (not annotated)."""

    @property
    def group(self) -> tuple:
        """Samples of one group can share a batch: one stage, equal target and condition shapes, one task."""
        return (self.stage, tuple(self.bucket), self.task, tuple(self.cond_bucket) if self.cond_bucket else (0, 0))


_PLAN_FIELDS = (*Mixture.TABLES, "stage", "filters", "encode_missing")


@dataclass(kw_only=True)
class DataVersion(Mixture):
    """One version of the data config, in force from global batch (epoch, index) until the next.

    The plan reads the mixture's weights (`Mixture`: task x source x category x bucket, unnamed
    ones weigh 1, weight 0 leaves a sample out), the curriculum `stage` (the base resolution; 0:
    every stage), the manifest `filters` (thresholds over stored scores; empty: everything
    cached) and whether uncached samples may be planned (`encode_missing`). `stage_weights`, when
    set, replaces `stage`: samples of every named stage are drawn, weighed (multi-scale
    training). The rest records the change: when, from which training step, what changed and
    why; it does not affect the plan.
    """

    version: int = field(kw_only=False)
    epoch: int = field(kw_only=False)
    index: int = field(kw_only=False)
    stage: int = 0
    filters: dict = field(default_factory=dict)
    encode_missing: bool = False
    time: float = field(default=0.0, compare=False)
    from_step: int = field(default=1, compare=False)
    why: str = field(default="", compare=False)
    changes: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        # every caption source named: a history saved before the table existed equals its
        # version as the job's config states it now
        self.caption_sources = self.caption_weights()

    @property
    def start(self) -> tuple[int, int]:
        return (self.epoch, self.index)

    @property
    def annotation_share(self) -> float:
        """The probability a text-to-image sample is trained with its annotation caption."""
        w = self.caption_weights()
        return w["annotation"] / (w["original"] + w["annotation"])

    def same_plan(self, other: DataVersion) -> bool:
        """Do both select and weigh samples alike (whatever their numbers and starts)?"""
        return all(getattr(self, f) == getattr(other, f) for f in _PLAN_FIELDS)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DataVersion:
        weights = lambda name: {str(k): float(v) for k, v in (d.get(name) or {}).items()}  # noqa: E731
        return cls(int(d["version"]), int(d["epoch"]), int(d["index"]),
                   **{t: weights(t) for t in Mixture.TABLES}, stage=int(d.get("stage", 0)),
                   filters=dict(d.get("filters") or {}), encode_missing=bool(d.get("encode_missing", False)),
                   time=float(d.get("time", 0.0)), from_step=int(d.get("from_step", 1)),
                   why=str(d.get("why", "")), changes=dict(d.get("changes") or {}))


def validate_history(history: Sequence[DataVersion]) -> None:
    if not history:
        raise PlanError("the data-config history is empty: it needs a version 0 at (0, 0)")
    if history[0].start != (0, 0):
        raise PlanError(f"the first data-config version must start at (0, 0), got {history[0].start}")
    for a, b in zip(history, history[1:]):
        if b.version <= a.version or b.start < a.start:
            raise PlanError(f"data-config versions must increase in number and start: {a} then {b}")
    for v in history:
        for name, w in (*v.task_weights.items(), *v.source_weights.items(), *v.category_weights.items(),
                        *v.bucket_weights.items(), *v.stage_weights.items(), *v.caption_sources.items()):
            if not np.isfinite(w) or w < 0:
                raise PlanError(f"data-config version {v.version}: weight of {name!r} must be finite and >= 0, got {w}")


def active_version(history: Sequence[DataVersion], epoch: int, index: int) -> DataVersion:
    """The version in force at global batch (epoch, index)."""
    current = history[0]
    for v in history:
        if v.start <= (epoch, index):
            current = v
        else:
            break
    return current


@dataclass(frozen=True)
class PlanSpec:
    seed: int
    global_batch_size: int
    """Samples per global batch: DP size x micro-batch size."""
    min_batch_size: int = 1
    """A group remainder smaller than this joins the group's last batch (use >= the DP size)."""
    drop_last: bool = False
    """Drop group remainders (every batch full) instead of serving them in a smaller batch."""

    def __post_init__(self):
        if self.global_batch_size < 1 or self.min_batch_size < 1:
            raise PlanError(f"global_batch_size and min_batch_size must be >= 1: {self}")
        if self.min_batch_size > self.global_batch_size:
            raise PlanError(f"min_batch_size {self.min_batch_size} > global_batch_size {self.global_batch_size}")


@dataclass(frozen=True)
class PlannedBatch:
    """One global batch of the plan; `keys` in the order the DP ranks split them."""

    epoch: int
    index: int
    bucket: tuple[int, int]
    task: str
    cond_bucket: tuple[int, int] | None
    keys: tuple[str, ...]
    config_version: int
    stage: int = 0
    """The base resolution the batch's records are encoded at (0: the cache's only stage)."""

    @property
    def batch_id(self) -> tuple[int, int]:
        return (self.epoch, self.index)

    def shard(self, dp_rank: int, dp_size: int) -> tuple[str, ...]:
        start, end = shard_bounds(len(self.keys), dp_rank, dp_size)
        return self.keys[start:end]


def shard_bounds(n: int, dp_rank: int, dp_size: int) -> tuple[int, int]:
    """[start, end) of DP rank `dp_rank`'s share of n samples: sizes differ by at most one."""
    if not 0 <= dp_rank < dp_size:
        raise PlanError(f"dp_rank {dp_rank} out of range for dp_size {dp_size}")
    base, extra = divmod(n, dp_size)
    start = dp_rank * base + min(dp_rank, extra)
    return start, start + base + (dp_rank < extra)


@dataclass(frozen=True)
class Cursor:
    """The next global batch to consume: `seq` counts batches across epochs; `index` may equal
    the length of `epoch` (then the next batch is the first of epoch + 1)."""

    seq: int = 0
    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> Cursor:
        return cls(**{k: int(v) for k, v in (d or {}).items() if k in ("seq", "epoch", "index")})


def sample_of(key: str) -> str:
    """The sample a record key belongs to (`<key>#reconstruction`, `<key>#annotation` are
    records of `<key>`)."""
    return key.split("#", 1)[0]


def caption_draw(seed: int, epoch: int, key: str) -> float:
    """A uniform number in [0, 1) of (seed, epoch, key): below a version's annotation share, the
    sample is trained with its annotation caption in that epoch."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def held_out(key: str, fraction: float) -> bool:
    """Is `key`'s sample in the evaluation split? A hash of the sample key below `fraction`: stable
    across runs and processes, so the plan (which leaves these out) and the evaluator agree
    without talking, and every record of a sample falls on the same side."""
    if fraction <= 0:
        return False
    return int(hashlib.sha1(sample_of(key).encode()).hexdigest()[:8], 16) / 2**32 < fraction


class Selection:
    """The universe the plan draws from, canonically ordered (by stage and key) and grouped; shared
    by every epoch. `manifest` (a pyarrow table of cache/manifest.py rows) lets versions filter
    by the stored scores; without it every filter passes."""

    def __init__(self, refs: Iterable[SampleRef], manifest=None):
        self.refs: tuple[SampleRef, ...] = tuple(sorted(refs, key=lambda r: (r.stage, r.key)))
        if not self.refs:
            raise PlanError("the selection is empty: nothing to plan")
        for a, b in zip(self.refs, self.refs[1:]):
            if (a.stage, a.key) == (b.stage, b.key):
                raise PlanError(f"key {a.key!r} is selected twice")
        by_group: dict[tuple, list[int]] = {}
        for i, r in enumerate(self.refs):
            by_group.setdefault(r.group, []).append(i)
        self.groups: list[tuple] = sorted(by_group)
        self.members: list[np.ndarray] = [np.asarray(by_group[g], dtype=np.int64) for g in self.groups]
        self.tasks = np.asarray([r.task for r in self.refs], dtype=object)
        self.sources = np.asarray([r.source for r in self.refs], dtype=object)
        self.categories = np.asarray([r.category or "unknown" for r in self.refs], dtype=object)
        self.bucket_names = np.asarray([f"{r.bucket[0]}x{r.bucket[1]}" for r in self.refs], dtype=object)
        self.stages = np.asarray([r.stage for r in self.refs], dtype=np.int64)
        self.cached = np.asarray([r.cached for r in self.refs], dtype=bool)
        self.annotations = np.asarray([r.annotation for r in self.refs], dtype=object)
        self.manifest = manifest
        self._passing: dict[str, np.ndarray] = {}
        self._digest: str | None = None

    def __len__(self) -> int:
        return len(self.refs)

    def keys(self) -> set[str]:
        return {r.key for r in self.refs}

    def digest(self) -> str:
        """Identity of the universe (keys, groups, caching, scores): a resumed run checks it.
        Computed once (a selection does not change): the coordinator's status carries it."""
        if self._digest is None:
            self._digest = self._compute_digest()
        return self._digest

    def _compute_digest(self) -> str:
        h = hashlib.sha256()
        for r in self.refs:
            h.update(f"{r.key}\0{r.group}\0{r.source}\0{r.category}\0{r.cached}".encode())
            h.update((f"\0{r.annotation}\n" if r.annotation else "\n").encode())  # digests before it stay
        if self.manifest is not None:
            for name in sorted(self.manifest.column_names):
                h.update(name.encode())
                h.update(str(self.manifest.column(name).to_pylist()).encode())
        return h.hexdigest()[:16]

    def passes(self, filters: dict) -> np.ndarray:
        """Mask of samples whose manifest scores pass `filters` (FilterConfig fields; the
        defaults for fields not named). Samples without a manifest row pass."""
        cache_key = json.dumps(filters, sort_keys=True)
        if cache_key not in self._passing:
            self._passing[cache_key] = self._passing_mask(filters)
        return self._passing[cache_key]

    def _passing_mask(self, filters: dict) -> np.ndarray:
        if self.manifest is None or not filters:
            return np.ones(len(self), dtype=bool)
        from mmdit.cache import select_mask
        from mmdit.config.data import FilterConfig

        mask, _ = select_mask(self.manifest, FilterConfig(**filters))
        keys = self.manifest.column("key").to_pylist()
        accepted = {k for k, ok in zip(keys, mask) if ok}
        in_manifest = set(keys)
        return np.asarray([sample_of(r.key) in accepted or sample_of(r.key) not in in_manifest for r in self.refs],
                          dtype=bool)

    def weights(self, version: DataVersion) -> np.ndarray:
        """Weight of every sample under `version` (0: not drawn while it is in force)."""
        def lookup(table: dict, names: np.ndarray) -> np.ndarray:
            if not table:
                return np.ones(len(names))
            return np.asarray([table.get(n, 1.0) for n in names], dtype=np.float64)

        w = (lookup(version.task_weights, self.tasks) * lookup(version.source_weights, self.sources)
             * lookup(version.category_weights, self.categories) * lookup(version.bucket_weights, self.bucket_names))
        if version.stage_weights:
            w = w * np.asarray([version.stage_weights.get(str(s), 0.0) for s in self.stages], dtype=np.float64)
        elif version.stage:
            w = w * (self.stages == version.stage)
        if not version.encode_missing:
            w = w * self.cached
        if version.filters:
            w = w * self.passes(version.filters)
        return w


def _rng(*words: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([w & 0xFFFFFFFF for w in words])))


_CLOCKS, _CHOICE = 0x0C10C, 0xBA7C4


class EpochPlanner:
    """The batches of one epoch, one at a time (`next`), in plan order.

    `history` may grow while planning (the coordinator appends hot-swapped versions whose start
    is the next unplanned batch); a version is picked up when its start is reached.
    """

    def __init__(self, spec: PlanSpec, epoch: int, selection: Selection, history: Sequence[DataVersion]):
        validate_history(history)
        self.spec, self.epoch, self.sel, self.history = spec, epoch, selection, history
        self.index = 0
        self.remaining = np.ones(len(selection), dtype=bool)
        self.skipped: list[str] = []
        """Keys left out of this epoch: zero weight (or, with drop_last, a group smaller than a batch)."""
        self.padded = 0
        """Repeats added to groups smaller than min_batch_size."""
        self.caption_fallbacks = 0
        """Samples drawn for their annotation caption that kept the original: the annotation
        failed to parse, or it is not encoded and no producer can encode (module docstring)."""
        self._version: DataVersion | None = None

    def _activate(self, version: DataVersion) -> None:
        """Order every group's remaining samples by exponential clocks under `version`."""
        self._version = version
        weights = self.sel.weights(version)
        rng = _rng(self.spec.seed, _CLOCKS, self.epoch, version.version)
        self._order, self._cumw, self._ptr = [], [], []
        for members in self.sel.members:
            idx = members[self.remaining[members]]
            clocks = rng.exponential(size=len(idx))
            w = weights[idx]
            live = w > 0
            idx, clocks, w = idx[live], clocks[live], w[live]
            order = np.argsort(clocks / w, kind="stable") if len(idx) else np.zeros(0, dtype=np.int64)
            idx, w = idx[order], w[order]
            if self.spec.drop_last and len(idx) < self.spec.global_batch_size:
                idx, w = idx[:0], w[:0]  # left out of this epoch (reported in `skipped`)
            elif 0 < len(idx) < self.spec.min_batch_size:  # a tiny group: repeat its samples
                repeat = np.resize(np.arange(len(idx)), self.spec.min_batch_size)
                self.padded += self.spec.min_batch_size - len(idx)
                idx, w = idx[repeat], w[repeat]
            self._order.append(idx)
            self._cumw.append(np.cumsum(w))
            self._ptr.append(0)

    def _mass(self, g: int) -> float:
        cum, ptr = self._cumw[g], self._ptr[g]
        if ptr >= len(cum):
            return 0.0
        return float(cum[-1] - (cum[ptr - 1] if ptr else 0.0))

    def _take(self, g: int) -> int:
        """How many samples the next batch of group g takes."""
        left = len(self._order[g]) - self._ptr[g]
        gbs = self.spec.global_batch_size
        if self.spec.drop_last:
            return gbs if left >= gbs else 0
        k = min(gbs, left)
        return left if 0 < left - k < self.spec.min_batch_size else k

    def next(self) -> PlannedBatch | None:
        """The next global batch, or None when the epoch is over."""
        version = active_version(self.history, self.epoch, self.index)
        if version is not self._version:
            self._activate(version)
        masses = np.asarray([self._mass(g) if self._take(g) else 0.0 for g in range(len(self._order))])
        total = masses.sum()
        if total <= 0:
            self._finish()
            return None
        u = _rng(self.spec.seed, _CHOICE, self.epoch, self.index).random() * total
        g = int(np.searchsorted(np.cumsum(masses), u, side="right"))
        live = np.flatnonzero(masses > 0)  # float rounding may land u on a massless group: snap
        g = int(live[min(int(np.searchsorted(live, g)), len(live) - 1)])
        k, ptr = self._take(g), self._ptr[g]
        taken = self._order[g][ptr:ptr + k]
        self._ptr[g] = ptr + k
        self.remaining[taken] = False
        stage, bucket, task, cond = self.sel.groups[g]
        batch = PlannedBatch(self.epoch, self.index, bucket, task, cond if cond != (0, 0) else None,
                             self._keys(taken, version), version.version, stage)
        self.index += 1
        return batch

    def _keys(self, taken: np.ndarray, version: DataVersion) -> tuple[str, ...]:
        """The record keys of samples `taken` under `version` (the caption draw only where a
        version gives annotations a share: a batch of 2,048 keys costs the coordinator ~0.3 ms
        without it, ~8 ms with it)."""
        refs = self.sel.refs
        if version.annotation_share <= 0:
            return tuple(refs[i].key for i in taken.tolist())
        return tuple(self._caption_variant(i, version) for i in taken.tolist())

    def _caption_variant(self, i: int, version: DataVersion) -> str:
        """The record key sample `i` is served as under `version`: its own, or its annotation
        caption's when the draw picks the annotation and it can be served."""
        ref = self.sel.refs[i]
        share = version.annotation_share
        if ref.task != "t2i" or share <= 0 or caption_draw(self.spec.seed, self.epoch, ref.key) >= share:
            return ref.key
        if ref.annotation == CACHED or (ref.annotation == UNCACHED and version.encode_missing):
            return ref.key + ANNOTATION_CAPTION
        self.caption_fallbacks += 1
        return ref.key

    def _finish(self) -> None:
        if not self.skipped:
            self.skipped = sorted(self.sel.refs[i].key for i in np.flatnonzero(self.remaining))

    def __iter__(self) -> Iterator[PlannedBatch]:
        while (batch := self.next()) is not None:
            yield batch


def plan_epoch(spec: PlanSpec, epoch: int, selection: Selection,
               history: Sequence[DataVersion]) -> list[PlannedBatch]:
    """All global batches of `epoch`, in order: the pure form of the plan."""
    return list(EpochPlanner(spec, epoch, selection, history))


class Planner:
    """The global batch sequence across epochs, from a cursor on: `next() -> (seq, batch)`."""

    def __init__(self, spec: PlanSpec, selection: Selection, history: Sequence[DataVersion],
                 start: Cursor = Cursor()):
        self.spec, self.sel, self.history = spec, selection, history
        self.seq = start.seq
        self._epoch = EpochPlanner(spec, start.epoch, selection, history)
        for _ in range(start.index):  # replay up to the cursor (the plan is pure)
            if self._epoch.next() is None:
                raise PlanError(f"cursor {start} is past the end of epoch {start.epoch} "
                                f"({self._epoch.index} batches)")

    @property
    def cursor(self) -> Cursor:
        """Position of the next batch `next` returns (its epoch may still roll over)."""
        return Cursor(self.seq, self._epoch.epoch, self._epoch.index)

    def next(self) -> tuple[int, PlannedBatch]:
        batch = self._epoch.next()
        if batch is None:
            if self._epoch.index == 0:
                raise PlanError(f"epoch {self._epoch.epoch} plans no batch: every group is smaller than "
                                f"min_batch_size={self.spec.min_batch_size} or weighs 0")
            self._epoch = EpochPlanner(self.spec, self._epoch.epoch + 1, self.sel, self.history)
            return self.next()
        seq = self.seq
        self.seq += 1
        return seq, batch
