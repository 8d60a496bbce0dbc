"""The batch plan: a pure function of (seed, epoch, selection, mixture history) -> global batches.

Every trainer step consumes one *global batch*: `global_batch_size` samples of ONE group (same
resolution bucket, same task, same condition-image bucket, because MSRoPE tables and tensor
shapes are built per batch), split as evenly as possible over the data-parallel ranks. The plan
depends on nothing else (not on producers, their number, their speed or their crashes), so any
coordinator can rebuild it and a trainer resumes from a cursor exactly.

How an epoch is drawn (weighted sampling without replacement, exactly once per epoch):
- A *mixture version* gives each sample a weight: task weight x source weight (unnamed tasks and
  sources weigh 1; weight 0 leaves a sample out while that version is active).
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
- The epoch ends when no group has samples left; the next epoch starts over with fresh clocks.

Randomness comes from counter-based seeds: the batch choice from (seed, epoch, index), the
clocks from (seed, epoch, version). So the plan can be replayed from any cursor, and a mixture
change alters only batches from its start position on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np


class PlanError(ValueError):
    """A selection, history or cursor the plan cannot be built from; the message says why."""


@dataclass(frozen=True)
class SampleRef:
    """What the plan needs to know of one selected sample."""

    key: str
    bucket: tuple[int, int]
    task: str
    source: str = ""
    cond_bucket: tuple[int, int] | None = None
    """(H, W) in pixels of the condition image (edit/reconstruction), None for text-to-image."""

    @property
    def group(self) -> tuple:
        """Samples of one group can share a batch: equal target and condition shapes, one task."""
        return (tuple(self.bucket), self.task, tuple(self.cond_bucket) if self.cond_bucket else (0, 0))


@dataclass(frozen=True)
class MixtureVersion:
    """Task and source weights, in force from global batch (epoch, index) until the next version."""

    version: int
    epoch: int
    index: int
    task_weights: dict = field(default_factory=dict)
    source_weights: dict = field(default_factory=dict)

    @property
    def start(self) -> tuple[int, int]:
        return (self.epoch, self.index)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MixtureVersion:
        return cls(int(d["version"]), int(d["epoch"]), int(d["index"]),
                   {str(k): float(v) for k, v in d.get("task_weights", {}).items()},
                   {str(k): float(v) for k, v in d.get("source_weights", {}).items()})


def validate_history(history: Sequence[MixtureVersion]) -> None:
    if not history:
        raise PlanError("the mixture history is empty: it needs a version 0 at (0, 0)")
    if history[0].start != (0, 0):
        raise PlanError(f"the first mixture version must start at (0, 0), got {history[0].start}")
    for a, b in zip(history, history[1:]):
        if b.version <= a.version or b.start < a.start:
            raise PlanError(f"mixture versions must increase in number and start: {a} then {b}")
    for v in history:
        for name, w in (*v.task_weights.items(), *v.source_weights.items()):
            if not np.isfinite(w) or w < 0:
                raise PlanError(f"mixture version {v.version}: weight of {name!r} must be finite and >= 0, got {w}")


def active_version(history: Sequence[MixtureVersion], epoch: int, index: int) -> MixtureVersion:
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


class Selection:
    """The selected samples, canonically ordered (by key) and grouped; shared by every epoch."""

    def __init__(self, refs: Iterable[SampleRef]):
        self.refs: tuple[SampleRef, ...] = tuple(sorted(refs, key=lambda r: r.key))
        if not self.refs:
            raise PlanError("the selection is empty: nothing to plan")
        for a, b in zip(self.refs, self.refs[1:]):
            if a.key == b.key:
                raise PlanError(f"key {a.key!r} is selected twice")
        by_group: dict[tuple, list[int]] = {}
        for i, r in enumerate(self.refs):
            by_group.setdefault(r.group, []).append(i)
        self.groups: list[tuple] = sorted(by_group)
        self.members: list[np.ndarray] = [np.asarray(by_group[g], dtype=np.int64) for g in self.groups]
        self.tasks = np.asarray([r.task for r in self.refs], dtype=object)
        self.sources = np.asarray([r.source for r in self.refs], dtype=object)

    def __len__(self) -> int:
        return len(self.refs)

    def keys(self) -> set[str]:
        return {r.key for r in self.refs}

    def digest(self) -> str:
        """Identity of the selection (keys and groups): a resumed run checks it did not change."""
        h = hashlib.sha256()
        for r in self.refs:
            h.update(f"{r.key}\0{r.group}\0{r.source}\n".encode())
        return h.hexdigest()[:16]

    def weights(self, version: MixtureVersion) -> np.ndarray:
        """Weight of every sample under `version` (task weight x source weight; unnamed: 1)."""
        tw = np.asarray([version.task_weights.get(t, 1.0) for t in self.tasks], dtype=np.float64)
        sw = np.asarray([version.source_weights.get(s, 1.0) for s in self.sources], dtype=np.float64)
        return tw * sw


def _rng(*words: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([w & 0xFFFFFFFF for w in words])))


_CLOCKS, _CHOICE = 0x0C10C, 0xBA7C4


class EpochPlanner:
    """The batches of one epoch, one at a time (`next`), in plan order.

    `history` may grow while planning (the coordinator appends hot-swapped versions whose start
    is the next unplanned batch); a version is picked up when its start is reached.
    """

    def __init__(self, spec: PlanSpec, epoch: int, selection: Selection, history: Sequence[MixtureVersion]):
        validate_history(history)
        self.spec, self.epoch, self.sel, self.history = spec, epoch, selection, history
        self.index = 0
        self.remaining = np.ones(len(selection), dtype=bool)
        self.skipped: list[str] = []
        """Keys left out of this epoch: zero weight (or, with drop_last, a group smaller than a batch)."""
        self.padded = 0
        """Repeats added to groups smaller than min_batch_size."""
        self._version: MixtureVersion | None = None

    def _activate(self, version: MixtureVersion) -> None:
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
        bucket, task, cond = self.sel.groups[g]
        batch = PlannedBatch(self.epoch, self.index, bucket, task, cond if cond != (0, 0) else None,
                             tuple(self.sel.refs[i].key for i in taken), version.version)
        self.index += 1
        return batch

    def _finish(self) -> None:
        if not self.skipped:
            self.skipped = sorted(self.sel.refs[i].key for i in np.flatnonzero(self.remaining))

    def __iter__(self) -> Iterator[PlannedBatch]:
        while (batch := self.next()) is not None:
            yield batch


def plan_epoch(spec: PlanSpec, epoch: int, selection: Selection,
               history: Sequence[MixtureVersion]) -> list[PlannedBatch]:
    """All global batches of `epoch`, in order: the pure form of the plan."""
    return list(EpochPlanner(spec, epoch, selection, history))


class Planner:
    """The global batch sequence across epochs, from a cursor on: `next() -> (seq, batch)`."""

    def __init__(self, spec: PlanSpec, selection: Selection, history: Sequence[MixtureVersion],
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
