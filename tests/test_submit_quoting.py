"""`mmdit submit`: no value can add a command, or a word, to the job script.

Every value that reaches the script is fuzzed (every `launch.slurm.*` string, run.dir, cache.dir,
the pass-through overrides) with text full of newlines, quotes, `$(...)`, backticks, `;`, `&`,
`#`, `%`, control characters and non-ASCII. Either the script is refused with a config error that
names the key, or each of its readers takes the values word for word:

- sbatch, which reads the `#SBATCH` lines itself (a model of its parser, src/sbatch/opt.c,
  checked against the real sbatch below);
- bash, which runs the script here with `srun`, `scontrol`, the interpreter, ... replaced by
  stubs that record their argv: the recorded commands are exactly the expected ones, with exactly
  the expected words, and nothing else ran;
- Hydra, which parses run.dir= and cache.dir= back to the paths.
"""

import copy
import operator
import os
import shutil
import subprocess
import tempfile
import unicodedata
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from mmdit.config import ConfigError
from mmdit.config.loader import load_config
from mmdit.launch import slurm as submit
from mmdit.launch.cli import main as cli_main
from mmdit.launch.slurm import render

# ----------------------------------------------------------------------------- readers

C_SPACE = " \t\n\v\f\r"  # isspace() in the C locale


def sbatch_header(script: str) -> tuple[list[str], str]:
    """The `#SBATCH` lines sbatch reads, and the line it stops at (the first command)."""
    lines = []
    for line in script.split("\n"):
        if line.startswith("#SBATCH"):
            lines.append(line)
        elif line.lstrip(C_SPACE)[:1] not in ("", "#"):
            return lines, line
    return lines, ""


def sbatch_words(line: str) -> list[str]:
    """The words sbatch takes from one `#SBATCH` line (`_get_argument`): split at whitespace,
    `#` starts a comment, '...' and "..." group, a backslash takes the next character as it is
    (whitespace still ends the word); an empty word ends the line."""
    text, i, words = line.removeprefix("#SBATCH"), 0, []
    while True:
        while i < len(text) and text[i] in C_SPACE:
            i += 1
        word, quote, escaped = "", "", False
        while i < len(text) and (quote or text[i] not in C_SPACE):
            c = text[i]
            if escaped:
                escaped = False
            elif c == "\\":
                escaped, i = True, i + 1
                continue
            elif quote:
                if c == quote:
                    quote, i = "", i + 1
                    continue
            elif c in "\"'":
                quote, i = c, i + 1
                continue
            elif c == "#":
                break
            word, i = word + c, i + 1
        assert not quote, f"sbatch: unmatched {quote} in {line!r}"
        if not word:
            return words
        words.append(word)


PARSER = OverridesParser.create()


def hydra_value(override: str):
    """What a process's Hydra + OmegaConf make of the value of `key=value`."""
    return OmegaConf.create({"v": PARSER.parse_override(override).value()}).v


# ----------------------------------------------------------------------------- the fuzzed job

NASTY = ["\n", "\ncanary\n", "$(canary)", "`canary`", ";canary", "&canary", "|canary", "&&canary", "$(echo>canary.txt)",
         "'", '"', "\\", "#", "%", "%j", "${HOME}", "$RUN", "${x}", "\\${", " ", "\t", "\r", "\x1b", "\x7f", "\x85",
         "\u2028", "é", "中", "🙂", "--", "-w", "hetjob", ",", "=", "*", "?", "!", "~", "{a,b}", "$'\\n'", "')",
         '")']
CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
TEXT = st.one_of(st.text(CHARS, max_size=12),
                 st.lists(st.sampled_from(NASTY) | st.text(CHARS, max_size=4), max_size=6).map("".join))
SBATCH_FIELDS = ("job_name", "partition", "account", "time", "qos", "mem")  # launch.slurm.*, in #SBATCH lines
SHELL_FIELDS = ("container_image", "container_mounts")


def has_control(value: str) -> bool:
    return any(unicodedata.category(c) == "Cc" for c in value)


