"""Training settings, by concern: the loop (`train`), the optimizer, checkpoints, evaluation."""

from dataclasses import dataclass, field

from mmdit.config.lora import LoraConfig
from mmdit.config.text_eval import TextEvalConfig
from mmdit.utils.dtypes import check_dtype

SIGMA_SAMPLINGS = ("uniform", "logit_normal")
LR_SCHEDULES = ("cosine", "linear", "constant")
EVAL_ON = ("auto", "trainer", "evaluator")
OBJECTIVES = ("flow", "dpo", "grpo")
"""Training objectives (consumer/objectives.py); post-training adds its own."""
PREVIEW_PROMPTS = ('A wooden sign that reads "OPEN" in bold letters', "一块写着“欢迎光临”的红色招牌",
                   'A poster with the title "Hello, world" on a blue gradient')
"""Text rendering in English and Chinese: what Qwen-Image is trained to do well."""


@dataclass
class DpoConfig:
    """Diffusion-DPO for flow matching (train.objective=dpo, consumer/dpo.py)."""

    beta: float = 2000.0
    """Inverse temperature of the preference: loss = -log sigmoid(-beta * ((err_w - err_l)_policy -
    (err_w - err_l)_reference)), each err the per-element mean squared velocity error of one image
    (so beta does not depend on the resolution; Diffusion-DPO used 2000-5000 on such means)."""

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"train.dpo.beta must be > 0, got {self.beta}")


GRPO_REWARDS = ("ocr", "latent_target", "alignment")
"""Built-in GRPO rewards (consumer/rewards.py); "package.module:function" names a user's own."""


