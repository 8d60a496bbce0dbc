"""The trainer side of the data service: prefetching batches over RPC, and the TP broadcast.

`ServiceClient` is one DP rank's connection (only TP rank 0 of each DP rank has one): it keeps
`service.prefetch` global batches in flight, fetched in plan order by `service.fetch_threads`
worker threads: ask the coordinator which producers hold the next `LOCATE_WINDOW` batches (one
`locate`) and fetch this rank's shard of each from its owner. A fetch that fails with a
transport error reports the producer dead and asks again: the coordinator has handed the batch
to another producer. The client acks a batch when its shard arrived, before the trainer's step:
the acks and the trainer's last report ride on the next locate, or go alone once they waited
the hold the coordinator allows (`Location.ack_hold_s`: up to a heartbeat while producers have
room, 0 while batches wait for a slot; checked every `service.ack_interval_s`). So a DP rank
costs the coordinator about a call per window or per heartbeat, whatever the step rate. It
times how long each `__next__` waited. Its `state()` (cursor +
mixture history) goes into checkpoints; a client built from it continues with exactly the
batches an uninterrupted run would have seen. When the coordinator starts a new plan generation
(another rank registered from an earlier cursor, after a restart), the client registers again at
its own cursor and fetches on.

Before it registers, the client asks the coordinator what it serves (`describe_service`) and
compares it with what the trainer's config expects (protocol.JOIN_CHECKS: latent channels,
patch, text width, resolution schedule, fingerprint): a trainer that does not match raises a
ConfigError naming each field and both values, and leaves without the running job noticing.

`TPBroadcast` gives every rank of a TP group the batch of its TP rank 0, over a gloo group
(never NCCL next to RPC); `trainer_batches` builds the right one for a trainer rank, and
`client_on_tp_rank0` makes a TP rank 0 that cannot join fail its whole TP group.
"""

from __future__ import annotations

import atexit
import logging
import queue
import sys
import threading
import time
from concurrent.futures import Future as ThreadFuture

import torch
import torch.distributed as dist
import torch.distributed.rpc as torch_rpc

from mmdit.config.service import ClientSettings
from mmdit.dataservice import protocol, rpc
from mmdit.dataservice.address import resolve
from mmdit.dataservice.plan import Cursor
from mmdit.dataservice.protocol import Location

log = logging.getLogger("mmdit.client")

LOCATE_WINDOW = 32
"""Batches one `locate` asks about (the owners of those already leased come back at once): a DP
rank locates about once per this many batches (bench/coordinator_model.py)."""


class DataServiceError(RuntimeError):
    """The data service cannot deliver (no producer left, coordinator gone, a batch that fails)."""


class _Stale(Exception):
    """The coordinator started a new plan generation: register again at the cursor."""


