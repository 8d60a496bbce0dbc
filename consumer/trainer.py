"""Flow-matching training of the MMDiT with TP x DP: what one rank of `mmdit train` runs.

Three layers, as in torchtitan: a batch source whose fetches are timed, `train_step`, and the
outer loop (`Trainer`) with logging and checkpoints. The command itself (consumer/train.py)
checks the config and launches ranks without importing this module's model stack.
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
from mmdit.consumer.batch import StepInputs
from mmdit.consumer.checkpoint import (
    checkpoint_dir,
    load_checkpoint,
    prune_checkpoints,
    resume_checkpoint,
    save_checkpoint,
)
from mmdit.consumer.metrics import METRICS, MetricsWriter, StepMetrics, truncate_after
from mmdit.consumer.random_data import RandomBatches
from mmdit.consumer.sample_log import SAMPLES, SampleLog
from mmdit.consumer.schedule import lr_at as schedule_lr
from mmdit.model.attention import resolve_attention
from mmdit.model.flops import mfu, peak_flops, step_flops
from mmdit.model.flow import flow_matching_loss, noisy_input, sample_training_sigmas, velocity_target
from mmdit.model.init import init_weights
from mmdit.model.layers import transformer_engine_available
from mmdit.model.mmdit import build_mmdit
from mmdit.parallel.backend import build_backend, resolve_backend
from mmdit.parallel.compile import compile_blocks
from mmdit.parallel.recompute import apply_recompute_config
from mmdit.parallel.state import ParallelDims, any_rank_true, dp_group, init_parallel, tp_group
from mmdit.utils.atomic import atomic_write_json, atomic_write_text
from mmdit.utils.dtypes import resolve_dtype
from mmdit.utils.processes import ignore_repeated_sigterm

log = logging.getLogger("mmdit.train")


def compute_dtype(cfg: JobConfig) -> torch.dtype:
    return resolve_dtype(cfg.train.dtype, "cuda" if torch.cuda.is_available() else "cpu")


def lr_at(step: int, cfg: JobConfig) -> float:
    o = cfg.optimizer
    return schedule_lr(step, o.lr, o.min_lr, o.warmup_steps, o.decay_steps or cfg.train.steps, o.lr_schedule)


def sample_noise(cfg: JobConfig, step: int, first_index: int, x0: torch.Tensor, num_target: int):
    """Noise level and noise of each sample, drawn from a generator keyed by (seed, step, the
    sample's index in the global batch): the same whatever the DP size or micro-batch split."""
    sigmas, noise = [], []
    for i in range(x0.shape[0]):
        g = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 100_003 + first_index + i)
        sigmas.append(sample_training_sigmas(
            1, sampling=cfg.train.sigma_sampling, logit_mean=cfg.train.logit_mean, logit_std=cfg.train.logit_std,
            image_seq_len=num_target if cfg.train.shift_sigmas else None, generator=g))
        noise.append(torch.randn(x0.shape[1:], generator=g))
    return torch.cat(sigmas).to(x0.device), torch.stack(noise).to(x0.device)


def micro_step(backend, batch: dict, cfg: JobConfig, step: int, first_index: int, device, dtype,
               scale: float = 1.0, autocast: bool | None = None) -> torch.Tensor:
    """Forward and backward of one micro-batch; gradients add up (`scale` weighs this micro-batch's
    mean loss within the optimizer step). Returns the unscaled loss. `autocast`: run the forward
    under autocast to `dtype` (fp32 parameters); with parameters already in `dtype` (megatron's
    bf16 model) it stays off: autocast would bring norm outputs back as fp32 and recast them at
    every linear."""
    autocast = dtype != torch.float32 if autocast is None else autocast
    inputs = StepInputs.from_batch(batch, device, dtype)
    x0, num_target = inputs.x0, inputs.x0.shape[1]
    sigmas, noise = sample_noise(cfg, step, first_index, x0, num_target)
    x_s = noisy_input(x0, noise, sigmas).to(dtype)
    tokens = x_s if inputs.cond_tokens is None else torch.cat([x_s, inputs.cond_tokens], dim=1)
    with torch.autocast(device.type, dtype=dtype, enabled=autocast):
        pred = backend.model(tokens, inputs.txt, inputs.txt_mask, sigmas, inputs.image_shapes)
    # The loss covers target tokens only: condition-image tokens are inputs, not predictions.
    loss = flow_matching_loss(pred[:, :num_target].float(), velocity_target(x0, noise))
    (loss * scale).backward()
    return loss.detach()


def train_step(backend, batch: dict, cfg: JobConfig, step: int, first_index: int, device, dtype) -> torch.Tensor:
    """One optimizer step's forward and backward on one micro-batch (no accumulation)."""
    backend.zero_grad()
    return micro_step(backend, batch, cfg, step, first_index, device, dtype)


class TrainingError(RuntimeError):
    """Training cannot go on (too many non-finite steps in a row); the message says why."""


