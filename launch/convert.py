"""`mmdit convert`: diffusers <-> mmdit checkpoints, and a numerical check against diffusers.

    mmdit convert from-diffusers SRC DST [--tp N]   diffusers transformer (or Qwen-Image repo) -> mmdit
    mmdit convert to-diffusers SRC DST [weights=ema] mmdit checkpoint -> diffusers (from_pretrained-able); with
                                                     weights=ema, a training checkpoint's EMA weights
    mmdit convert verify SRC [--tp N] [--seed S]     run diffusers and mmdit on the same inputs
    mmdit convert lora-to-diffusers SRC DST          mmdit LoRA checkpoint -> pytorch_lora_weights.safetensors
                                                     (QwenImagePipeline.load_lora_weights loads it)
    mmdit convert merge SRC DST [--base B] [--tp N]  mmdit LoRA checkpoint folded into its base -> a full checkpoint
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from mmdit.config.model import MMDiTArgs
from mmdit.launch.args import Action, Command, Flag, parse
from mmdit.model.checkpoint import checkpoint_args, load_full_state_dict_from, save_full_state_dict
from mmdit.model.diffusers_io import read_diffusers, transformer_dir, write_diffusers
from mmdit.model.mmdit import build_mmdit, pack_latents, packed_shape
from mmdit.model.sharding import diffusers_partition_dims


@dataclass
class ToDiffusersKeys:
    weights: str = "raw"
    """raw: the trained weights | ema: their moving average (SRC: a training checkpoint of a run with
    train.ema_decay > 0, its step_N/ or step_N/model/)."""

    def __post_init__(self):
        if self.weights not in ("raw", "ema"):
            raise ValueError(f"weights must be raw or ema, got {self.weights!r}")


TP = Flag("tp", "tensor-parallel ranks: shards written (from-diffusers), gloo ranks run (verify)", int, 1, "N")
COMMAND = Command("convert", __doc__, actions=(
    Action("from-diffusers", "diffusers -> mmdit", flags=(TP,), overrides=None,
           paths={"SRC": "a diffusers QwenImageTransformer2DModel dir, or a Qwen-Image repo (its transformer/)",
                  "DST": "the mmdit checkpoint to write"}),
    Action("to-diffusers", "mmdit -> diffusers", overrides=None, keys=ToDiffusersKeys,
           paths={"SRC": "an mmdit checkpoint", "DST": "the diffusers dir to write (from_pretrained loads it)"}),
    Action("verify", "diffusers and mmdit on the same inputs: max_abs_diff per case", overrides=None,
           paths={"SRC": "a diffusers transformer dir"}, flags=(TP, Flag("seed", "seed of the inputs", int, 0, "S"))),
    Action("lora-to-diffusers", "mmdit LoRA checkpoint -> diffusers/PEFT LoRA file", overrides=None,
           paths={"SRC": "an mmdit LoRA checkpoint (a LoRA run's checkpoints/step_N/model)",
                  "DST": "a dir (gets pytorch_lora_weights.safetensors) or a .safetensors file"}),
    Action("merge", "fold a LoRA checkpoint into its base weights", overrides=None,
           flags=(Flag("base", "the base weights (default: the run's checkpoint.init_from, as the LoRA "
                               "checkpoint records)", str, "", "DIR"), TP),
           paths={"SRC": "an mmdit LoRA checkpoint", "DST": "the full mmdit checkpoint to write"}),
))


def meta_partition_dims(args: MMDiTArgs) -> dict:
    from mmdit.parallel.state import init_parallel, tp_group

    init_parallel(1)
    return diffusers_partition_dims(build_mmdit(args, tp_group(), device="meta"))


def from_diffusers(src: str, dst: str, tp: int = 1) -> None:
    args, state = read_diffusers(src)
    dims = meta_partition_dims(args)
    if set(state) != set(dims):
        raise KeyError(f"{src}: unexpected parameters {sorted(set(state) - set(dims))[:8]}, "
                       f"missing {sorted(set(dims) - set(state))[:8]}")
    save_full_state_dict(state, args, dims, dst, tp)


def to_diffusers(src: str, dst: str, weights: str = "raw") -> None:
    from mmdit.model.checkpoint import is_checkpoint

    src = str(Path(src) / "model") if not is_checkpoint(src) and is_checkpoint(Path(src) / "model") else src
    state, args = load_full_state_dict_from(src), checkpoint_args(src)
    if weights == "ema":
        state = with_ema(state, src, args)
    write_diffusers(state, args, dst)


def with_ema(state: dict[str, torch.Tensor], src: str, args: MMDiTArgs) -> dict[str, torch.Tensor]:
    """`state` (diffusers names) with the EMA weights beside the checkpoint `src` in place of the
    trained ones, in their dtype."""
    from mmdit.model.qkv import to_diffusers as diffusers_named
    from mmdit.parallel.ema import ema_dir_of, full_ema_tensors

    averaged = dict(diffusers_named(full_ema_tensors(ema_dir_of(Path(src))).items(), args.attention_head_dim))
    unknown = sorted(set(averaged) - set(state))
    if unknown:
        raise ValueError(f"{src}: its EMA averages parameters the checkpoint lacks ({', '.join(unknown[:4])}); "
                         "an EMA of LoRA adapters is not converted here")
    return {name: averaged[name].to(t.dtype) if name in averaged else t for name, t in state.items()}


def lora_record(src: str) -> dict:
    from mmdit.model.checkpoint import read_index

    record = read_index(src).get("lora")
    if record is None:
        raise ValueError(f"{src} is a full mmdit checkpoint, not a LoRA one")
    return record


def lora_to_diffusers(src: str, dst: str) -> str:
    from mmdit.model.lora_io import write_diffusers_lora

    return str(write_diffusers_lora(load_full_state_dict_from(src), lora_record(src)["scale"], dst))


def merge_lora(src: str, dst: str, base: str = "", tp: int = 1) -> str:
    """Write base + scale B A of every adapter as a full mmdit checkpoint at TP=tp; the base
    defaults to what the LoRA run started from."""
    from mmdit.model.checkpoint import is_checkpoint
    from mmdit.model.lora_io import merge_into

    record = lora_record(src)
    base = base or record.get("base", "")
    if not base:
        raise ValueError(f"{src}: its run started from init_weights(seed={record.get('seed')}), no base "
                         "weights on disk; pass --base")
    args = checkpoint_args(src)
    state = load_full_state_dict_from(base) if is_checkpoint(base) else read_diffusers(base)[1]
    save_full_state_dict(merge_into(state, load_full_state_dict_from(src), record["scale"]), args,
                         meta_partition_dims(args), dst, tp)
    return base


def verification_cases(args: MMDiTArgs, seed: int) -> dict[str, dict]:
    """A text-to-image batch with a padded text mask, and an edit batch whose condition image
    (another size) follows the target as frame 1."""
    g = torch.Generator().manual_seed(seed)
    c = args.latent_channels

    def latents(b, h, w):
        return torch.randn(b, c, h, w, generator=g)

    text = torch.randn(2, 12, args.joint_attention_dim, generator=g)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 7:] = False
    target, cond = latents(2, 16, 24), latents(2, 8, 32)
    sigmas = torch.rand(2, generator=g)
    return {
        "t2i": dict(img_tokens=pack_latents(target), txt=text, txt_mask=mask, sigmas=sigmas,
                    image_shapes=[packed_shape(16, 24)]),
        "edit": dict(img_tokens=torch.cat([pack_latents(target), pack_latents(cond)], dim=1), txt=text,
                     txt_mask=mask, sigmas=sigmas, image_shapes=[packed_shape(16, 24), packed_shape(8, 32)]),
    }


def mmdit_outputs(rank: int, src: str, tp: int, seed: int) -> dict[str, torch.Tensor] | None:
    """Run on each of tp ranks: build this rank's shard, load SRC, return rank 0's outputs."""
    from mmdit.model.checkpoint import load_weights, weights_args
    from mmdit.parallel.state import init_parallel, tp_group

    init_parallel(tp)
    args = weights_args(src)
    model = build_mmdit(args, tp_group())
    load_weights(model, src)
    with torch.no_grad():
        outputs = {name: model(**case) for name, case in verification_cases(args, seed).items()}
    return outputs if rank == 0 else None


def verify(src: str, tp: int = 1, seed: int = 0) -> dict:
    from diffusers import QwenImageTransformer2DModel

    from mmdit.parallel.spawn import spawn

    reference = QwenImageTransformer2DModel.from_pretrained(transformer_dir(src), torch_dtype=torch.float32).eval()
    args = MMDiTArgs.from_diffusers_config(dict(reference.config))
    ours = spawn(mmdit_outputs, tp, src, tp, seed)[0]
    result = {"tp": tp, "seed": seed}
    for name, case in verification_cases(args, seed).items():
        with torch.no_grad():
            expected = reference(hidden_states=case["img_tokens"], encoder_hidden_states=case["txt"],
                                 encoder_hidden_states_mask=case["txt_mask"], timestep=case["sigmas"],
                                 img_shapes=[case["image_shapes"]] * case["txt"].shape[0]).sample
        result[name] = {"max_abs_diff": (ours[name] - expected).abs().max().item(),
                        "max_abs_ref": expected.abs().max().item()}
    return result


def main(argv: list[str]) -> int:
    args = parse(COMMAND, argv)
    src, flags = args.paths[0], args.flags
    if args.action == "from-diffusers":
        from_diffusers(src, args.paths[1], flags.tp)
        print(json.dumps({"converted": src, "to": args.paths[1], "tp": flags.tp}))
    elif args.action == "to-diffusers":
        to_diffusers(src, args.paths[1], args.keys.weights)
        print(json.dumps({"converted": src, "to": args.paths[1], "weights": args.keys.weights}))
    elif args.action == "lora-to-diffusers":
        print(json.dumps({"converted": src, "to": lora_to_diffusers(src, args.paths[1])}))
    elif args.action == "merge":
        base = merge_lora(src, args.paths[1], flags.base, flags.tp)
        print(json.dumps({"merged": src, "base": base, "to": args.paths[1], "tp": flags.tp}))
    else:
        print(json.dumps(verify(src, flags.tp, flags.seed)))
    return 0