class ServiceClient:
    """Global batches for one DP rank, in plan order, `service.prefetch` of them in flight."""

    def __init__(self, settings: ClientSettings, dp_rank: int, dp_size: int, micro_batch_size: int,
                 state: dict | None = None, name: str | None = None, expect: dict | None = None):
        """`expect`: what this trainer's config expects of the service (protocol.expectation); a
        service that differs is a ConfigError naming each field, raised before registering."""
        self.cfg, self.dp_rank, self.dp_size, self.micro_batch_size = settings, dp_rank, dp_size, micro_batch_size
        self.name = name or rpc.incarnation_name("trainer")
        self._own_rpc = not torch_rpc.is_available() or not _rpc_initialized()
        self.address = None  # where it joined the service (None: this process was in the RPC group already)
        if self._own_rpc:
            from mmdit.config import ConfigError

            self.address = resolve(settings, settings.join_timeout_s)
            try:
                self.rank = rpc.join(self.name, self.address.host, self.address.port,
                                     service_id=self.address.service_id, advertise_host=settings.advertise_host,
                                     rpc_timeout_s=settings.rpc_timeout_s, join_timeout_s=settings.join_timeout_s,
                                     num_worker_threads=settings.rpc_threads)
            except rpc.JoinRejected as e:  # the address it advertises: a config error, exit 2
                raise ConfigError(str(e)) from None
        else:
            self.name = torch_rpc.get_worker_info().name
            self.rank = torch_rpc.get_worker_info().id
        state = state or {}
        self.cursor = Cursor.from_dict(state.get("cursor"))
        self.history = state.get("history") or []
        try:
            if expect:
                self._check_agreement(expect)
            self._register()
        except BaseException as e:
            if self._own_rpc:  # leave the group we joined (at once when the coordinator does not answer)
                rpc.leave(graceful=not isinstance(e, rpc.RpcError), timeout_s=settings.shutdown_timeout_s)
            raise
        if state.get("selection") and state["selection"] != self.selection:
            log.warning("the selection changed since this state was saved (%s -> %s): the plan from the cursor "
                        "on differs from the original run's", state["selection"], self.selection)
        saved_batch = state.get("global_batch_size")
        if saved_batch and saved_batch != self.global_batch_size:
            log.warning("the global batch size changed since this state was saved (%d -> %d): the rest of the "
                        "current epoch is re-planned from its batch index, so some of its samples may repeat "
                        "or be skipped; later epochs are exact", saved_batch, self.global_batch_size)
        self.waits: list[float] = []
        self._lock = threading.Lock()
        self._closed = False
        self._history_stale = False
        self._last_progress = time.monotonic()
        self._ack_queue: list[tuple[int, int]] = []  # (generation, seq)
        self._acks_since: float | None = None  # when the oldest queued ack was queued
        self._ack_hold = 0.0  # how long acks may wait for a locate to carry them (the coordinator says)
        self._report: dict | None = None  # the trainer's last step, sent with the next acks
        self._report_since = 0.0
        self._ack_stop = threading.Event()
        self._acker = threading.Thread(target=self._ack_loop, name=f"acks-dp{dp_rank}", daemon=True)
        self._acker.start()
        self._reports: list = []
        self._futures: dict[int, ThreadFuture] = {}
        self._located: dict[int, Location] = {}  # seq -> a location given ahead of time
        self._pool = _DaemonPool(min(settings.fetch_threads, settings.prefetch), f"prefetch-dp{dp_rank}")
        self._fill()
        atexit.register(self.close)

    def _check_agreement(self, expect: dict) -> None:
        """Ask the coordinator what it serves and compare, before registering: registering may
        start a new plan generation and replaces this DP rank's earlier client, so a trainer
        that does not match must leave before it, unseen by the running job."""
        from mmdit.config import ConfigError

        service = rpc.call(rpc.COORDINATOR, protocol.describe_service, timeout_s=self.cfg.rpc_timeout_s, retries=2)
        problems = protocol.disagreements(expect, service) if service is not None else []
        if problems:
            raise ConfigError(f"this trainer does not match the data service at {self.address or 'this RPC group'}: "
                              + "; ".join(problems))

    def _register(self) -> None:
        """Join the coordinator's plan at `self.cursor` (every batch before it is consumed)."""
        reply = rpc.call(rpc.COORDINATOR, protocol.register_consumer, self.name, self.rank, self.dp_rank,
                         self.dp_size, self.micro_batch_size, self.cursor.to_dict(), self.history,
                         timeout_s=self.cfg.rpc_timeout_s, retries=2)
        self.gen, self.history, self.selection = reply.gen, reply.history, reply.selection
        self.global_batch_size = reply.global_batch_size

    def _rejoin(self) -> None:
        """A new plan generation: drop what was prefetched for the old one and register again."""
        for fut in self._futures.values():
            fut.cancel()
        self._futures = {}
        with self._lock:
            self._located = {}
        self._register()
        log.info("%s: rejoined the plan at %s (generation %d)", self.name, self.cursor, self.gen)

    # ---- the iterator

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._closed:
            raise StopIteration
        seq = self.cursor.seq
        started = time.perf_counter()
        budget = self.cfg.consumer_timeout_s + self.cfg.rpc_timeout_s + 2 * self.cfg.heartbeat_s
        while True:
            self._fill()
            try:
                batch = self._futures[seq].result(timeout=budget)
                break
            except _Stale:
                self._rejoin()
            except TimeoutError as e:
                raise DataServiceError(f"{self.name}: batch seq {seq} not delivered within {budget:.0f}s") from e
        self.waits.append(time.perf_counter() - started)
        del self._futures[seq]
        self._last_progress = time.monotonic()
        epoch, index = batch["batch_id"]
        self.cursor = Cursor(seq + 1, epoch, index + 1)
        if self._history_stale or batch["config_version"] > self.history[-1]["version"]:
            self._refresh_history()
        self._fill()
        return batch

    def state(self) -> dict:
        """Cursor of the next batch to consume, the mixture history, and the plan's identity."""
        return {"cursor": self.cursor.to_dict(), "history": list(self.history), "selection": self.selection,
                "global_batch_size": self.global_batch_size}

    # ---- fetching

    def _fill(self) -> None:
        if self._closed:
            return
        for seq in range(self.cursor.seq, self.cursor.seq + self.cfg.prefetch):
            if seq not in self._futures:
                self._futures[seq] = self._pool.submit(self._fetch, self.gen, seq)

    def _locate(self, gen: int, seq: int) -> Location:
        """Where batch `seq` is: from an earlier answer's window, else from the coordinator (which
        long-polls up to a heartbeat when it is not leased yet), carrying the queued acks."""
        with self._lock:
            where = self._located.pop(seq, None)
        if where is not None and where.gen == gen:
            return where
        acks, report = self._take_acks(gen)
        try:
            where = rpc.call(rpc.COORDINATOR, protocol.locate, self.name, gen, seq, LOCATE_WINDOW - 1, acks, report,
                             timeout_s=self.cfg.heartbeat_s + self.cfg.rpc_timeout_s, retries=2)
        except rpc.RpcError:
            self._requeue(gen, acks, report)
            raise
        with self._lock:
            self._ack_hold = where.ack_hold_s
            if where.status == "ok":  # where the next batches are: their workers skip a locate
                for s, (owner, rank, uid) in where.ahead.items():
                    if s >= self.cursor.seq:
                        self._located[s] = Location("ok", where.gen, owner, rank, uid, {}, where.history_len,
                                                    where.producers_alive, where.ack_hold_s)
        return where

    def _fetch(self, gen: int, seq: int) -> dict:
        """Locate batch `seq` of generation `gen` and fetch this rank's shard, until it arrives or
        the deadline passes. The batch is acked on arrival: the producer may drop it, this client
        holds it until the trainer takes it."""
        cfg = self.cfg
        started = time.monotonic()
        why = "no answer yet"
        while not self._closed:
            if gen != self.gen:
                raise _Stale()
            if time.monotonic() - max(started, self._last_progress) > cfg.consumer_timeout_s:
                raise DataServiceError(f"{self.name}: no batch for seq {seq} within service.consumer_timeout_s="
                                       f"{cfg.consumer_timeout_s:.0f}s: {why}")
            try:
                where = self._locate(gen, seq)
            except rpc.RpcError as e:
                why = f"coordinator unreachable ({e})"
                time.sleep(0.5)
                continue
            if where.status == "waiting":
                why = f"batch not leased; {where.producers_alive} producers alive"
                continue
            if where.status == "stale":
                raise _Stale()
            if where.status == "done":
                raise DataServiceError(f"{self.name}: batch seq {seq} was already consumed by every DP rank")
            if where.history_len > len(self.history):
                self._history_stale = True
            shard, why = self._fetch_from(where)
            if shard is not None:
                self._last_progress = time.monotonic()
                self._queue_ack(gen, seq)
                return shard
        raise DataServiceError(f"{self.name}: closed")

    def _fetch_from(self, where: Location) -> tuple[dict | None, str]:
        """Fetch this rank's shard from `where.owner`: (shard, "") or (None, why it failed).

        The fetch is a long poll (the producer answers `not_ready` after a heartbeat); a transfer
        still running after a heartbeat is kept while the coordinator still names the same owner
        and abandoned when the lease moved (a hung producer loses its leases after
        `lease_timeout_s`), so a rank never waits on a producer the coordinator gave up on."""
        owner, cfg = where.owner, self.cfg
        try:
            rpc.ensure_known(owner, where.owner_rank)
            fut = torch_rpc.rpc_async(owner, protocol.fetch, args=(where.uid, self.dp_rank),
                                      timeout=cfg.rpc_timeout_s + cfg.heartbeat_s)
        except RuntimeError as e:
            self._report_dead(owner)
            return None, f"fetch from {owner} failed ({e})"
        arrived = threading.Event()
        fut.add_done_callback(lambda _: arrived.set())
        while not arrived.wait(2 * cfg.heartbeat_s):
            if self._closed:
                return None, "closed"
            try:
                now = rpc.call(rpc.COORDINATOR, protocol.locate, self.name, where.gen, where.uid[1], 0,
                               timeout_s=cfg.heartbeat_s + cfg.rpc_timeout_s, retries=2)
            except rpc.RpcError:
                continue  # the next locate in _fetch reports an unreachable coordinator
            if now.status != "ok" or now.owner != owner:
                return None, f"{owner} stopped answering and lost the lease"
        try:
            got = fut.wait()
        except RuntimeError as e:
            if not rpc.is_timeout(e):
                self._report_dead(owner)
            return None, f"fetch from {owner} failed ({str(e).splitlines()[0][:200]})"
        if got.status == "ok":
            return got.batch, ""
        if got.status == "error":
            raise DataServiceError(got.message)
        if got.status == "not_held":
            time.sleep(0.02)
            return None, f"{owner} does not hold the batch (lease moving)"
        return None, f"{owner} is still preparing the batch"

    def _report_dead(self, producer: str) -> None:
        with self._lock:  # the window's other batches there moved too (or will): ask again for them
            self._located = {s: w for s, w in self._located.items() if w.owner != producer}
        try:
            self._reports.append(torch_rpc.rpc_async(rpc.COORDINATOR, protocol.producer_failed,
                                                     args=(producer, self.name), timeout=self.cfg.rpc_timeout_s))
        except RuntimeError as e:
            log.warning("could not report %s dead: %s", producer, e)

    def _ack_loop(self) -> None:
        while not self._ack_stop.wait(self.cfg.ack_interval_s):
            self._flush_acks(due_only=True)

    def report(self, figures: dict) -> None:
        """The trainer's figures of its last step (dataservice/telemetry.py TRAINER_FIELDS): they
        travel to the coordinator's /metrics and dashboard with the next acks, no extra call."""
        with self._lock:
            if self._report is None:
                self._report_since = time.monotonic()
            self._report = dict(figures)

    def _queue_ack(self, gen: int, seq: int) -> None:
        with self._lock:
            if not self._ack_queue:
                self._acks_since = time.monotonic()
            self._ack_queue.append((gen, seq))

    def _take_acks(self, gen: int) -> tuple[list[int], dict | None]:
        """The queued acks of generation `gen` and the report; older generations' acks are void,
        newer ones (queued after a rejoin this caller did not see yet) stay queued."""
        with self._lock:
            queued = self._ack_queue
            self._ack_queue = [(g, s) for g, s in queued if g > gen]
            self._acks_since = self._acks_since if self._ack_queue else None
            report, self._report = self._report, None
        return [seq for g, seq in queued if g == gen], report

    def _requeue(self, gen: int, acks: list[int], report: dict | None) -> None:
        """A call that carried them failed: they go with the next one."""
        with self._lock:
            if acks:
                self._ack_queue = [(gen, s) for s in acks] + self._ack_queue
                self._acks_since = self._acks_since or time.monotonic()
            if report is not None and self._report is None:
                self._report, self._report_since = report, time.monotonic()

    def _flush_acks(self, due_only: bool = False) -> None:
        """Send the queued acks and report in one call; `due_only`: only when the acks waited the
        hold (the report as long, at least a heartbeat) without a locate to carry them."""
        now = time.monotonic()
        with self._lock:
            acks_due = self._acks_since is not None and now - self._acks_since >= self._ack_hold
            report_due = (self._report is not None
                          and now - self._report_since >= max(self._ack_hold, self.cfg.heartbeat_s))
            if due_only and not (acks_due or report_due):
                return
        gen = self.gen
        acks, report = self._take_acks(gen)
        if not acks and report is None:
            return
        try:
            rpc.call(rpc.COORDINATOR, protocol.ack, self.name, self.dp_rank, gen, acks, report,
                     timeout_s=self.cfg.rpc_timeout_s, retries=2)
        except rpc.RpcError as e:  # the coordinator is gone; the next locate reports it properly
            log.warning("ack of %d batches failed: %s", len(acks), e)

    def _refresh_history(self) -> None:
        try:
            self.history = rpc.call(rpc.COORDINATOR, protocol.history, timeout_s=self.cfg.rpc_timeout_s, retries=2)
            self._history_stale = False
        except rpc.RpcError as e:
            log.warning("could not refresh the mixture history: %s", e)

    # ---- shutdown

    def close(self) -> None:
        """Ack the last batch, stop prefetching, leave the coordinator and (if ours) the RPC group."""
        if self._closed:
            return
        self._closed = True
        for fut in self._futures.values():
            fut.cancel()
        self._pool.shutdown(timeout_s=2 * self.cfg.heartbeat_s)
        self._ack_stop.set()
        self._acker.join()
        self._flush_acks()
        for f in self._reports:
            try:
                f.wait()
            except RuntimeError:
                pass
        reachable = True
        try:
            rpc.call(rpc.COORDINATOR, protocol.consumer_left, self.name, timeout_s=5.0)
        except rpc.RpcError:
            reachable = False
        if self._own_rpc:
            rpc.leave(graceful=reachable, timeout_s=self.cfg.shutdown_timeout_s)
        atexit.unregister(self.close)


