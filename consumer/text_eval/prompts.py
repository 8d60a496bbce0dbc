"""Prompt sets for text-rendering evaluation: JSONL, one prompt per line.

    {"prompt": "A neon sign on a brick wall that says \\"OPEN LATE\\"", "target_texts": ["OPEN LATE"],
     "language": "en", "kind": "single_line"}

`target_texts` is the text the prompt asks the image to show, one entry per region, in reading
order (top to bottom, left to right): what the OCR reading is scored against. `language` is en
or zh, `kind` single_line (one short text), multi_region (several texts in distinct places) or
paragraph (a long text over several lines). An optional `id` names the prompt (default: its line
number). The built-in set (text_rendering.jsonl beside this file) holds 100 prompts written for
mmdit: 45 English, 55 Chinese, every kind in both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

LANGUAGES = ("en", "zh")
KINDS = ("single_line", "multi_region", "paragraph")
BUILTIN = Path(__file__).with_name("text_rendering.jsonl")


class PromptSetError(ValueError):
    """A prompt file that cannot be used; the message names the file and the line."""


@dataclass(frozen=True)
class TextPrompt:
    id: str
    prompt: str
    target_texts: tuple[str, ...]
    language: str
    kind: str

    def to_dict(self) -> dict:
        return {"id": self.id, "prompt": self.prompt, "target_texts": list(self.target_texts),
                "language": self.language, "kind": self.kind}


def load_prompts(path: str | Path | None = None) -> list[TextPrompt]:
    """The prompts of a JSONL file (None or "": the built-in set); PromptSetError naming the
    line of the first bad entry."""
    path = Path(path) if path else BUILTIN
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PromptSetError(f"prompt set {path}: cannot read it ({e})") from None
    prompts, seen = [], set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        prompt = _parse(line, f"{path}:{number}", default_id=str(number))
        if prompt.id in seen:
            raise PromptSetError(f"{path}:{number}: id {prompt.id!r} is used twice")
        seen.add(prompt.id)
        prompts.append(prompt)
    if not prompts:
        raise PromptSetError(f"prompt set {path} holds no prompt")
    return prompts


def _parse(line: str, where: str, default_id: str) -> TextPrompt:
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as e:
        raise PromptSetError(f"{where}: not JSON ({e.msg})") from None
    if not isinstance(entry, dict):
        raise PromptSetError(f"{where}: expected a JSON object, got {type(entry).__name__}")
    missing = [k for k in ("prompt", "target_texts", "language", "kind") if k not in entry]
    if missing:
        raise PromptSetError(f"{where}: missing {', '.join(missing)}")
    prompt, targets = entry["prompt"], entry["target_texts"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptSetError(f"{where}: prompt must be a non-empty string")
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t.strip() for t in targets):
        raise PromptSetError(f"{where}: target_texts must be a non-empty list of non-empty strings")
    if entry["language"] not in LANGUAGES:
        raise PromptSetError(f"{where}: language {entry['language']!r} is not one of {', '.join(LANGUAGES)}")
    if entry["kind"] not in KINDS:
        raise PromptSetError(f"{where}: kind {entry['kind']!r} is not one of {', '.join(KINDS)}")
    return TextPrompt(str(entry.get("id", default_id)), prompt, tuple(targets), entry["language"], entry["kind"])


def subset(prompts: list[TextPrompt], limit: int) -> list[TextPrompt]:
    """At most `limit` prompts (0: all), taken in turn from each (language, kind) group in file
    order, so a small subset covers both languages and every kind; returned in file order."""
    if not limit or limit >= len(prompts):
        return list(prompts)
    groups: dict[tuple[str, str], list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault((p.language, p.kind), []).append(i)
    order = sorted(groups, key=lambda g: (KINDS.index(g[1]), LANGUAGES.index(g[0])))
    taken: list[int] = []
    depth = 0
    while len(taken) < limit:
        for g in order:
            if depth < len(groups[g]) and len(taken) < limit:
                taken.append(groups[g][depth])
        depth += 1
    return [prompts[i] for i in sorted(taken)]
