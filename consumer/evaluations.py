"""The evaluations of a model at a step, one slot per kind, run by the trainer ranks
(train.eval_on=trainer) or by the evaluator process (consumer/evaluator.py) with the same code:

    loss            the held-out flow loss at fixed noise levels (consumer/evaluation.py), every eval.every
    previews        the fixed prompts' images into samples/step_N/ (consumer/preview.py), every eval.sample_every
    text_rendering  OCR word accuracy and 1-NED into eval/step_N/ (consumer/text_eval/), every eval.text_every

So the same weights give the same figures and the same images wherever they are evaluated. Each
returns the record metrics.jsonl gets (consumer/metrics.py), on the rank that writes it (rank 0)
and None elsewhere. What an evaluation needs besides the model (held-out samples, the encoders,
the OCR engine) is loaded once, on first use.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mmdit.config import ConfigError
from mmdit.config.job import JobConfig
from mmdit.config.train import evaluations_due

log = logging.getLogger("mmdit.eval")


class _GeneratingOnly:
    """The OCR engine of a TP rank other than 0: it generates with the others and reads nothing."""

    name = "none (generating only)"


def alignment_scorer(setting: str, encoders_dir: str | None):
    """The image-prompt alignment model `eval.text.alignment_model` names (auto:
    <encoders>/alignment when it exists; none: no alignment score)."""
    from mmdit.producer.annotate.alignment import AlignmentScorer

    if setting in ("none", ""):
        return None
    if setting == "auto":
        found = Path(encoders_dir or "") / "alignment"
        return AlignmentScorer.load(str(found)) if encoders_dir and (found / "config.json").is_file() else None
    if not (Path(setting) / "config.json").is_file():
        raise ConfigError(f"eval.text.alignment_model={setting!r} has no config.json (a CLIP or SigLIP directory)")
    return AlignmentScorer.load(setting)


class Evaluations:
    """A run's evaluations as its config sets them, for a model split as `dims` says."""

    def __init__(self, cfg: JobConfig, run_dir: Path, dims, dp_group):
        e = cfg.eval
        if (e.sample_every or e.text_every) and not cfg.encoders.dir:
            raise ConfigError("eval.sample_every and eval.text_every need encoders.dir (the VAE and Qwen2.5-VL that "
                              "turn prompts into images)")
        self.cfg, self.run_dir, self.dims, self.dp_group = cfg, Path(run_dir), dims, dp_group
        self.loss = self._held_out() if e.every else None
        self._encoders = None
        self._text = None

    def due(self, step: int) -> list[str]:
        """The evaluations due at `step` (the loss only when there are held-out samples)."""
        return [k for k in evaluations_due(self.cfg.eval, step) if k != "loss" or self.loss is not None]

    def run(self, model, plan, step: int, kinds: list[str]) -> list[dict]:
        """Run `kinds` on `model` (this rank's shard, run as `plan` says); the records to write,
        on rank 0. Collective over the model's ranks. The model is left in training mode."""
        records = []
        try:
            for kind in kinds:
                record = getattr(self, f"_{kind}")(model, plan, step)
                if record is not None:
                    records.append(record)
        finally:
            model.train()
        return records

    # ------------------------------------------------------------------------- the slots

    def _loss(self, model, plan, step: int) -> dict:
        return self.loss.run(model, plan)

    def _previews(self, model, plan, step: int) -> dict | None:
        """The TP group of DP rank 0 samples together; its TP rank 0 writes."""
        if self.dims.dp_rank != 0:
            return None
        from mmdit.consumer.preview import preview_dir, write_previews

        out = preview_dir(self.run_dir, step)
        paths = write_previews(model, plan, self.encoders(), self.cfg.eval, out, write=self.dims.tp_rank == 0)
        if not paths:
            return None
        return {"eval": "preview", "dir": out.relative_to(self.run_dir).as_posix(), "images": len(paths) - 1}

    def _text_rendering(self, model, plan, step: int) -> dict | None:
        """The TP group of DP rank 0 generates the prompt set together; its TP rank 0 reads and scores."""
        if self.dims.dp_rank != 0:
            return None
        from mmdit.consumer.sample import Sampler
        from mmdit.consumer.text_eval import eval_dir

        sampler, evaluation = Sampler(model, plan, self.encoders()), self.text_evaluation()
        if self.dims.tp_rank != 0:
            evaluation.generate(sampler)
            return None
        out = eval_dir(self.run_dir, step)
        summary = evaluation.run(sampler, out)
        return {**{k: v for k, v in summary.items() if k != "settings"}, "dir": out.relative_to(self.run_dir).as_posix()}

    # ------------------------------------------------------------------------- what they need

    def encoders(self):
        if self._encoders is None:
            from mmdit.producer.encoders import Encoders

            self._encoders = Encoders.load(self.cfg.encoders)
        return self._encoders

    def text_evaluation(self):
        if self._text is None:
            from mmdit.consumer.text_eval import PromptSetError, TextRenderingEval

            settings = self.cfg.eval.text
            try:
                if self.dims.tp_rank != 0:
                    self._text = TextRenderingEval(settings, engine=_GeneratingOnly())
                else:
                    self._text = TextRenderingEval(settings, alignment=alignment_scorer(settings.alignment_model,
                                                                                       self.cfg.encoders.dir))
            except PromptSetError as e:
                raise ConfigError(f"eval.text.prompts: {e}") from None
        return self._text

    def _held_out(self):
        from mmdit.consumer.evaluation import HeldOutLoss, held_out_records, random_held_out

        cfg, e = self.cfg, self.cfg.eval
        if cfg.train.data_source == "random":
            samples = random_held_out(cfg.model, cfg.train, cfg.seed, e.max_samples)
        elif cfg.data.eval_fraction > 0:
            samples = held_out_records(cfg.cache.dir, cfg.service.fingerprint, cfg.data.eval_fraction, e.max_samples)
        else:
            log.warning("eval.every is set but data.eval_fraction is 0: nothing is held out, no evaluation")
            return None
        if not samples:
            log.warning("no held-out sample in the cache: no evaluation")
            return None
        return HeldOutLoss(samples, e.sigmas, self.dims.dp_rank, self.dims.dp, self.dp_group)
