"""Prompt sets for text-rendering evaluation: JSONL, one prompt per line.

    {"prompt": "A neon sign on a brick wall that says \\"OPEN LATE\\"", "target_texts": ["OPEN LATE"],
     "language": "en", "kind": "single_line"}

`target_texts` is the text the prompt asks the image to show, one entry per region, in reading
order (top to bottom, left to right): what the OCR reading is scored against. `language` is en
or zh, `kind` single_line (one short text), multi_region (several texts in distinct places) or
paragraph (a long text over several lines). An optional `id` names the prompt (default: its line
number). Blank lines, a UTF-8 byte-order mark and CRLF line ends are accepted; a file that is
not a regular file (a FIFO, a directory), over MAX_FILE_BYTES, with a line over MAX_LINE_BYTES,
invalid UTF-8, or NaN/Infinity in place of a number is refused with an error naming the file and
the line, before any prompt is used. The built-in set (text_rendering.jsonl beside this file) holds 100 prompts written for
mmdit: 45 English, 55 Chinese, every kind in both.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

LANGUAGES = ("en", "zh")
KINDS = ("single_line", "multi_region", "paragraph")
BUILTIN = Path(__file__).with_name("text_rendering.jsonl")
MAX_FILE_BYTES = 64 << 20
"""A prompt set larger than this is refused (100 prompts take about 20 KiB)."""
MAX_LINE_BYTES = 1 << 20
"""A line (one prompt) longer than this is refused."""


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
    lines = _read_lines(path)
    prompts, seen = [], set()
    for number, line in enumerate(lines, 1):
        if len(line.encode("utf-8")) > MAX_LINE_BYTES:
            raise PromptSetError(f"{path}:{number}: the line is over {MAX_LINE_BYTES} bytes")
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


def _read_lines(path: Path) -> list[str]:
    """The file's lines, read without blocking (a FIFO is refused, not waited on) and bounded;
    a leading BOM and the CR of CRLF dropped. Only newlines split lines: a U+2028 in a prompt
    is text, not a line end."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise PromptSetError(f"prompt set {path}: cannot read it ({e.strerror or e})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        raise PromptSetError(f"prompt set {path}: {kind}, not a JSONL file")
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(MAX_FILE_BYTES + 1)
        except OSError as e:
            raise PromptSetError(f"prompt set {path}: cannot read it ({e.strerror or e})") from None
    if len(data) > MAX_FILE_BYTES:
        raise PromptSetError(f"prompt set {path}: over {MAX_FILE_BYTES} bytes")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise PromptSetError(f"{path}:{line}: not UTF-8 ({e.reason} at byte {e.start})") from None
    return [line.removesuffix("\r") for line in text.split("\n")]


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _parse(line: str, where: str, default_id: str) -> TextPrompt:
    try:
        entry = json.loads(line, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise PromptSetError(f"{where}: not JSON ({e.msg})") from None
    except (ValueError, RecursionError) as e:
        raise PromptSetError(f"{where}: not JSON ({e})") from None
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
    for text in (prompt, *targets):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise PromptSetError(f"{where}: {text[:40]!r} is not UTF-8 encodable (a lone surrogate escape)") from None
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
