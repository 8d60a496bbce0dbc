"""GRPO rewards on a reward service: the trainer's side (`train.grpo.reward_service=true`).

Reward workers (`mmdit reward-worker`, consumer/reward_worker.py) join the data service's RPC
group under names `reward_<host>_<pid>_<n>`. `RemoteRewards.submit(latents, prompts)` returns at
once with a future of the [B] rewards, so the trainer rolls out its next chunk while they are
scored: the images are split into chunks, one per live worker (the workers with the fewest
chunks outstanding first), and each chunk goes to its worker as one `score` call
(dataservice/protocol.py) carrying the final latents, never pixels.

Exactly once, under worker failures (`ChunkBook`, single-threaded, so a simulation can drive it
through any interleaving: tests/test_reward_service.py):
- a call that fails (a dead worker fails at once; a hung one after service.rpc_timeout_s) marks
  its worker dead for good (incarnation names are never reused; a crashed one stays listed) and
  sends each chunk it still held to another live worker: one retry per chunk re-sent;
- only the answer of a chunk's latest attempt counts: a late answer from a worker it left is
  dropped (`late`), so no image is counted twice;
- a chunk sent `max_tries` times, or left without a live worker for service.join_timeout_s,
  resolves to NaN for its images: GRPO drops them from their groups (`failed_chunks`).

The worker list is the RPC group's member list (`rpc.listed_members`), read again on each submit,
after each failed call and every 0.2 s while a chunk waits for a worker. A process that is not
yet a member (a trainer without the data service) joins as the data-service client does, and
leaves on `close()`.
"""

from __future__ import annotations

import itertools
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from mmdit.dataservice import protocol, rpc

log = logging.getLogger("mmdit.grpo")

WORKER_PREFIX = "reward_"
"""Members whose RPC name starts with this are reward workers (rpc.incarnation_name("reward"))."""
POLL_S = 0.2
"""How often the member list is read again while a chunk waits for a live worker."""


# ----------------------------------------------------------------------------- the bookkeeping


@dataclass
class _Request:
    id: str
    size: int
    future: Future
    rewards: torch.Tensor
    open_chunks: int = 0


@dataclass
class _Chunk:
    request: _Request
    lo: int
    hi: int
    tries: int = 0
    attempt: int = -1
    """The attempt whose answer counts (-1: not out)."""
    worker: str = ""
    waiting_since: float | None = None


@dataclass
class _Worker:
    rank: int
    dead: bool = False
    outstanding: set = field(default_factory=set)
    """Attempt ids out to this worker whose answers still count."""
    taken: int = 0
    """Chunks whose rewards it gave."""


@dataclass(frozen=True)
class Send:
    """One call to make: chunk [lo, hi) of a request to `worker` as attempt `attempt`."""

    attempt: int
    worker: str
    rank: int
    request_id: str
    lo: int
    hi: int


