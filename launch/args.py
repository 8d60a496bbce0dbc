"""One command-line grammar for every `mmdit` command.

    mmdit COMMAND [ACTION] [PATH ...] [--flag [VALUE] ...] [key=value ...] [-- PATH ...]

A command declares its shape once, as `COMMAND = Command(...)` in its module: its actions (`cache
verify`, `ctl set`), each action's positional paths and `--flags`, its own keys (a dataclass with
a docstring under each field, e.g. sample's `prompt=`), and the config sections it reads.
`parse()` splits argv by that declaration; `help_text()` prints it (`--help` or `-h`). A token is

- `--name`, `--name VALUE` or `--name=VALUE`: one of the action's flags;
- `key=value` (and Hydra's `+key=value`, `++key=value`, `~key`): one of the command's own keys,
  or a bare field of the config section it works on (synth: `num_samples=8` is
  `synth.num_samples=8`), else an override of the job config, which `load_config` checks;
- anything else, and everything after `--`: a positional path (a path that looks like
  `key=value` is written `./key=value`, or after `--`).

A token that fits nowhere is a ConfigError naming it: one line and exit 2 (launch/cli.py).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import textwrap
import types
import typing
from dataclasses import dataclass, field

from mmdit.config import ConfigError

CONFIG = "config"
"""An action's `key=value` tokens are Hydra overrides of the job config."""
DATA_CHANGES = "data changes"
"""An action's `key=value` tokens are changes to a running job's data config (`mmdit ctl set`)."""
PATH_LIST_KEYS = ("data.shards",)
"""List-of-path keys that may be written bare and repeated: `data.shards=shards/*.tar`."""

_ASSIGNMENT = re.compile(r"(?P<prefix>\+\+|\+|~)?(?P<key>[A-Za-z_][\w.]*)(?P<rest>=.*)?", re.S)


@dataclass(frozen=True)
class Flag:
    name: str
    """Without the dashes: `dry-run` is given as `--dry-run` and read as `args.flags.dry_run`."""
    help: str
    type: type = bool
    """bool: a switch, given alone; int, float or str: it takes a value (`--jobs 4`, `--jobs=4`)."""
    default: object = None
    metavar: str = "VALUE"

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")


@dataclass(frozen=True)
class Action:
    """One form of a command: the word that selects it, its positional paths, flags and keys."""

    name: str | None = None
    """The word after the command (`verify` in `mmdit cache verify`); None: the command has no actions."""
    help: str = ""
    paths: dict[str, str] = field(default_factory=dict)
    """Positional paths, in order: metavar -> what it is. All are required."""
    flags: tuple[Flag, ...] = ()
    keys: type | None = None
    """The command's own `key=value` settings: a dataclass, a docstring under each field; a
    list field is given once per item (`prompt=a prompt=b`)."""
    section: str | None = None
    """A config section whose fields may be written bare (`num_samples=8` for `synth.num_samples=8`)."""
    overrides: str | None = CONFIG
    """What other `key=value` tokens are: CONFIG, DATA_CHANGES, or None (refused)."""


@dataclass(frozen=True)
class Command:
    name: str
    doc: str
    """What the command does (its module's docstring)."""
    actions: tuple[Action, ...] = (Action(),)
    sections: tuple[str, ...] = ()
    """The job-config sections it reads (its `key=value` overrides go there)."""


@dataclass
class Args:
    """A parsed command line."""

    action: str | None
    paths: list[str]
    flags: types.SimpleNamespace
    keys: object | None
    """An instance of the action's `keys` dataclass (None when it has none)."""
    overrides: list[str]
    """The remaining `key=value` tokens, in order (CONFIG: ready for `load_config`)."""


def parse(command: Command, argv: list[str]) -> Args:
    """Split `argv` by the command's declaration; `--help` prints the help and exits 0."""
    argv = list(argv)
    if wants_help(argv):
        print(help_text(command))
        raise SystemExit(0)
    action, rest = _select_action(command, argv)
    flags = {f.dest: False if f.type is bool else f.default for f in action.flags}
    paths: list[str] = []
    keys: dict[str, object] = {}
    overrides: list[str] = []
    tokens = iter(rest)
    for token in tokens:
        if token == "--":
            paths += tokens
        elif token.startswith("-") and token != "-":
            flag = _find_flag(command, action, token)
            name, eq, value = token.partition("=")
            if flag.type is bool:
                if eq:
                    raise _error(command, f"{name} takes no value, got {token!r}")
                flags[flag.dest] = True
                continue
            if not eq:
                value = next(tokens, None)
                if value is None:
                    raise _error(command, f"{name} needs a value ({flag.metavar})")
            flags[flag.dest] = _convert(value, flag.type, name)
        elif (m := _ASSIGNMENT.fullmatch(token)) and (m["rest"] or m["prefix"] == "~"):
            _assign(command, action, m, token, keys, overrides)
        else:
            paths.append(token)
    _check_paths(command, action, paths)
    if action.overrides == CONFIG:
        overrides = join_path_lists(overrides)
    return Args(action.name, paths, types.SimpleNamespace(**flags), _build_keys(command, action, keys), overrides)


