"""Scoring an OCR reading against the text a prompt asks for: word accuracy and 1 - NED.

Both compare *normalized* text: Unicode NFKC (full-width letters and digits become ASCII),
case folded, and split into tokens: a maximal run of letters or digits is one token (an English
word, a number), and every CJK character (Han, kana, hangul) is a token of its own, as Chinese
has no spaces and Chinese word accuracy is measured per character. Spaces and punctuation are
separators only: OCR engines drop or invent spaces between words set close together
("The quickbrown foxjumps"), and a model is not asked to render ASCII punctuation exactly.

Word accuracy (per image): the share of the target's tokens found in the reading, each
target text on its own, its tokens in order, as non-overlapping substrings of the reading's
*compact* form (its tokens joined without separators). So a reading that lost the spaces
between words loses nothing, a word split over two OCR lines still counts, but a word read
wrongly, missing, or out of order does not. The count is the largest number of tokens that
can match in order (not a greedy first match, which one early stray match could derail).

1 - NED (per image): one minus the Levenshtein distance between the compact target (the target
texts joined in the prompt's order) and the compact reading (the lines in the engine's reading
order), divided by the longer of the two: 1 is an exact rendering; text the prompt did not ask
for lowers it, as do missing and wrong characters.

A group's figures (a language, a kind, the whole set) are means over its images: every
prompt weighs the same, whatever its length.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Sequence

_CJK_RANGES = (
    (0x2E80, 0x2FDF),    # CJK radicals
    (0x3040, 0x30FF),    # hiragana, katakana
    (0x3100, 0x312F),    # bopomofo
    (0x3400, 0x4DBF),    # CJK extension A
    (0x4E00, 0x9FFF),    # CJK unified ideographs
    (0xAC00, 0xD7AF),    # hangul syllables
    (0xF900, 0xFAFF),    # CJK compatibility ideographs
    (0x20000, 0x3134F),  # CJK extensions B-G
)


def is_cjk(ch: str) -> bool:
    code = ord(ch)
    return any(lo <= code <= hi for lo, hi in _CJK_RANGES)


def tokens(text: str) -> list[str]:
    """Normalized tokens of `text` (see the module docstring)."""
    out: list[str] = []
    run: list[str] = []
    for ch in unicodedata.normalize("NFKC", text).casefold():
        if is_cjk(ch):
            if run:
                out.append("".join(run))
                run = []
            out.append(ch)
        elif ch.isalnum():
            run.append(ch)
        elif run:
            out.append("".join(run))
            run = []
    if run:
        out.append("".join(run))
    return out


def compact(text: str) -> str:
    """`text`'s tokens joined without separators: what matching and edit distance compare."""
    return "".join(tokens(text))


def matched_in_order(words: Sequence[str], reading: str) -> int:
    """The most of `words` that occur in `reading`, in order, as non-overlapping substrings.

    Once a word is matched, matching it at its earliest occurrence is never worse (it leaves
    the most room for the rest), so each state (word, position) has two choices: match there
    or skip the word.
    """
    best_at = {0: 0}  # reading position -> most words matched reaching it
    for word in words:
        nxt = dict(best_at)  # skip this word
        for pos, got in best_at.items():
            at = reading.find(word, pos)
            if at >= 0:
                end = at + len(word)
                nxt[end] = max(nxt.get(end, -1), got + 1)
        # a state dominated by one with more words at an earlier position is dropped
        best_at, top = {}, -1
        for pos in sorted(nxt):
            if nxt[pos] > top:
                best_at[pos] = top = nxt[pos]
    return max(best_at.values())


def levenshtein(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def score_reading(target_texts: Sequence[str], lines: Sequence[str]) -> dict:
    """One image's scores: `words_total` target tokens, `words_matched` of them read,
    `word_accuracy` (their ratio; 1.0 for a target without tokens), `one_minus_ned`."""
    reading = compact(" ".join(lines))
    total = matched = 0
    for text in target_texts:
        words = tokens(text)
        total += len(words)
        matched += matched_in_order(words, reading) if words else 0
    target = "".join(compact(t) for t in target_texts)
    longest = max(len(target), len(reading))
    ned = levenshtein(target, reading) / longest if longest else 0.0
    return {"words_total": total, "words_matched": matched, "word_accuracy": matched / total if total else 1.0,
            "one_minus_ned": 1.0 - ned}


def summarize(results: Iterable[dict], by: Sequence[str] = ("language", "kind")) -> dict:
    """Means of word_accuracy, one_minus_ned (and alignment, where scored) over `results`
    (per-image dicts), overall and per value of each field of `by`: {"prompts", "word_accuracy",
    "one_minus_ned", "alignment", "by_language": {"en": {...}}, "by_kind": {...}}."""
    results = list(results)
    out = _means(results)
    for field in by:
        groups: dict[str, list[dict]] = {}
        for r in results:
            groups.setdefault(r[field], []).append(r)
        out[f"by_{field}"] = {name: _means(group) for name, group in sorted(groups.items())}
    return out


def _means(results: list[dict]) -> dict:
    def mean(key: str) -> float | None:
        values = [r[key] for r in results if r.get(key) is not None]
        return round(sum(values) / len(values), 4) if values else None

    return {"prompts": len(results), "word_accuracy": mean("word_accuracy"), "one_minus_ned": mean("one_minus_ned"),
            "alignment": mean("alignment")}
