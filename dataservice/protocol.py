"""The data service's wire protocol: every RPC entry point and every message, in one place.

Roles (one process may hold several): the *coordinator* (RPC rank 0, one per job), *producers*
(prepare and serve batches), *clients* (one per DP rank of the trainer, on its TP rank 0),
*reward workers* (`mmdit reward-worker`: score GRPO rollouts for the trainers).

    producer -> coordinator   lease(name, rank, depth, held, can_encode, counters) -> Lease   long poll,
                                                                               heartbeat, telemetry
                              producer_left(name)
    client   -> coordinator   describe_service() -> ServiceDescription       checked before registering
                              register_consumer(...) -> Registration
                              locate(name, gen, seq, ahead, acks, report) -> Location   long poll; a
                                                                   window of owners, acks ride on it
                              ack(name, dp_rank, gen, seqs, report) -> int   acks no locate carried
                              producer_failed(name, reporter), consumer_left(name), history()
    client   -> producer      fetch(uid, dp_rank) -> Shard                   long poll
    anyone   -> coordinator   status() -> dict, update_data(changes, why) -> dict
    trainer  -> reward worker score(request_id, latents, prompts) -> [B] float32   answered by the
                                   worker's scoring thread; NaN for an image it could not score
    anyone   -> anyone        ping() -> True                                 is that member there?

A batch is named by its `uid` (plan generation, global sequence number). A process serves a role
by `serve(role, handler)`; the entry points below call the handler's method of the same name.
TensorPipe resolves a function by its module path, so entry points live here, in a module every
role imports the same way, never in a `__main__`.
"""

from __future__ import annotations

import functools
import operator
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from torch.distributed.rpc.functions import async_execution
from torch.futures import Future

from mmdit.dataservice.plan import PlannedBatch

COORDINATOR, PRODUCER, REWARD = "coordinator", "producer", "reward"

# ----------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class Lease:
    """Coordinator -> producer: batches to prepare (`new`) and every batch it may keep (`keep`);
    it drops what it holds beyond `keep` (acked everywhere, or revoked)."""

    gen: int
    dp_size: int
    new: list[tuple[int, PlannedBatch]]
    keep: list[int]
    stop: bool = False


@dataclass(frozen=True)
class Location:
    """Coordinator -> client: where batch `seq` is.

    status: `ok` (owner holds it), `waiting` (not leased within a heartbeat: ask again), `stale`
    (the plan generation changed under the client), `done` (every DP rank consumed it).
    `ahead` maps later seqs already leased to (owner, owner_rank, uid), saving calls.
    `ack_hold_s`: how long the client may hold acks for a later call to carry (0: producers are
    full and its acks free their slots: send them at once)."""

    status: str
    gen: int
    owner: str = ""
    owner_rank: int = -1
    uid: tuple[int, int] = (-1, -1)
    ahead: dict = field(default_factory=dict)
    history_len: int = 0
    producers_alive: int = 0
    ack_hold_s: float = 0.0


@dataclass(frozen=True)
class Shard:
    """Producer -> client: one DP rank's share of a batch.

    status: `ok` (`batch` holds it), `not_ready` (still being prepared after a heartbeat: ask
    again), `not_held` (the producer dropped or never had it: locate again), `error`
    (`message` says why the batch cannot be made)."""

    status: str
    batch: dict | None = None
    message: str = ""


@dataclass(frozen=True)
class Registration:
    """Coordinator -> client: the plan this client follows (its generation and starting cursor)."""

    gen: int
    cursor: dict
    history: list[dict]
    selection: str
    num_keys: int
    global_batch_size: int


@dataclass(frozen=True)
class ServiceDescription:
    """Coordinator -> client: what a trainer must agree with before it joins (`JOIN_CHECKS`),
    from the cache and the service's job config. None: unknown here, so not checked."""

    fingerprints: list[str]
    """Cache fingerprints served, one per curriculum stage."""
    latent_channels: int | None
    """Channels of a cached latent (None: nothing cached yet)."""
    latent_side_multiple: int | None
    """The largest patch side that tiles every latent the plan may draw (targets and conditions)."""
    text_width: int | None
    """Width of a cached prompt embedding (the MLLM's hidden size)."""
    base_resolution: int | None
    """The stage the job starts at (its data.base_resolution, or the first cached stage when that
    one is not cached); None for a cache without stages."""
    stage_weights: dict
    curriculum: list
    dp_size: int
    """The DP size the service was started for (informational: another DP size re-plans)."""


# ----------------------------------------------------------------------------- the join check


@dataclass(frozen=True)
class JoinCheck:
    """One thing trainer and service must agree on: the trainer's config key, the description's
    field, and the rule (equality unless said otherwise)."""

    key: str
    service: str
    agrees: Callable = operator.eq
    rule: str = ""
    """Shown after the two values when the rule is not equality."""
    canonical: Callable = lambda value: value
    """Both values in one form before they are compared and shown."""


def _stage_table(weights: dict) -> dict:
    """Stage weights as the data config's history holds them (YAML may give int keys)."""
    return {str(k): float(v) for k, v in weights.items()}


