"""The device-side stand-ins for megatron's pure-torch gradient-norm and scale fallbacks."""

import torch

from mmdit.parallel import megatron_fallbacks as fb


def test_norm_and_scale_equal_the_plain_math():
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=g) for s in ((7, 3), (11,), (2, 5, 4))] + [torch.randn(6).bfloat16()]
    flag = torch.zeros(1, dtype=torch.int)
    norm, per_tensor = fb.foreach_l2_norm(2048, flag, [grads], False)
    expected = torch.cat([t.float().flatten() for t in grads]).norm()
    assert per_tensor is None and norm.shape == (1,) and norm.dtype == torch.float32
    torch.testing.assert_close(norm[0], expected)
    assert fb.foreach_l2_norm(2048, flag, [[]], False)[0].tolist() == [0.0]

    before = [t.clone() for t in grads[:3]]
    fb.foreach_scale(2048, flag, [grads[:3], grads[:3]], 0.25)  # in place, as clip_grads calls it
    for old, new in zip(before, grads[:3]):
        torch.testing.assert_close(new, old * 0.25)
    dst = [torch.zeros_like(t) for t in before]
    fb.foreach_scale(2048, flag, [before, dst], 2.0)
    for src, out in zip(before, dst):
        torch.testing.assert_close(out, src * 2.0)


def test_installed_only_where_megatron_fell_back():
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, distrib_optimizer

    saved = clip_grads.l2_norm_impl, clip_grads.multi_tensor_scale_impl
    try:
        installed = fb.install()
        assert installed == (saved[0] is utils.local_multi_tensor_l2_norm)
        if not distrib_optimizer.HAVE_APEX_OR_TE:  # this CPU machine: no TE, no apex
            assert installed and clip_grads.l2_norm_impl is fb.foreach_l2_norm
            assert clip_grads.multi_tensor_scale_impl is fb.foreach_scale
        assert fb.install() is False  # idempotent
    finally:
        clip_grads.l2_norm_impl, clip_grads.multi_tensor_scale_impl = saved
