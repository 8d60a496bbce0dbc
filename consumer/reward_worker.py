"""A GRPO reward worker (`mmdit reward-worker`): scores rollouts for trainers over the data
service's RPC group.

It builds the reward of `train.grpo.reward` once (consumer/rewards.py; `ocr` loads encoders.dir's
VAE), joins the group at the address producers use (`service.*`) as `reward_<host>_<pid>_<n>`,
and answers `score(request_id, latents, prompts)` (dataservice/protocol.py): a call only queues
the request (at most `QUEUE_DEPTH`; beyond that it is refused, and the trainer sends it
elsewhere) and one scoring thread answers the requests in order, so no RPC thread ever waits on a
reward. An image the reward cannot score gets NaN; a reward that raises makes its request NaN.
The trainer side is consumer/reward_service.py.

It serves until SIGTERM/SIGINT, or until the coordinator has not answered for
service.join_timeout_s (the service is gone), then fails what is still queued (the trainers
re-send it) and leaves. Its counters (requests, images, failures) are logged at exit.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import sys
import threading
import time

import torch
from torch.futures import Future

from mmdit.config.service import RpcSettings
from mmdit.consumer.rewards import Reward, build_reward
from mmdit.dataservice import protocol, rpc

log = logging.getLogger("mmdit.reward_worker")

QUEUE_DEPTH = 64
"""Requests a worker holds at once (queued or being scored)."""


class RewardServer:
    """The REWARD role's handler: a bounded queue and one scoring thread."""

    def __init__(self, reward: Reward, depth: int = QUEUE_DEPTH):
        self.reward = reward
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.counters = {"requests": 0, "images": 0, "failures": 0, "refused": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._score_loop, name="reward-scoring", daemon=True)
        self._thread.start()

    def score(self, request_id: str, latents: torch.Tensor, prompts: list) -> Future:
        fut: Future = Future()
        try:
            if self._stop.is_set():
                raise queue.Full
            self.queue.put_nowait((request_id, latents, prompts, fut))
        except queue.Full:
            self.counters["refused"] += 1
            fut.set_exception(RuntimeError(f"reward worker busy or stopping: request {request_id} refused"))
        return fut

    def _score_loop(self) -> None:
        while not self._stop.is_set():
            try:
                request_id, latents, prompts, fut = self.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            fut.set_result(self._score(request_id, latents, prompts))

    def _score(self, request_id: str, latents: torch.Tensor, prompts: list) -> torch.Tensor:
        n = latents.shape[0]
        self.counters["requests"] += 1
        self.counters["images"] += n
        try:
            rewards = torch.as_tensor(self.reward(latents, prompts), dtype=torch.float32).reshape(-1)
            if rewards.shape[0] != n:
                raise ValueError(f"{rewards.shape[0]} rewards for {n} images")
        except Exception as e:  # noqa: BLE001 - a failed reward drops its samples, not the worker
            log.warning("request %s: the reward failed (%s): %d images get NaN", request_id, e, n)
            rewards = torch.full((n,), math.nan)
        self.counters["failures"] += int(rewards.isnan().sum())
        return rewards

    def close(self) -> None:
        """Stop scoring; what is still queued fails, so its trainers re-send it elsewhere."""
        self._stop.set()
        self._thread.join()
        while True:
            try:
                request_id, *_, fut = self.queue.get_nowait()
            except queue.Empty:
                return
            fut.set_exception(RuntimeError(f"reward worker stopping: request {request_id} not scored"))


def _serve(stop, settings: RpcSettings) -> bool:
    """Ping the coordinator every heartbeat until `stop`; False when it stayed unreachable for
    service.join_timeout_s (the service is gone)."""
    unreachable_since = None
    while not stop.wait(settings.heartbeat_s):
        try:
            rpc.call(rpc.COORDINATOR, protocol.ping, timeout_s=settings.heartbeat_s + settings.rpc_timeout_s)
            unreachable_since = None
        except rpc.RpcError as e:
            unreachable_since = unreachable_since or time.monotonic()
            if time.monotonic() - unreachable_since > settings.join_timeout_s:
                log.error("coordinator unreachable for %.0fs (%s); stopping", settings.join_timeout_s, e)
                return False
    return True


def run_reward_worker(cfg) -> int:
    """One reward worker process: build the reward, join, serve until stopped, leave; the exit code."""
    from mmdit.dataservice.address import ServiceUnreachable, resolve
    from mmdit.utils.processes import SignalStop

    settings = cfg.service.role(RpcSettings)
    stop = SignalStop()

    def encoders():
        from mmdit.producer.encoders import Encoders

        return Encoders.load(cfg.encoders)

    reward = build_reward(cfg.train.grpo, encoders)
    name = rpc.incarnation_name("reward", n=int(os.environ.get("MMDIT_INCARNATION", "0")))
    try:
        address = resolve(settings, settings.join_timeout_s)
        rank = rpc.join(name, address.host, address.port, service_id=address.service_id,
                        advertise_host=settings.advertise_host, rpc_timeout_s=settings.rpc_timeout_s,
                        join_timeout_s=settings.join_timeout_s, num_worker_threads=settings.rpc_threads)
    except (rpc.RpcError, ServiceUnreachable) as e:
        print(f"mmdit reward-worker: {e}", file=sys.stderr)
        return 2 if isinstance(e, rpc.JoinRejected) else 1
    server = RewardServer(reward)
    protocol.serve(protocol.REWARD, server)
    log.info("reward worker %s (rank %d) scoring %s", name, rank, cfg.train.grpo.reward)
    reachable = False
    try:
        reachable = _serve(stop, settings)
    finally:
        protocol.stop_serving(protocol.REWARD)
        server.close()
        graceful = rpc.leave(graceful=reachable, timeout_s=settings.shutdown_timeout_s)
        log.info("reward worker %s stopped (%s); counters %s", name, "graceful" if graceful else "not graceful",
                 server.counters)
        stop.restore()
    return 0 if reachable or stop.is_set() else 1
