"""The MMDiT against diffusers' QwenImageTransformer2DModel, MSRoPE, sizes and recompute."""

import dataclasses

import pytest
import torch
from diffusers import QwenImageTransformer2DModel
from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope
from model_workers import forward_backward, random_full_state_dict

from mmdit.config.loader import load_config
from mmdit.model.attention import TextPadding, resolve_attention
from mmdit.launch.convert import verification_cases
from mmdit.launch.model_info import model_info
from mmdit.model.init import init_weights
from mmdit.model.mmdit import build_mmdit, pack_latents, unpack_latents
from mmdit.model.qkv import diffusers_names, fuse, unfuse
from mmdit.model.rope import msrope
from mmdit.model.sharding import load_full_state_dict, partition_dims
from mmdit.parallel.state import init_parallel, tp_group

TINY = load_config([]).model


@pytest.fixture(scope="module")
def reference_and_ours():
    torch.manual_seed(0)
    config = {k: v for k, v in TINY.diffusers_config().items() if not k.startswith("_")}
    reference = QwenImageTransformer2DModel(**config).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.02 * torch.randn_like(p))  # leave no zero-initialized weight untested
    init_parallel(1)
    ours = build_mmdit(TINY, tp_group())
    load_full_state_dict(ours, reference.state_dict())
    return reference, ours


def with_attention(model, attention: str):
    """The same weights under another attention kernel."""
    other = build_mmdit(TINY, tp_group(), attention=attention)
    other.load_state_dict(model.state_dict())
    return other


@pytest.mark.parametrize("attention", ["sdpa", "varlen"])
@pytest.mark.parametrize("case", ["t2i", "edit"])
def test_forward_matches_diffusers(reference_and_ours, case, attention):
    reference, ours = reference_and_ours
    ours = with_attention(ours, attention)
    inputs = verification_cases(TINY, seed=3)[case]
    assert not inputs["txt_mask"].all(), "the text mask must pad something"
    with torch.no_grad():
        expected = reference(hidden_states=inputs["img_tokens"], encoder_hidden_states=inputs["txt"],
                             encoder_hidden_states_mask=inputs["txt_mask"], timestep=inputs["sigmas"],
                             img_shapes=[inputs["image_shapes"]] * 2).sample
        got = ours(**inputs)
    assert expected.abs().max() > 0.1
    assert (got - expected).abs().max().item() <= 1e-5


