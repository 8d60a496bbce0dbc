"""`mmdit eval RUN_OR_CKPT [prompts=FILE] [limit=N] [key=value ...]`: how well a checkpoint renders text.

Generates every prompt of a prompt set (the built-in 100 English and Chinese prompts, or a JSONL
file: prompt, target_texts, language, kind) with the checkpoint's weights, reads each image with
a real OCR engine (RapidOCR, PP-OCR models bundled: offline) and scores the reading against the
text the prompt asks for: word accuracy and 1 - NED, overall, per language (en, zh) and per kind
(single_line, multi_region, paragraph), plus the image-prompt alignment of a CLIP/SigLIP model.

Writes the images, results.json and index.html (each image beside its reading and scores) to
`out=DIR`, by default run.dir/eval/step_N/ for a run's checkpoint (step_N-ema/ with `weights=ema`:
the checkpoint's EMA weights, parallel/ema.py); a run's evaluation is also
appended to its metrics.jsonl as {"step": N, "eval": "text_rendering", ...} (and to its
TensorBoard when it has one). Prints the summary as one JSON line. Exit 2: a bad prompt file.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, fields
from pathlib import Path

from mmdit.config import ConfigError
from mmdit.config.text_eval import TextEvalConfig
from mmdit.launch.args import Action, Command, parse


@dataclass
class EvalArgs(TextEvalConfig):
    """`mmdit eval`'s keys: the evaluation's settings (TextEvalConfig) and where things are."""

    out: str = ""
    """Directory for the images, results.json and index.html; default run.dir/eval/step_N/."""
    encoders: str = ""
    """The VAE and Qwen2.5-VL (a Qwen-Image-layout directory); default: the run's encoders.dir."""
    record: bool = True
    """Append the summary to the run's metrics.jsonl (a run's checkpoint only)."""
    weights: str = "raw"
    """raw: the trained weights | ema: their moving average (a run with train.ema_decay > 0)."""

    def __post_init__(self):
        super().__post_init__()
        if self.negative_prompt in ('""', "''"):  # written without a shell to remove the quotes
            self.negative_prompt = ""
        if self.weights not in ("raw", "ema"):
            raise ValueError(f"weights must be raw or ema, got {self.weights!r}")

    def settings(self) -> TextEvalConfig:
        return TextEvalConfig(**{f.name: getattr(self, f.name) for f in fields(TextEvalConfig)})


COMMAND = Command("eval", __doc__, actions=(Action(
    paths={"RUN_OR_CKPT": "a run directory (its newest checkpoint), a run's checkpoints/step_N, or a model checkpoint"},
    keys=EvalArgs, overrides=None),))


def alignment_scorer(setting: str, encoders_dir: str | None):
    """The AlignmentScorer `alignment_model` names (auto: <encoders>/alignment if it exists), or None."""
    from mmdit.producer.annotate.alignment import AlignmentScorer

    if setting in ("none", ""):
        return None
    if setting == "auto":
        found = Path(encoders_dir or "") / "alignment"
        return AlignmentScorer.load(str(found)) if encoders_dir and (found / "config.json").is_file() else None
    if not (Path(setting) / "config.json").is_file():
        raise ConfigError(f"alignment_model={setting!r} has no config.json (a CLIP or SigLIP directory)")
    return AlignmentScorer.load(setting)


def main(argv: list[str]) -> int:
    from tqdm import tqdm

    from mmdit.consumer.metrics import METRICS, append_record, eval_scalars
    from mmdit.consumer.sample import load_sampler, locate_model
    from mmdit.consumer.text_eval import PromptSetError, TextRenderingEval, eval_dir

    args = parse(COMMAND, argv)
    keys: EvalArgs = args.keys
    source = locate_model(args.paths[0], keys.encoders or None)
    if keys.out:
        out = Path(keys.out)
    elif source.run_dir is not None:
        out = eval_dir(source.run_dir, source.step)
        out = out.with_name(f"{out.name}-ema") if keys.weights == "ema" else out
    else:
        raise ConfigError(f"{args.paths[0]} is not a run's checkpoint: give out=DIR for the results")
    try:
        evaluation = TextRenderingEval(keys.settings(), alignment=alignment_scorer(keys.alignment_model,
                                                                                     source.encoders_dir))
    except PromptSetError as e:
        raise ConfigError(str(e)) from None
    sampler = load_sampler(source, weights=keys.weights)
    calls = len(evaluation.prompts) * keys.steps * (2 if keys.true_cfg_scale > 1 else 1)
    with tqdm(total=calls, desc="eval", disable=not sys.stderr.isatty()) as bar:
        summary = evaluation.run(sampler, out, progress=bar)
    summary["dir"] = str(out)
    if keys.weights == "ema":
        summary["weights"] = "ema"
    if keys.record and source.run_dir is not None:
        record = {"step": source.step, **{k: v for k, v in summary.items() if k != "settings"},
                  "dir": str(out.relative_to(source.run_dir)) if out.is_relative_to(source.run_dir) else str(out)}
        append_record(source.run_dir / METRICS, record)
        _tensorboard(source.run_dir, source.step, eval_scalars(summary))
    print(json.dumps(summary, ensure_ascii=False))
    return 0


def _tensorboard(run_dir: Path, step: int, scalars: dict[str, float]) -> None:
    """Into the run's TensorBoard, when training keeps one (a new event file beside its own)."""
    if not (run_dir / "tensorboard").is_dir():
        return
    from torch.utils.tensorboard import SummaryWriter

    board = SummaryWriter(str(run_dir / "tensorboard"), filename_suffix=".text_eval")
    try:
        for name, value in scalars.items():
            board.add_scalar(name, value, step)
    finally:
        board.close()