class _DaemonPool:
    """A few daemon threads running submitted calls in order. Unlike ThreadPoolExecutor's
    workers, which the interpreter joins at exit, a fetch blocked on a hung peer never delays
    a trainer's exit; `shutdown` waits a bounded time for the rest."""

    def __init__(self, threads: int, name: str):
        self._jobs: queue.Queue = queue.Queue()
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(threads)]
        for t in self._threads:
            t.start()

    def submit(self, fn, *args) -> ThreadFuture:
        fut: ThreadFuture = ThreadFuture()
        self._jobs.put((fut, fn, args))
        return fut

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            fut, fn, args = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the future
                fut.set_exception(e)

    def shutdown(self, timeout_s: float) -> None:
        """Cancel what has not started; give running calls `timeout_s` to notice the close."""
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job[0].cancel()
        for _ in self._threads:
            self._jobs.put(None)
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))


def _rpc_initialized() -> bool:
    from torch.distributed.rpc import api

    return api._is_current_rpc_agent_set()


# ----------------------------------------------------------------------------- TP broadcast

_WIRE_DTYPES = {torch.bool: torch.uint8}  # sent as uint8, restored on arrival


class TPBroadcast:
    """The batch of TP rank 0 (which owns the `ServiceClient`) on every rank of the TP group."""

    def __init__(self, source: ServiceClient | None, group, src: int):
        self.source, self.group, self.src = source, group, src
        self.waits: list[float] = []
        self._state: dict = source.state() if source is not None else {}

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        started = time.perf_counter()
        if self.source is not None:
            batch = next(self.source)
            tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
            meta = {"fields": {k: v for k, v in batch.items() if k not in tensors}, "state": self.source.state(),
                    "tensors": [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]}
        else:
            meta, tensors = None, {}
        box = [meta]
        dist.broadcast_object_list(box, src=self.src, group=self.group)
        meta = box[0]
        out = dict(meta["fields"])
        for name, shape, dtype in meta["tensors"]:
            wire = _WIRE_DTYPES.get(dtype, dtype)
            t = tensors[name].to(wire).contiguous() if self.source is not None else torch.empty(shape, dtype=wire)
            dist.broadcast(t, src=self.src, group=self.group)
            out[name] = t.to(dtype) if wire != dtype else t
        self._state = meta["state"]
        self.waits.append(time.perf_counter() - started)
        return out

    def state(self) -> dict:
        return dict(self._state)

    def report(self, figures: dict) -> None:
        if self.source is not None:
            self.source.report(figures)

    def close(self) -> None:
        if self.source is not None:
            self.source.close()