@st.composite
def jobs(draw) -> dict:
    # half the jobs keep control characters out of the values bound for #SBATCH lines (and run.dir):
    # a control character anywhere there refuses the whole script
    one_line = (lambda s: "".join(c for c in s if not has_control(c))) if draw(st.booleans()) else (lambda s: s)
    sbatch_text = TEXT.map(one_line)
    job = {k: draw(sbatch_text) for k in SBATCH_FIELDS} | {k: draw(TEXT) for k in SHELL_FIELDS}
    job.update(extra=draw(st.lists(sbatch_text, max_size=3)), het=draw(st.booleans()), requeue=draw(st.booleans()),
               python=draw(TEXT).replace("/", "_"), run=draw(sbatch_text).replace("/", "_"), cache=draw(TEXT),
               overrides=draw(st.lists(TEXT.map(lambda s: "x" + s), max_size=3)))  # "x": not one render drops
    return job


@pytest.fixture(scope="module")
def base_cfg():
    return load_config(["launch.trainer_nodes=2", "launch.gpus_per_node=2", "launch.producers_per_node=3",
                        "launch.slurm.gpus=true", "launch.slurm.cpus_per_task=4"])


def configure(base, job: dict, root: Path):
    cfg = copy.deepcopy(base)
    slurm = cfg.launch.slurm
    for key in SBATCH_FIELDS + SHELL_FIELDS + ("extra", "requeue"):
        setattr(slurm, key, job[key])
    slurm.python = str(root / "bin" / f"py-{job['python']}")
    cfg.launch.producer_nodes = 2 if job["het"] else 0
    cfg.run.dir = str(root / "runs" / f"r{job['run']}")
    cfg.cache.dir = str(root / "cache" / job["cache"])
    return cfg


def refused_keys(cfg) -> set[str]:
    """The keys whose values cannot go into an #SBATCH line (a control character could end it) or
    a SLURM log file name (which drops backslashes)."""
    slurm, run = cfg.launch.slurm, str(Path(cfg.run.dir).resolve())
    keys = {f"launch.slurm.{k}" for k in SBATCH_FIELDS if has_control(getattr(slurm, k))}
    keys |= {"launch.slurm.extra"} if any(has_control(x) for x in slurm.extra) else set()
    keys |= {"run.dir"} if has_control(run) or "\\" in run else set()
    return keys


def render_or_refuse(cfg, overrides: list[str]) -> str | None:
    """The script, or None when render refused it naming one of the keys it must refuse."""
    keys = refused_keys(cfg)
    if keys:
        with pytest.raises(ConfigError) as e:
            render(cfg, overrides)
        assert any(f"{k}=" in str(e.value) for k in keys), (keys, str(e.value))
        assert "\n" not in str(e.value)
        return None
    return render(cfg, overrides)


def expected_sbatch_words(cfg) -> list[str]:
    slurm, launch, run = cfg.launch.slurm, cfg.launch, Path(cfg.run.dir).resolve()
    words = [f"--job-name={slurm.job_name}", f"--output={str(run).replace('%', '%%')}/logs/slurm-%j.out",
             "--open-mode=append", f"--signal=B:USR1@{slurm.signal_s}",
             "--requeue" if slurm.requeue else "--no-requeue"]
    words += [f"--{k}={getattr(slurm, k)}" for k in ("time", "account", "qos") if getattr(slurm, k)]

    def component(nodes: int, gpus: int) -> list[str]:
        return ([f"--nodes={nodes}", "--ntasks-per-node=1"] + [f"--partition={slurm.partition}"] * bool(slurm.partition)
                + [f"--gpus-per-node={gpus}"] * bool(gpus) + [f"--cpus-per-task={slurm.cpus_per_task}"]
                + [f"--mem={slurm.mem}"] * bool(slurm.mem))

    words += component(launch.trainer_nodes, launch.gpus_per_node)
    if launch.producer_nodes:
        words += ["hetjob"] + component(launch.producer_nodes, 0)
    return words


# ----------------------------------------------------------------------------- sbatch reads it word for word


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(job=jobs())
def test_fuzzed_values_reach_sbatch_word_for_word_or_are_refused_by_key(base_cfg, job):
    root = Path("/nonexistent/fuzz")  # render touches no file
    cfg = configure(base_cfg, job, root)
    script = render_or_refuse(cfg, job["overrides"])
    if script is None:
        return
    lines, first_command = sbatch_header(script)
    assert first_command == "set -uo pipefail", script  # no value ended the header early
    extra = cfg.launch.slurm.extra
    ours, verbatim = lines[:len(lines) - len(extra)], lines[len(lines) - len(extra):]
    assert [w for line in ours for w in sbatch_words(line)] == expected_sbatch_words(cfg)
    assert verbatim == [f"#SBATCH {x.removeprefix('#SBATCH').strip()}" for x in extra]  # one line each


