"""Image-caption alignment: the cosine similarity of a CLIP or SigLIP model's image and text
embeddings, in [-1, 1] (SigLIP's logit scale and bias are left out: they only rescale it).

The model and its processor come from a local directory through `AutoModel` / `AutoProcessor`,
so any dual encoder with `get_image_features` and `get_text_features` works. Captions longer than
the text tower's positions are truncated (the processor keeps the end-of-text token CLIP pools
at), and text is padded to that length, as SigLIP was trained (it pools the last position).
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image


def _features(out) -> torch.Tensor:
    """transformers >= 5 returns a model output whose pooler_output is the projected embedding;
    earlier versions return the embedding itself."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class AlignmentScorer:
    def __init__(self, model, processor, device: torch.device | str = "cpu", name: str | None = None):
        self.model, self.processor, self.device, self.name = model.eval(), processor, torch.device(device), name
        tokenizer = getattr(processor, "tokenizer", processor)
        positions = getattr(getattr(model.config, "text_config", model.config), "max_position_embeddings", 77)
        self.max_length = min(positions, getattr(tokenizer, "model_max_length", positions) or positions)

    @classmethod
    def load(cls, directory: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import AutoModel, AutoProcessor

        if not (Path(directory) / "config.json").is_file():
            raise FileNotFoundError(f"{directory}/config.json not found: not a CLIP or SigLIP model directory")
        model = AutoModel.from_pretrained(directory, dtype=dtype)
        if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
            raise ValueError(f"{directory}: {type(model).__name__} has no get_image_features/get_text_features")
        model.to(device).requires_grad_(False)
        return cls(model, AutoProcessor.from_pretrained(directory), device, directory)

    @torch.no_grad()
    def score(self, images: list[Image.Image], captions: list[str], batch_size: int = 32) -> list[float]:
        """Cosine similarity of each (image, caption) pair."""
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        out: list[float] = []
        for i in range(0, len(images), batch_size):
            inputs = self.processor(
                text=captions[i:i + batch_size], images=images[i:i + batch_size], return_tensors="pt",
                padding="max_length", truncation=True, max_length=self.max_length,
            )
            dtype = self.model.dtype
            inputs = {k: v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device)
                      for k, v in inputs.items()}
            text = {k: inputs.pop(k) for k in ("input_ids", "attention_mask", "position_ids") if k in inputs}
            img = _features(self.model.get_image_features(**inputs)).float()  # [b, D]
            txt = _features(self.model.get_text_features(**text)).float()  # [b, D]
            cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1).clamp(-1.0, 1.0)  # [b]
            out += cos.cpu().tolist()
        return out
