"""`mmdit vae-train`'s loop: the decoder fine-tune, data-parallel over local or SLURM ranks.

Three layers, as in consumer/trainer.py: `Prefetch` prepares the next step's crops in a thread
(and times the wait), `VaeTrainer.step` takes one optimizer step, `VaeTrainer.run` is the loop
with evaluation, checkpoints and the export.

Data parallelism is torch DDP (gloo on CPU, NCCL on GPU), not FSDP2: the release decoder has
73.3M parameters, so its fp32 weights, gradients and AdamW moments come to 1.2 GB per rank (1% of
an 80 GB GPU), while the activations of its full-resolution blocks, which FSDP does not shard,
dominate memory (vae.recompute checkpoints them). FSDP2 would all-gather every block's weights in
forward and again in backward to save under 1 GB; DDP moves each gradient once, in buckets
overlapped with backward. Weights and optimizer state stay fp32; compute runs in bf16 autocast
where the GPU supports it.

Every crop is a function of (seed, step, index in the global batch) and the loss of a step is the
mean over its global batch, so a resumed run repeats the uninterrupted one exactly and any DP x
accumulation split of the same global batch takes the same steps (up to summation order).
"""

from __future__ import annotations

import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist

from mmdit.config.job import JobConfig
from mmdit.config.vae import check_vae_job
from mmdit.consumer.metrics import METRICS, MetricsWriter, StepMetrics, append_record, truncate_after
from mmdit.consumer.schedule import lr_at
from mmdit.consumer.vae import checkpoint as ckpt
from mmdit.consumer.vae.data import CropSampler, micro_batch_indices, pool_identity, scan
from mmdit.consumer.vae.evaluation import ReconstructionEval, held_out_crops
from mmdit.consumer.vae.losses import DecoderLoss, perceptual_weight_at
from mmdit.consumer.vae.model import DecoderPath, load_vae, trainable_state, vae_folder
from mmdit.utils.atomic import atomic_write_json

log = logging.getLogger("mmdit.vae")

DATA_REPORT = "vae_data.json"
EVAL_DIR = "vae_eval"
EXPORT_DIR = "export"


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        supported = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if supported else torch.float32
    return torch.bfloat16 if name == "bf16" else torch.float32