def test_varlen_attention_gives_the_gradients_of_masked_sdpa(reference_and_ours):
    """Packing the real tokens (no mask) against masking the padded ones: the same loss and the
    same gradient for every parameter, on a micro-batch padded differently per sample."""
    _, ours = reference_and_ours
    inputs = verification_cases(TINY, seed=5)["edit"]
    inputs["txt_mask"][0, :] = True  # one full prompt, one padded: as after the trainer's trim
    grads = {}
    for attention in ("sdpa", "varlen"):
        model = with_attention(ours, attention)
        out = model(**inputs)
        (out.square().mean() + out[:, ::3].sum() * 1e-3).backward()
        grads[attention] = (out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    (out_sdpa, g_sdpa), (out_varlen, g_varlen) = grads["sdpa"], grads["varlen"]
    assert torch.allclose(out_sdpa, out_varlen, atol=1e-5)
    assert g_sdpa.keys() == g_varlen.keys() and len(g_sdpa) > 50
    for name in g_sdpa:
        assert torch.allclose(g_sdpa[name], g_varlen[name], rtol=1e-4, atol=1e-6), name


def test_text_padding_packs_each_sample_text_prefix_then_its_image():
    mask = torch.tensor([[True, True, False, False], [True, True, True, True], [True, False, False, False]])
    padding = TextPadding.of(mask, num_image_tokens=3)
    assert padding.lengths == (5, 7, 4) and padding.cu_seqlens.tolist() == [0, 5, 12, 16]
    assert padding.index.tolist() == [0, 1, 4, 5, 6, *range(7, 14), 14, 18, 19, 20]
    assert TextPadding.of(None, 3) is None


def test_attention_kernel_is_checked_by_the_config():
    with pytest.raises(Exception, match="parallel.attention must be one of"):
        load_config(["parallel.attention=flash3"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs Transformer Engine on a GPU"):
            resolve_attention("te")
    assert resolve_attention("auto") == "sdpa"


def test_padding_changes_nothing_for_valid_tokens(reference_and_ours):
    _, ours = reference_and_ours
    inputs = verification_cases(TINY, seed=4)["t2i"]
    padded = dict(inputs, txt=inputs["txt"].clone())
    padded["txt"][1, 7:] = 1e3  # masked tokens: must not influence image outputs
    with torch.no_grad():
        assert torch.allclose(ours(**inputs)[1], ours(**padded)[1], atol=1e-5)


@pytest.mark.parametrize("image_shapes,text_len", [([(1, 8, 12)], 5), ([(1, 7, 9), (1, 4, 16)], 11),
                                                   ([(1, 64, 64)], 300)])
def test_msrope_matches_diffusers(image_shapes, text_len):
    axes = [16, 56, 56]
    img_freqs, txt_freqs = QwenEmbedRope(theta=10000, axes_dim=axes, scale_rope=True)(
        [image_shapes], device=torch.device("cpu"), max_txt_seq_len=text_len)
    cos, sin = msrope(image_shapes, text_len, axes)
    expected = torch.cat([txt_freqs, img_freqs])
    assert cos.shape == expected.shape
    assert torch.allclose(cos, expected.real, atol=1e-6) and torch.allclose(sin, expected.imag, atol=1e-6)


def test_pack_unpack_roundtrip():
    x = torch.randn(2, 16, 6, 10)
    assert torch.equal(unpack_latents(pack_latents(x), 6, 10), x)


def test_params_total_of_released_model():
    from mmdit.parallel.state import destroy_parallel

    destroy_parallel()  # model_info forms its own (fake) 8-rank group
    info = model_info(load_config(["model=qwen_image_20b"]).model, tp=8)
    assert info["params_total"] == 20_430_401_088
    assert info["params_per_rank"] < info["params_total"] / 7.8


def test_every_large_matrix_is_split_at_tp8():
    """At TP=8 no rank holds more than 1/8 of any weight matrix but the small replicated ones."""
    from mmdit.parallel.state import destroy_parallel, init_fake_parallel

    args = load_config(["model=qwen_image_20b"]).model
    destroy_parallel()
    init_fake_parallel(8)
    try:
        model = build_mmdit(args, tp_group(), device="meta")
        dims = partition_dims(model)
        allowed = ("time_text_embed.", "txt_norm.", "norm_out.", "img_in.", "txt_in.", "proj_out.")
        for name, p in model.named_parameters():
            if p.dim() == 2 and not name.startswith(allowed):
                assert dims[name] is not None, f"{name} is replicated"
                assert p.numel() * 8 <= (3072 * 6 * 3072 if "_mod" in name else 3072 * 12288), name
    finally:
        destroy_parallel()
        init_parallel(1)


@pytest.mark.parametrize("policy", ["full", "every_k", "attention", "mlp", "elementwise"])
def test_recompute_changes_no_gradient(policy):
    state = random_full_state_dict(TINY, seed=5)
    base = forward_backward(0, TINY, 1, state, "none")
    got = forward_backward(0, TINY, 1, state, policy)
    assert torch.equal(base["out"], got["out"])
    assert base["grads"].keys() == got["grads"].keys()
    for name in base["grads"]:
        assert torch.allclose(base["grads"][name], got["grads"][name], atol=1e-7, rtol=1e-6), name


@pytest.mark.slow  # inductor compiles the block's forward and backward: tens of seconds on 2 cores
def test_compiled_blocks_match_eager():
    """With the selective recompute policy too: checkpointing wraps the compiled blocks."""
    state = random_full_state_dict(TINY, seed=5)
    base = forward_backward(0, TINY, 1, state, "none")
    got = forward_backward(0, TINY, 1, state, "elementwise", compile=True)
    torch.testing.assert_close(got["out"], base["out"], atol=1e-5, rtol=1e-4)
    for name in base["grads"]:
        torch.testing.assert_close(got["grads"][name], base["grads"][name], atol=1e-5, rtol=1e-4, msg=name)


def test_last_block_text_stream_is_frozen():
    init_parallel(1)
    model = build_mmdit(TINY, tp_group(), device="meta")
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    last = TINY.num_layers - 1
    assert frozen and all(n.startswith(f"transformer_blocks.{last}.") for n in frozen)
    assert all(".to_add_out." in n or ".txt_mlp." in n for n in frozen)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="axes_dims_rope"):
        dataclasses.replace(TINY, axes_dims_rope=[8, 12, 14])
    with pytest.raises(ValueError, match="must divide model.num_attention_heads"):
        init_parallel(1)
        from mmdit.model.layers import make_linear_provider

        make_linear_provider(TINY, 3, None)


@pytest.mark.parametrize("tp", [1, 2, 3, 6])
def test_fused_qkv_chunks_hold_whole_heads_at_any_tp(tp):
    """The head-major fused layout: a rank's contiguous 1/TP chunk is the fusion of its slices of
    q, k and v, so TP sharding commutes with the diffusers name map; unfuse inverts fuse."""
    heads, head_dim, dim = 6, 4, 5
    g = torch.Generator().manual_seed(tp)
    for shape in ((heads * head_dim, dim), (heads * head_dim,)):
        parts = [torch.randn(shape, generator=g) for _ in range(3)]
        fused = fuse(parts, head_dim)
        assert all(torch.equal(a, b) for a, b in zip(unfuse(fused, head_dim), parts))
        for rank in range(tp):
            local = [p.chunk(tp)[rank] for p in parts]
            assert torch.equal(fused.chunk(tp)[rank], fuse(local, head_dim))
    assert diffusers_names("transformer_blocks.3.attn.add_qkv_proj.bias") == [
        "transformer_blocks.3.attn.add_q_proj.bias", "transformer_blocks.3.attn.add_k_proj.bias",
        "transformer_blocks.3.attn.add_v_proj.bias"]
    assert diffusers_names("transformer_blocks.3.attn.to_out.0.weight") == ["transformer_blocks.3.attn.to_out.0.weight"]


def test_checkpoint_files_keep_diffusers_names(tmp_path):
    """What a saved model holds is named and laid out as diffusers' QwenImageTransformer2DModel."""
    from mmdit.model.checkpoint import load_full_state_dict_from, save_model

    init_parallel(1)
    model = build_mmdit(TINY, tp_group())
    init_weights(model, seed=1)
    save_model(model, tmp_path)
    config = {k: v for k, v in TINY.diffusers_config().items() if not k.startswith("_")}
    reference = QwenImageTransformer2DModel(**config)
    saved = load_full_state_dict_from(tmp_path)
    assert set(saved) == set(reference.state_dict())
    assert all(saved[k].shape == v.shape for k, v in reference.state_dict().items())
    q = saved["transformer_blocks.0.attn.to_q.weight"]
    assert torch.equal(model.transformer_blocks[0].attn.to_qkv.weight.unflatten(0, (-1, 3, TINY.attention_head_dim))[:, 0]
                       .flatten(0, 1), q)
