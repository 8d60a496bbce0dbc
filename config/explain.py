"""What a config key means and where its value comes from (`mmdit config explain KEY`).

The schema documents itself: a field's doc is the string literal right under it in its dataclass
(read from the source with `ast`, as Sphinx reads attribute docstrings); its type and default come
from the dataclass. Provenance replays Hydra's merge order: its defaults list (the schema, then
each conf/ file in the order Hydra merges them, `defaults:` parents before their children), then
the command line; the last write to a key (or to a table holding it) is where its value comes from.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import textwrap
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from mmdit.config import ConfigError
from mmdit.config.job import JobConfig
from mmdit.config.loader import CONF_DIR, compose_config, load_config, upgrade_overrides
from mmdit.config.train import MOVED_KEYS

ROOT = CONF_DIR.parent
UNSET = object()
"""A table entry no default and no override names."""


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal right under it), looked up along the MRO so a
    subclass's own doc wins and inherited fields keep theirs; fields without one are left out."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        docs.update(_own_field_docs(klass))
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # defined where no source can be read (a REPL)
        return {}
    body = ast.parse(source).body[0].body
    docs = {}
    for stmt, after in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs


def first_line(doc: str) -> str:
    """The doc's first paragraph, on one line (for listings)."""
    return " ".join(doc.split("\n\n", 1)[0].split())


def type_name(tp) -> str:
    return tp.__name__ if isinstance(tp, type) and not typing.get_args(tp) else str(tp).replace("typing.", "")


def source_file(cls: type) -> str:
    """Where a class is defined, relative to the repository (config/train.py)."""
    path = Path(inspect.getsourcefile(cls)).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return UNSET


@dataclass
class KeyInfo:
    """One key of the schema: a field (maybe a whole section) or an entry of a table field."""

    key: str
    owner: type
    """The class that declares the field (a base class, for an inherited one)."""
    field: str
    type: object
    doc: str
    default: object
    section: type | None = None
    """Set when the key is a whole dataclass (a section): its class."""


def sections() -> list[str]:
    """The job config's top-level keys, in schema order (model, parallel, train, ...)."""
    return [f.name for f in dataclasses.fields(JobConfig)]


def section_class(name: str) -> type:
    """The dataclass of a top-level section (`synth` -> SynthConfig)."""
    return typing.get_type_hints(JobConfig)[name]


def lookup(key: str) -> KeyInfo:
    """The schema's description of `key` (a dotted path; a table's entries are keys too:
    `data.category_weights.design`); ConfigError for a key the schema does not have."""
    cls, parts = JobConfig, key.split(".")
    for i, name in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if name not in fields:
            raise unknown_key(key)
        f, tp = fields[name], typing.get_type_hints(cls)[name]
        rest = parts[i + 1:]
        declared_in = next(k for k in cls.__mro__ if name in k.__dict__.get("__annotations__", {}))
        info = KeyInfo(".".join(parts[:i + 1]), declared_in, name, tp, field_docs(cls).get(name, ""), _default(f))
        if dataclasses.is_dataclass(tp):
            if not rest:
                info.section, info.doc = tp, info.doc or inspect.cleandoc(tp.__doc__ or "")
                return info
            cls = tp
            continue
        if not rest:
            return info
        if typing.get_origin(tp) is dict and len(rest) == 1:  # one entry of a table
            value_type = typing.get_args(tp)[1] if typing.get_args(tp) else object
            default = info.default.get(rest[0], UNSET) if isinstance(info.default, dict) else UNSET
            return KeyInfo(key, declared_in, name, value_type, info.doc, default)
        raise unknown_key(key)
    raise unknown_key(key)


@functools.cache
def all_keys() -> tuple[str, ...]:
    """Every key of the schema, sections included (tables count as one key)."""
    def walk(cls: type, prefix: str):
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            yield prefix + f.name
            if dataclasses.is_dataclass(tp):
                yield from walk(tp, f"{prefix}{f.name}.")
    return tuple(walk(JobConfig, ""))


def unknown_key(key: str) -> ConfigError:
    """A ConfigError naming `key` and the keys it is close to (by the whole path or by its last part)."""
    keys = all_keys()
    near = difflib.get_close_matches(key, keys, n=3, cutoff=0.75)
    last = key.rsplit(".", 1)[-1]
    near += [k for k in keys if k not in near and difflib.SequenceMatcher(None, last, k.rsplit(".", 1)[-1]).ratio()
             >= 0.8][:5 - len(near)]
    hint = f" (did you mean {', '.join(near)}?)" if near else " (`mmdit config show` lists every key)"
    return ConfigError(f"unknown key {key!r}{hint}")


def moved_to(key: str) -> str | None:
    """The key's new name if it moved (config/train.py MOVED_KEYS), else None."""
    old = next((o for o in MOVED_KEYS if key == o or key.startswith(o + ".")), None)
    return MOVED_KEYS[old] + key[len(old):] if old else None


# ----------------------------------------------------------------------------------- provenance


@dataclass(frozen=True)
class Write:
    """One place that sets a key: a conf/ file or the command line, with the value as written."""

    key: str
    source: str
    value: object


