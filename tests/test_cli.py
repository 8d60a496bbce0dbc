"""The command line: one grammar for every command (launch/args.py), `--help` for each, and
`mmdit config show|explain` (config/explain.py). In-process: each command's main(argv) or the
dispatcher, output captured."""

import dataclasses
import importlib
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from mmdit.config import ConfigError
from mmdit.config.job import JobConfig
from mmdit.config.loader import CONF_DIR, compose_config, load_data_preset
from mmdit.launch.args import Action, Command, Flag, parse
from mmdit.launch.cli import COMMANDS
from mmdit.launch.cli import main as cli

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass
class Keys:
    prompt: list[str] = dataclasses.field(default_factory=list)
    """A prompt (repeatable)."""
    width: int = 256
    """Image width."""
    fast: bool = False


DEMO = Command("demo-cmd", "a command to test the grammar", actions=(
    Action("run", paths={"SRC": "in", "DST": "out"}, keys=Keys, section="synth",
           flags=(Flag("jobs", "threads", int, 1, "N"), Flag("dry-run", "say only"), Flag("why", "reason", str))),
    Action("peek", paths={"SRC": "in"}, overrides=None),
))


def test_tokens_split_into_action_paths_flags_keys_and_overrides():
    args = parse(DEMO, ["run", "a", "prompt=x y", "--jobs", "3", "num_samples=8", "b", "prompt=z", "--dry-run",
                        "width=128", "fast=yes", "optimizer.lr=1e-4", "+foo.bar=1", "~data.shards", "--why=because"])
    assert args.action == "run" and args.paths == ["a", "b"]
    assert (args.flags.jobs, args.flags.dry_run, args.flags.why) == (3, True, "because")
    assert args.keys == Keys(prompt=["x y", "z"], width=128, fast=True)
    # a bare field of the action's section is that section's key; the rest are overrides, in order
    assert args.overrides == ["synth.num_samples=8", "optimizer.lr=1e-4", "+foo.bar=1", "~data.shards"]
    defaults = parse(DEMO, ["run", "a", "b"])
    assert (defaults.flags.jobs, defaults.flags.dry_run, defaults.flags.why, defaults.keys) == (1, False, None, Keys())


def test_paths_that_look_like_assignments_or_flags_go_after_a_double_dash():
    args = parse(DEMO, ["run", "--jobs", "2", "--", "k=v", "--odd"])
    assert args.paths == ["k=v", "--odd"] and args.flags.jobs == 2 and args.overrides == []
    assert parse(DEMO, ["run", "./k=v", "dir/x=1"]).paths == ["./k=v", "dir/x=1"]  # not key=value: a path


def test_bare_shard_patterns_add_up_into_one_list_override():
    args = parse(Command("p", "", sections=("data",)), ["data.shards=a/*.tar", "data.shards=b-{0..3}.tar", "seed=1"])
    assert args.overrides == ["seed=1", "data.shards=['a/*.tar','b-{0..3}.tar']"]
    assert OmegaConf.to_object(compose_config(args.overrides)).data.shards == ["a/*.tar", "b-{0..3}.tar"]


@pytest.mark.parametrize("argv, named", [
    (["walk", "a"], "'walk'"),                          # not an action
    ([], "expected an action"),
    (["run", "a"], "missing DST"),
    (["run", "a", "b", "c"], "'c'"),                    # a path too many
    (["run", "a", "b", "--job", "2"], "'--job'"),        # an unknown flag (did you mean --jobs?)
    (["run", "a", "b", "--jobs"], "--jobs needs a value"),
    (["run", "a", "b", "--jobs", "many"], "'many'"),
    (["run", "a", "b", "--dry-run=1"], "'--dry-run=1'"),
    (["run", "a", "b", "width=wide"], "'wide'"),
    (["peek", "a", "lr=1"], "'lr'"),                    # an action that takes no key=value
    (["peek", "a", "--jobs", "1"], "'--jobs'"),          # a flag of another action
])
def test_a_bad_token_is_a_config_error_naming_it(argv, named):
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("?", r"\?")) as e:
        parse(DEMO, argv)
    assert "\n" not in str(e.value)


