"""Where a job runs: its run directory, the local launcher, SLURM submission."""

from dataclasses import dataclass, field


@dataclass
class RunConfig:
    dir: str = "runs/demo"
    """Run directory: metrics.jsonl, summary.json, checkpoints, logs."""


@dataclass
class SlurmConfig:
    """`mmdit submit`'s sbatch options (launch/slurm.py)."""

    partition: str = ""
    """#SBATCH --partition (empty: the cluster's default)."""
    account: str = ""
    """#SBATCH --account (empty: none)."""
    time: str = "24:00:00"
    """#SBATCH --time: the job's time limit."""
    qos: str = ""
    """#SBATCH --qos (empty: none)."""
    job_name: str = "mmdit"
    """#SBATCH --job-name."""
    gpus: bool = True
    """Request launch.gpus_per_node GPUs per trainer node (false: CPU-only nodes, e.g. tests)."""
    mem: str = ""
    """#SBATCH --mem per node (empty: the cluster's default)."""
    cpus_per_task: int = 0
    """#SBATCH --cpus-per-task (0: the cluster's default)."""
    container_image: str = ""
    """pyxis/enroot image every step runs in (empty: the nodes' own environment)."""
    container_mounts: str = ""
    """pyxis --container-mounts with container_image (e.g. /shared:/shared)."""
    python: str = ""
    """The interpreter on the nodes (empty: the one running `mmdit submit`, on shared storage)."""
    signal_s: int = 300
    """SLURM sends USR1 this long before the time limit: the trainers checkpoint, the job requeues."""
    requeue: bool = True
    """Requeue the job after the time-limit warning's checkpoint (and on preemption)."""
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
    """`mmdit submit`: ranks (GPUs) per trainer node; parallel.tp must divide it."""
    producer_nodes: int = 0
    """`mmdit submit`: nodes of producers (a heterogeneous job); 0: they run on the first trainer node."""
    producers_per_node: int = 1
    """`mmdit submit`: producer processes per producer node (or on the first trainer node)."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    def __post_init__(self):
        if self.nproc < 1:
            raise ValueError(f"launch.nproc must be >= 1, got {self.nproc}")
        if self.stop_timeout_s <= 0:
            raise ValueError(f"launch.stop_timeout_s must be > 0, got {self.stop_timeout_s}")
        if not 0 <= self.master_port < 65536:
            raise ValueError(f"launch.master_port must be in 0..65535, got {self.master_port}")