def writes(overrides: list[str] = ()) -> list[Write]:
    """Every key the conf/ files and the command line set, in the order Hydra merges them."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    overrides = upgrade_overrides(list(overrides))
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            loader = GlobalHydra.instance().config_loader()
            defaults = loader.compute_defaults_list("config", overrides, RunMode.RUN)
    except Exception:  # Hydra raises many types: let the loader say why, as every command does
        compose_config(overrides)
        raise
    chosen = {group for group, meta in defaults.overrides.override_metadata.items() if meta.external_override}
    parents = {d.config_path: d.parent for d in defaults.defaults}
    out = []
    for d in defaults.defaults:
        path = CONF_DIR / f"{d.config_path}.yaml"
        if d.package.startswith("hydra") or not path.is_file():  # Hydra's own config, or the schema
            continue
        source = _describe_file(d.config_path, parents, chosen)
        body = yaml.safe_load(path.read_text()) or {}
        body.pop("defaults", None)
        out += [Write(k, source, v) for k, v in _flatten(body, d.package)]
    for o in defaults.overrides.config_overrides:
        value = None if o.is_delete() else o.value()
        out.append(Write(o.key_or_group, f"the command line ({o.input_line})", value))
    return out


def _describe_file(config_path: str, parents: dict[str, str], chosen: set[str]) -> str:
    """`conf/data/stage1.yaml (inherited by data=stage3, chosen on the command line)`."""
    top = config_path
    while parents.get(top) not in (None, "config", "<root>"):
        top = parents[top]
    text = f"conf/{config_path}.yaml"
    if "/" in top:
        group, option = top.split("/", 1)
        how = "chosen on the command line" if group in chosen else "conf/config.yaml's defaults"
        text += f" (inherited by {group}={option}, {how})" if top != config_path else f" ({group}={option}, {how})"
    return text


def _flatten(node: dict, prefix: str):
    for k, v in node.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            yield from _flatten(v, key)
        else:
            yield key, v


def sources_of(key: str, all_writes: list[Write]) -> list[Write]:
    """The writes the key's current value comes from: the last one to the key itself (or to a
    table or section holding it), then the later ones to parts of it that still stand. Empty:
    the value is the dataclass default."""
    standing: dict[str, Write] = {}
    for w in all_writes:
        if w.key == key or key.startswith(w.key + "."):
            standing = {w.key: w}
        elif w.key.startswith(key + "."):
            for k in [k for k in standing if k == w.key or k.startswith(w.key + ".")]:
                del standing[k]
            standing[w.key] = w
    return list(standing.values())


# ------------------------------------------------------------------------------------- explain


def current_value(job: JobConfig, key: str):
    value = job
    for part in key.split("."):
        if isinstance(value, dict):
            value = value.get(part, value.get(int(part), UNSET) if part.isdigit() else UNSET)
        else:
            value = getattr(value, part)
        if value is UNSET:
            return UNSET
    return value


def explain(key: str, overrides: list[str] = ()) -> str:
    """`mmdit config explain KEY [overrides]`: the key's doc, type, default, current value and
    where that value comes from, as text. ConfigError for an unknown key or a bad override."""
    lines = []
    new = moved_to(key)
    if new:
        lines.append(f"{key} moved to {new} (the old key still works, with a warning)")
        key = new
    info = lookup(key)
    overrides = upgrade_overrides(list(overrides))
    job = load_config(overrides)
    lines.append(f"{key}  ({source_file(info.owner)} {info.owner.__name__}.{info.field})")
    lines += ["  " + line for line in (info.doc or "(no docstring)").splitlines()]
    if info.section is None:
        lines.append(f"  type     {type_name(info.type)}")
        lines.append(f"  default  {_show(info.default)}")
        lines.append(f"  current  {_show(current_value(job, key))}")
    else:
        docs = field_docs(info.section)
        lines.append(f"  keys of {info.section.__name__} ({source_file(info.section)}), current values:")
        for f in dataclasses.fields(info.section):
            lines.append(f"    {f.name} = {_show(current_value(job, f'{key}.{f.name}'))}"
                         f"    {first_line(docs.get(f.name, ''))}".rstrip())
    found = sources_of(key, writes(overrides))
    if not found:
        lines.append("  set by   the default (nothing in conf/ or on the command line sets it)")
    by_source: dict[str, list[Write]] = {}
    for w in found:
        by_source.setdefault(w.source, []).append(w)
    for i, (source, ws) in enumerate(by_source.items()):
        # writes to parts of the key, and interpolations, are shown as written
        shown = [] if source.startswith("the command line") else [
            _show(w.value) if w.key == key else f"{w.key.removeprefix(key + '.')}: {_show(w.value)}"
            for w in ws if w.key != key or isinstance(w.value, str) and "${" in w.value]
        lines.append(f"  {'set by' if i == 0 else 'and':<8} {source}" + (f": {', '.join(shown)}" if shown else ""))
    if any(w.key != key for w in found):
        lines.append("           (the rest: the defaults)")
    return "\n".join(lines)


def _show(value) -> str:
    if value is UNSET:
        return "(unset)"
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    return yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10**6).strip().removesuffix(
        "\n...").removesuffix(" ...")
