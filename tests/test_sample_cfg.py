"""True CFG in `mmdit sample`: an empty negative prompt runs CFG against the empty prompt, as
QwenImagePipeline does with `negative_prompt=""`; unset keeps the default " "."""

import numpy as np
import pytest
from tiny_model import perturbed_tiny_model


@pytest.fixture(scope="module")
def sampler(tiny_encoders_dir):
    from mmdit.config.produce import EncodersConfig
    from mmdit.consumer.sample import Sampler
    from mmdit.parallel.state import destroy_parallel
    from mmdit.producer.encoders import Encoders

    built = perturbed_tiny_model()
    yield Sampler(built.model, built.plan, Encoders.load(EncodersConfig(dir=tiny_encoders_dir)))
    destroy_parallel()


def pixels(sampler, **settings) -> np.ndarray:
    from mmdit.consumer.sample import SampleConfig

    image = sampler.generate('a sign that reads "OPEN"', SampleConfig(64, 64, steps=2, **settings))
    return np.asarray(image, dtype=np.int16)


def test_an_empty_negative_prompt_runs_cfg_against_the_empty_prompt(sampler):
    empty = pixels(sampler, negative_prompt="")
    assert not np.array_equal(empty, pixels(sampler, true_cfg_scale=1.0))  # CFG ran (it used to be off)
    assert not np.array_equal(empty, pixels(sampler, negative_prompt=" "))  # against "", not the default
    assert np.array_equal(pixels(sampler), pixels(sampler, negative_prompt=" "))  # unset: the default " "
    assert np.array_equal(pixels(sampler, true_cfg_scale=1.0, negative_prompt=""),
                          pixels(sampler, true_cfg_scale=1.0))  # scale <= 1: no CFG, whatever the prompt


@pytest.mark.parametrize("tokens, wanted", [([], None), (["negative_prompt="], ""), (['negative_prompt=""'], ""),
                                            (["negative_prompt=blurry"], "blurry")])
def test_the_command_line_keeps_an_empty_negative_prompt(tokens, wanted):
    from mmdit.launch.args import parse
    from mmdit.launch.sample import COMMAND

    cfg = parse(COMMAND, ["RUN", "prompt=a", *tokens]).keys.sampling()
    assert cfg.negative_prompt == wanted and cfg.guided
