"""train.grpo.reward=alignment (consumer/alignment_reward.py): the VAE's decode of the final
latents, scored against each prompt by a local CLIP model exactly as `mmdit eval` scores
alignment; its config needs alignment_model and encoders.dir.

Whether the reward prefers an image that matches its prompt is not tested: the tiny CLIP here has
random weights, so no image matches any prompt better than another in a way a test could rely on.
"""

from pathlib import Path

import pytest
import torch

from mmdit.config import ConfigError
from mmdit.config.loader import load_config

BASE = ["train.objective=grpo", "train.grpo.reward=alignment", "train.grpo.width=32", "train.grpo.height=32"]


@pytest.fixture(scope="module")
def encoders(tiny_encoders_dir):
    from mmdit.config.produce import EncodersConfig
    from mmdit.producer.encoders import Encoders

    return Encoders.load(EncodersConfig(dir=tiny_encoders_dir))


def prompts(*texts):
    from mmdit.consumer.text_eval.prompts import TextPrompt

    return [TextPrompt(str(i), t, ("X",), "en", "single_line") for i, t in enumerate(texts)]


def test_the_reward_is_the_alignment_score_of_the_decoded_image(tiny_encoders_dir, encoders):
    from mmdit.consumer.rewards import build_reward
    from mmdit.consumer.sample import Sampler
    from mmdit.producer.annotate.alignment import AlignmentScorer

    model_dir = str(Path(tiny_encoders_dir) / "alignment")
    cfg = load_config([*BASE, f"encoders.dir={tiny_encoders_dir}", f"train.grpo.alignment_model={model_dir}"])
    reward = build_reward(cfg.train.grpo, lambda: encoders)
    latents = torch.randn(3, encoders.latent_channels, 4, 6, generator=torch.Generator().manual_seed(0))
    asked = prompts('a neon sign that says "OPEN"', "a red apple on a table", "一块写着“欢迎光临”的红色招牌")
    got = reward(latents, asked)
    assert got.dtype == torch.float32 and got.shape == (3,)
    sampler = Sampler(torch.nn.Identity(), None, encoders)  # the sampler's own decode, one image at a time
    images = [sampler.decode(latents[i:i + 1]) for i in range(3)]
    expected = AlignmentScorer.load(model_dir).score(images, [p.prompt for p in asked])
    assert torch.allclose(got, torch.tensor(expected), atol=1e-5, rtol=0), (got, expected)
    assert len(set(got.tolist())) == 3 and all(-1 <= v <= 1 for v in got.tolist())
    try:  # submit(): the same scores from the background thread
        assert torch.equal(reward.submit(latents, asked).result(timeout=120), got)
    finally:
        reward.close()


def test_an_image_the_scorer_cannot_take_gets_nan_and_the_others_keep_their_scores(tiny_encoders_dir, encoders):
    from mmdit.consumer.alignment_reward import AlignmentReward
    from mmdit.producer.annotate.alignment import AlignmentScorer

    class Refuses(AlignmentScorer):  # the real scorer, failing on one caption
        def score(self, images, captions, batch_size=32):
            if "unscorable" in captions:
                raise RuntimeError("cannot score this one")
            return super().score(images, captions, batch_size)

    real = AlignmentScorer.load(str(Path(tiny_encoders_dir) / "alignment"))
    refuses = Refuses(real.model, real.processor)
    latents = torch.randn(3, encoders.latent_channels, 4, 4, generator=torch.Generator().manual_seed(1))
    asked = prompts("a cat", "unscorable", "a dog")
    got = AlignmentReward(encoders, "", scorer=refuses)(latents, asked)
    plain = AlignmentReward(encoders, "", scorer=real)(latents, asked)
    assert torch.isnan(got[1]) and torch.isfinite(plain).all()
    assert torch.allclose(got[[0, 2]], plain[[0, 2]], atol=1e-5, rtol=0)  # alone vs in a batch: float rounding


def test_alignment_needs_its_model_and_encoders_dir(tiny_encoders_dir, tmp_path):
    from mmdit.consumer.alignment_reward import AlignmentReward

    with pytest.raises(ConfigError, match="train.grpo.alignment_model"):
        load_config([*BASE, f"encoders.dir={tiny_encoders_dir}"])
    with pytest.raises(ConfigError, match="alignment needs encoders.dir"):
        load_config([*BASE, f"train.grpo.alignment_model={tiny_encoders_dir}/alignment"])
    with pytest.raises(ConfigError, match="has no config.json"):
        AlignmentReward(None, str(tmp_path))
