"""The job config: Hydra composes conf/ with command-line overrides over typed dataclasses.

Every group has a dataclass schema, so an unknown key or a wrong type is rejected by OmegaConf,
and each dataclass's `__post_init__` checks values when the config is turned into objects.
"""

from dataclasses import dataclass, field
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from mmdit.consumer.config import TrainConfig
from mmdit.dataservice.config import ServiceConfig
from mmdit.model.args import MMDiTArgs
from mmdit.parallel.config import ParallelConfig
from mmdit.producer.config import AnnotateConfig, CacheConfig, DataConfig, EncodersConfig, SynthConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@dataclass
class RunConfig:
    dir: str = "runs/demo"
    """Run directory: metrics.jsonl, summary.json, checkpoints, logs."""


@dataclass
class SlurmConfig:
    """`mmdit submit`'s sbatch options (launch/slurm.py)."""

    partition: str = ""
    account: str = ""
    time: str = "24:00:00"
    qos: str = ""
    job_name: str = "mmdit"
    gpus: bool = True
    """Request launch.gpus_per_node GPUs per trainer node (false: CPU-only nodes, e.g. tests)."""
    mem: str = ""
    cpus_per_task: int = 0
    container_image: str = ""
    """pyxis/enroot image every step runs in (empty: the nodes' own environment)."""
    container_mounts: str = ""
    python: str = ""
    """The interpreter on the nodes (empty: the one running `mmdit submit`, on shared storage)."""
    signal_s: int = 300
    """SLURM sends USR1 this long before the time limit: the trainers checkpoint, the job requeues."""
    requeue: bool = True
    extra: list[str] = field(default_factory=list)
    """More `#SBATCH` lines, verbatim (e.g. "--exclusive", "--constraint=h100")."""


@dataclass
class LaunchConfig:
    nproc: int = 1
    """Local processes (tp * dp) the local launcher starts."""
    master_port: int = 0
    """Port of the job's store, which rank 0 hosts on 127.0.0.1 (local launcher); 0: a free one."""
    stop_timeout_s: float = 600.0
    """After SIGINT/SIGTERM, how long the local launcher and `mmdit demo` let ranks finish their step
    and checkpoint before SIGKILL (a 20B checkpoint takes minutes). Ranks left behind by a failed
    rank are stopped within `service.shutdown_timeout_s` instead: they cannot checkpoint."""
    trainer_nodes: int = 1
    """`mmdit submit`: trainer nodes, each running launch.gpus_per_node ranks."""
    gpus_per_node: int = 8
    producer_nodes: int = 0
    """`mmdit submit`: nodes of producers (a heterogeneous job); 0: they run on the first trainer node."""
    producers_per_node: int = 1
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    def __post_init__(self):
        if self.nproc < 1:
            raise ValueError(f"launch.nproc must be >= 1, got {self.nproc}")
        if self.stop_timeout_s <= 0:
            raise ValueError(f"launch.stop_timeout_s must be > 0, got {self.stop_timeout_s}")
        if not 0 <= self.master_port < 65536:
            raise ValueError(f"launch.master_port must be in 0..65535, got {self.master_port}")


@dataclass
class JobConfig:
    model: MMDiTArgs = field(default_factory=MMDiTArgs)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    encoders: EncodersConfig = field(default_factory=EncodersConfig)
    annotate: AnnotateConfig = field(default_factory=AnnotateConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    run: RunConfig = field(default_factory=RunConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    seed: int = 0


ConfigStore.instance().store(name="job_schema", node=JobConfig)


class ConfigError(ValueError):
    """A config that cannot be composed or fails validation; the message says why."""


def compose_config(overrides: list[str] = (), config_name: str = "config"):
    """Compose conf/ + overrides into a DictConfig (types checked, values not yet)."""
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            return compose(config_name=config_name, overrides=list(overrides))
    except Exception as e:  # hydra/omegaconf raise many types; surface one with the reason
        raise ConfigError(f"invalid config: {_reason(e)}") from e


def to_job_config(cfg) -> JobConfig:
    """Resolve interpolations and build the dataclasses, running their value checks, then the
    checks that span groups."""
    try:
        job = OmegaConf.to_object(cfg)
    except Exception as e:
        raise ConfigError(f"invalid config: {_reason(e)}") from e
    check_job(job)
    job.data.curriculum = [expand_preset(entry) for entry in job.data.curriculum]
    return job


def data_presets() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "data").glob("*.yaml"))


def load_data_preset(name: str):
    """conf/data/<name>.yaml composed over the DataConfig defaults."""
    if name not in data_presets():
        raise ConfigError(f"invalid config: no data preset {name!r} (conf/data has {', '.join(data_presets())})")
    return to_job_config(compose_config([f"data={name}"])).data


def expand_preset(entry: dict) -> dict:
    """A curriculum entry {step: N, preset: stage5} -> {step: N, <every field stage5 sets>}."""
    if "preset" not in entry:
        return entry
    from mmdit.dataservice.data_config import preset_changes

    rest = {k: v for k, v in entry.items() if k not in ("step", "preset")}
    return {"step": entry["step"], **preset_changes(load_data_preset(str(entry["preset"]))), **rest}


def _reason(e: BaseException) -> str:
    """One line: the first line of each message along the exception's cause chain."""
    parts: list[str] = []
    while e is not None and len(parts) < 4:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if first not in parts and "$VALUE" not in first:
            parts.append(first.rstrip("."))
        e = e.__cause__ or e.__context__
    return ": ".join(parts)


def check_job(job: JobConfig) -> None:
    """Checks between groups, before any process starts."""
    heads, tp, nproc = job.model.num_attention_heads, job.parallel.tp, job.launch.nproc
    if heads % tp:
        raise ConfigError(f"invalid config: parallel.tp={tp} must divide model.num_attention_heads={heads} "
                          "(each tensor-parallel rank owns whole heads)")
    if nproc > 1 and nproc % tp:
        raise ConfigError(f"invalid config: launch.nproc={nproc} must be a multiple of parallel.tp={tp}")
    if job.train.sample_every and not job.encoders.dir:
        raise ConfigError("invalid config: train.sample_every needs encoders.dir (the VAE and Qwen2.5-VL that turn "
                          "prompts into images)")
    dp, mbs, gbs = max(1, nproc // tp), job.train.micro_batch_size, job.train.global_batch_size
    if gbs and gbs % (mbs * dp):
        raise ConfigError(f"invalid config: train.global_batch_size={gbs} must be a multiple of train.micro_batch_size "
                          f"x DP = {mbs} x {dp} (the rest is gradient accumulation)")


def load_config(overrides: list[str] = (), config_name: str = "config") -> JobConfig:
    return to_job_config(compose_config(overrides, config_name))


def config_yaml(cfg: JobConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