def wants_help(argv: list[str]) -> bool:
    """`-h` or `--help` before any `--`."""
    return bool({"-h", "--help"} & set(argv[:argv.index("--")] if "--" in argv else argv))


def _select_action(command: Command, argv: list[str]) -> tuple[Action, list[str]]:
    named = {a.name: a for a in command.actions if a.name}
    if not named:
        return command.actions[0], argv
    if argv and argv[0] in named:
        return named[argv[0]], argv[1:]
    got = f", got {argv[0]!r}" if argv else ""
    raise _error(command, f"expected an action: {' | '.join(named)}{got}")


def _find_flag(command: Command, action: Action, token: str) -> Flag:
    name = token.partition("=")[0]
    for flag in action.flags:
        if name == f"--{flag.name}":
            return flag
    known = [f"--{f.name}" for f in action.flags]
    near = difflib.get_close_matches(name, known, n=2)
    hint = f"; did you mean {' or '.join(near)}?" if near else ""
    where = f"mmdit {command.name}" + (f" {action.name}" if action.name else "")
    takes = f"takes {', '.join(known)}" if known else "takes no flags"
    raise _error(command, f"unknown flag {name!r} ({where} {takes}{hint})")


def _assign(command: Command, action: Action, m: re.Match, token: str, keys: dict, overrides: list[str]) -> None:
    prefix, key, value = m["prefix"] or "", m["key"], (m["rest"] or "")[1:]
    own = {f.name: f for f in dataclasses.fields(action.keys)} if action.keys else {}
    if not prefix and key in own:
        tp = typing.get_type_hints(action.keys)[key]
        if typing.get_origin(tp) is list:
            keys.setdefault(key, []).append(_convert(value, typing.get_args(tp)[0], key))
        else:
            keys[key] = _convert(value, tp, key)
    elif action.section and key.split(".", 1)[0] in _section_fields(action.section):
        overrides.append(f"{prefix}{action.section}.{key}{m['rest'] or ''}")
    elif action.overrides:
        overrides.append(token)
    else:
        near = difflib.get_close_matches(key, list(own), n=2)
        hint = f"; did you mean {' or '.join(near)}?" if near else ""
        takes = f"its keys are {', '.join(own)}" if own else "it takes no key=value"
        raise _error(command, f"unknown key {key!r} in {token!r} ({takes}{hint})")


def _check_paths(command: Command, action: Action, paths: list[str]) -> None:
    wanted = list(action.paths)
    if len(paths) < len(wanted):
        raise _error(command, f"missing {' '.join(wanted[len(paths):])}")
    if len(paths) > len(wanted):
        where = f"mmdit {command.name}" + (f" {action.name}" if action.name else "")
        takes = f"takes {' '.join(wanted)}" if wanted else "takes no path"
        raise _error(command, f"unexpected argument {paths[len(wanted)]!r} ({where} {takes})")


def _build_keys(command: Command, action: Action, given: dict):
    if action.keys is None:
        return None
    try:
        return action.keys(**given)
    except (TypeError, ValueError) as e:  # the dataclass's own checks (`__post_init__`)
        raise _error(command, str(e)) from None


def _convert(value: str, tp, what: str):
    tp = _plain(tp)
    try:
        if tp is bool:
            lowered = value.strip().lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError
            return lowered in ("true", "1", "yes", "on")
        return tp(value) if tp in (int, float, str) else value
    except ValueError:
        raise ConfigError(f"{what}: expected {tp.__name__}, got {value!r}") from None