JOIN_CHECKS = (
    JoinCheck("model.out_channels", "latent_channels"),
    JoinCheck("model.patch_size", "latent_side_multiple", lambda patch, side: side % patch == 0,
              "the patch must tile every cached latent"),
    JoinCheck("model.joint_attention_dim", "text_width"),
    JoinCheck("data.base_resolution", "base_resolution"),
    JoinCheck("data.stage_weights", "stage_weights", canonical=_stage_table),
    JoinCheck("data.curriculum", "curriculum"),
    JoinCheck("service.fingerprint", "fingerprints", lambda fp, served: fp in served, "the service serves only these"),
)
"""Everything a trainer and its data service must agree on; a new field is one line here (and
one in ServiceDescription)."""


def expectation(cfg, model: bool) -> dict:
    """What a trainer's config (`JobConfig`) expects of the service: {config key: value}. `model`:
    False for a consumer without a model (`mmdit consume`), whose model keys mean nothing. An
    empty value (service.fingerprint="") expects nothing."""
    wanted = {c.key: functools.reduce(getattr, c.key.split("."), cfg) for c in JOIN_CHECKS
              if model or not c.key.startswith("model.")}
    return {k: v for k, v in wanted.items() if v is not None and v != ""}


def disagreements(expected: dict, service: ServiceDescription) -> list[str]:
    """Each check where the trainer's expectation and the service differ, as
    `key: trainer VALUE, service VALUE`; checks one side does not know are skipped."""
    problems = []
    for check in JOIN_CHECKS:
        mine, theirs = expected.get(check.key), getattr(service, check.service)
        if mine is None or theirs is None:
            continue
        mine, theirs = check.canonical(mine), check.canonical(theirs)
        if not check.agrees(mine, theirs):
            rule = f" ({check.rule})" if check.rule else ""
            problems.append(f"{check.key}: trainer {mine!r}, service {theirs!r}{rule}")
    return problems


# ----------------------------------------------------------------------------- handlers

_handlers: dict[str, object] = {}
_lock = threading.Lock()


def serve(role: str, handler) -> None:
    """Answer `role`'s entry points in this process with `handler`'s methods."""
    with _lock:
        if role in _handlers and _handlers[role] is not handler:
            raise RuntimeError(f"this process already serves the {role} role")
        _handlers[role] = handler


def stop_serving(role: str) -> None:
    with _lock:
        _handlers.pop(role, None)


def _handler(role: str):
    handler = _handlers.get(role)
    if handler is None:
        raise RuntimeError(f"this process does not serve the {role} role")
    return handler


def _ready(value) -> Future:
    fut: Future = Future()
    fut.set_result(value)
    return fut


# ----------------------------------------------------------------------------- coordinator entry points


@async_execution
def lease(name: str, rank: int, depth: int, held: list, can_encode: bool = False, counters: dict | None = None
          ) -> Future:
    return _handler(COORDINATOR).lease(name, rank, depth, held, can_encode, counters)


@async_execution
def locate(name: str, gen: int, seq: int, ahead: int = 0, acks: list[int] | None = None,
           report: dict | None = None) -> Future:
    return _handler(COORDINATOR).locate(name, gen, seq, ahead, acks, report)


def ack(name: str, dp_rank: int, gen: int, seqs: list[int], report: dict | None = None) -> int:
    return _handler(COORDINATOR).ack(name, dp_rank, gen, seqs, report)


def describe_service() -> ServiceDescription:
    return _handler(COORDINATOR).describe()


def register_consumer(name: str, rank: int, dp_rank: int, dp_size: int, micro_batch_size: int,
                      cursor: dict | None, history: list[dict] | None) -> Registration:
    return _handler(COORDINATOR).register_consumer(name, rank, dp_rank, dp_size, micro_batch_size, cursor, history)


def consumer_left(name: str) -> None:
    _handler(COORDINATOR).consumer_left(name)


def producer_left(name: str) -> None:
    _handler(COORDINATOR).producer_left(name)


def producer_failed(name: str, reporter: str) -> None:
    _handler(COORDINATOR).producer_failed(name, reporter)


def history() -> list[dict]:
    return _handler(COORDINATOR).history_dicts()


def update_data(changes: dict, why: str = "") -> dict:
    return _handler(COORDINATOR).update_data(changes, why)


def status() -> dict:
    return _handler(COORDINATOR).status()


# ----------------------------------------------------------------------------- producer entry points


@async_execution
def fetch(uid: tuple[int, int], dp_rank: int) -> Future:
    handler = _handlers.get(PRODUCER)
    return _ready(Shard("not_held")) if handler is None else handler.fetch(tuple(uid), dp_rank)


def peek(uid: tuple[int, int], dp_rank: int) -> dict | None:
    """A prepared shard without waiting or counting (diagnostics, transport baselines)."""
    handler = _handlers.get(PRODUCER)
    return None if handler is None else handler.peek(tuple(uid), dp_rank)


def producer_counters() -> dict:
    handler = _handlers.get(PRODUCER)
    return {} if handler is None else dict(handler.counters)


# ----------------------------------------------------------------------------- reward worker entry points


@async_execution
def score(request_id: str, latents, prompts: list) -> Future:
    """Rewards of final latents [B, 16, h, w] (float32, CPU) for their B prompts: a [B] float32
    tensor. The future completes on the worker's scoring thread, never holding an RPC thread."""
    return _handler(REWARD).score(request_id, latents, prompts)


# ----------------------------------------------------------------------------- every member


def ping() -> bool:
    """Answers while this member's RPC agent runs: a liveness probe that needs no role."""
    return True