@dataclass
class GrpoConfig:
    """Flow-GRPO (train.objective=grpo, consumer/grpo_objective.py): each optimizer step, every
    DP rank's TP group samples `group_size` images for each of `prompts_per_step` prompts with
    the exploration SDE, scores them and trains on the recorded transitions."""

    group_size: int = 4
    """G: images per prompt; advantages are normalized within a prompt's group."""
    prompts_per_step: int = 2
    """Prompts per DP rank per micro-batch (each micro-batch rolls out prompts_per_step x G images)."""
    sde_steps: int = 10
    """T: steps of the SDE sampler (QwenImagePipeline's shifted sigmas)."""
    train_steps: int = 0
    """Train on this many of the T transitions, a random subset per rollout (0: all T)."""
    a: float = 0.7
    """Exploration: sigma_t = a * sqrt(t / (1 - t)) (model/flow_sde.py)."""
    t_max: float = 0.95
    """t is clipped to at most this inside sigma_t's root."""
    clip_range: float = 1e-4
    """PPO clip of the ratio exp(logp - logp_old) (log-probs are per-element means, as Flow-GRPO's)."""
    kl_beta: float = 0.04
    """Weight of the closed-form KL to the frozen reference (0: no reference is built)."""
    updates_per_rollout: int = 1
    """Optimizer steps trained on one rollout: the first sees ratio 1, later ones the clip."""
    rollout_chunk: int = 1
    """Prompts whose groups are sampled together (a batch of rollout_chunk x G images, twice with
    CFG); each chunk is sent to be scored as soon as it is sampled, while the next one samples."""
    update_micro_batch: int = 0
    """Transitions per forward and backward of the update (0: a whole chunk's, its kept images x
    trained steps); the gradients of the pieces add up."""
    cfg_scale: float = 1.0
    """True classifier-free guidance in rollouts and updates (> 1: on, against the prompt " ")."""
    width: int = 256
    """Width of the rollout images in pixels (a multiple of 16)."""
    height: int = 256
    """Height of the rollout images in pixels (a multiple of 16)."""
    prompts: str = ""
    """A JSONL prompt set ({"prompt", "target_texts", ...} per line, the text-eval format); "":
    the built-in text-rendering set (consumer/text_eval/text_rendering.jsonl)."""
    reward: str = "ocr"
    """ocr (decode with encoders.dir's VAE, RapidOCR word accuracy vs target_texts) | latent_target
    (-mean((latents - latent_target)^2): a cheap toy) | alignment (CLIP/SigLIP cosine similarity of
    the decoded image and its prompt: alignment_model) | package.module:function (called with the
    final latents [B, 16, h, w] and the prompts, returns B floats; NaN drops a sample)."""
    alignment_model: str = ""
    """reward=alignment: a local CLIP or SigLIP directory (config.json + weights + processor); each
    image decoded with encoders.dir's VAE is scored by its cosine similarity to its prompt, as
    `mmdit eval`'s alignment figure (consumer/alignment_reward.py)."""
    latent_target: float = 0.5
    """The value the latent_target reward pulls every normalized latent towards."""
    ocr_threads: int = 0
    """CPU threads of the OCR engine (0: onnxruntime's default)."""
    reward_workers: int = 0
    """Score in this many local worker processes (consumer/rewards.py RewardWorkers; a worker
    that dies costs a retry); 0: in the trainer process."""
    reward_service: bool = False
    """Score on the reward service: `mmdit reward-worker` processes that joined the data service's
    RPC group (service.* keys); the trainer sends them the final latents and rolls out on while
    they score (consumer/reward_service.py: a worker that dies costs a retry elsewhere; images no
    worker could score get NaN)."""

    def __post_init__(self):
        if self.rollout_chunk < 1 or self.update_micro_batch < 0:
            raise ValueError(f"train.grpo.rollout_chunk must be >= 1 and update_micro_batch >= 0, got "
                             f"{self.rollout_chunk} and {self.update_micro_batch}")
        if self.reward_service and self.reward_workers:
            raise ValueError("train.grpo.reward_service and train.grpo.reward_workers are two places to score: "
                             "pick one")
        if self.reward_workers < 0:
            raise ValueError(f"train.grpo.reward_workers must be >= 0, got {self.reward_workers}")
        if self.group_size < 2 or self.prompts_per_step < 1 or self.sde_steps < 2 or self.updates_per_rollout < 1:
            raise ValueError("train.grpo.group_size must be >= 2, prompts_per_step and updates_per_rollout >= 1, "
                             "sde_steps >= 2")
        if not 0 <= self.train_steps <= self.sde_steps:
            raise ValueError(f"train.grpo.train_steps must be in [0, sde_steps={self.sde_steps}], got {self.train_steps}")
        if not (self.a > 0 and 0 < self.t_max < 1 and self.clip_range > 0 and self.kl_beta >= 0):
            raise ValueError("train.grpo needs a > 0, 0 < t_max < 1, clip_range > 0 and kl_beta >= 0")
        if self.width <= 0 or self.height <= 0 or self.width % 16 or self.height % 16:
            raise ValueError(f"train.grpo.width/height must be positive multiples of 16, got {self.width}x{self.height}")
        if self.reward not in GRPO_REWARDS and ":" not in self.reward:
            raise ValueError(f"train.grpo.reward must be one of {GRPO_REWARDS} or package.module:function, "
                             f"got {self.reward!r}")
        if self.reward == "alignment" and not self.alignment_model:
            raise ValueError("train.grpo.reward=alignment needs train.grpo.alignment_model (a local CLIP or "
                             "SigLIP directory)")


