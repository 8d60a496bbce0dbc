"""Edit conditioning equals diffusers: `encoders.edit_template=edit_plus` gives the features of
QwenImageEditPlusPipeline.encode_prompt, `edit` those of QwenImageEditPipeline.encode_prompt, on
the same source image and instruction (the tiny encoders); a cache of one kind refuses the other.

The pipelines are diffusers' own classes with their own `encode_prompt`, and their source image
is resized by their own `VaeImageProcessor` to their own `calculate_dimensions`, as `__call__`
does before calling `encode_prompt`. One part is substituted: transformers' `Qwen2VLProcessor`
cannot be built without torchvision (its video processor needs it), so the pipelines get
`VisionTextProcessor` below, which does what that processor's `__call__` does for images and
text: run the image processor (Qwen2VLImageProcessor, loaded from the encoders' processor/),
expand each `<|image_pad|>` to the image's `grid_thw.prod() // merge_size**2` tokens
(Qwen2VLProcessor.replace_image_token) and tokenize with padding.
"""

import pytest
import torch
from PIL import Image, ImageDraw

from mmdit.producer.prompts import EDIT_CONDITIONINGS, IMAGE_PAD


class VisionTextProcessor:
    """Qwen2VLProcessor's `__call__(text=, images=, padding=, return_tensors=)` (module docstring)."""

    def __init__(self, image_processor, tokenizer):
        self.image_processor, self.tokenizer = image_processor, tokenizer

    def __call__(self, text, images=None, padding=True, return_tensors="pt"):
        from transformers import BatchFeature

        images = [] if images is None else images if isinstance(images, list) else [images]
        vision = dict(self.image_processor(images=images, return_tensors=return_tensors)) if images else {}
        grids = iter(vision.get("image_grid_thw", []))
        merge = self.image_processor.merge_size ** 2

        def expand(t: str) -> str:
            head, *rest = t.split(IMAGE_PAD)
            return head + "".join(IMAGE_PAD * (int(next(grids).prod()) // merge) + part for part in rest)

        texts = [expand(t) for t in ([text] if isinstance(text, str) else text)]
        return BatchFeature({**self.tokenizer(texts, padding=padding, return_tensors=return_tensors), **vision})


def picture(width: int, height: int) -> Image.Image:
    img = Image.new("RGB", (width, height), (230, 225, 210))
    draw = ImageDraw.Draw(img)
    draw.rectangle((width // 5, height // 4, width * 3 // 4, height * 2 // 3), fill=(40, 90, 160))
    draw.ellipse((width // 2, height // 8, width * 7 // 8, height // 2), fill=(200, 60, 40))
    return img


def diffusers_features(name: str, enc, image: Image.Image, prompt: str) -> torch.Tensor:
    """`encode_prompt` of the diffusers pipeline `name` stands for, on the source image the
    pipeline's `__call__` would hand it."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline, QwenImageEditPlusPipeline
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit_module
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus_module

    from mmdit.producer.encoders import image_processor_class

    processor = VisionTextProcessor(image_processor_class().from_pretrained(enc.cfg.dir, subfolder="processor"),
                                    enc.tokenizer)
    cls = {"edit": QwenImageEditPipeline, "edit_plus": QwenImageEditPlusPipeline}[name]
    pipe = cls(scheduler=FlowMatchEulerDiscreteScheduler(), vae=enc.vae, text_encoder=enc.text_encoder,
               tokenizer=enc.tokenizer, processor=processor, transformer=None)
    ratio = image.width / image.height
    if name == "edit":  # QwenImageEditPipeline.__call__: calculate_dimensions(1024 * 1024, ...) -> resize
        width, height, _ = edit_module.calculate_dimensions(1024 * 1024, ratio)
        source = pipe.image_processor.resize(image, height, width)
    else:  # QwenImageEditPlusPipeline.__call__: the condition image at CONDITION_IMAGE_SIZE
        width, height = plus_module.calculate_dimensions(plus_module.CONDITION_IMAGE_SIZE, ratio)
        source = [pipe.image_processor.resize(image, height, width)]
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt(prompt, image=source, device=torch.device("cpu"))
    assert mask is None  # one prompt: every position valid
    return embeds[0].float()


@pytest.fixture(scope="module")
def encoders(tiny_encoders_dir):
    from mmdit.config.produce import EncodersConfig
    from mmdit.producer.encoders import Encoders

    return {name: Encoders.load(EncodersConfig(dir=tiny_encoders_dir, edit_template=name)) for name in EDIT_CONDITIONINGS}


@pytest.mark.parametrize("name", sorted(EDIT_CONDITIONINGS))
def test_edit_features_equal_the_diffusers_pipelines_encode_prompt(encoders, name):
    image, prompt = picture(300, 200), 'Change the sign to read "EXIT" 把背景换成红色'
    ours = encoders[name].encode_edit_prompts([prompt], [image])[0]
    theirs = diffusers_features(name, encoders[name], image, prompt)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < 1e-5
    other = "edit" if name == "edit_plus" else "edit_plus"  # and the other kind is not: the test can tell
    theirs_other = diffusers_features(other, encoders[name], image, prompt)
    assert ours.shape != theirs_other.shape or (ours - theirs_other).abs().max().item() > 1e-3


def test_the_default_is_edit_plus_and_the_kind_is_in_the_fingerprint(encoders):
    from mmdit.config.produce import EDIT_TEMPLATES, EncodersConfig

    assert EncodersConfig().edit_template == "edit_plus" and set(EDIT_TEMPLATES) == set(EDIT_CONDITIONINGS)
    assert encoders["edit"].fingerprint != encoders["edit_plus"].fingerprint
    with pytest.raises(ValueError, match="encoders.edit_template must be one of edit_plus, edit"):
        EncodersConfig(edit_template="plus")


def test_a_cache_of_one_edit_kind_refuses_the_other(encoders, tmp_path):
    from mmdit.config import ConfigError
    from mmdit.config.data import DataConfig
    from mmdit.config.produce import CacheConfig, SynthConfig
    from mmdit.producer.encoders import cache_kinds
    from mmdit.producer.produce import produce
    from mmdit.producer.synth.shards import write_shards

    shards = write_shards(str(tmp_path / "shards"), SynthConfig(num_samples=3, kinds={"pure": 1.0}, edit_fraction=1.0,
                                                                 min_side=128, max_side=160))
    data, cache = DataConfig(shards=shards), CacheConfig(dir=str(tmp_path / "cache"))
    report = produce(data, cache, encoders["edit_plus"], progress=False)
    assert report["tasks"] == {"edit": 3} and report["encoded"] == 3
    (recorded,) = cache_kinds(cache.dir).values()
    assert (recorded["edit_template"], recorded["edit_vision_area"]) == ("edit_plus", 384 * 384)
    with pytest.raises(ConfigError, match=r"edit_template='edit_plus' \(QwenImageEditPlusPipeline.*make 'edit' "
                                          r"\(QwenImageEditPipeline"):
        produce(data, cache, encoders["edit"], progress=False)
    assert produce(data, cache, encoders["edit_plus"], progress=False)["cache_hits"] == 3  # its own kind: hits