def test_a_bad_command_line_exits_2_with_one_line(capsys):
    assert cli(["cache", "verify", "/nowhere", "--repiar"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmdit cache: unknown flag '--repiar'") and "--repair" in err and len(err.splitlines()) == 1
    assert cli(["sample", "run", "prompt=a", "widht=128"]) == 2
    err = capsys.readouterr().err.strip()
    assert "'widht'" in err and "did you mean width" in err and len(err.splitlines()) == 1


# Command lines the README and the tests use, as each command now splits them.
DOCUMENTED = [
    ("sample", ["RUN", "prompt=a", "prompt=b", "out=DIR"], None, ["RUN"], {}, []),
    ("synth", ["OUT", "num_samples=8", "kinds.complex=1"], None, ["OUT"], {}, ["synth.num_samples=8",
                                                                                "synth.kinds.complex=1"]),
    ("synth", ["OUT", "synth.num_samples=12"], None, ["OUT"], {}, ["synth.num_samples=12"]),
    ("produce", ["data.shards=shards/*.tar", "cache.dir=c", "encoders.dir=e"], None, [], {},
     ["cache.dir=c", "encoders.dir=e", "data.shards=['shards/*.tar']"]),
    ("ctl", ["set", "RUN", "task_weights.edit=0", "--why", "x"], "set", ["RUN"], {"why": "x", "preset": None},
     ["task_weights.edit=0"]),
    ("ctl", ["set", "RUN", "--preset", "stage2"], "set", ["RUN"], {"preset": "stage2"}, []),
    ("ctl", ["history", "RUN"], "history", ["RUN"], {}, []),
    ("cache", ["verify", "DIR", "--repair"], "verify", ["DIR"], {"repair": True, "fingerprint": None}, []),
    ("convert", ["verify", "SRC", "--tp", "2"], "verify", ["SRC"], {"tp": 2, "seed": 0}, []),
    ("convert", ["from-diffusers", "SRC", "DST", "--tp", "2"], "from-diffusers", ["SRC", "DST"], {"tp": 2}, []),
    ("status", ["RUN", "--json"], None, ["RUN"], {"json": True}, []),
    ("slurm", ["run.dir=R", "--dry-run", "parallel.tp=8"], None, [], {"dry_run": True}, ["run.dir=R", "parallel.tp=8"]),
    ("capacity", ["--markdown", "--trainer-mfu", "0.5", "model=tiny"], None, [], {"markdown": True, "trainer_mfu": 0.5},
     ["model=tiny"]),
    ("checkpoint", ["verify", "DIR", "--jobs", "3"], "verify", ["DIR"], {"jobs": 3}, []),
    ("train", ["run.dir=R", "launch.nproc=2", "train.lr=1e-4"], None, [], {}, ["run.dir=R", "launch.nproc=2",
                                                                             "train.lr=1e-4"]),
    ("tiny_encoders", ["DIR"], None, ["DIR"], {}, []),
]


@pytest.mark.parametrize("module, argv, action, paths, flags, overrides", DOCUMENTED)
def test_documented_command_lines_keep_working(module, argv, action, paths, flags, overrides):
    args = parse(importlib.import_module(f"mmdit.launch.{module}").COMMAND, argv)
    assert (args.action, args.paths, args.overrides) == (action, paths, overrides)
    assert {k: getattr(args.flags, k) for k in flags} == flags
    if module == "sample":
        assert args.keys.prompt == ["a", "b"] and args.keys.out == "DIR"


def test_the_demo_stage_is_a_flag_or_a_key():
    from mmdit.config import ConfigError
    from mmdit.launch.demo import COMMAND, chosen_stage

    def stage(*argv):
        return chosen_stage(parse(COMMAND, list(argv)))

    assert stage("run.dir=R") == "pretrain"
    assert stage("--stage", "grpo", "run.dir=R") == stage("stage=grpo", "run.dir=R") == "grpo"
    assert stage("--stage", "dpo", "stage=dpo") == "dpo"
    with pytest.raises(ConfigError, match="name two stages"):
        stage("--stage", "dpo", "stage=grpo")
    with pytest.raises(ConfigError, match="must be one of pretrain, sft, dpo, grpo, got 'rl'"):
        stage("stage=rl")
    assert parse(COMMAND, ["stage=sft", "train.steps=3"]).overrides == ["train.steps=3"]


def test_commands_that_run_in_process_with_their_flags(tmp_path, capsys):
    import json

    assert cli(["status", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["run_dir"] == str(tmp_path)
    assert cli(["checkpoint", "verify", str(tmp_path), "--jobs", "2"]) == 2  # neither a run nor a checkpoint
    assert cli(["submit", f"run.dir={tmp_path}", "--dry-run", "launch.slurm.gpus=false"]) == 0
    assert capsys.readouterr().out.startswith("#!/bin/bash")
    assert cli(["ctl", "set", str(tmp_path), "filters.min_blur=1", "--why", "x"]) == 1  # parsed; nothing runs there


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help_listing_its_own_keys(name, capsys):
    module = importlib.import_module(COMMANDS[name][0])
    for flag in ("--help", "-h"):
        assert cli([name, flag]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: mmdit {name}")
    command = getattr(module, "COMMAND", None)
    if command is None:  # not declared yet: it takes overrides of every section
        assert "config sections it reads" in out and "mmdit config explain KEY" in out
        return
    for action in command.actions:
        expected = [*(action.paths), *(f"--{f.name}" for f in action.flags)]
        expected += [f"{f.name}=" for f in dataclasses.fields(action.keys)] if action.keys else []
        if action.section:
            from mmdit.config.explain import section_class

            expected += [f"{action.section}.{f.name}" for f in dataclasses.fields(section_class(action.section))]
        expected += [action.name] if action.name else []
        assert [word for word in expected if word not in out] == []
    assert all(section in out for section in command.sections)
    with pytest.raises(SystemExit) as e:  # the command's own main() answers --help the same way
        module.main(["--help"])
    assert e.value.code == 0 and capsys.readouterr().out == out


def test_the_train_help_names_the_sections_it_reads(capsys):
    assert cli(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for section in ("train", "optimizer", "checkpoint", "eval", "model", "parallel", "data", "service"):
        assert section in out.split("config sections it reads")[1]
    assert "mmdit config explain KEY" in out


def test_no_command_parses_argv_its_own_way():
    """argparse and hand-rolled splitting stay in launch/args.py."""
    own = [p.name for p in (ROOT / "launch").glob("*.py") if p.name != "args.py" and "argparse" in p.read_text()]
    assert own == []


# ------------------------------------------------------------------------------------ config


def test_config_show_prints_the_resolved_config_with_overrides(capsys):
    assert cli(["config", "show", "optimizer.lr=0.001", "data=stage2", "train.steps=7"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["optimizer"]["lr"] == 0.001 and shown["train"]["steps"] == 7
    assert shown["data"]["filters"]["min_blur"] == 20.0 and shown["model"]["num_layers"] == 2  # stage2, tiny
    assert cli(["config", "show", "optimizer.lr=-1"]) == 2


def explain(capsys, *argv: str) -> str:
    assert cli(["config", "explain", *argv]) == 0
    return capsys.readouterr().out


def line(out: str, label: str) -> str:
    return next(row for row in out.splitlines() if row.strip().startswith(label))


def test_explain_a_plain_key(capsys):
    out = explain(capsys, "optimizer.lr")
    assert "Peak learning rate, reached after warmup." in out and "config/train.py OptimizerConfig.lr" in out
    assert line(out, "type").split() == ["type", "float"] and line(out, "default").split() == ["default", "0.0005"]
    assert line(out, "current").split() == ["current", "0.0005"] and "the default" in line(out, "set by")


def test_explain_a_nested_key_set_by_an_inherited_preset(capsys):
    out = explain(capsys, "data.filters.min_blur", "data=stage3")
    assert "Laplacian variance" in out and "config/data.py FilterConfig.min_blur" in out
    assert line(out, "default").split()[1] == "0.0" and line(out, "current").split()[1] == "20.0"
    # stage3 inherits stage2, which sets it
    assert "conf/data/stage2.yaml (inherited by data=stage3, chosen on the command line)" in line(out, "set by")


def test_explain_a_key_set_by_the_default_preset_file(capsys):
    out = explain(capsys, "model.num_layers")
    assert line(out, "current").split()[1] == "2" and line(out, "default").split()[1] == "60"
    assert "conf/model/tiny.yaml" in line(out, "set by")


def test_explain_a_key_set_on_the_command_line(capsys):
    out = explain(capsys, "service.heartbeat_s", "service.heartbeat_s=0.5")
    assert line(out, "current").split()[1] == "0.5"
    assert "the command line (service.heartbeat_s=0.5)" in line(out, "set by")
    # the command line wins over a preset file
    out = explain(capsys, "model.num_layers", "model.num_layers=3")
    assert "the command line" in line(out, "set by") and "tiny.yaml" not in out


def test_explain_a_table_names_each_source_of_its_entries(capsys):
    out = explain(capsys, "data.category_weights", "data=stage6")
    sources = out.split("set by", 1)[1]
    assert "conf/data/stage4.yaml" in sources and "design: 1.5" in sources  # stage 6 keeps stage 4's design
    assert "conf/data/stage6.yaml" in sources and "people: 2.0" in sources
    entry = explain(capsys, "data.category_weights.people", "data=stage6")
    assert line(entry, "current").split()[1] == "2.0" and "conf/data/stage6.yaml" in line(entry, "set by")


def test_explain_a_moved_key(capsys):
    out = explain(capsys, "train.lr", "train.lr=3e-4")
    assert out.startswith("train.lr moved to optimizer.lr")
    assert line(out, "current").split()[1] == "0.0003" and "the command line" in line(out, "set by")


def test_explain_an_unknown_key_suggests_close_ones(capsys):
    assert cli(["config", "explain", "optimizer.lrr"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown key 'optimizer.lrr'" in err and "optimizer.lr" in err and len(err.splitlines()) == 1
    assert cli(["config", "explain", "heartbeat"]) == 2
    assert "service.heartbeat_s" in capsys.readouterr().err


def test_field_docs_are_the_string_under_each_field():
    from mmdit.config.explain import field_docs
    from mmdit.config.service import ServiceConfig

    docs = field_docs(Keys)
    assert docs == {"prompt": "A prompt (repeatable).", "width": "Image width."}  # `fast` has none
    # inherited fields keep their doc (ServiceConfig's fields come from four role classes)
    assert field_docs(ServiceConfig)["heartbeat_s"].startswith("Longest a long poll")
    assert field_docs(ServiceConfig)["producers"].startswith("Producers `mmdit serve` starts")


# ------------------------------------------------------------------------------------- conf/


def _conf_files() -> list[Path]:
    return sorted(CONF_DIR.rglob("*.yaml"))


def _leaves(node, prefix=""):
    for k, v in node.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            yield from _leaves(v, key + ".")
        else:
            yield key, v


@pytest.mark.parametrize("path", _conf_files(), ids=lambda p: str(p.relative_to(CONF_DIR)))
def test_conf_files_set_only_what_differs_from_what_they_build_on(path):
    """Every value a file sets differs from its parent's (its `defaults:`) or, without one, from
    the dataclass default."""
    body = yaml.safe_load(path.read_text()) or {}
    parents = [d for d in body.pop("defaults", []) if d != "_self_"]
    group = path.parent.name if path.parent != CONF_DIR else None
    if group is None:
        base = OmegaConf.structured(JobConfig)
    elif parents:
        assert len(parents) == 1, path
        base = compose_config([f"{group}={parents[0]}"])[group]
    else:
        base = OmegaConf.structured(JobConfig)[group]
    same = []
    for key, value in _leaves(body):
        before = OmegaConf.select(base, key, default=None)
        if isinstance(before, (dict, list)) or OmegaConf.is_config(before):
            before = OmegaConf.to_container(before)
        if before == value and before is not None:
            same.append(key)
    assert same == [], f"{path.relative_to(CONF_DIR)} repeats what it builds on: {same}"


def test_the_quality_preset_is_stage2_with_caption_bounds():
    body = yaml.safe_load((CONF_DIR / "data" / "quality.yaml").read_text())
    assert "stage2" in body["defaults"]
    quality, stage2 = load_data_preset("quality").filters, load_data_preset("stage2").filters
    own = set(body["filters"])
    assert {k: v for k, v in dataclasses.asdict(quality).items() if k not in own} == \
        {k: v for k, v in dataclasses.asdict(stage2).items() if k not in own}
    # the curated set as it was before it inherited
    assert (quality.min_side, quality.min_aspect, quality.max_aspect, quality.min_blur, quality.min_brightness,
            quality.max_brightness, quality.min_contrast, quality.min_entropy, quality.min_caption_chars,
            quality.max_caption_chars, quality.max_saturation, quality.duplicate_distance) == \
        (256, 0.33, 3.0, 20.0, 0.05, 0.95, 0.04, 3.0, 8, 2000, 1.0, 0)

