"""Regenerate the example images of each `mmdit synth` kind in this folder (fixed seed).

Run: `.venv/bin/python docs/synth_examples/make.py`. Each image is the first sample of its kind
that `mmdit synth` writes as PNG (producer/synth/shards.py `make_sample`; a JPEG would show its
artefacts), with sides kept within 320..512 pixels; captions.txt holds the captions.
"""

import io
from pathlib import Path

from PIL import Image

from mmdit.config.produce import SynthConfig
from mmdit.producer.synth.shards import make_sample

HERE = Path(__file__).resolve().parent
SEED = 11
KINDS = ("pure", "compositional", "complex")


def first_png(cfg: SynthConfig) -> dict:
    return next(s for s in (make_sample(i, cfg) for i in range(100)) if "png" in s)


def main() -> None:
    captions = []
    for kind in KINDS:
        cfg = SynthConfig(seed=SEED, kinds={kind: 1.0}, min_side=320, max_side=512, edit_fraction=0.0,
                          zh_caption_fraction=0.0)
        sample = first_png(cfg)
        Image.open(io.BytesIO(sample["png"])).save(HERE / f"{kind}.png", optimize=True)
        captions.append(f"{kind}.png: {sample['txt'].decode('utf-8')}")
        print(captions[-1])
    (HERE / "captions.txt").write_text("\n".join(captions) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
