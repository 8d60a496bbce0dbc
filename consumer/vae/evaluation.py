"""Reconstruction quality on held-out text-rich images, before vs after the fine-tune.

Each held-out image (vae.eval_fraction of the text-rich pool, by key hash) is evaluated on its
centre crop at native resolution (vae.eval_size), encoded by the frozen encoder and decoded (then
clamped, as `vae.decode` does). Figures per evaluation, means over the images:

- PSNR (dB) over RGB in [0, 1];
- SSIM: Wang et al. 2004, 11x11 Gaussian window (sigma 1.5), K1 0.01, K2 0.03, per channel, averaged;
- OCR word accuracy (consumer/text_eval: RapidOCR, tokens matched in order): the reconstruction's
  reading scored against the *original's* reading, over images whose original reads as text at
  all (`ocr_images`). That asks "is the text that was legible still legible", needs no ground
  truth, and holds for any text-rich image, not only synthetic ones.

The first evaluation (the base model) is "before"; every later one is written beside it:
run.dir/vae_eval/step_N/results.json (figures per image) and pair_K.png (original | before |
after, side by side), and one {"eval": "vae_reconstruction", ...} record in metrics.jsonl.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mmdit.utils.atomic import atomic_path, atomic_write_json

EVAL_KIND = "vae_reconstruction"


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image [B], for images in [0, 1]."""
    mse = (a.float() - b.float()).square().flatten(1).mean(dim=1).clamp_min(1e-12)
    return 10 * torch.log10(1.0 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per image [B], for images [B, C, H, W] in [0, 1] (valid windows only, as Wang et al.)."""
    coords = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = (g / g.sum()).float()
    channels = a.shape[1]
    kernel = (g[:, None] * g[None, :]).expand(channels, 1, window, window).contiguous()
    blur = lambda x: F.conv2d(x, kernel, groups=channels)  # noqa: E731
    a, b = a.float(), b.float()
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    score = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return score.flatten(1).mean(dim=1)


def to_image(x: torch.Tensor) -> Image.Image:
    """[3, H, W] in [-1, 1] -> PIL RGB."""
    array = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, "RGB")


def side_by_side(images: list[Image.Image], gap: int = 4) -> Image.Image:
    width = sum(i.width for i in images) + gap * (len(images) - 1)
    out = Image.new("RGB", (width, max(i.height for i in images)), (255, 255, 255))
    x = 0
    for img in images:
        out.paste(img, (x, 0))
        x += img.width + gap
    return out


class ReconstructionEval:
    """Scores reconstructions of fixed held-out crops; remembers the first ("before") ones."""

    def __init__(self, keys: list[str], images: torch.Tensor, out_dir: Path, pairs: int, ocr=None):
        self.keys, self.images, self.out_dir, self.pairs, self.ocr = keys, images, Path(out_dir), pairs, ocr
        self.before: torch.Tensor | None = None
        self.before_figures: dict | None = None
        self._originals_read = None  # OCR readings of the originals, read once

    @torch.no_grad()
    def reconstruct(self, vae, decoder, batch_size: int = 8) -> torch.Tensor:
        from mmdit.consumer.vae.model import encode

        device = next(decoder.parameters()).device
        out = []
        for chunk in self.images.split(batch_size):
            x = chunk.to(device)
            out.append(decoder(encode(vae, x)).clamp(-1, 1).float().cpu())
        return torch.cat(out)

    def score(self, recon: torch.Tensor) -> tuple[dict, list[dict]]:
        a, b = (self.images + 1) / 2, (recon + 1) / 2
        per_psnr, per_ssim = psnr(a, b), ssim(a, b)
        rows = [{"key": k, "psnr": round(float(p), 4), "ssim": round(float(s), 4)}
                for k, p, s in zip(self.keys, per_psnr, per_ssim)]
        figures = {"samples": len(self.keys), "psnr": round(float(per_psnr.mean()), 4),
                   "ssim": round(float(per_ssim.mean()), 4)}
        if self.ocr is not None:
            figures |= self._ocr(recon, rows)
        return figures, rows

    def _ocr(self, recon: torch.Tensor, rows: list[dict]) -> dict:
        from mmdit.consumer.text_eval.scoring import score_reading, tokens

        if self._originals_read is None:
            self._originals_read = [self.ocr.read(to_image(x)).lines for x in self.images]
        accuracies = []
        for row, original, x in zip(rows, self._originals_read, recon):
            if not tokens(" ".join(original)):
                row["word_accuracy"] = None  # nothing legible to keep
                continue
            lines = self.ocr.read(to_image(x)).lines
            row["word_accuracy"] = round(score_reading(list(original), lines)["word_accuracy"], 4)
            row["original_text"], row["reconstruction_text"] = " | ".join(original), " | ".join(lines)
            accuracies.append(row["word_accuracy"])
        return {"ocr_images": len(accuracies),
                "word_accuracy": round(float(np.mean(accuracies)), 4) if accuracies else None}

    def run(self, vae, decoder, step: int) -> dict:
        """Evaluate the decoder at `step`; write results and pairs; the record for metrics.jsonl."""
        recon = self.reconstruct(vae, decoder)
        figures, rows = self.score(recon)
        first = self.before is None
        if first:
            self.before, self.before_figures = recon, figures
        out = self.out_dir / f"step_{step:08d}"
        out.mkdir(parents=True, exist_ok=True)
        for k in range(min(self.pairs, len(self.keys))):
            row = [to_image(self.images[k]), to_image(self.before[k])] + ([] if first else [to_image(recon[k])])
            with atomic_path(out / f"pair_{k}.png") as tmp:
                side_by_side(row).save(tmp, format="PNG")
        record = {"eval": EVAL_KIND, **figures, "dir": str(out.relative_to(self.out_dir.parent))}
        if not first:
            record |= {f"{name}_before": value for name, value in self.before_figures.items()
                       if name in ("psnr", "ssim", "word_accuracy")}
        atomic_write_json(out / "results.json", {"step": step, **record, "images": rows,
                                                 "pairs": "original | before" + ("" if first else " | after")})
        return record


def held_out_crops(refs, size: int, limit: int) -> tuple[list[str], torch.Tensor]:
    """The centre crops (native resolution) of up to `limit` held-out images: (keys, [N, 3, S, S])."""
    from mmdit.consumer.vae.data import cover_crop

    refs = refs[:limit]
    if not refs:
        return [], torch.zeros(0, 3, size, size)
    return [r.key for r in refs], torch.stack([cover_crop(r.load(), size, 0.5, 0.5) for r in refs])
