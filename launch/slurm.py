"""`mmdit submit [key=value ...] [--dry-run]`: one SLURM job running a whole mmdit training.

The rendered sbatch script (saved as run.dir/submit/job.sbatch, with the job's config beside it):

- trainers: `launch.trainer_nodes` nodes x `launch.gpus_per_node` ranks, one `srun` task per node
  running torchrun (launch/agent.py: every listener on one address) with its rendezvous on the
  first trainer node; TP x DP from `parallel.tp`;
- producers: with `launch.producer_nodes` > 0, a heterogeneous job whose second component runs
  `launch.producers_per_node` producer processes per node; the coordinator runs on its first node.
  With no producer nodes, the coordinator and `launch.producers_per_node` producers run on the
  first trainer node (`mmdit serve`); with eval.evaluator=true, the service starts the evaluator
  (`mmdit evaluate run.dir`) beside the coordinator;
- addresses (utils/netaddr.py), never from host names, which resolve to loopback on many images:
  the first trainer node's address is the local end of its route to another node of the job
  (`python -m mmdit.launch.address`, asked on that node); it is the rendezvous endpoint,
  and the coordinator listens on the local end of its own route to it
  (`service.advertise_host=route:ADDR`) and publishes that address in run.dir/service/address.json,
  where producers and trainers find it (`service.address_from`); each of them listens on the
  local end of its route to the coordinator. A job on one node keeps everything on 127.0.0.1;
- every process logs to run.dir/logs/ (run.dir must be on storage every node sees);
- preemption and time limits: SLURM sends USR1 `launch.slurm.signal_s` seconds ahead
  (`--signal=B:USR1@...`); the script passes it through srun to a shell around torchrun on each
  node, which sends SIGTERM to the ranks; they checkpoint and exit 0; the script then requeues the job (`scontrol requeue`); the requeued job resumes from `latest` and sees
  exactly the batches the uninterrupted run would have (the data cursor is in the checkpoint).
  A preemption that SIGTERMs the job directly works the same way (`--requeue`).

Options in `launch.slurm.*`: partition, account, time, qos, job_name, gpus (request GPUs), mem,
cpus_per_task, container_image / container_mounts (pyxis), python (the nodes' interpreter),
extra (`#SBATCH` lines, verbatim).

Every value reaches the script in a form its reader takes word for word: `#SBATCH` lines are read
by sbatch, not bash (quoted for sbatch; a control character, which could end the line and turn
the rest into a command, is a config error naming the key), the rest by bash (shell-quoted), and
run.dir / cache.dir reach the processes as Hydra overrides (Hydra-quoted, then shell-quoted).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

from mmdit.config import ConfigError
from mmdit.config.explain import sections as config_sections
from mmdit.launch.args import Action, Command, Flag, parse

RDZV_PORT = 29400
COMMAND = Command("submit", __doc__, sections=tuple(config_sections()), actions=(Action(
    help="its overrides reach every process of the job",
    flags=(Flag("dry-run", "print the script, submit nothing"),)),))


class LayoutError(ValueError):
    """A job layout SLURM could not run as asked; the message says why."""


def check_layout(cfg) -> None:
    launch, tp = cfg.launch, cfg.parallel.tp
    if launch.trainer_nodes < 1 or launch.gpus_per_node < 1:
        raise LayoutError(f"launch.trainer_nodes ({launch.trainer_nodes}) and launch.gpus_per_node "
                          f"({launch.gpus_per_node}) must be >= 1")
    if launch.producer_nodes < 0 or launch.producers_per_node < 1:
        raise LayoutError(f"launch.producer_nodes must be >= 0 and launch.producers_per_node >= 1, got "
                          f"{launch.producer_nodes}, {launch.producers_per_node}")
    if launch.gpus_per_node % tp:
        raise LayoutError(f"parallel.tp={tp} must divide launch.gpus_per_node={launch.gpus_per_node}: tensor "
                          "parallelism stays inside a node (its all-reduces need NVLink)")


def render(cfg, overrides: list[str]) -> str:
    """The sbatch script of the job `cfg` describes (`overrides` reach every process)."""
    check_layout(cfg)
    launch, slurm, run = cfg.launch, cfg.launch.slurm, Path(cfg.run.dir).resolve()
    het = launch.producer_nodes > 0
    dp = launch.trainer_nodes * launch.gpus_per_node // cfg.parallel.tp
    logs = _output_pattern("run.dir", run / "logs")  # first: it also checks run.dir for the comment below
    common = [o for o in overrides if not o.startswith(("run.dir=", "cache.dir=", "launch.", "service.host=",
                                                        "service.address_from=", "service.producers=",
                                                        "service.dp_size="))]
    common += [_override("cache.dir", Path(cfg.cache.dir).resolve()), f"service.dp_size={dp}"]
    args = " ".join(shlex.quote(a) for a in common)
    python = slurm.python or sys.executable
    if python.startswith("-"):  # srun would take it for one of its own options
        raise ConfigError(f"invalid config: launch.slurm.python={python!r} must be an interpreter, not an option")
    py = shlex.quote(python)
    lines = ["#!/bin/bash", f"# rendered by `mmdit submit` on {time.strftime('%Y-%m-%d %H:%M:%S')}; "
             f"config: {run / 'submit' / 'config.yaml'}",
             f"#SBATCH --job-name={_sbatch_word('launch.slurm.job_name', slurm.job_name)}",
             f"#SBATCH --output={_sbatch_word('run.dir', logs)}/slurm-%j.out",
             "#SBATCH --open-mode=append", f"#SBATCH --signal=B:USR1@{slurm.signal_s}"]
    lines += ["#SBATCH --requeue"] if slurm.requeue else ["#SBATCH --no-requeue"]
    for key, value in (("time", slurm.time), ("account", slurm.account), ("qos", slurm.qos)):
        if value:
            lines.append(f"#SBATCH --{key}={_sbatch_word(f'launch.slurm.{key}', value)}")
    lines += _component(slurm, launch.trainer_nodes, gpus=launch.gpus_per_node if slurm.gpus else 0)
    if het:
        lines += ["#SBATCH hetjob"] + _component(slurm, launch.producer_nodes, gpus=0)
    for x in slurm.extra:  # verbatim: sbatch splits them into words, but each must stay one line
        _check_one_line("launch.slurm.extra", x)
        lines.append(f"#SBATCH {x.removeprefix('#SBATCH').strip()}")
    container = ""
    if slurm.container_image:
        container = f" --container-image={shlex.quote(slurm.container_image)}"
        if slurm.container_mounts:
            container += f" --container-mounts={shlex.quote(slurm.container_mounts)}"
    trainers = "--het-group=0 " if het else ""
    services = "--het-group=1 " if het else ""
    service_dir = shlex.quote(_override("run.dir", run / "service"))
    # service.advertise_host given (an interface name, say): every process, the first trainer node
    # and the coordinator too, advertises what it says; else each the local end of a route
    given = [o.split("=", 1)[1] for o in overrides if o.startswith("service.advertise_host=")]
    advertise = f" {shlex.quote(given[-1])}" if given else ""
    coordinator_addr = "" if given else 'service.advertise_host="route:$HEAD_ADDR" '
    address_from = shlex.quote(_override("service.address_from", run / "service"))
    # eval.evaluator: the service starts the evaluator on the coordinator's node, following run.dir
    evaluator = f"{shlex.quote(_override('eval.evaluator_run', run))} " if cfg.eval.evaluator else ""
    lines += ["", "set -uo pipefail", f"RUN={shlex.quote(str(run))}", 'mkdir -p "$RUN/logs"',
              f"LOGS={shlex.quote(logs)}  # run.dir/logs as srun reads --output: % doubled",
              'TRAINER_NODES=$(scontrol show hostnames "${SLURM_JOB_NODELIST_HET_GROUP_0:-$SLURM_JOB_NODELIST}")',
              'TRAINER_HOST=$(echo "$TRAINER_NODES" | head -n1)']
    if het:
        lines.append('COORD_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST_HET_GROUP_1" | head -n1)')
    else:
        lines.append('COORD_HOST=$TRAINER_HOST')
    if launch.trainer_nodes > 1 or het:
        # a node's own name may resolve to 127.0.0.1 there (many images): the first trainer node is
        # asked for the local end of its route to another node of the job, named by SLURM
        lines += ["", "# the first trainer node's address: the rendezvous endpoint, and the coordinator's peer",
                  "NODES=($TRAINER_NODES)",
                  f"PEER={'${NODES[1]}' if launch.trainer_nodes > 1 else '$COORD_HOST'}",
                  f'HEAD_ADDR=$(srun --overlap --nodes=1 --ntasks=1 -w "$TRAINER_HOST"{container} {py} -m '
                  f'mmdit.launch.address "$PEER"{advertise}) || exit 1',
                  'echo "mmdit: $TRAINER_HOST is $HEAD_ADDR on the way to $PEER"']
    else:
        lines += ["HEAD_ADDR=127.0.0.1  # one node: nothing listens beyond it"]
    lines += [
        "",
        "# the data service: the coordinator (and, without producer nodes, the producers too); it listens on",
        "# the local end of its route to the first trainer node and publishes that address in address.json",
        'rm -f "$RUN/service/address.json"  # a requeued job\'s: no process may follow it',
        f'srun --overlap {services}--nodes=1 --ntasks=1 -w "$COORD_HOST"{container} '
        f'--output="$LOGS/coordinator-%j.log" {py} -m mmdit.launch.cli serve {args} {service_dir} '
        f'{coordinator_addr}{evaluator}service.producers={0 if het else launch.producers_per_node} &',
        "SERVICE=$!",
    ]
    if het:
        lines += [f'srun --overlap {services}--ntasks-per-node={launch.producers_per_node}{container} '
                  f'--output="$LOGS/producer-%N-%t-%j.log" {py} -m mmdit.launch.cli producer {args} '
                  f'{service_dir} {address_from} &', "PRODUCERS=$!"]
    agent = (f"{py} -m mmdit.launch.agent --nnodes={launch.trainer_nodes} --nproc-per-node={launch.gpus_per_node} "
             f'--rdzv-backend=mmdit --rdzv-endpoint="$HEAD_ADDR:{RDZV_PORT}" --rdzv-id="$SLURM_JOB_ID" '
             f'-m mmdit.launch.cli train {shlex.quote(_override("run.dir", run))} {args} train.data_source=service '
             f'{address_from}')
    # On each node a shell around torchrun turns USR1 (forwarded by srun) or TERM (a preemption)
    # into SIGTERM to the ranks themselves: they checkpoint and exit 0, and torchrun exits with
    # them. Signalling srun or torchrun instead kills the ranks mid-save (srun takes TERM as
    # "kill the step now"; torchrun SIGKILLs its workers 30 s after its own TERM). torchrun starts
    # with USR1 ignored: the step's signal can reach its whole process group, and torchrun does
    # not handle USR1, so it would die of it, and the step with it.
    node_shell = (f"trap '' USR1; {agent} & agent=$!; trap 'pkill -TERM -P \"$agent\"' USR1 TERM; "
                  'while kill -0 "$agent" 2>/dev/null; do wait "$agent"; done; wait "$agent"')
    lines += [
        "",
        "# the trainers: torchrun per node, rendezvous on the first trainer node",
        "export HEAD_ADDR",
        f'srun --overlap {trainers}--ntasks-per-node=1{container} --output="$LOGS/trainer-%N-%j.log" '
        f"bash -c {shlex.quote(node_shell)} &",
        "TRAINERS=$!",
        "",
        "# USR1 (SLURM's warning before the time limit or a preemption): checkpoint, stop, requeue.",
        "# srun passes USR1 on to the node shells; TERM would make it kill the step at once.",
        "requeue=0",
        "trap 'requeue=1; kill -USR1 $TRAINERS 2>/dev/null' USR1",
        "trap 'kill -USR1 $TRAINERS 2>/dev/null' TERM",
        "# a trapped signal interrupts wait: wait again until the trainers are done, then take",
        "# their exit status (not the interrupted wait's 128 + signal)",
        'while kill -0 "$TRAINERS" 2>/dev/null; do wait "$TRAINERS"; done',
        'wait "$TRAINERS"; code=$?',
        'kill -TERM $SERVICE ${PRODUCERS:-} 2>/dev/null; wait',
        'if [ "$requeue" = 1 ]; then',
        '  echo "mmdit: requeueing job $SLURM_JOB_ID after a checkpoint"',
        '  scontrol requeue "$SLURM_JOB_ID"',
        "  exit 0",
        "fi",
        'exit "$code"',
    ]
    return "\n".join(lines) + "\n"


def _component(slurm, nodes: int, gpus: int) -> list[str]:
    out = [f"#SBATCH --nodes={nodes}", "#SBATCH --ntasks-per-node=1"]
    if slurm.partition:
        out.append(f"#SBATCH --partition={_sbatch_word('launch.slurm.partition', slurm.partition)}")
    if gpus:
        out.append(f"#SBATCH --gpus-per-node={gpus}")
    if slurm.cpus_per_task:
        out.append(f"#SBATCH --cpus-per-task={slurm.cpus_per_task}")
    if slurm.mem:
        out.append(f"#SBATCH --mem={_sbatch_word('launch.slurm.mem', slurm.mem)}")
    return out


def _check_one_line(key: str, value: str) -> None:
    """An #SBATCH line ends at a newline and what follows runs as a command: no control characters."""
    bad = next((c for c in value if unicodedata.category(c) == "Cc"), None)
    if bad is not None:
        raise ConfigError(f"invalid config: {key}={value!r} holds the control character {bad!r}; it goes into an "
                          "#SBATCH line of the job script, which must stay one line")


