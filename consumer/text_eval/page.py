"""The evaluation's page: each image beside its prompt, the text asked for, the OCR reading and
its scores, under a table of the figures per language and kind. One static HTML file that links
the PNGs next to it, so the directory can be opened, copied or served as it is."""

from __future__ import annotations

from html import escape

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
td, th { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { width: 256px; max-height: 256px; object-fit: contain; }
.reading { font-family: monospace; white-space: pre-wrap; }
.none { color: #999; font-style: italic; }
"""


def _num(value, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _figures_row(name: str, figures: dict) -> str:
    return (f"<tr><td>{escape(name)}</td><td class=num>{figures['prompts']}</td>"
            f"<td class=num>{_num(figures['word_accuracy'])}</td><td class=num>{_num(figures['one_minus_ned'])}</td>"
            f"<td class=num>{_num(figures['alignment'])}</td></tr>")


def render_page(summary: dict, images: list[dict], title: str) -> str:
    """The HTML of the page: `summary` as `scoring.summarize` makes it, `images` the per-image
    results (with `file`, the PNG's name beside the page)."""
    rows = [_figures_row("all", summary)]
    rows += [_figures_row(f"language {name}", f) for name, f in summary["by_language"].items()]
    rows += [_figures_row(f"kind {name}", f) for name, f in summary["by_kind"].items()]
    head = ("<table><tr><th></th><th>prompts</th><th>word accuracy</th><th>1 - NED</th><th>alignment</th></tr>"
            + "".join(rows) + "</table>")
    cells = []
    for r in images:
        reading = "\n".join(r["reading"]["lines"])
        targets = "<br>".join(escape(t) for t in r["target_texts"])
        cells.append(
            f"<tr><td><a href='{escape(r['file'])}'><img src='{escape(r['file'])}' alt='{escape(r['id'])}'></a></td>"
            f"<td>{escape(r['prompt'])}<br><small>{escape(r['id'])} | {r['language']} | {r['kind']}</small></td>"
            f"<td>{targets}</td>"
            f"<td class=reading>{escape(reading) if reading else '<span class=none>(no text read)</span>'}</td>"
            f"<td class=num>{r['words_matched']}/{r['words_total']}<br>{_num(r['word_accuracy'])}</td>"
            f"<td class=num>{_num(r['one_minus_ned'])}</td><td class=num>{_num(r.get('alignment'))}</td></tr>")
    body = ("<table><tr><th>image</th><th>prompt</th><th>text asked for</th><th>OCR reading</th>"
            "<th>words</th><th>1 - NED</th><th>alignment</th></tr>" + "".join(cells) + "</table>")
    note = escape(f"{summary.get('engine', '')}; {summary.get('settings', '')}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{escape(title)}</h1><p><small>{note}</small></p>"
            f"{head}{body}</body></html>\n")