@dataclass
class TrainConfig:
    """The training loop: how long, how big a batch, which noise levels, where data comes from."""

    steps: int = 30
    """Optimizer steps to run (in total, counting resumed ones)."""
    micro_batch_size: int = 2
    """Samples per data-parallel rank per forward/backward."""
    global_batch_size: int = 0
    """Samples per optimizer step, over all DP ranks; a multiple of micro_batch_size x DP, the
    rest is gradient accumulation. 0: micro_batch_size x DP (no accumulation)."""
    objective: str = "flow"
    """What a step minimizes (consumer/objectives.py): flow (flow matching, pre-training and SFT) |
    dpo (Diffusion-DPO on preference pairs against a frozen reference: train.dpo) | grpo (Flow-GRPO
    on its own rollouts, scored by a reward: train.grpo)."""
    dpo: DpoConfig = field(default_factory=DpoConfig)
    """Diffusion-DPO's settings (train.objective=dpo)."""
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    """Flow-GRPO's settings (train.objective=grpo): it makes its own data (rollouts), so it runs
    with data_source=random, whose batches only pace the loop."""
    dtype: str = "auto"
    """Compute dtype: auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Train low-rank adapters instead of the full weights (train.lora.rank > 0; config/lora.py)."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the trained weights (parallel/ema.py), updated after
    every optimizer step in fp32: ema = decay * ema + (1 - decay) * w; 0 = off, else in (0, 1),
    e.g. 0.999. Sharded like the optimizer state and saved in checkpoints; `weights=ema` uses it."""
    sigma_sampling: str = "logit_normal"
    """How training noise levels are drawn: uniform | logit_normal."""
    logit_mean: float = 0.0
    """Mean of the normal whose sigmoid gives the noise level (sigma_sampling=logit_normal)."""
    logit_std: float = 1.0
    """Its standard deviation."""
    shift_sigmas: bool = True
    """Apply Qwen-Image's resolution-dependent shift to sampled sigmas."""
    data_source: str = "random"
    """random: synthetic latents of one bucket (no producers needed) | service: the data service."""
    random_height: int = 256
    """Image height in pixels for data_source=random."""
    random_width: int = 256
    """Image width in pixels for data_source=random."""
    random_text_len: int = 24
    """Prompt tokens per random sample."""
    random_pool_size: int = 16
    """Distinct random samples cycled through with data_source=random."""
    log_every: int = 1
    """Print a log line every N steps (metrics.jsonl gets every step)."""
    max_bad_steps: int = 5
    """A step whose loss or gradient is not finite is skipped (no optimizer update, counted in
    metrics.jsonl); this many in a row stop the run with an error."""
    log_samples: bool = False
    """Append each step's sample keys to run.dir/samples.jsonl."""
    tensorboard: bool = True
    """Write the per-step scalars to run.dir/tensorboard/ as well (`tensorboard --logdir RUN_DIR`)."""
    telemetry: bool = True
    """Report each step's figures to the data service's /metrics and dashboard (with the acks)."""
    peak_tflops: float = 0.0
    """Peak dense TFLOP/s of one device for MFU; 0 picks a known value for the GPU (H100/H200: 989)."""
    eval_on: str = "auto"
    """Who runs the held-out evaluation, previews and text-rendering evaluation: trainer (every
    trainer rank waits while they run) | evaluator (an evaluator process, `mmdit evaluate`, follows
    the checkpoints; the trainer publishes one at every step an evaluation is due) | auto
    (evaluator when eval.evaluator is set, else trainer)."""

    def __post_init__(self):
        if self.sigma_sampling not in SIGMA_SAMPLINGS:
            raise ValueError(f"train.sigma_sampling must be one of {SIGMA_SAMPLINGS}, got {self.sigma_sampling!r}")
        if self.eval_on not in EVAL_ON:
            raise ValueError(f"train.eval_on must be one of {EVAL_ON}, got {self.eval_on!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"train.objective must be one of {OBJECTIVES}, got {self.objective!r}")
        check_dtype("train.dtype", self.dtype, ("auto", "bf16", "fp32"))  # fp16 would need loss scaling
        if self.data_source not in ("random", "service"):
            raise ValueError(f"train.data_source must be random or service, got {self.data_source!r}")
        if self.objective == "grpo" and self.data_source != "random":
            raise ValueError("train.objective=grpo makes its own samples (rollouts): use train.data_source=random")
        if self.steps < 0 or self.micro_batch_size < 1 or self.global_batch_size < 0:
            raise ValueError("train.steps and train.global_batch_size must be >= 0, train.micro_batch_size >= 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay must be 0 (off) or in (0, 1), got {self.ema_decay}")
        if self.max_bad_steps < 1 or self.log_every < 1:
            raise ValueError("train.max_bad_steps and train.log_every must be >= 1")
        for side in (self.random_height, self.random_width):
            if side % 16:
                raise ValueError(f"train.random_height/width must be multiples of 16, got {side}")


def check_batch_sizes(train: TrainConfig, dp: int) -> int:
    """Gradient-accumulation steps per optimizer step at `dp` data-parallel ranks; ValueError
    when train.global_batch_size does not split into micro-batches over them."""
    per_round = train.micro_batch_size * dp
    if train.global_batch_size % per_round:
        raise ValueError(f"train.global_batch_size={train.global_batch_size} must be a multiple of "
                         f"train.micro_batch_size x DP = {train.micro_batch_size} x {dp} (the rest is gradient "
                         "accumulation)")
    return max(1, train.global_batch_size // per_round)


@dataclass
class OptimizerConfig:
    """AdamW and its learning-rate schedule (consumer/schedule.py)."""

    lr: float = 5e-4
    """Peak learning rate, reached after warmup."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay."""
    lr_schedule: str = "cosine"
    """Decay after warmup: cosine | linear | constant."""
    warmup_steps: int = 5
    """Steps of linear warmup from 0 to lr."""
    decay_steps: int = 0
    """Steps (warmup included) over which the rate decays to min_lr; 0: train.steps."""
    weight_decay: float = 0.0
    """AdamW weight decay, applied to weight matrices only (not to biases and norm weights)."""
    adam_beta1: float = 0.9
    """AdamW's first-moment decay."""
    adam_beta2: float = 0.999
    """AdamW's second-moment decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""

    def __post_init__(self):
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"optimizer.lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if not self.lr > 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("optimizer.lr must be > 0, optimizer.grad_clip and optimizer.weight_decay >= 0")
        if self.decay_steps < 0 or self.warmup_steps < 0 or not 0 <= self.min_lr <= self.lr:
            raise ValueError("optimizer.decay_steps and optimizer.warmup_steps must be >= 0, and 0 <= "
                             "optimizer.min_lr <= optimizer.lr")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            raise ValueError("optimizer.adam_beta1 and optimizer.adam_beta2 must be in [0, 1)")


@dataclass
class CheckpointConfig:
    """Where training starts from, how often it saves and what it keeps (consumer/checkpoint.py)."""

    every: int = 0
    """Checkpoint every N steps (0: only at the end)."""
    keep: int = 3
    """Keep the newest N checkpoints (0: all); older ones are deleted after each save."""
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of this (0: none beyond `keep`)."""
    init_from: str = ""
    """Start from these weights: an mmdit checkpoint or a diffusers transformer dir (e.g. Qwen-Image)."""
    resume: bool = True
    """Resume from the newest checkpoint in run.dir when one exists."""
    async_save: bool = True
    """Write checkpoints in a background thread (consumer/async_save.py): the step loop waits only
    while the state is copied to host memory; the checkpoint is published (trainer.json, `latest`)
    at the first step boundary after every rank's write. A stop and the end of training wait for
    the write. false: the step loop waits for the whole save."""

    def __post_init__(self):
        for name in ("every", "keep", "keep_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"checkpoint.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class EvalConfig:
    """What training measures besides its loss: the held-out flow loss, image previews and text
    rendering; on the trainer ranks or in an evaluator process (train.eval_on)."""

    every: int = 0
    """Score the held-out samples (data.eval_fraction; random data: past the pool) every N steps
    (0: never); records with "eval": true in metrics.jsonl."""
    sigmas: int = 8
    """Stratified noise levels each held-out sample is scored at."""
    max_samples: int = 32
    """At most this many held-out samples per evaluation."""
    sample_every: int = 0
    """Generate `sample_prompts` every N steps into run.dir/samples/step_N/ (0: never); needs
    encoders.dir. Same prompts and seeds every time, so the images show what training changes."""
    sample_prompts: list[str] = field(default_factory=lambda: list(PREVIEW_PROMPTS))
    """The prompts sampled every sample_every steps (English and Chinese text rendering by default)."""
    sample_size: int = 256
    """Width and height of the sampled images (a multiple of 16)."""
    sample_steps: int = 20
    """Euler steps of the flow sampler per image."""
    sample_cfg_scale: float = 4.0
    """True classifier-free guidance scale (1: none) of the samples."""
    text_every: int = 0
    """Evaluate text rendering (consumer/text_eval/: OCR word accuracy, 1-NED) every N steps (0:
    never) into run.dir/eval/step_N/, with the settings of eval.text; needs encoders.dir."""
    text: TextEvalConfig = field(default_factory=TextEvalConfig)
    """The text-rendering evaluation's settings: `mmdit eval`'s keys (prompts, limit, width, ...)."""
    evaluator: bool = False
    """Run evaluations in an evaluator process (`mmdit evaluate RUN_DIR`, consumer/evaluator.py)
    that follows the run's checkpoints as they are published, instead of on the trainer ranks (with
    train.eval_on=auto). `mmdit serve`, `mmdit submit` and `mmdit demo` start it."""
    evaluator_run: str = ""
    """The run directory the evaluator `mmdit serve` starts follows: the trainer's run.dir
    (default: serve's own run.dir)."""
    evaluator_tp: int = 1
    """Tensor-parallel size of the evaluator (as many local ranks): any TP loads any checkpoint."""
    evaluator_backlog: int = 2
    """The evaluator evaluates waiting checkpoints oldest first while at most this many wait; with
    more it has fallen behind: it evaluates the newest and records the others as skipped (0 or 1:
    always the newest)."""
    weights: str = "raw"
    """Which weights the evaluations measure: raw (the trained weights) | ema (their moving
    average, train.ema_decay > 0)."""

    def __post_init__(self):
        if self.every < 0 or self.sigmas < 1 or self.max_samples < 1:
            raise ValueError("eval.every must be >= 0, eval.sigmas and eval.max_samples >= 1")
        if self.weights not in ("raw", "ema"):
            raise ValueError(f"eval.weights must be raw or ema, got {self.weights!r}")
        if self.text_every < 0 or self.evaluator_tp < 1 or self.evaluator_backlog < 0:
            raise ValueError("eval.text_every and eval.evaluator_backlog must be >= 0, eval.evaluator_tp >= 1")
        if self.sample_every < 0 or self.sample_size <= 0 or self.sample_size % 16 or self.sample_steps < 2:
            raise ValueError("eval.sample_every must be >= 0, eval.sample_size a positive multiple of 16 and "
                             "eval.sample_steps >= 2")
        if self.sample_every and not self.sample_prompts:
            raise ValueError("eval.sample_every needs eval.sample_prompts")


EVALUATIONS = ("loss", "previews", "text_rendering")
"""What an evaluation at a step can hold: the held-out loss (eval.every), the previews
(eval.sample_every), the text-rendering evaluation (eval.text_every)."""


def evaluations_due(evals: EvalConfig, step: int) -> list[str]:
    """The evaluations due at `step`, in the order they run."""
    every = {"loss": evals.every, "previews": evals.sample_every, "text_rendering": evals.text_every}
    return [kind for kind in EVALUATIONS if every[kind] and step % every[kind] == 0]


def evaluates_on_evaluator(train: TrainConfig, evals: EvalConfig) -> bool:
    """Does an evaluator process evaluate, rather than the trainer ranks (train.eval_on)?"""
    return train.eval_on == "evaluator" or (train.eval_on == "auto" and evals.evaluator)


MOVED_KEYS = {
    **{f"train.{k}": f"optimizer.{k}" for k in ("lr", "min_lr", "lr_schedule", "warmup_steps", "decay_steps",
                                                 "weight_decay", "adam_beta1", "adam_beta2", "grad_clip")},
    "train.save_every": "checkpoint.every", "train.keep_checkpoints": "checkpoint.keep",
    "train.keep_every": "checkpoint.keep_every", "train.init_from": "checkpoint.init_from",
    "train.resume": "checkpoint.resume",
    "train.eval_every": "eval.every", "train.eval_sigmas": "eval.sigmas", "train.eval_samples": "eval.max_samples",
    **{f"train.{k}": f"eval.{k}" for k in ("sample_every", "sample_prompts", "sample_size", "sample_steps",
                                           "sample_cfg_scale")},
}
"""Keys that moved when `train` was split by concern: old name -> new name (still accepted, with a warning)."""