def tp_gloo_group(tp: int):
    """This rank's TP group as a gloo group, with its source (global rank of TP rank 0).

    Every rank must call this (group creation is collective). TP groups are consecutive ranks,
    as megatron's parallel_state lays them out; when megatron is initialized that is checked.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % tp:
        raise ValueError(f"TP size {tp} does not divide the world size {world}")
    layout = [list(range(start, start + tp)) for start in range(0, world, tp)]
    mine = layout[rank // tp]
    parallel_state = sys.modules.get("megatron.core.parallel_state")  # a consumer without a model never imports it
    if parallel_state is not None and parallel_state.model_parallel_is_initialized():
        megatron_ranks = dist.get_process_group_ranks(parallel_state.get_tensor_model_parallel_group())
        if sorted(megatron_ranks) != mine:
            raise RuntimeError(f"megatron's TP group {megatron_ranks} is not the consecutive ranks {mine}")
    group, _ = dist.new_subgroups_by_enumeration(layout, backend="gloo")
    return group, mine[0]


def client_on_tp_rank0(make_client, group, src: int) -> ServiceClient | None:
    """`make_client()` on TP rank 0 (`make_client` is None on the others), and its outcome on
    every rank of the group: when TP rank 0 cannot join (a config the service does not match, no
    service), every rank raises, with TP rank 0's reason, instead of waiting for a broadcast that
    never comes. Every rank of the group must call this."""
    from mmdit.config import ConfigError

    client, failure = None, None
    if make_client is not None:
        try:
            client = make_client()
        except BaseException as e:  # noqa: BLE001 - re-raised below, once the group knows
            failure = e
    box = [None if failure is None else (isinstance(failure, ConfigError), str(failure) or type(failure).__name__)]
    dist.broadcast_object_list(box, src=src, group=group)
    if failure is not None:
        raise failure
    if box[0] is not None:
        is_config, why = box[0]
        raise (ConfigError(why) if is_config else DataServiceError(f"TP rank 0 could not join the data service: {why}"))
    return client


def trainer_batches(cfg, dims, data_state: dict | None):
    """The batch source of one trainer rank: a `ServiceClient` on TP rank 0 of each DP rank,
    broadcast to the TP group when TP > 1. `data_state` is a checkpoint's `state()` (or empty).
    A service that does not match the trainer's config is a ConfigError on every rank."""
    def make_client() -> ServiceClient:
        return ServiceClient(cfg.service.role(ClientSettings), dims.dp_rank, dims.dp, cfg.train.micro_batch_size,
                             state=data_state or None, expect=protocol.expectation(cfg, model=True))

    if dims.tp == 1:
        return make_client()
    group, src = tp_gloo_group(dims.tp)  # first: creating it is collective over every rank
    return TPBroadcast(client_on_tp_rank0(make_client if dims.tp_rank == 0 else None, group, src), group, src)
