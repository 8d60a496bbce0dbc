"""`mmdit checkpoint verify RUN_OR_CKPT_DIR [--jobs N]`: check a run's checkpoints, or one, file by file.

The checks resume makes (consumer/checkpoint.py): every file present and whole, holding the bytes
the save wrote (the size and CRC-32 trainer.json lists); checkpoints saved before checksums were
recorded are checked for structure only. Prints a JSON report: per checkpoint its status, files,
bytes, the damaged files and why, and the checkpoint resume would take. Exit 0 when no checkpoint
is damaged, 1 when one is (or none can be resumed from), 2 when the path is neither a run
directory nor a checkpoint.
"""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mmdit.launch.args import Action, Command, Flag, parse

COMMAND = Command("checkpoint", __doc__, actions=(Action(
    "verify", "check every file of a run's checkpoints (or of one) against the save",
    paths={"RUN_OR_CKPT_DIR": "a run directory (all its checkpoints) or one checkpoint"},
    flags=(Flag("jobs", "files checked at once", int, min(8, os.cpu_count() or 1), "N"),), overrides=None),))


def _targets(path: Path) -> list[Path] | None:
    """The checkpoints to check (newest first), or None when `path` is neither a run nor a checkpoint."""
    from mmdit.consumer.checkpoint import CHECKPOINTS, TRAINER, checkpoints

    if (path / TRAINER).is_file() or (path.name.startswith("step_") and path.parent.name == CHECKPOINTS):
        return [path]
    if path.name == CHECKPOINTS and path.is_dir():
        path = path.parent
    return checkpoints(path) if (path / CHECKPOINTS).is_dir() else None


def verify(ckpt: Path, jobs: int) -> dict:
    """One checkpoint's entry of the report: `jobs` threads check a share of its files each (the
    CRC and the reads release the GIL)."""
    from mmdit.consumer.checkpoint import FILES, TRAINER, checkpoint_problems

    if not (ckpt / TRAINER).is_file():  # a save that did not finish; resume skips it, retention removes it
        return {"status": "incomplete", "damaged": [], "problems": [f"{TRAINER}: missing"]}
    start = time.perf_counter()
    with ThreadPoolExecutor(jobs) as pool:
        found = pool.map(lambda rank: checkpoint_problems(ckpt, rank, jobs), range(jobs))
        problems = sorted({why for part in found for why in part})
    try:
        files = json.loads((ckpt / TRAINER).read_text()).get(FILES)
    except (OSError, ValueError, AttributeError):
        files = None
    return {"status": "damaged" if problems else "ok",
            "damaged": sorted({why.split(": ", 1)[0] for why in problems}), "problems": problems,
            "checksums": files is not None, "files": len(files or {}),
            "bytes": sum(f.get("bytes", 0) for f in (files or {}).values() if isinstance(f, dict)),
            "seconds": round(time.perf_counter() - start, 3)}


def main(argv: list[str]) -> int:
    args = parse(COMMAND, argv)
    path = Path(args.paths[0])
    targets = _targets(path)
    if targets is None:
        print(f"mmdit checkpoint: {path} is neither a run directory nor a checkpoint", file=sys.stderr)
        return 2
    report = {ckpt.name: verify(ckpt, max(1, args.flags.jobs)) for ckpt in targets}
    resume_from = next((name for name, entry in report.items() if entry["status"] == "ok"), None)
    print(json.dumps({"path": str(path), "checkpoints": report, "resume_from": resume_from}, indent=2))
    damaged = [f"{name} ({', '.join(entry['damaged'])})" for name, entry in report.items()
               if entry["status"] == "damaged"]
    if damaged:
        print(f"mmdit checkpoint: damaged: {'; '.join(damaged)}", file=sys.stderr)
    elif report and resume_from is None:
        print("mmdit checkpoint: no complete checkpoint to resume from", file=sys.stderr)
    return 1 if damaged or (report and resume_from is None) else 0