# ----------------------------------------------------------------------------- bash runs exactly what is meant

# each stub records its argv in a file of its own, whole or not at all (written, then renamed)
RECORD = (f'printf "%s\\0" {{name}} "$@" > "$MMDIT_TEST_LOG/.$BASHPID"\n'
          f'{shutil.which("mv")} "$MMDIT_TEST_LOG/.$BASHPID" "$MMDIT_TEST_LOG/{{name}}.$BASHPID.$RANDOM"\n')
TRAINER_HOST, TRAINER_PEER, COORD_HOST, JOB_ID, HEAD_ADDR = "trainer0", "trainer1", "coord0", "4242", "10.9.8.7"
STUBS = {  # the commands the script may run; each records its argv, then does its part
    # srun runs the trainers' node shell once the data service steps are up (on a cluster they are
    # running by then; here they return at once, and the script would stop them before they record)
    "srun": RECORD + 'args=("$@")\n'
                     # the first trainer node's address, asked of it (`python -m mmdit.launch.address PEER`)
                     f'[[ " $* " == *" mmdit.launch.address "* ]] && {{ echo {HEAD_ADDR}; exit 0; }}\n'
                     'for ((i = 0; i + 2 < $#; i++)); do\n'
                     '  if [ "${args[i]}" = bash ] && [ "${args[i+1]}" = -c ]; then\n'
                     '    shopt -s nullglob\n'
                     '    for ((t = 0; t < 12000; t++)); do\n'
                     '      started=("$MMDIT_TEST_LOG"/srun.*)\n'
                     '      [ ${#started[@]} -gt "$MMDIT_TEST_SERVICES" ] && break\n'
                     f'      {shutil.which("sleep")} 0.01\n'
                     '    done\n'
                     '    exec /bin/bash -c "${args[i+2]}"\n'
                     '  fi\n'
                     'done\n',
    "scontrol": RECORD + 'printf "%s\\n" ${3//,/ }\n',  # show hostnames LIST: one host a line
    "rm": RECORD,
    "mkdir": RECORD + f'exec {shutil.which("mkdir")} "$@"\n',
    "head": RECORD + f'exec {shutil.which("head")} "$@"\n',
    "canary": RECORD,  # what an injected command would run
}



def fake_cluster(root: Path, python: str, het: bool) -> dict:
    bin_dir, log = root / "bin", root / "log"
    bin_dir.mkdir(parents=True)
    log.mkdir()
    for name, body in STUBS.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body.replace("{name}", name), encoding="utf-8")
        (bin_dir / name).chmod(0o755)
    Path(python).write_text("#!/bin/bash\n" + RECORD.replace("{name}", "python"), encoding="utf-8")
    Path(python).chmod(0o755)
    return {"PATH": str(bin_dir), "MMDIT_TEST_LOG": str(log), "SLURM_JOB_ID": JOB_ID,
            "SLURM_JOB_NODELIST": f"{TRAINER_HOST},{TRAINER_PEER}",
            "SLURM_JOB_NODELIST_HET_GROUP_0": f"{TRAINER_HOST},{TRAINER_PEER}", "SLURM_JOB_NODELIST_HET_GROUP_1": COORD_HOST,
            # srun steps before the trainers': the address of the first trainer node, coordinator, producers
            "MMDIT_TEST_SERVICES": "3" if het else "2"}


def recorded(log: Path) -> list[list[str]]:
    out = []
    for f in log.glob("[!.]*"):
        name, *argv = f.read_bytes().decode("utf-8").split("\0")[:-1]
        # run.dir= / cache.dir= / service.address_from= are read by Hydra: compare what it makes of them
        argv = [w.split("=", 1)[0] + "=" + hydra_value(w) if w.startswith(("run.dir=", "cache.dir=", "service.address_from=")) else w
                for w in argv]
        if name == "srun" and argv[-3:-1] == ["bash", "-c"]:
            argv[-1] = "<node shell>"  # run by the stub: what it starts is recorded
        out.append([name, *argv])
    return out