def _sbatch_word(key: str, value: str) -> str:
    """`value` as (part of) one word of an #SBATCH line. sbatch splits these lines itself: at
    whitespace, and '#' starts a comment, unless inside quotes, where \\ and \\" are escapes."""
    _check_one_line(key, value)
    if not re.search(r"""[\s"'\\#]""", value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _output_pattern(key: str, path: Path) -> str:
    """`path` as the directory part of an sbatch/srun --output pattern: SLURM expands %j, %N... there
    (so a literal % is written %%) and a backslash anywhere turns that off, dropping the backslash."""
    _check_one_line(key, str(path))
    if "\\" in str(path):
        raise ConfigError(f"invalid config: {key}={str(path)!r} holds a backslash, which SLURM drops from "
                          "log file names")
    return str(path).replace("%", "%%")


def _override(key: str, value) -> str:
    """`key=value` as a Hydra override that gives back `value` exactly (quotes, commas, spaces,
    `${`, non-ASCII and all): Hydra-quoted unless a plain absolute path."""
    value = str(value)
    if re.fullmatch(r"/[\w./+-]*", value, re.ASCII):
        return f"{key}={value}"
    # inside '...': \' is a quote, backslashes before a quote (or the closing one) are doubled,
    # and \${ is a literal "${" (OmegaConf), with the backslashes before it doubled too
    value = re.sub(r"(\\*)(?='|\$\{|$)", lambda m: m.group(1) * 2, value)
    return f"{key}='" + value.replace("'", "\\'").replace("${", "\\${") + "'"


def main(argv: list[str]) -> int:
    from mmdit.config.loader import config_yaml, load_config

    args = parse(COMMAND, argv)
    cfg = load_config(args.overrides)
    try:
        script = render(cfg, args.overrides)
    except LayoutError as e:
        raise ConfigError(f"invalid layout: {e}") from None
    if args.flags.dry_run:
        print(script, end="")
        return 0
    submit = Path(cfg.run.dir) / "submit"
    submit.mkdir(parents=True, exist_ok=True)
    (Path(cfg.run.dir) / "logs").mkdir(parents=True, exist_ok=True)
    (submit / "config.yaml").write_text(config_yaml(cfg))
    (submit / "job.sbatch").write_text(script)
    done = subprocess.run(["sbatch", "--parsable", str(submit / "job.sbatch")], capture_output=True, text=True)
    if done.returncode:
        print(f"mmdit submit: sbatch failed: {done.stderr.strip()}", file=sys.stderr)
        return 1
    job_id = done.stdout.strip().split(";")[0]
    print(job_id)
    return 0
