"""Training of the MMDiT with TP x DP: what one rank of `mmdit train` runs.

Three layers, as in torchtitan: a batch source whose fetches are timed, `micro_step`, and the
outer loop (`Trainer`) with logging and checkpoints. The model comes from `parallelize()`
(parallel/parallelize.py) and the loss from the objective slot (consumer/objectives.py), so the
loop knows neither how the model is parallelized nor what it minimizes. The command itself
(launch/train.py) checks the config and launches ranks without importing this module's model stack.
"""

import contextlib
import logging
import math
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from mmdit.config import ConfigError
from mmdit.config.job import JobConfig
from mmdit.config.loader import config_yaml
from mmdit.config.train import check_batch_sizes, evaluates_on_evaluator, evaluations_due
from mmdit.consumer.async_save import Checkpointer
from mmdit.consumer.checkpoint import (checkpoint_dir, load_checkpoint, load_objective_state, prune_checkpoints,
                                      resume_checkpoint)
from mmdit.consumer.lineage import LINEAGE, lineage_of
from mmdit.consumer.metrics import METRICS, MetricsWriter, StepMetrics, truncate_after
from mmdit.consumer.objectives import Objective, build_objective
from mmdit.consumer.random_data import RandomBatches
from mmdit.consumer.sample_log import SAMPLES, SampleLog
from mmdit.consumer.schedule import lr_at as schedule_lr
from mmdit.model.flops import mfu, peak_flops, step_flops
from mmdit.parallel.ema import EMA
from mmdit.parallel.parallelize import parallelize
from mmdit.parallel.state import any_rank_true, dp_group
from mmdit.utils.atomic import atomic_write_json, atomic_write_text
from mmdit.utils.processes import ignore_repeated_sigterm

log = logging.getLogger("mmdit.train")


def lr_at(step: int, cfg: JobConfig) -> float:
    o = cfg.optimizer
    return schedule_lr(step, o.lr, o.min_lr, o.warmup_steps, o.decay_steps or cfg.train.steps, o.lr_schedule)


def micro_step(backend, objective: Objective, batch: dict, step: int, first_index: int,
               scale: float = 1.0, sync: bool = True) -> tuple[torch.Tensor, dict]:
    """Forward and backward of one micro-batch; gradients add up (`scale` weighs this micro-batch's
    mean loss within the optimizer step; `sync`: the step's last, whose backward all-reduces them
    over DP). Returns the unscaled loss and the objective's figures. An objective that runs its
    own backward in pieces (GRPO's update) has `forward_backward`."""
    if hasattr(objective, "forward_backward"):
        loss, figures = objective.forward_backward(backend, batch, step, first_index, scale, sync)
        return loss.detach(), figures
    with contextlib.nullcontext() if sync else backend.no_sync():
        loss, figures = objective.loss(backend.model, batch, step, first_index)
        (loss * scale).backward()
    return loss.detach(), figures


class TrainingError(RuntimeError):
    """Training cannot go on (too many non-finite steps in a row); the message says why."""


