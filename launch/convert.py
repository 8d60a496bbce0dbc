"""`mmdit convert`: diffusers <-> mmdit checkpoints, and a numerical check against diffusers.

    mmdit convert from-diffusers SRC DST [--tp N]   diffusers transformer (or Qwen-Image repo) -> mmdit
    mmdit convert to-diffusers SRC DST               mmdit checkpoint -> diffusers (from_pretrained-able)
    mmdit convert verify SRC [--tp N] [--seed S]     run diffusers and mmdit on the same inputs
"""

import json

import torch

from mmdit.config.model import MMDiTArgs
from mmdit.launch.args import Action, Command, Flag, parse
from mmdit.model.checkpoint import checkpoint_args, load_full_state_dict_from, save_full_state_dict
from mmdit.model.diffusers_io import read_diffusers, transformer_dir, write_diffusers
from mmdit.model.mmdit import build_mmdit, pack_latents, packed_shape
from mmdit.model.sharding import diffusers_partition_dims

TP = Flag("tp", "tensor-parallel ranks: shards written (from-diffusers), gloo ranks run (verify)", int, 1, "N")
COMMAND = Command("convert", __doc__, actions=(
    Action("from-diffusers", "diffusers -> mmdit", flags=(TP,), overrides=None,
           paths={"SRC": "a diffusers QwenImageTransformer2DModel dir, or a Qwen-Image repo (its transformer/)",
                  "DST": "the mmdit checkpoint to write"}),
    Action("to-diffusers", "mmdit -> diffusers", overrides=None,
           paths={"SRC": "an mmdit checkpoint", "DST": "the diffusers dir to write (from_pretrained loads it)"}),
    Action("verify", "diffusers and mmdit on the same inputs: max_abs_diff per case", overrides=None,
           paths={"SRC": "a diffusers transformer dir"}, flags=(TP, Flag("seed", "seed of the inputs", int, 0, "S"))),
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


def to_diffusers(src: str, dst: str) -> None:
    write_diffusers(load_full_state_dict_from(src), checkpoint_args(src), dst)


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
        to_diffusers(src, args.paths[1])
        print(json.dumps({"converted": src, "to": args.paths[1]}))
    else:
        print(json.dumps(verify(src, flags.tp, flags.seed)))
    return 0
