"""The `mmdit` command: `mmdit <command> [action] [paths] [--flags] [key=value ...]`.

Each command is a module of launch/ with a `main(argv)` and a `COMMAND` declaring its command line
(launch/args.py: one grammar for all, `mmdit <command> --help` for each); this file only
dispatches, importing the command's module lazily so `mmdit --help` and light commands start fast.
"""

import importlib
import os
import sys
import traceback
import warnings

COMMANDS = {
    "demo": ("mmdit.launch.demo", "the whole local pipeline: encoders, synth, produce, serve, train"),
    "train": ("mmdit.launch.train", "train the MMDiT (random latents or the data service)"),
    "sample": ("mmdit.launch.sample", "generate images from a checkpoint (true CFG, Euler flow sampler)"),
    "vae-train": ("mmdit.launch.vae_train", "fine-tune the VAE decoder on text-rich images (encoder frozen)"),
    "eval": ("mmdit.launch.eval", "text rendering of a checkpoint: OCR word accuracy, 1-NED, alignment"),
    "evaluate": ("mmdit.launch.evaluate", "the evaluator: follow a run's checkpoints, evaluate each as published"),
    "model-info": ("mmdit.launch.model_info", "build the model on the meta device and print its size"),
    "convert": ("mmdit.launch.convert", "convert between diffusers and mmdit checkpoints"),
    "make-tiny-encoders": ("mmdit.launch.tiny_encoders", "write tiny random VAE/Qwen2.5-VL/tokenizer"),
    "synth": ("mmdit.launch.synth", "render synthetic text images as webdataset shards"),
    "produce": ("mmdit.launch.produce", "score, filter, bucket and encode shards into the cache"),
    "annotate": ("mmdit.launch.annotate", "VL-model annotations and alignment scores into the manifest"),
    "status": ("mmdit.launch.status", "one screen on a run: processes, step, throughput, service, checkpoint"),
    "cache": ("mmdit.launch.cache", "verify the latent cache (`cache verify DIR [--repair]`)"),
    "checkpoint": ("mmdit.launch.checkpoint", "check a run's checkpoints file by file (`checkpoint verify DIR`)"),
    "submit": ("mmdit.launch.slurm", "submit a SLURM job: trainers, producers, coordinator (--dry-run prints it)"),
    "capacity": ("mmdit.launch.capacity", "producer GPUs, network and coordinator load per trainer GPU"),
    "serve": ("mmdit.launch.serve", "run the coordinator and producers on this machine"),
    "producer": ("mmdit.launch.producer", "one more producer for a running service (`mmdit serve`)"),
    "reward-worker": ("mmdit.launch.reward_worker", "a GRPO reward worker for a running service (train.grpo.reward_service)"),
    "ctl": ("mmdit.launch.ctl", "change a running job's data config (`ctl get|set|history RUN_DIR`)"),
    "consume": ("mmdit.launch.consume", "pull batches like a trainer, without a model"),
    "config": ("mmdit.launch.config", "the resolved config (`config show`), what a key means (`config explain KEY`)"),
}


def usage() -> str:
    lines = ["usage: mmdit <command> [action] [paths] [--flags] [key=value ...]", "", "commands:"]
    lines += [f"  {name:<20} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`mmdit <command> --help` lists a command's keys and flags; `mmdit config explain KEY` what a "
              "config key does."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 2 a bad command line or config (nothing started), 1 a failure at run
    time (one line on stderr; `MMDIT_DEBUG=1` adds the traceback), 130 stopped by a signal."""
    argv = sys.argv[1:] if argv is None else argv
    from mmdit.utils.processes import die_with_parent

    die_with_parent()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, args = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mmdit: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    # Warnings users can do nothing about (megatron without TE/apex on CPU, deprecations).
    warnings.filterwarnings("ignore", module=r"megatron(\.|$)")
    warnings.filterwarnings("ignore", category=FutureWarning)
    from mmdit.config import ConfigError

    try:
        module = importlib.import_module(COMMANDS[name][0])
        from mmdit.launch.args import wants_help

        if wants_help(args):
            print(_help(name, module))
            return 0
        return module.main(args) or 0
    except SystemExit as e:  # --help, or a command's own exit: the code, as the interpreter would
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 1
        return e.code or 0
    except ConfigError as e:
        print(f"mmdit {name}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mmdit {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line for the operator; the traceback on request
        if os.environ.get("MMDIT_DEBUG") == "1":
            traceback.print_exc()
        print(f"mmdit {name}: {type(e).__name__}: {_first_line(e)}", file=sys.stderr)
        return 1


def _help(name: str, module) -> str:
    """The command's help; a module without a `COMMAND` declaration takes `key=value` overrides
    of every config section (as `load_config(argv)` does)."""
    from mmdit.config.explain import sections
    from mmdit.launch.args import Command, help_text

    return help_text(getattr(module, "COMMAND", None)
                     or Command(name, module.__doc__ or COMMANDS[name][1], sections=tuple(sections())))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else repr(e)


if __name__ == "__main__":
    sys.exit(main())
