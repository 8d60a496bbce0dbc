"""Where a run's weights came from: `checkpoint.init_from`, recorded in the run and in every checkpoint.

A fine-tuned model (SFT, DPO, a LoRA) is only as meaningful as the model it started from. When a
run starts from `checkpoint.init_from`, its rank 0 writes `run.dir/lineage.json`, and every
checkpoint's `trainer.json` carries the same record under "lineage":

    source       the init_from path, resolved
    kind         mmdit (an mmdit checkpoint's model/ directory) | diffusers (a transformer dir)
    step         the training step of that checkpoint (from the trainer.json beside it; None for
                 a bare model directory or a diffusers model)
    run          the run directory it was trained in, when it is one of a run's checkpoints
    fingerprint  sha256 over the directory's *.json and *.safetensors files: name, size, and a
                 sampled content hash of each safetensors file (its header and 3 x 4 KiB of every
                 tensor, utils/safetensors_header.py `safetensors_identity`): milliseconds at 20B, and
                 any retrained tensor changes it
    parent       the source run's own lineage, when it had one (SFT -> DPO: the chain back to
                 pre-training)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mmdit.model.checkpoint import is_checkpoint
from mmdit.utils.safetensors_header import safetensors_identity

LINEAGE = "lineage.json"


def weights_fingerprint(folder: Path) -> str:
    """sha256 over a weights directory's *.json and *.safetensors (module docstring)."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors")):
        h.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        h.update((safetensors_identity(path) if path.suffix == ".safetensors" else
                  hashlib.sha256(path.read_bytes()).hexdigest()).encode())
    return h.hexdigest()


def lineage_of(init_from: str) -> dict | None:
    """The lineage record of weights loaded from `init_from` (None: the run starts from its seed)."""
    if not init_from:
        return None
    source = Path(init_from).resolve()
    record = {"source": str(source), "kind": "mmdit" if is_checkpoint(source) else "diffusers", "step": None,
              "run": None, "fingerprint": weights_fingerprint(source)}
    trainer = source.parent / "trainer.json"  # RUN/checkpoints/step_N/{model/, trainer.json}
    if record["kind"] == "mmdit" and trainer.is_file():
        state = json.loads(trainer.read_text())
        record["step"] = state.get("step")
        record["run"] = str(source.parent.parent.parent)
        if state.get("lineage"):
            record["parent"] = state["lineage"]
    return record
