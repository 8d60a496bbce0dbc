"""Reading the JSONL logs (metrics.jsonl, samples.jsonl) while their writer runs."""

import json
import os
from pathlib import Path


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSONL file that another process may be appending to; the unterminated
    last line (being written, or torn by a crash) is left out. A missing file has none."""
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text(errors="replace")
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines() if line.strip()]