class Trainer:
    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.run.dir)
        self.dims: ParallelDims = init_parallel(cfg.parallel.tp)
        self.rank0 = dist.get_rank() == 0
        self.device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
        self.dtype = compute_dtype(cfg)
        use_te = cfg.parallel.layers == "te" or (cfg.parallel.layers == "auto" and transformer_engine_available()
                                                 and not cfg.parallel.sequence_parallel)
        on_gpu = self.device.type == "cuda"
        backend_name = resolve_backend(cfg.parallel)
        # megatron's optimizer keeps fp32 main weights itself, so its model holds bf16 params.
        params_dtype = self.dtype if backend_name == "megatron" else torch.float32
        self.model = build_mmdit(cfg.model, tp_group(), device=self.device, use_te=use_te, params_dtype=params_dtype,
                                 attention=resolve_attention(cfg.parallel.attention),
                                 sequence_parallel=cfg.parallel.sequence_parallel)
        if cfg.checkpoint.init_from:
            from mmdit.model.checkpoint import load_weights

            load_weights(self.model, cfg.checkpoint.init_from)
        else:
            init_weights(self.model, cfg.seed)
        self.model.to(params_dtype)
        self.autocast = self.dtype != torch.float32 and params_dtype == torch.float32
        apply_recompute_config(self.model, cfg.parallel)
        if cfg.parallel.compile:
            compile_blocks(self.model)
        self.backend = build_backend(self.model, cfg.parallel, cfg.optimizer, tp_group(), dp_group(), self.model.config)
        self.step, self.bad_steps = 0, 0
        self._encoders = None  # loaded for the first preview
        self.data_state: dict = {}
        resume = resume_checkpoint(self.run_dir) if cfg.checkpoint.resume else None  # raises before anything is written
        if resume is not None:
            state, self.data_state = load_checkpoint(resume, self.model, self.backend, self.dims)
            self.step = state["step"]
            log.info("resumed from %s at step %d", resume, self.step)
        if self.rank0:  # the config is accepted: record it, and forget what ran after the checkpoint
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.yaml", config_yaml(cfg))
            for name in (METRICS, SAMPLES):
                truncate_after(self.run_dir / name, self.step)
            prune_checkpoints(self.run_dir, cfg.checkpoint.keep, cfg.checkpoint.keep_every, resumed_from=resume)
        per_round = cfg.train.micro_batch_size * self.dims.dp
        if cfg.train.global_batch_size % per_round:
            raise ConfigError(f"invalid config: train.global_batch_size={cfg.train.global_batch_size} must be a "
                              f"multiple of train.micro_batch_size x DP = {per_round}")
        self.accumulation = max(1, cfg.train.global_batch_size // per_round)
        self.metrics = MetricsWriter(self.run_dir, enabled=self.rank0, log_every=cfg.train.log_every,
                                     tensorboard=cfg.train.tensorboard)
        self.peak = cfg.train.peak_tflops * 1e12 or (peak_flops(torch.cuda.get_device_name()) if on_gpu else None)
        self.stop_requested = False
        self.evaluator = self._evaluator() if cfg.eval.every else None
        log.info("backend %s | layers %s | attention %s | tp %d%s x dp %d | dtype %s | recompute %s | device %s",
                 self.backend.name, "transformer-engine" if use_te else "megatron-local", self.model.attention,
                 self.dims.tp, " (sequence parallel)" if self.model.sequence_parallel_group else "", self.dims.dp,
                 str(self.dtype).removeprefix("torch."), cfg.parallel.recompute, self.device)

    def _evaluator(self):
        from mmdit.consumer.evaluation import Evaluator, held_out_records, random_held_out

        t, e = self.cfg.train, self.cfg.eval
        if t.data_source == "random":
            samples = random_held_out(self.cfg.model, t, self.cfg.seed, e.max_samples)
        elif self.cfg.data.eval_fraction > 0:
            samples = held_out_records(self.cfg.cache.dir, self.cfg.service.fingerprint, self.cfg.data.eval_fraction,
                                       e.max_samples)
        else:
            log.warning("eval.every is set but data.eval_fraction is 0: nothing is held out, no evaluation")
            return None
        if not samples:
            log.warning("no held-out sample in the cache: no evaluation")
            return None
        return Evaluator(samples, e.sigmas, self.dims.dp_rank, self.dims.dp, dp_group())

    def evaluate(self) -> None:
        result = self.evaluator.run(self.backend.module, self.device, self.dtype)
        self.metrics.write_eval(self.step, result)

    def preview(self) -> None:
        """Sample the fixed prompts (consumer/preview.py): the TP group of DP rank 0 does."""
        if self.dims.dp_rank != 0:
            return
        from mmdit.consumer.preview import preview_dir, write_previews

        if self._encoders is None:
            from mmdit.producer.encoders import Encoders

            self._encoders = Encoders.load(self.cfg.encoders)
        paths = write_previews(self.backend.module, self._encoders, self.cfg.eval,
                               preview_dir(self.run_dir, self.step), write=self.dims.tp_rank == 0)
        if paths:
            log.info("step %d: samples in %s", self.step, paths[-1].parent)

    def batches(self):
        if self.cfg.train.data_source == "random":
            return RandomBatches(self.cfg.model, self.cfg.train, self.cfg.seed, self.dims.dp_rank, self.dims.dp,
                                 start_step=self.step * self.accumulation)
        from mmdit.dataservice.client import trainer_batches

        return trainer_batches(self.cfg, self.dims, self.data_state)

    def checkpoint(self, batches) -> None:
        save_checkpoint(self.run_dir, self.step, self.model, self.backend, self.dims, batches.state(),
                        {"seed": self.cfg.seed})
        if self.rank0:
            prune_checkpoints(self.run_dir, self.cfg.checkpoint.keep, self.cfg.checkpoint.keep_every)

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
        finally:
            for sig, handler in handlers.items():
                if not (self.stop_requested and sig == signal.SIGTERM):  # ignored until the rank exits
                    signal.signal(sig, handler)
            if hasattr(batches, "close"):
                batches.close()  # acks what arrived and leaves the data service
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
        started = time.perf_counter()
        while self.step < cfg.train.steps:
            lr = lr_at(self.step, cfg)
            self.backend.set_lr(lr)
            self.backend.zero_grad()
            data_wait, losses, micro_batches = 0.0, [], []
            for micro in range(accum):
                fetch = time.perf_counter()
                batch = next(data_iter)
                data_wait += time.perf_counter() - fetch
                micro_batches.append(batch)
                # index in the optimizer step's global batch: noise follows the sample, not the split
                first_index = (micro * self.dims.dp + self.dims.dp_rank) * batch["latents"].shape[0]
                with self.backend.no_sync() if micro < accum - 1 else contextlib.nullcontext():
                    losses.append(micro_step(self.backend, batch, cfg, self.step, first_index, self.device,
                                             self.dtype, scale=1.0 / accum, autocast=self.autocast))
            loss_value = self._mean_over_dp(torch.stack(losses).mean())
            grad_norm, stepped = self.backend.step(skip=not math.isfinite(loss_value))
            step_time, started = time.perf_counter() - started, time.perf_counter()
            self.step += 1
            if sample_log is not None:
                for batch in micro_batches:
                    sample_log.write(self.step, batch)
            m = self._record(micro_batches, loss_value, lr, grad_norm, step_time, data_wait, skipped=not stepped)
            if cfg.train.telemetry and hasattr(batches, "report"):  # to /metrics and the dashboard, with the acks
                batches.report(m.telemetry())
            self._count_bad_steps(stepped, loss_value, grad_norm)
            # Every rank stops at the same step; a stopping run skips evaluation and previews, so
            # that it checkpoints within the launcher's shutdown timeout.
            stop = any_rank_true(self.stop_requested)
            if not stop and self.evaluator is not None and self.step % cfg.eval.every == 0:
                self.evaluate()
                started = time.perf_counter()  # evaluation is not the next step's time
            if not stop and cfg.eval.sample_every and self.step % cfg.eval.sample_every == 0:
                self.preview()
                started = time.perf_counter()
            if stop or (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0):
                self.checkpoint(batches)
                saved, started = self.step, time.perf_counter()
            if stop:
                log.warning("stopped at step %d (checkpoint %s)", self.step, checkpoint_dir(self.run_dir, self.step))
                return
        if self.step > saved:
            self.checkpoint(batches)

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

    def _mean_over_dp(self, loss: torch.Tensor) -> float:
        loss = loss.float().cpu() if self.device.type == "cpu" else loss.float()
        if self.dims.dp > 1:
            dist.all_reduce(loss, group=dp_group())
            loss = loss / self.dims.dp
        return loss.item()

    def _record(self, micro_batches, loss, lr, grad_norm, step_time, data_wait, skipped: bool) -> StepMetrics:
        flops = global_batch = tokens = 0
        for batch in micro_batches:
            latents = batch["latents"]
            image_tokens = (latents.shape[-2] // 2) * (latents.shape[-1] // 2)
            cond = batch.get("cond_latents")
            cond_tokens = 0 if cond is None else (cond.shape[-2] // 2) * (cond.shape[-1] // 2)
            samples = latents.shape[0] * self.dims.dp
            flops += step_flops(self.cfg.model, samples, image_tokens, batch["prompt_embeds"].shape[1], cond_tokens)
            global_batch, tokens = global_batch + samples, tokens + samples * image_tokens
        per_device = flops / self.dims.world_size / step_time
        m = StepMetrics(
            step=self.step, loss=loss, lr=lr, grad_norm=grad_norm, samples_per_second=global_batch / step_time,
            image_tokens_per_second=tokens / step_time, tflops_per_gpu=per_device / 1e12,
            mfu=mfu(flops, step_time, self.dims.world_size, self.peak) if self.peak else None,
            data_wait_fraction=data_wait / step_time, config_version=int(micro_batches[-1].get("config_version", 0)),
            step_time_s=step_time, global_batch_size=global_batch, skipped=skipped)
        self.metrics.write(m)
        return m
