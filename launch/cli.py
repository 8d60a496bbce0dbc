"""The `mmdit` command: `mmdit <command> [key=value ...]`.

Each command lives in the module that owns its concept; this file only dispatches, importing
the command's module lazily so `mmdit --help` and light commands start fast.
"""

import importlib
import sys

COMMANDS = {
    "demo": ("mmdit.launch.demo", "the whole local pipeline: encoders, synth, produce, serve, train"),
    "train": ("mmdit.consumer.train", "train the MMDiT (random latents or the data service)"),
    "model-info": ("mmdit.model.info", "build the model on the meta device and print its size"),
    "convert": ("mmdit.model.convert_cli", "convert between diffusers and mmdit checkpoints"),
    "make-tiny-encoders": ("mmdit.producer.tiny_encoders", "write tiny random VAE/Qwen2.5-VL/tokenizer"),
    "synth": ("mmdit.producer.synth", "render synthetic text images as webdataset shards"),
    "produce": ("mmdit.producer.produce", "score, filter, bucket and encode shards into the cache"),
    "serve": ("mmdit.launch.serve", "run the coordinator and producers on this machine"),
    "producer": ("mmdit.dataservice.server", "one more producer for a running service (`mmdit serve`)"),
    "consume": ("mmdit.consumer.consume", "pull batches like a trainer, without a model"),
}


def usage() -> str:
    lines = ["usage: mmdit <command> [key=value ...]", "", "commands:"]
    lines += [f"  {name:<20} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, args = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mmdit: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    from mmdit.launch.config import ConfigError

    try:
        return module.main(args) or 0
    except ConfigError as e:
        print(f"mmdit {name}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
