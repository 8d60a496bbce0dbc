"""`mmdit make-tiny-encoders DIR`: a tiny random-weight stand-in for the Qwen-Image encoders.

There is no model hub here, and tests and the demo must still load the encoders through the code
path that loads the real 20B release. So this writes the public repository layout with real
`save_pretrained` checkpoints of the real classes, only small:

  DIR/vae/            AutoencoderKLQwenImage (base_dim 8, z_dim 16, the release's latents_mean/std)
  DIR/text_encoder/   Qwen2_5_VLForConditionalGeneration (hidden 64, 2 layers, 2-block vision tower)
  DIR/tokenizer/      byte-level BPE trained here with Qwen2's pre-tokenizer and special tokens,
                      plus the Qwen2-VL chat template
  DIR/processor/      Qwen2VLImageProcessor config + tokenizer (where Qwen-Image-Edit keeps them)
  DIR/alignment/      CLIPModel + CLIPProcessor (byte-level vocabulary, no merges) for `mmdit annotate`

The BPE is trained on the prompt templates' system texts and on synth-style captions, so every
word of the template prefixes is one token, as in Qwen's real 151k vocabulary: the prefixes come to
34 and 64 tokens exactly, and the pipeline's drop counts hold for the tiny tokenizer too (checked
before anything is written).
"""

import json
from pathlib import Path

import torch

from mmdit.producer.prompts import EDIT_SYSTEM, EDIT_TEMPLATE, T2I_SYSTEM, T2I_TEMPLATE, check_drop

PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
"""Qwen2's pre-tokenizer split (transformers' Qwen2Tokenizer uses the same)."""

SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
"""Qwen2.5-VL's special tokens, in the release's id order (appended after the BPE vocabulary)."""
EXTRA_TOKENS = ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")
"""Qwen2.5's non-special added tokens, kept so token ids line up with the release's layout."""

CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""The Qwen2-VL / Qwen2.5-VL chat template (Qwen-Image's prompt templates are this format)."""

BPE_VOCAB = 3000
TEXT_HIDDEN = 64


def _corpus() -> list[str]:
    from mmdit.producer.synth.shards import text_corpus

    templates = [T2I_SYSTEM, EDIT_SYSTEM, "system\nuser\nassistant\n"] * 50
    return templates + text_corpus(n=400, seed=0)


def build_tokenizer():
    """Train the byte-level BPE and wrap it as the Qwen2 tokenizer class the release uses."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import AddedToken, Qwen2Tokenizer

    bpe = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB, min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(_corpus(), trainer)
    model = json.loads(bpe.to_str())["model"]
    tokenizer = Qwen2Tokenizer(
        vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]],
        errors="replace", model_max_length=131072, padding_side="right", clean_up_tokenization_spaces=False,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    tokenizer.add_tokens([AddedToken(t, special=False) for t in EXTRA_TOKENS])
    tokenizer.chat_template = CHAT_TEMPLATE
    for template in (T2I_TEMPLATE, EDIT_TEMPLATE):
        check_drop(tokenizer, template)
    return tokenizer


def text_encoder_config(tokenizer):
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab = (len(tokenizer) + 63) // 64 * 64
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=TEXT_HIDDEN, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
            rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                                "mrope_section": [2, 3, 3]},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=TEXT_HIDDEN,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
            fullatt_block_indexes=[1], tokens_per_second=2,
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def image_processor():
    """Qwen2.5-VL's preprocessing (patch 14, merge 2, CLIP mean/std, the release's pixel bounds)."""
    from mmdit.producer.encoders import image_processor_class

    return image_processor_class()(
        min_pixels=3136, max_pixels=12845056, patch_size=14, temporal_patch_size=2, merge_size=2,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    )


def make_tiny_alignment(out: Path, seed: int = 0) -> Path:
    """A tiny random CLIP (32 text positions, 32x32 images) that AutoModel/AutoProcessor load."""
    import transformers
    from tokenizers import pre_tokenizers
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # every byte, so any caption tokenizes
    tokens = ["<|startoftext|>", "<|endoftext|>", *alphabet, *(a + "</w>" for a in alphabet)]
    tokenizer = CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=32)
    # the PIL backend (transformers >= 5) needs no torchvision; before 5 it was the only one
    image_processor_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    image_processor = image_processor_cls(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokens), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    CLIPModel(config).eval().save_pretrained(out)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out


def make_tiny_encoders(out_dir: str, seed: int = 0) -> Path:
    """Write the tiny encoders to `out_dir` (created; existing files are overwritten)."""
    from diffusers import AutoencoderKLQwenImage
    from transformers import Qwen2_5_VLForConditionalGeneration

    out = Path(out_dir)
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1)
    vae.save_pretrained(out / "vae")
    model = Qwen2_5_VLForConditionalGeneration(text_encoder_config(tokenizer)).eval()
    model.save_pretrained(out / "text_encoder")
    tokenizer.save_pretrained(out / "tokenizer")
    tokenizer.save_pretrained(out / "processor")
    image_processor().save_pretrained(out / "processor")
    make_tiny_alignment(out / "alignment", seed)
    return out