def expected_commands(cfg, overrides: list[str]) -> list[list[str]]:
    launch, slurm, run = cfg.launch, cfg.launch.slurm, Path(cfg.run.dir).resolve()
    het, py, ppn = launch.producer_nodes > 0, slurm.python, launch.producers_per_node
    coord = COORD_HOST if het else TRAINER_HOST
    logs = str(run).replace("%", "%%") + "/logs"
    container = ([f"--container-image={slurm.container_image}"]
                 + [f"--container-mounts={slurm.container_mounts}"] * bool(slurm.container_mounts)
                 ) if slurm.container_image else []
    dp = launch.trainer_nodes * launch.gpus_per_node // cfg.parallel.tp
    common = [*overrides, f"cache.dir={Path(cfg.cache.dir).resolve()}", f"service.dp_size={dp}"]
    group = (lambda g: [f"--het-group={g}"]) if het else (lambda g: [])
    cli = [py, "-m", "mmdit.launch.cli"]
    address_from = f"service.address_from={run}/service"
    commands = [
        ["mkdir", "-p", f"{run}/logs"],
        ["scontrol", "show", "hostnames", f"{TRAINER_HOST},{TRAINER_PEER}"], ["head", "-n1"],
        ["srun", "--overlap", "--nodes=1", "--ntasks=1", "-w", TRAINER_HOST, *container, py, "-m",
         "mmdit.launch.address", TRAINER_PEER],
        ["rm", "-f", f"{run}/service/address.json"],
        ["srun", "--overlap", *group(1), "--nodes=1", "--ntasks=1", "-w", coord, *container,
         f"--output={logs}/coordinator-%j.log", *cli, "serve", *common, f"run.dir={run}/service",
         f"service.advertise_host=route:{HEAD_ADDR}", f"service.producers={0 if het else ppn}"],
        ["srun", "--overlap", *group(0), "--ntasks-per-node=1", *container, f"--output={logs}/trainer-%N-%j.log",
         "bash", "-c", "<node shell>"],
        ["python", "-m", "mmdit.launch.agent", f"--nnodes={launch.trainer_nodes}",
         f"--nproc-per-node={launch.gpus_per_node}", "--rdzv-backend=mmdit", f"--rdzv-endpoint={HEAD_ADDR}:29400",
         f"--rdzv-id={JOB_ID}", "-m", "mmdit.launch.cli", "train", f"run.dir={run}", *common,
         "train.data_source=service", address_from],
    ]
    if het:
        commands += [["scontrol", "show", "hostnames", COORD_HOST], ["head", "-n1"],
                     ["srun", "--overlap", "--het-group=1", f"--ntasks-per-node={ppn}", *container,
                      f"--output={logs}/producer-%N-%t-%j.log", *cli, "producer", *common, f"run.dir={run}/service",
                      address_from]]
    return commands


@pytest.mark.slow  # about 8 processes per example
@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(job=jobs())
def test_fuzzed_values_run_no_command_and_reach_each_command_word_for_word(base_cfg, job):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = configure(base_cfg, job, root)
        script = render_or_refuse(cfg, job["overrides"])
        if script is None:
            return
        env = fake_cluster(root, cfg.launch.slurm.python, job["het"])
        (root / "job.sbatch").write_text(script, encoding="utf-8")
        assert subprocess.run(["/bin/bash", "-n", "job.sbatch"], cwd=root).returncode == 0
        done = subprocess.run(["/bin/bash", "job.sbatch"], cwd=root, env=env, capture_output=True, timeout=60)
        # nothing else ran: no "command not found" either
        assert (done.returncode, done.stderr) == (0, b""), done.stderr.decode(errors="replace")
        assert not (root / "canary.txt").exists()
        got, want = sorted(recorded(root / "log")), sorted(expected_commands(cfg, job["overrides"]))
        assert got == want, (f"ran, not expected: {[c for c in got if c not in want]}\n"
                             f"expected, not run: {[c for c in want if c not in got]}\n{script}")


# ----------------------------------------------------------------------------- the CLI, Hydra, the real sbatch