class ChunkBook:
    """Which chunk is out where, and which answers count. Not thread-safe: one thread drives it."""

    def __init__(self, max_tries: int, wait_s: float, clock: Callable[[], float] = time.monotonic):
        self.max_tries, self.wait_s, self.clock = max_tries, wait_s, clock
        self.workers: dict[str, _Worker] = {}
        self.attempts: dict[int, _Chunk] = {}  # attempt id -> its chunk, while the answer counts
        self.waiting: deque[_Chunk] = deque()
        self._ids = itertools.count()
        self.counters = {"requests": 0, "images": 0, "chunks": 0, "sent": 0, "accepted": 0, "retries": 0,
                         "late": 0, "failed_calls": 0, "failed_chunks": 0, "nan_images": 0}

    # ---- workers

    def live(self) -> list[str]:
        return [name for name, w in self.workers.items() if not w.dead]

    def listed(self, members: dict[str, int]) -> None:
        """The reward workers now listed (name -> rank): new ones become live; one no longer
        listed left, and its chunks go elsewhere."""
        for name, rank in members.items():
            self.workers.setdefault(name, _Worker(rank))
        for name, w in self.workers.items():
            if not w.dead and name not in members:
                self._lose(name)

    def _lose(self, name: str) -> None:
        w = self.workers[name]
        w.dead = True
        for attempt in sorted(w.outstanding):
            chunk = self.attempts.pop(attempt)
            chunk.attempt, chunk.worker = -1, ""
            self.waiting.append(chunk)
        w.outstanding.clear()

    # ---- requests

    def add(self, request_id: str, size: int, future: Future) -> None:
        """A request of `size` images, split into one chunk per live worker (at least one)."""
        request = _Request(request_id, size, future, torch.full((size,), math.nan))
        self.counters["requests"] += 1
        self.counters["images"] += size
        bounds = torch.arange(size).tensor_split(max(1, min(size, len(self.live()))))
        for part in bounds:
            if part.numel():
                self.waiting.append(_Chunk(request, int(part[0]), int(part[-1]) + 1))
                request.open_chunks += 1
                self.counters["chunks"] += 1
        if request.open_chunks == 0:  # an empty request
            future.set_result(request.rewards)

    def dispatch(self) -> list[Send]:
        """Send every waiting chunk that can go (least outstanding live worker first); fail the
        ones out of tries, or out of patience for a worker."""
        sends, still = [], deque()
        now = self.clock()
        while self.waiting:
            chunk = self.waiting.popleft()
            if chunk.request.future.done():  # closed meanwhile
                continue
            if chunk.tries >= self.max_tries:
                self._fail(chunk, f"sent {chunk.tries} times")
                continue
            live = self.live()
            if not live:
                chunk.waiting_since = chunk.waiting_since if chunk.waiting_since is not None else now
                if now - chunk.waiting_since >= self.wait_s:
                    self._fail(chunk, f"no reward worker for {self.wait_s:.0f} s")
                else:
                    still.append(chunk)
                continue
            name = min(live, key=lambda n: len(self.workers[n].outstanding))
            attempt = next(self._ids)
            chunk.attempt, chunk.worker, chunk.waiting_since = attempt, name, None
            chunk.tries += 1
            self.counters["sent"] += 1
            self.counters["retries"] += chunk.tries > 1
            self.attempts[attempt] = chunk
            self.workers[name].outstanding.add(attempt)
            sends.append(Send(attempt, name, self.workers[name].rank, chunk.request.id, chunk.lo, chunk.hi))
        self.waiting = still
        return sends

    def answered(self, attempt: int, rewards: torch.Tensor | None, error: str = "") -> bool:
        """The answer of `attempt`: the chunk's rewards, or None and why the call failed. True
        if these rewards were taken (the chunk's latest attempt answered)."""
        chunk = self.attempts.get(attempt)
        if chunk is None:  # superseded: its worker was given up and the chunk went elsewhere
            self.counters["late"] += rewards is not None
            return False
        worker = chunk.worker
        if rewards is not None and rewards.shape != (chunk.hi - chunk.lo,):
            rewards, error = None, f"{tuple(rewards.shape)} rewards for {chunk.hi - chunk.lo} images"
        if rewards is None:
            self.counters["failed_calls"] += 1
            log.warning("reward worker %s failed (%s): its chunks go to another worker", worker, error)
            self._lose(worker)
            return False
        del self.attempts[attempt]
        self.workers[worker].outstanding.discard(attempt)
        self.workers[worker].taken += 1
        chunk.attempt = -1
        chunk.request.rewards[chunk.lo:chunk.hi] = rewards.float()
        self.counters["accepted"] += 1
        self._close_chunk(chunk)
        return True

    def _fail(self, chunk: _Chunk, why: str) -> None:
        log.warning("reward chunk [%d, %d) of request %s failed (%s): its %d images get NaN", chunk.lo, chunk.hi,
                    chunk.request.id, why, chunk.hi - chunk.lo)
        self.counters["failed_chunks"] += 1
        self.counters["nan_images"] += chunk.hi - chunk.lo
        self._close_chunk(chunk)

    def _close_chunk(self, chunk: _Chunk) -> None:
        request = chunk.request
        request.open_chunks -= 1
        if request.open_chunks == 0 and not request.future.done():
            request.future.set_result(request.rewards)

    def pending(self) -> int:
        """Chunks waiting for a worker or out at one."""
        return len(self.waiting) + len(self.attempts)


# ----------------------------------------------------------------------------- transport