class Trainer:
    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.run.dir)
        built = parallelize(cfg.model, cfg.parallel, dtype=cfg.train.dtype, optimizer=cfg.optimizer, seed=cfg.seed,
                            weights=cfg.checkpoint.init_from or None, lora=cfg.train.lora)
        self.model, self.backend, self.plan, self.dims = built.model, built.backend, built.plan, built.dims
        self.rank0 = dist.get_rank() == 0
        self.objective = build_objective(cfg, self.plan)
        self.objective.setup(built)
        self.ema = EMA(self.backend, cfg.train.ema_decay) if cfg.train.ema_decay else None  # parallel/ema.py
        self.lineage = lineage_of(cfg.checkpoint.init_from) if self.rank0 else None
        self.step, self.bad_steps = 0, 0
        self.data_state: dict = {}
        resume = resume_checkpoint(self.run_dir) if cfg.checkpoint.resume else None  # raises before anything is written
        if resume is not None:
            state, self.data_state = load_checkpoint(resume, self.model, self.backend, self.dims, self.ema)
            self.step = state["step"]
            objective_state = load_objective_state(resume, state, self.dims)
            if objective_state is not None:  # GRPO: the rollout the next steps still train on
                self.objective.load_state_dict(objective_state)
            log.info("resumed from %s at step %d", resume, self.step)
        if self.rank0:  # the config is accepted: record it, and forget what ran after the checkpoint
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.yaml", config_yaml(cfg))
            if self.lineage is not None:  # where the weights came from (consumer/lineage.py)
                atomic_write_json(self.run_dir / LINEAGE, self.lineage, indent=2)
            for name in (METRICS, SAMPLES):
                truncate_after(self.run_dir / name, self.step)
            prune_checkpoints(self.run_dir, cfg.checkpoint.keep, cfg.checkpoint.keep_every, resumed_from=resume)
        try:  # the DP size is known only now (under torchrun, launch.nproc need not say it)
            self.accumulation = check_batch_sizes(cfg.train, self.dims.dp)
        except ValueError as e:
            raise ConfigError(f"invalid config: {e}") from None
        self.metrics = MetricsWriter(self.run_dir, enabled=self.rank0, log_every=cfg.train.log_every,
                                     tensorboard=cfg.train.tensorboard)
        on_gpu = self.plan.device.type == "cuda"
        self.peak = cfg.train.peak_tflops * 1e12 or (peak_flops(torch.cuda.get_device_name()) if on_gpu else None)
        self.stop_requested = False
        # Evaluations run here only when no evaluator process runs them (train.eval_on); with one,
        # this trainer publishes a checkpoint at every step an evaluation is due instead.
        self.on_evaluator = evaluates_on_evaluator(cfg.train, cfg.eval)
        self.evaluations = None
        if not self.on_evaluator and (cfg.eval.every or cfg.eval.sample_every or cfg.eval.text_every):
            from mmdit.consumer.evaluations import Evaluations

            self.evaluations = Evaluations(cfg, self.run_dir, self.dims, dp_group())
        self.checkpointer = Checkpointer(self.run_dir, cfg.checkpoint.keep, cfg.checkpoint.keep_every,
                                         asynchronous=cfg.checkpoint.async_save, rank0=self.rank0)

    def evaluate(self, kinds: list[str]) -> None:
        """The evaluations due at this step, on the trainer ranks (consumer/evaluations.py)."""
        with self.ema.weights_in(self.backend.module, dp_group()) if self.cfg.eval.weights == "ema" \
                else contextlib.nullcontext():
            for record in self.evaluations.run(self.backend.module, self.plan, self.step, kinds):
                self.metrics.write_eval(self.step, record)

    def batches(self):
        if self.cfg.train.data_source == "random":
            return RandomBatches(self.cfg.model, self.cfg.train, self.cfg.seed, self.dims.dp_rank, self.dims.dp,
                                 start_step=self.step * self.accumulation)
        from mmdit.dataservice.client import trainer_batches

        return trainer_batches(self.cfg, self.dims, self.data_state)

    def checkpoint_due(self, step: int) -> bool:
        every = self.cfg.checkpoint.every
        return bool(every and step % every == 0) or (self.on_evaluator and bool(evaluations_due(self.cfg.eval, step)))

    def checkpoint(self, batches) -> float:
        """Save this step's checkpoint (in the background with checkpoint.async_save); the stall."""
        objective = self.objective.state_dict(self.step) if hasattr(self.objective, "state_dict") else None
        return self.checkpointer.save(self.step, self.model, self.backend, self.dims, batches.state(),
                                      {"seed": self.cfg.seed, **({"lineage": self.lineage} if self.lineage else {})},
                                      ema=self.ema, objective=objective)

    def _on_signal(self, signum, _frame) -> None:
        if self.stop_requested and signum == signal.SIGINT:  # a second Ctrl-C: stop now, unsaved
            raise KeyboardInterrupt
        ignore_repeated_sigterm()  # a rank starts no children: from now on, nothing interrupts the checkpoint
        log.warning("%s: checkpointing at the end of this step, then stopping (Ctrl-C again stops at once, "
                    "unsaved)", signal.Signals(signum).name)
        self.stop_requested = True

    def run(self) -> dict:
        cfg = self.cfg
        handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        batches = self.batches()
        try:
            self._loop(batches)
        except TrainingError:  # every rank stops at this step alike: the pending save (finite) is published
            self.checkpointer.finish(self.model)
            raise
        except BaseException:
            self.checkpointer.abandon()  # a pending write ends unpublished: resume passes it over
            raise
        finally:
            for sig, handler in handlers.items():
                if not (self.stop_requested and sig == signal.SIGTERM):  # ignored until the rank exits
                    signal.signal(sig, handler)
            if hasattr(batches, "close"):
                batches.close()  # acks what arrived and leaves the data service
            if hasattr(self.objective, "close"):
                self.objective.close()  # GRPO: stops its reward (or leaves the reward service)
        self.metrics.close()
        summary = self.metrics.summary(backend=self.backend.name, tp=self.dims.tp, dp=self.dims.dp,
                                       stopped_early=self.step < cfg.train.steps)
        if self.rank0:
            atomic_write_json(self.run_dir / "summary.json", summary)
        return summary

    def _loop(self, batches) -> None:
        cfg = self.cfg
        data_iter = iter(batches)
        sample_log = SampleLog(self.run_dir, self.dims.dp_rank, 0) \
            if cfg.train.log_samples and self.dims.tp_rank == 0 else None
        saved = self.step
        accum = self.accumulation
        # Step time is the period between the host syncs of consecutive steps (the loss must reach
        # the host to decide, on every rank alike, whether to skip a non-finite step): no extra
        # device sync, so the optimizer's kernels overlap the next step's data fetch and launches.
        # Time spent between steps on checkpoints and evaluation is not step time: it is counted
        # as a stall and reported with the next step (metrics.jsonl, the dashboard's wall time).
        started = previous_end = time.perf_counter()
        stalls = (0.0, 0.0)  # (checkpoint, evaluation) seconds since the previous step ended
        while self.step < cfg.train.steps:
            lr = lr_at(self.step, cfg)
            self.backend.set_lr(lr)
            self.backend.zero_grad()
            data_wait, losses, figures, micro_batches = 0.0, [], [], []
            for micro in range(accum):
                fetch = time.perf_counter()
                batch = next(data_iter)
                data_wait += time.perf_counter() - fetch
                micro_batches.append(batch)
                # index in the optimizer step's global batch: noise follows the sample, not the split
                first_index = (micro * self.dims.dp + self.dims.dp_rank) * batch["latents"].shape[0]
                loss, figs = micro_step(self.backend, self.objective, batch, self.step, first_index,
                                        scale=1.0 / accum, sync=micro == accum - 1)
                losses.append(loss)
                figures.append(figs)
            loss_value, objective_figures = self._mean_over_dp(losses, figures)
            grad_norm, stepped = self.backend.step(skip=not math.isfinite(loss_value))
            if stepped and self.ema is not None:
                self.ema.update()
            end = time.perf_counter()
            step_time, wall, started, previous_end = end - started, end - previous_end, end, end
            self.step += 1
            if sample_log is not None:
                for batch in micro_batches:
                    sample_log.write(self.step, batch)
            m = self._record(micro_batches, loss_value, lr, grad_norm, step_time, data_wait, skipped=not stepped,
                             objective=objective_figures, stalls=stalls, wall=wall)
            if cfg.train.telemetry:  # to /metrics and the dashboard: with the acks (GRPO: with its rewards)
                sink = batches if hasattr(batches, "report") else self.objective
                if hasattr(sink, "report"):
                    sink.report({**m.telemetry(), **self.metrics.wall.totals(), "run_dir": str(self.run_dir.resolve())})
            self._count_bad_steps(stepped, loss_value, grad_norm)
            # Every rank stops at the same step; a stopping run skips evaluation and previews, so
            # that it checkpoints within the launcher's shutdown timeout.
            stop = any_rank_true(self.stop_requested)
            checkpoint_stall = self.checkpointer.poll(self.model)  # publishes a save whose write is done
            eval_stall = 0.0
            kinds = self.evaluations.due(self.step) if self.evaluations is not None and not stop else []
            if kinds:
                eval_started = time.perf_counter()
                self.evaluate(kinds)
                eval_stall = time.perf_counter() - eval_started
            if stop or self.checkpoint_due(self.step):
                checkpoint_stall += self.checkpoint(batches)
                saved = self.step
            if stop:  # a stop waits for the write
                self.metrics.wall.add_stall(checkpoint_stall + self.checkpointer.finish(self.model), eval_stall)
                log.warning("stopped at step %d (checkpoint %s)", self.step, checkpoint_dir(self.run_dir, self.step))
                return
            stalls = (checkpoint_stall, eval_stall)
            if checkpoint_stall or eval_stall:
                started = time.perf_counter()
        stall = self.checkpoint(batches) if self.step > saved else 0.0
        self.metrics.wall.add_stall(stall + self.checkpointer.finish(self.model))

    def _count_bad_steps(self, stepped: bool, loss: float, grad_norm: float) -> None:
        if stepped:
            self.bad_steps = 0
            return
        self.bad_steps += 1
        log.warning("step %d skipped: loss %s, grad norm %s (%d in a row)", self.step, loss, grad_norm, self.bad_steps)
        if self.bad_steps >= self.cfg.train.max_bad_steps:
            raise TrainingError(f"{self.bad_steps} steps in a row with a non-finite loss or gradient (last: step "
                                f"{self.step}, loss {loss}, grad norm {grad_norm}); the last checkpoint holds "
                                "finite weights (train.max_bad_steps)")

    def _mean_over_dp(self, losses: list, figures: list[dict]) -> tuple[float, dict]:
        """The step's loss and the objective's figures, each the mean over micro-batches and DP
        ranks: one all-reduce and one host sync for all of them."""
        loss = torch.stack(losses).mean().float()
        names = sorted(figures[0])
        values = torch.stack([loss, *(torch.stack([torch.as_tensor(f[n]).to(loss.device, torch.float32)
                                                   for f in figures]).mean() for n in names)])
        values = values.cpu() if self.plan.device.type == "cpu" else values
        if self.dims.dp > 1:
            dist.all_reduce(values, group=dp_group())
            values = values / self.dims.dp
        loss, *rest = values.tolist()
        return loss, dict(zip(names, rest))

    def _batch_work(self, micro_batches) -> tuple[int, int, int]:
        """The step's model FLOPs, samples and image tokens over every DP rank, from its batches."""
        flops = samples = tokens = 0
        for batch in micro_batches:
            latents = batch["latents"]
            image_tokens = (latents.shape[-2] // 2) * (latents.shape[-1] // 2)
            cond = batch.get("cond_latents")
            cond_tokens = 0 if cond is None else (cond.shape[-2] // 2) * (cond.shape[-1] // 2)
            n = latents.shape[0] * self.dims.dp
            flops += step_flops(self.cfg.model, n, image_tokens, batch["prompt_embeds"].shape[1], cond_tokens)
            samples, tokens = samples + n, tokens + n * image_tokens
        return flops, samples, tokens

    def _record(self, micro_batches, loss, lr, grad_norm, step_time, data_wait, skipped: bool,
                objective: dict, stalls: tuple[float, float], wall: float) -> StepMetrics:
        if "model_flops" in objective:  # an objective that makes its own samples (GRPO) counts its work:
            per_rank = len(micro_batches) * self.dims.dp  # its figures are means over micro-batches and DP
            flops = objective.pop("model_flops") * per_rank
            global_batch, tokens = round(objective["images"] * per_rank), objective.pop("image_tokens") * per_rank
        else:
            flops, global_batch, tokens = self._batch_work(micro_batches)
        per_device = flops / self.dims.world_size / step_time
        m = StepMetrics(
            step=self.step, loss=loss, lr=lr, grad_norm=grad_norm, samples_per_second=global_batch / step_time,
            image_tokens_per_second=tokens / step_time, tflops_per_gpu=per_device / 1e12,
            mfu=mfu(flops, step_time, self.dims.world_size, self.peak) if self.peak else None,
            data_wait_fraction=data_wait / step_time, config_version=int(micro_batches[-1].get("config_version", 0)),
            step_time_s=step_time, global_batch_size=global_batch, skipped=skipped, objective=objective,
            data_wait_s=data_wait, checkpoint_stall_s=stalls[0], eval_stall_s=stalls[1], wall_s=wall,
            peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_initialized() else None)
        self.metrics.write(m)
        return m