def _plain(tp):
    """`str | None` -> str; other types as they are."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1 else tp


def _section_fields(section: str) -> set[str]:
    from mmdit.config.explain import section_class

    return {f.name for f in dataclasses.fields(section_class(section))}


def _error(command: Command, text: str) -> ConfigError:
    return ConfigError(f"{text} (`mmdit {command.name} --help` lists what it takes)")


def flags_of(cls: type) -> tuple[Flag, ...]:
    """A flag per field of a dataclass (`trainer_gpus` is `--trainer-gpus`), its docstring as help."""
    from mmdit.config.explain import field_docs

    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    return tuple(Flag(f.name.replace("_", "-"), docs.get(f.name, ""), hints[f.name], f.default,
                      _metavar(hints[f.name])) for f in dataclasses.fields(cls))


def join_path_lists(overrides: list[str]) -> list[str]:
    """Let list-of-path keys (`data.shards=PATTERN`) be written bare: Hydra's grammar would read
    braces as a dict and commas as a sweep, and the field is a list, so values that are not list
    literals are quoted into one list; repeated bare arguments (a shell-expanded glob or brace
    pattern) add up instead of overriding each other."""
    out, bare = [], {key: [] for key in PATH_LIST_KEYS}
    for arg in overrides:
        key, _, value = arg.partition("=")
        if key in bare and "=" in arg and not value.lstrip().startswith("["):
            bare[key].append(value.replace("\\", "\\\\").replace("'", "\\'"))
        else:
            out.append(arg)
    out += [f"{key}=[" + ",".join(f"'{v}'" for v in values) + "]" for key, values in bare.items() if values]
    return out


# ----------------------------------------------------------------------------------------- help


def help_text(command: Command) -> str:
    """Usage, what the command does, then per action its paths, flags and keys (with their
    docstrings), and the config sections it reads."""
    lines = [_wrap(("usage: " if i == 0 else "       ") + _usage(command, action), indent=7)
             for i, action in enumerate(command.actions)]
    lines += ["", textwrap.dedent(command.doc).strip()]
    for action in command.actions:
        entries = list(action.paths.items())
        entries += [(f"--{f.name}" + ("" if f.type is bool else f" {f.metavar}"), f.help + _default_note(f.default))
                    for f in action.flags if f.type is not bool] + \
                   [(f"--{f.name}", f.help) for f in action.flags if f.type is bool]
        entries += _key_entries(action)
        if action.overrides == DATA_CHANGES:
            entries.append(("KEY=VALUE", "a change to the running job's data config: a data.* key without "
                                         "`data.` (filters.min_blur=15, task_weights.edit=0); values are YAML"))
        if not entries and not action.help:
            continue
        title = f"mmdit {command.name} {action.name}" if action.name else "arguments"
        lines += ["", f"{title}:" + (f"  {action.help}" if action.help else "")]
        lines += [_entry(meta, text) for meta, text in entries]
    if command.sections:
        lines += ["", "config sections it reads (key=value overrides any of their keys):",
                  _wrap("  " + ", ".join(command.sections), indent=2),
                  _wrap("`mmdit config explain KEY` prints a key's doc, type, default and current value; "
                        "`mmdit config show [key=value ...]` the whole resolved config.")]
    return "\n".join(lines)


def _usage(command: Command, action: Action) -> str:
    parts = [f"mmdit {command.name}"] + ([action.name] if action.name else []) + list(action.paths)
    parts += [f"[--{f.name}" + ("]" if f.type is bool else f" {f.metavar}]") for f in action.flags]
    if action.overrides == DATA_CHANGES:
        parts.append("[KEY=VALUE ...]")
    elif action.keys or action.section or action.overrides:
        parts.append("[key=value ...]")
    return " ".join(parts)


def _default_note(default) -> str:
    return "" if default in (None, "") else f" (default {default!r})"


def _key_entries(action: Action) -> list[tuple[str, str]]:
    from mmdit.config.explain import field_docs, section_class

    out = []
    if action.keys:
        docs, hints = field_docs(action.keys), typing.get_type_hints(action.keys)
        for f in dataclasses.fields(action.keys):
            tp = hints[f.name]
            repeat = typing.get_origin(tp) is list
            meta = f"{f.name}={_metavar(typing.get_args(tp)[0] if repeat else tp)}" + (" ..." if repeat else "")
            out.append((meta, docs.get(f.name, "") + ("" if repeat else _default_note(_field_default(f)))))
    if action.section:
        cls = section_class(action.section)
        docs, hints = field_docs(cls), typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out.append((f"{f.name}={_metavar(hints[f.name])}", f"{docs.get(f.name, '')} ({action.section}."
                                                               f"{f.name}, default {_field_default(f)!r})"))
    return out


def _field_default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _metavar(tp) -> str:
    tp = _plain(tp)
    return {int: "INT", float: "FLOAT", str: "TEXT", bool: "BOOL"}.get(tp, "VALUE")


def _entry(meta: str, text: str) -> str:
    """`  META   text`, the text wrapped in a column of its own."""
    body = textwrap.wrap(" ".join(text.split()), width=100 - 28) or [""]
    first = f"  {meta:<26}" if len(meta) < 26 else f"  {meta}\n{'':28}"
    return first + body[0] + "".join(f"\n{'':28}{line}" for line in body[1:])


def _wrap(text: str, indent: int = 0) -> str:
    return "\n".join(textwrap.wrap(text, width=100, subsequent_indent=" " * indent, break_on_hyphens=False))