class RpcTransport:
    """Reward workers over the data service's RPC group."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s

    def members(self) -> dict[str, int]:
        listed = (entry.rpartition("-") for entry in rpc.listed_members())
        return {name: int(rank) for name, _, rank in listed if name.startswith(WORKER_PREFIX)}

    def call(self, worker: str, rank: int, request_id: str, latents: torch.Tensor, prompts: list,
             done: Callable[[torch.Tensor | None, str], None]) -> None:
        import torch.distributed.rpc as torch_rpc

        def finished(fut) -> None:
            try:
                done(fut.value(), "")
            except Exception as e:  # noqa: BLE001 - a dead peer, a timeout, a remote error
                done(None, ("timeout: " if rpc.is_timeout(e) else "") + str(e).splitlines()[0][:200])

        try:
            rpc.ensure_known(worker, rank)
            fut = torch_rpc.rpc_async(worker, protocol.score, args=(request_id, latents, prompts),
                                      timeout=self.timeout_s)
        except Exception as e:  # noqa: BLE001 - could not even send
            done(None, str(e).splitlines()[0][:200])
            return
        fut.add_done_callback(finished)


# ----------------------------------------------------------------------------- the trainer's handle


class RemoteRewards:
    """The reward slot served by reward workers: `submit(latents, prompts) -> Future` of [B]
    float32 rewards (NaN for an image no worker could score). `retries`: chunks re-sent."""

    def __init__(self, service_settings, grpo_cfg=None, *, max_tries: int = 3, transport=None,
                 name: str | None = None):
        """`service_settings`: the `service.*` keys (RpcSettings or a role of it): the address to
        join at, service.rpc_timeout_s per call, service.join_timeout_s of waiting for a worker.
        `grpo_cfg` (train.grpo) only names the reward in logs: the workers' own config decides it."""
        self.settings, self.reward = service_settings, getattr(grpo_cfg, "reward", "?")
        self._joined = False
        if transport is None:
            self._joined = self._join(name or rpc.incarnation_name("grpo"))
            transport = RpcTransport(service_settings.rpc_timeout_s)
        self.transport = transport
        self.book = ChunkBook(max_tries, service_settings.join_timeout_s)
        self._events: queue.Queue = queue.Queue()
        self._ids = itertools.count()
        self._prefix = name or "grpo"
        self._closed = False
        self._requests: dict[str, tuple[torch.Tensor, list]] = {}
        self._thread = threading.Thread(target=self._run, name="remote-rewards", daemon=True)
        self._thread.start()

    def _join(self, name: str) -> bool:
        from torch.distributed.rpc import api

        if api._is_current_rpc_agent_set():
            return False
        from mmdit.config import ConfigError
        from mmdit.dataservice.address import resolve

        s = self.settings
        address = resolve(s, s.join_timeout_s)
        try:
            rpc.join(name, address.host, address.port, service_id=address.service_id, advertise_host=s.advertise_host,
                     rpc_timeout_s=s.rpc_timeout_s, join_timeout_s=s.join_timeout_s, num_worker_threads=s.rpc_threads)
        except rpc.JoinRejected as e:
            raise ConfigError(str(e)) from None
        return True

    @property
    def retries(self) -> int:
        return self.book.counters["retries"]

    @property
    def counters(self) -> dict:
        return dict(self.book.counters)

    def report(self, dp_rank: int, figures: dict) -> None:
        """The trainer's figures of its last step, to the coordinator's /metrics and dashboard
        (as a data-service client's acks carry them; a GRPO trainer fetches no batches to ack).
        Fire and forget: a lost report costs one point of a chart."""
        import torch.distributed.rpc as torch_rpc

        try:
            torch_rpc.rpc_async(rpc.COORDINATOR, protocol.ack, args=(self._prefix, dp_rank, -1, [], figures),
                                timeout=self.settings.rpc_timeout_s)
        except Exception as e:  # noqa: BLE001 - the service gone: training goes on
            log.debug("telemetry report not sent: %s", e)

    def submit(self, latents: torch.Tensor, prompts: Sequence) -> Future:
        """Score `latents` [B, 16, h, w] (float32, CPU) for their B prompts; returns at once."""
        if len(prompts) != latents.shape[0]:
            raise ValueError(f"{latents.shape[0]} latents but {len(prompts)} prompts")
        future: Future = Future()
        if self._closed:
            raise RuntimeError("RemoteRewards is closed")
        self._events.put(("submit", f"{self._prefix}_{next(self._ids)}", latents.detach().float().cpu(), list(prompts),
                          future))
        return future

    def __call__(self, latents: torch.Tensor, prompts: Sequence) -> torch.Tensor:
        return self.submit(latents, prompts).result()

    # ---- the dispatcher thread: every change to the book happens here

    def _run(self) -> None:
        while True:
            try:
                event = self._events.get(timeout=POLL_S)
            except queue.Empty:
                event = ("tick",)
            if event[0] == "close":
                return
            try:
                self._handle(event)
            except Exception:  # noqa: BLE001 - a bug here must not leave every later request hanging
                log.exception("remote rewards: event %s failed", event[0])

    def _handle(self, event: tuple) -> None:
        kind = event[0]
        if kind == "submit":  # the member list as of now, then the request split over its live workers
            _, request_id, latents, prompts, future = event
            self._requests[request_id] = (latents, prompts)
            future.add_done_callback(lambda _f, rid=request_id: self._events.put(("forget", rid)))
            self._refresh()
            self.book.add(request_id, latents.shape[0], future)
        elif kind == "answer":
            _, attempt, rewards, error = event
            self.book.answered(attempt, rewards, error)
            if rewards is None:  # a failed call: who is still listed?
                self._refresh()
        elif kind == "forget":
            self._requests.pop(event[1], None)
        if self.book.waiting and not self.book.live():  # waiting for a worker to join
            self._refresh()
        for send in self.book.dispatch():
            latents, prompts = self._requests[send.request_id]
            self.transport.call(send.worker, send.rank, send.request_id, latents[send.lo:send.hi].clone(),
                                prompts[send.lo:send.hi],
                                lambda rewards, error, a=send.attempt: self._events.put(("answer", a, rewards, error)))

    def _refresh(self) -> None:
        try:
            self.book.listed(self.transport.members())
        except Exception as e:  # noqa: BLE001 - the store unreachable: keep the list we have
            log.warning("cannot read the reward workers' list: %s", str(e).splitlines()[0][:200])

    def close(self) -> None:
        """Stop; requests still open resolve with what they have (NaN where unscored); leave the
        RPC group if this object joined it."""
        if self._closed:
            return
        self._closed = True
        self._events.put(("close",))
        self._thread.join()
        for chunk in [*self.book.waiting, *self.book.attempts.values()]:
            if not chunk.request.future.done():
                chunk.request.future.set_result(chunk.request.rewards)
        log.info("remote rewards (%s): %s", self.reward, self.book.counters)
        if self._joined:
            rpc.leave(graceful=True, timeout_s=self.settings.shutdown_timeout_s)
