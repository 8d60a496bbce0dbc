"""Qwen-Image prompt templates and the token ids they produce.

Qwen-Image conditions its MMDiT on Qwen2.5-VL's last hidden state (after the final norm) of a
chat-formatted prompt, with the chat prefix (system message + user header) dropped: 34 tokens for
text-to-image, 64 for editing. The strings below are copied from diffusers' `QwenImagePipeline`,
`QwenImageEditPipeline` and `QwenImageEditPlusPipeline` (diffusers/pipelines/qwenimage/), so
features cached here are the features those pipelines compute at inference.

Editing comes in two kinds (`EDIT_CONDITIONINGS`, chosen by `encoders.edit_template`), one per
pipeline, and a model conditioned on one kind must be sampled with the same kind:
- `edit_plus` (QwenImageEditPlusPipeline, Qwen-Image-Edit-2509 and later): the source image
  resized to about 384x384 pixels, announced as "Picture 1: " before its vision tokens;
- `edit` (QwenImageEditPipeline, the first Qwen-Image-Edit): the source image at about
  1024x1024 pixels (some 1300 vision tokens), its vision tokens right after the user header.

The drop counts are properties of the template *and* the tokenizer: `check_drop` verifies that the
loaded tokenizer turns each prefix into exactly `drop` tokens, so a tokenizer that does not match
the template is an error at load time instead of silently shifted features.

Token ids are those of `tokenizer(template.format(text))`, the pipelines' own call, whenever the
prompt fits `max_tokens` kept tokens. Two deliberate differences: a longer prompt is cut inside the
user text and keeps the chat suffix (`<|im_end|>\\n<|im_start|>assistant\\n`; diffusers would cut
the suffix instead), and vision special tokens written literally in a caption are removed (they
would desynchronise image features and image tokens and fail the whole batch).
"""

from dataclasses import dataclass

IMAGE_PAD = "<|image_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
VISION_PLACEHOLDER = f"{VISION_START}{IMAGE_PAD}{VISION_END}"
VISION_TOKENS = (VISION_START, VISION_END, "<|vision_pad|>", IMAGE_PAD, "<|video_pad|>")
USER_HEADER = "<|im_start|>user\n"

T2I_SYSTEM = (
    "Describe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:"
)
EDIT_SYSTEM = (
    "Describe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. "
    "Generate a new image that meets the user's requirements while maintaining consistency with "
    "the original input where appropriate."
)


@dataclass(frozen=True)
class PromptTemplate:
    """A chat template with one `{}` slot for the user text, and the prefix tokens to drop."""

    name: str
    template: str
    drop: int
    """Tokens of the system message + user header; their hidden states are not features."""

    @property
    def prefix(self) -> str:
        """The dropped part: everything up to and including the user header."""
        return self.template[: self.template.index(USER_HEADER) + len(USER_HEADER)]

    @property
    def suffix(self) -> str:
        """Everything after the user text (the chat turn end and the assistant header)."""
        return self.template.split("{}", 1)[1]

    @property
    def has_image(self) -> bool:
        return VISION_PLACEHOLDER in self.template

    def format(self, text: str, image_tokens: int = 0) -> str:
        """The full prompt; `<|image_pad|>` expanded to `image_tokens` copies, as the processor does."""
        if self.has_image != (image_tokens > 0):
            raise ValueError(f"template {self.name!r}: image_tokens={image_tokens} does not fit the template")
        for token in VISION_TOKENS:
            text = text.replace(token, "")
        template = self.template.replace(IMAGE_PAD, IMAGE_PAD * image_tokens, 1) if image_tokens else self.template
        return template.format(text)


T2I_TEMPLATE = PromptTemplate(
    name="t2i",
    template=f"<|im_start|>system\n{T2I_SYSTEM}<|im_end|>\n{USER_HEADER}{{}}<|im_end|>\n<|im_start|>assistant\n",
    drop=34,
)
EDIT_TEMPLATE = PromptTemplate(
    name="edit",
    template=(
        f"<|im_start|>system\n{EDIT_SYSTEM}<|im_end|>\n{USER_HEADER}{VISION_PLACEHOLDER}{{}}"
        "<|im_end|>\n<|im_start|>assistant\n"
    ),
    drop=64,
)
EDIT_PLUS_TEMPLATE = PromptTemplate(
    name="edit_plus",
    # QwenImageEditPlusPipeline formats "Picture 1: <vision>" + the instruction into its
    # template; written here as one template, the string (and its tokens) are the same
    template=(
        f"<|im_start|>system\n{EDIT_SYSTEM}<|im_end|>\n{USER_HEADER}Picture 1: {VISION_PLACEHOLDER}{{}}"
        "<|im_end|>\n<|im_start|>assistant\n"
    ),
    drop=64,
)


@dataclass(frozen=True)
class EditConditioning:
    """How one diffusers edit pipeline turns (source image, instruction) into prompt features."""

    name: str
    template: PromptTemplate
    vision_area: int
    """Pixel area the source image is resized to (aspect kept, sides multiples of 32) before
    Qwen2.5-VL's processor sees it."""
    pipeline: str
    """The diffusers pipeline whose `encode_prompt` these features equal."""


EDIT_CONDITIONINGS = {
    "edit_plus": EditConditioning("edit_plus", EDIT_PLUS_TEMPLATE, 384 * 384, "QwenImageEditPlusPipeline"),
    "edit": EditConditioning("edit", EDIT_TEMPLATE, 1024 * 1024, "QwenImageEditPipeline"),
}
"""`encoders.edit_template` -> its conditioning (the module docstring)."""


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def check_drop(tokenizer, template: PromptTemplate) -> None:
    """Raise if `tokenizer` does not turn the template's prefix into exactly `drop` tokens."""
    n = len(_ids(tokenizer, template.prefix))
    if n != template.drop:
        raise ValueError(
            f"tokenizer splits the {template.name} template prefix into {n} tokens, but the template "
            f"drops {template.drop}: this tokenizer does not belong to the Qwen-Image text encoder"
        )


def build_input_ids(
    tokenizer, template: PromptTemplate, text: str, max_tokens: int, image_tokens: int = 0
) -> list[int]:
    """Token ids of one prompt: at most `template.drop + image_tokens + max_tokens`, chat suffix
    always kept.

    `image_tokens` is the number of `<|image_pad|>` tokens of the source image (edit templates);
    they come on top of `max_tokens`, as the edit pipelines never cut an image's tokens (the
    first edit pipeline's 1024x1024 source alone is some 1300 of them).
    """
    ids = _ids(tokenizer, template.format(text, image_tokens))
    if len(ids) - template.drop - image_tokens <= max_tokens:
        return ids
    suffix = _ids(tokenizer, template.suffix)
    head = template.drop + image_tokens + max_tokens - len(suffix)
    fixed = len(_ids(tokenizer, template.format("", image_tokens))) - len(suffix)
    if head < fixed:
        raise ValueError(
            f"{template.name} prompt: the template's own tokens alone exceed max_tokens={max_tokens} "
            "(beside the image's); raise encoders.max_text_tokens"
        )
    return ids[:head] + suffix
