"""The job config: every group's schema, composed; and the checks that span groups.

Hydra composes conf/ (presets: only what differs from these defaults) with command-line
overrides over `JobConfig`, so an unknown key or a wrong type is rejected by OmegaConf, and each
section's `__post_init__` checks its own values. Each check is stated once: in its section, or
here when it needs two sections.
"""

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from mmdit.config.data import DataConfig
from mmdit.config.launch import LaunchConfig, RunConfig
from mmdit.config.model import MMDiTArgs
from mmdit.config.parallel import ParallelConfig, check_heads_divisible
from mmdit.config.produce import AnnotateConfig, CacheConfig, EncodersConfig, SynthConfig
from mmdit.config.service import ServiceConfig
from mmdit.config.train import CheckpointConfig, EvalConfig, OptimizerConfig, TrainConfig, check_batch_sizes
from mmdit.config.vae import VaeConfig


@dataclass
class JobConfig:
    model: MMDiTArgs = field(default_factory=MMDiTArgs)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    encoders: EncodersConfig = field(default_factory=EncodersConfig)
    annotate: AnnotateConfig = field(default_factory=AnnotateConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    run: RunConfig = field(default_factory=RunConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    vae: VaeConfig = field(default_factory=VaeConfig)
    seed: int = 0
    """The job's seed: weights' init, noise per sample, the batch plan; a run is a function of it."""


ConfigStore.instance().store(name="job_schema", node=JobConfig)


def check_job(job: JobConfig) -> None:
    """Checks between groups, before any process starts (ValueError naming the keys)."""
    tp, nproc = job.parallel.tp, job.launch.nproc
    check_heads_divisible(job.model.num_attention_heads, tp)
    if nproc > 1 and nproc % tp:
        raise ValueError(f"launch.nproc={nproc} must be a multiple of parallel.tp={tp}")
    if job.eval.sample_every and not job.encoders.dir:
        raise ValueError("eval.sample_every needs encoders.dir (the VAE and Qwen2.5-VL that turn prompts into images)")
    if job.train.objective == "grpo" and job.train.grpo.reward == "alignment" and not job.encoders.dir:
        raise ValueError("train.grpo.reward=alignment needs encoders.dir (its VAE decodes the images the "
                         "alignment model scores)")
    if job.eval.weights == "ema" and not job.train.ema_decay:
        raise ValueError("eval.weights=ema needs train.ema_decay > 0 (the run keeps no EMA weights otherwise)")
    check_batch_sizes(job.train, max(1, nproc // tp))