class Prefetch:
    """The micro-batches of step N+1 are read and cropped while step N computes."""

    def __init__(self, make):
        self.make, self.pool, self.pending = make, ThreadPoolExecutor(1, thread_name_prefix="mmdit-vae-data"), {}

    def get(self, step: int, then: int | None) -> tuple[list[torch.Tensor], float]:
        """(step's micro-batches, seconds waited for them); starts preparing step `then`."""
        started = time.perf_counter()
        future = self.pending.pop(step, None) or self.pool.submit(self.make, step)
        batches = future.result()
        waited = time.perf_counter() - started
        if then is not None and then not in self.pending:
            self.pending[then] = self.pool.submit(self.make, then)
        return batches, waited

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class VaeTrainer:
    def __init__(self, cfg: JobConfig, stop=None):
        self.cfg, self.vc, self.run_dir = cfg, cfg.vae, Path(cfg.run.dir)
        self.stop = stop

    # ------------------------------------------------------------------------------ setup

    def setup(self) -> None:
        from torch.nn.parallel import DistributedDataParallel

        from mmdit.consumer.vae.perceptual import LPIPS
        from mmdit.parallel.state import init_distributed

        init_distributed()
        vc = self.vc
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.accum = check_vae_job(vc, self.cfg.encoders.dir, self.world)
        self.global_batch = vc.micro_batch_size * self.world * self.accum
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        self.dtype = compute_dtype(vc.dtype, self.device)
        self.base_root = Path(vc.model or self.cfg.encoders.dir)
        self.base_vae = vae_folder(self.base_root)
        self.vae = load_vae(self.base_vae, self.device)
        self.decoder = DecoderPath(self.vae, vc.recompute)
        self.params = {n: p for n, p in self.vae.named_parameters() if p.requires_grad}
        self.optimizer_steps = 0  # steps that updated the weights (a non-finite one does not): AdamW's count
        o = vc.optimizer
        decay = [p for p in self.params.values() if p.ndim > 1]
        rest = [p for p in self.params.values() if p.ndim <= 1]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                            {"params": rest, "weight_decay": 0.0}],
                                           lr=o.lr, betas=(o.adam_beta1, o.adam_beta2))
        lpips = LPIPS.load(vc.perceptual_dir).to(self.device) if vc.uses_perceptual else None
        self.loss = DecoderLoss(vc, lpips)
        self.flops = self.step_flops()  # before DDP wraps the decoder: this backward is no step
        self.model, self.backend = self.decoder, "single"
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.decoder, device_ids=ids)
            self.backend = f"torch-ddp ({dist.get_backend()})"
        self._setup_data()
        self.metrics = MetricsWriter(self.run_dir, enabled=self.rank == 0, log_every=vc.log_every,
                                     tensorboard=vc.tensorboard)
        n_params = sum(p.numel() for p in self.params.values())
        frozen = sum(p.numel() for p in self.vae.parameters()) - n_params
        self.log0(f"vae-train: {self.base_vae}, decoder {n_params / 1e6:.2f}M trained, {frozen / 1e6:.2f}M frozen; "
                  f"DP={self.world} ({self.backend}), {self.dtype}, global batch {self.global_batch} = "
                  f"{vc.micro_batch_size} x {self.world} x {self.accum} of {vc.crop_size}px crops, "
                  f"recompute {'on' if vc.recompute else 'off'}, perceptual {'LPIPS' if lpips else 'off'}")

    def _setup_data(self) -> None:
        from mmdit.dataservice.plan import held_out
        from mmdit.producer.ingest import ErrorLog

        vc, errors = self.vc, ErrorLog()
        text = scan(vc.text_shards, errors)
        general = scan(vc.general_shards, errors) if vc.general_shards else []
        self.held = [r for r in text if held_out(r.key, vc.eval_fraction)]
        train_text = [r for r in text if not held_out(r.key, vc.eval_fraction)]
        self.sampler = CropSampler(train_text, general, self.cfg.seed, vc.crop_size, vc.text_fraction,
                                   self.global_batch)
        self.data_identity = {"text": pool_identity(train_text), "general": pool_identity(general)}
        self.data_report = {"text_images": len(train_text), "general_images": len(general),
                            "held_out_images": len(self.held), "errors": dict(sorted(errors.counts.items())),
                            "text_per_batch": self.sampler.text_per_batch, "global_batch": self.global_batch}
        if errors.errors:
            first = errors.errors[0]
            self.data_report["first_error"] = f"{first.reason}: {first.key!r} in {first.url}"
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.run_dir / DATA_REPORT, self.data_report)
        skipped = sum(errors.counts.values())
        self.log0(f"data: {len(train_text)} text-rich + {len(general)} general images, {len(self.held)} held out, "
                  f"{skipped} bad inputs skipped" + (f" ({self.data_report['errors']})" if skipped else ""))

    def log0(self, message: str) -> None:
        if self.rank == 0:
            log.info(message)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16)

    # ------------------------------------------------------------------------------ one step

    def micro_batches(self, step: int) -> list[torch.Tensor]:
        return [self.sampler.batch(step, micro_batch_indices(r, self.rank, self.world, self.vc.micro_batch_size))
                for r in range(self.accum)]

    def step(self, step: int, batches: list[torch.Tensor], stop: bool) -> tuple[dict, bool]:
        """One optimizer step over the global batch; (figures, some rank asked to stop)."""
        from mmdit.consumer.vae.model import encode

        sums = torch.zeros(4, dtype=torch.float64)  # loss, reconstruction, perceptual, stop
        for r, x in enumerate(batches):
            sums[:3] += self._forward_backward(step, x, encode, last=r == len(batches) - 1)
        sums[3] = float(stop)
        return self._update(step, sums)

    def step_flops(self) -> float:
        """FLOPs of one rank's step (encoder forward, decoder forward and backward, the losses),
        counted on a throwaway micro-batch of the unwrapped decoder before training: counted
        during a real step, the counter's dispatch changes the last bits of some kernels and a
        resumed run would drift from the uninterrupted one."""
        from torch.utils.flop_counter import FlopCounterMode

        from mmdit.consumer.vae.model import encode

        x = torch.zeros(self.vc.micro_batch_size, 3, self.vc.crop_size, self.vc.crop_size, device=self.device)
        with FlopCounterMode(display=False) as counter:
            with self.autocast():
                per_sample, _ = self.loss(self.decoder(encode(self.vae, x)), x, 0)
            per_sample.sum().backward()
        self.optimizer.zero_grad(set_to_none=True)
        return float(counter.get_total_flops() * self.accum)

    def _forward_backward(self, step: int, x: torch.Tensor, encode, last: bool) -> torch.Tensor:
        """One micro-batch's gradients (DDP all-reduces them on the `last`); its sums of the loss
        and of each term."""
        x = x.to(self.device, non_blocking=True)
        with self.autocast():
            z = encode(self.vae, x)
        sync = self.world == 1 or last
        with (contextlib.nullcontext() if sync else self.model.no_sync()), self.autocast():
            out = self.model(z)
            per_sample, terms = self.loss(out, x, step)
        # DDP averages gradients over ranks: x world makes the result the global batch's mean
        (per_sample.sum() * (self.world / self.global_batch)).backward()
        return torch.stack([per_sample.detach().sum(), terms["reconstruction"].sum(),
                            terms.get("perceptual", torch.zeros(1, device=x.device)).sum()]).double().cpu()

    def _update(self, step: int, sums: torch.Tensor) -> tuple[dict, bool]:
        """Pool the ranks' sums, clip, step the optimizer (unless non-finite); (figures, stop)."""
        if self.world > 1:
            reduced = sums.to(self.device)
            dist.all_reduce(reduced)
            sums = reduced.cpu()
        clip = self.vc.optimizer.grad_clip or float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(list(self.params.values()), clip))
        loss = float(sums[0]) / self.global_batch
        finite = torch.isfinite(torch.tensor([loss, grad_norm])).all().item()
        if finite:
            self.optimizer.step()
            self.optimizer_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        figures = {"loss": loss, "grad_norm": grad_norm, "skipped": not finite,
                   "objective": {"reconstruction": float(sums[1]) / self.global_batch}}
        if self.loss.lpips is not None:
            figures["objective"]["perceptual"] = float(sums[2]) / self.global_batch
            figures["objective"]["perceptual_weight"] = perceptual_weight_at(
                step, self.vc.perceptual_weight_start, self.vc.perceptual_weight, self.vc.perceptual_ramp_steps)
        return figures, bool(sums[3] > 0)

    # ------------------------------------------------------------------------------ the loop

    def run(self) -> dict:
        self.setup()
        vc = self.vc
        evaluator = self._evaluator()
        if evaluator is not None:  # the base model: "before"
            before = self._evaluate(evaluator, 0, record=False)
        start, self.optimizer_steps = self._resume()
        if self.rank == 0:
            truncate_after(self.run_dir / METRICS, start)
            if start == 0 and evaluator is not None:
                self._record(0, before)
        prefetch = Prefetch(self.micro_batches)
        bad_in_a_row, last_saved, after, step = 0, start, None, start
        try:
            for step in range(start, vc.steps):
                lr = lr_at(step, vc.optimizer.lr, vc.optimizer.min_lr, vc.optimizer.warmup_steps,
                           vc.optimizer.decay_steps or vc.steps, vc.optimizer.lr_schedule)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                t0 = time.perf_counter()
                batches, waited = prefetch.get(step, step + 1 if step + 1 < vc.steps else None)
                figures, stop = self.step(step, batches, self.stop is not None and self.stop.is_set())
                elapsed = time.perf_counter() - t0
                self.metrics.write(self._step_metrics(step + 1, lr, figures, elapsed, waited))
                bad_in_a_row = bad_in_a_row + 1 if figures["skipped"] else 0
                if bad_in_a_row >= self.cfg.train.max_bad_steps:
                    raise FloatingPointError(f"{bad_in_a_row} steps in a row with a non-finite loss or gradient "
                                             f"(step {step + 1}); stopping")
                done = step + 1
                if vc.save_every and done % vc.save_every == 0 or stop:
                    self._save(done)
                    last_saved = done
                if evaluator is not None and vc.eval_every and done % vc.eval_every == 0 and done < vc.steps:
                    self._evaluate(evaluator, done)
                if stop:
                    self.log0(f"stopped at step {done} (checkpointed)")
                    break
            else:
                done = max(start, vc.steps)
                if done > last_saved:
                    self._save(done)
                if evaluator is not None and done > start:
                    after = self._evaluate(evaluator, done)
                if vc.export and self.rank == 0:
                    from mmdit.consumer.vae.export import export_layout

                    out = export_layout(self.base_root, trainable_state(self.vae), self.run_dir / EXPORT_DIR)
                    self.log0(f"exported the fine-tuned VAE to {out} (vae/ new, other components linked)")
        finally:
            prefetch.close()
            self.metrics.close()
        summary = self.metrics.summary(data=self.data_report, before=evaluator and evaluator.before_figures,
                                       after=after, export=str(self.run_dir / EXPORT_DIR) if vc.export else None)
        if self.rank == 0:
            atomic_write_json(self.run_dir / "summary.json", summary)
        return summary

    def _evaluator(self) -> ReconstructionEval | None:
        if self.rank != 0 or not self.held or not self.vc.eval_max_samples:
            return None
        keys, images = held_out_crops(self.held, self.vc.eval_size, self.vc.eval_max_samples)
        ocr = None
        if self.vc.eval_ocr:
            from mmdit.consumer.text_eval.ocr import OcrEngine

            ocr = OcrEngine()
        return ReconstructionEval(keys, images, self.run_dir / EVAL_DIR, self.vc.eval_pairs, ocr)

    def _evaluate(self, evaluator: ReconstructionEval, step: int, record: bool = True) -> dict:
        with self.autocast():
            result = evaluator.run(self.vae, self.decoder, step)
        if record:
            self._record(step, result)
        return result

    def _record(self, step: int, result: dict) -> None:
        append_record(self.run_dir / METRICS, {"step": step, **result})
        ocr = "" if result.get("word_accuracy") is None else (
            f", OCR word accuracy {result['word_accuracy']:.3f} over {result['ocr_images']} images")
        before = f" (before: {result['psnr_before']:.2f} dB)" if "psnr_before" in result else ""
        log.info(f"step {step:6d} | eval: PSNR {result['psnr']:.2f} dB{before}, SSIM {result['ssim']:.4f}{ocr} "
                 f"on {result['samples']} held-out crops")
        board = self.metrics.board
        if board is not None:
            for name in ("psnr", "ssim", "word_accuracy"):
                if result.get(name) is not None:
                    board.add_scalar(f"eval/vae/{name}", result[name], step)

    def _step_metrics(self, step: int, lr: float, figures: dict, elapsed: float, waited: float) -> StepMetrics:
        from mmdit.model.flops import peak_flops

        tflops = self.flops / elapsed / 1e12
        peak = peak_flops(torch.cuda.get_device_name(self.device)) if self.device.type == "cuda" else None
        tokens = self.global_batch * (self.vc.crop_size // 16) ** 2  # as the MMDiT counts image tokens
        return StepMetrics(step=step, loss=figures["loss"], lr=lr, grad_norm=figures["grad_norm"],
                           samples_per_second=self.global_batch / elapsed, image_tokens_per_second=tokens / elapsed,
                           tflops_per_gpu=tflops, mfu=tflops * 1e12 / peak if peak else None,
                           data_wait_fraction=min(1.0, waited / elapsed), config_version=0, step_time_s=elapsed,
                           global_batch_size=self.global_batch, skipped=figures["skipped"],
                           objective=figures["objective"])

    # ------------------------------------------------------------------------------ checkpoints

    def _trainer_state(self) -> dict:
        from mmdit.producer.encoders import encoder_half_identity

        return {"seed": self.cfg.seed, "dp": self.world, "backend": self.backend, "base": str(self.base_vae),
                "encoder_half": encoder_half_identity(self.base_vae), "optimizer_steps": self.optimizer_steps,
                "global_batch": self.global_batch}

    def _save(self, step: int) -> None:
        from mmdit.parallel.state import barrier

        if self.rank == 0:
            path = ckpt.save(self.run_dir, step, self.params, self.optimizer,
                             {"step": step, "pools": self.data_identity}, self._trainer_state())
            ckpt.prune(self.run_dir, self.vc.keep)
            log.info(f"checkpoint {path}")
        barrier()

    def _resume(self) -> tuple[int, int]:
        """(first step to run, optimizer steps taken) after loading the newest valid checkpoint."""
        from mmdit.parallel.state import all_gather_objects

        if not self.vc.resume:
            return 0, 0
        found = all_gather_objects(str(ckpt.newest_valid(self.run_dir) or "") if self.rank == 0 else None)[0]
        if not found:
            return 0, 0
        path = Path(found)
        state, data = ckpt.load(path, self.params, self.optimizer)
        mine = self._trainer_state()
        if state.get("encoder_half") != mine["encoder_half"]:
            raise ckpt.CheckpointError(f"{path} fine-tunes the decoder of another VAE (encoder half differs from "
                                       f"{self.base_vae}'s); use its base or another run.dir")
        if state.get("global_batch") != self.global_batch:
            log.warning("resuming %s with global batch %d (saved with %s): the crops differ from the "
                        "uninterrupted run's from here on", path.name, self.global_batch, state.get("global_batch"))
        if data.get("pools") != self.data_identity:
            log.warning("resuming %s over other images than it was trained on (the shards changed)", path.name)
        self.log0(f"resumed from {path} (step {state['step']})")
        return int(state["step"]), int(state.get("optimizer_steps", state["step"]))