def test_a_newline_in_an_sbatch_value_is_refused_by_the_cli_naming_the_key(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")  # an sbatch that would record a submission
    (tmp_path / "sbatch").write_text(f"#!/bin/sh\ntouch {tmp_path}/submitted\necho 1\n")
    (tmp_path / "sbatch").chmod(0o755)
    for dry_run in (["--dry-run"], []):
        code = cli_main(["submit", *dry_run, f"run.dir={run}", "launch.slurm.account='a\ntouch /tmp/x'"])
        out, err = capsys.readouterr()
        assert code == 2 and out == "", out
        assert err.count("\n") == 1 and "launch.slurm.account=" in err and "control character" in err, err
    assert not run.exists() and not (tmp_path / "submitted").exists()  # nothing written, nothing submitted


@pytest.mark.parametrize("key,value", [("launch.slurm.job_name", "'x\ny'"), ("launch.slurm.partition", "'gpu\r'"),
                                       ("launch.slurm.mem", "'1G\x1b'"), ("launch.slurm.qos", "'q\x85'"),
                                       ("launch.slurm.extra", "['--exclusive\ntouch x']")])
def test_each_sbatch_key_is_named_when_refused(tmp_path, capsys, key, value):
    assert cli_main(["submit", "--dry-run", f"run.dir={tmp_path}", f"{key}={value}"]) == 2
    assert f"{key}=" in capsys.readouterr().err


def test_an_interpreter_that_srun_would_take_for_an_option_is_refused(tmp_path, capsys):
    assert cli_main(["submit", "--dry-run", f"run.dir={tmp_path}", "launch.slurm.python=--pty"]) == 2
    assert "launch.slurm.python=" in capsys.readouterr().err


def test_paths_reach_a_process_config_exactly():
    """run.dir= and cache.dir= as render writes them give a process's config the paths exactly (and
    `hydra_value`, which the fuzzing uses, reads them as the config does)."""
    paths = {"run.dir": "/runs/a b", "cache.dir": "/runs/it's", "launch.slurm.partition": "/runs/a,b",
             "launch.slurm.account": "/runs/${oc.env:HOME}", "launch.slurm.time": "/runs/\\${x}",
             "launch.slurm.qos": "/runs/end\\", "launch.slurm.job_name": "/runs/é 中\n",
             "launch.slurm.mem": "/runs/q\\'",
             "launch.slurm.container_image": "/runs/[1]", "launch.slurm.container_mounts": "/runs/a=b#c",
             "launch.slurm.python": "/plain/path-1.2_x+y"}
    overrides = [submit._override(key, path) for key, path in paths.items()]
    cfg = load_config(overrides)
    assert {key: operator.attrgetter(key)(cfg) for key in paths} == paths
    assert [hydra_value(o) for o in overrides] == list(paths.values())


@pytest.mark.slow
def test_the_sbatch_model_reads_a_script_as_the_real_sbatch_does(base_cfg, tmp_path):
    """sbatch -vvvv logs each word it takes from the #SBATCH lines before it contacts a controller."""
    if not shutil.which("sbatch"):
        pytest.fail("slurm-wlm is not installed: `make test` installs it (Debian packages)")
    job = {k: "" for k in SBATCH_FIELDS + SHELL_FIELDS}
    job.update(job_name="a b#c\"d\\e'f $(x) `y` é", account="x \"y#z", qos="q'#", partition="p\\#1", time="1:00:00",
               mem="1G", extra=["--comment='c d' --exclusive"], het=True, requeue=True, python="p", run="a b%c'd",
               cache="c", overrides=[])
    cfg = configure(base_cfg, job, tmp_path)
    cfg.launch.slurm.gpus = False  # sbatch checks a GPU request against the cluster's gres before logging
    (tmp_path / "job.sbatch").write_text(render(cfg, []), encoding="utf-8")
    lines, _ = sbatch_header((tmp_path / "job.sbatch").read_text(encoding="utf-8"))
    model = [w for line in lines for w in sbatch_words(line) if w != "hetjob"]
    assert f"--job-name={job['job_name']}" in model and "--comment=c d" in model
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=model\nSlurmctldHost=localhost\nSlurmctldPort=9\n")  # nothing listens
    env = {**os.environ, "SLURM_CONF": str(conf)}
    proc = subprocess.Popen(["sbatch", "-vvvv", str(tmp_path / "job.sbatch")], env=env, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, encoding="utf-8", errors="replace")
    words, ends, log = [], 0, []
    try:
        for line in proc.stderr:  # both components' options are logged before the submission is tried
            log.append(line)
            if "Found in script, argument \"" in line:
                words.append(line.split("Found in script, argument \"", 1)[1].rstrip("\n")[:-1])
            ends += "end of defined options" in line
            if ends == 2:
                break
    finally:
        proc.kill()
        proc.wait()
    assert ends == 2, "".join(log)
    assert words == model, "".join(log)
