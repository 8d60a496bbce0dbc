"""`mmdit ctl`: change a running job's data pipeline through its coordinator's control endpoint.

    mmdit ctl get RUN_DIR                          the data config in force and its version
    mmdit ctl set RUN_DIR KEY=VALUE... [--why T]   a change, from the first batch no producer holds
    mmdit ctl set RUN_DIR --preset stage5 [K=V...] switch to a whole data preset (conf/data/stage5.yaml)
    mmdit ctl history RUN_DIR                      every version: when, from which step, what, why

RUN_DIR is the service's run directory (where `mmdit serve` writes control.json and
control.token), or the demo's (its service/ is looked at too). Values are YAML scalars
(`task_weights.edit=2`, `filters.min_blur=15.5`, `filters.drop_duplicates=false`). Exit codes: 0
done, 2 the change was rejected (the reason on stderr), 1 the endpoint cannot be reached.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from mmdit.dataservice.control import CONTROL_JSON, CONTROL_TOKEN
from mmdit.launch.args import DATA_CHANGES, Action, Command, Flag, parse

RUN_DIR = {"RUN_DIR": "the service's run directory (control.json, control.token), or the demo's"}
COMMAND = Command("ctl", __doc__, actions=(
    Action("get", "the data config in force and its version", paths=RUN_DIR, overrides=None),
    Action("set", "a change, from the first batch no producer holds", paths=RUN_DIR, overrides=DATA_CHANGES, flags=(
        Flag("preset", "a data config of conf/data (stage1..stage7, quality, ...): every weight table, threshold "
                       "and the stage, as a whole; KEY=VALUE pairs apply on top", str, metavar="NAME"),
        Flag("why", "recorded in the history with the change", str, "", "TEXT"))),
    Action("history", "every version: when, from which step, what, why", paths=RUN_DIR, overrides=None),
))


class Unreachable(RuntimeError):
    pass


def find_endpoint(run_dir: str) -> tuple[str, Path]:
    """(url, directory holding control.json) of the run's coordinator."""
    url, where, _ = _endpoint(run_dir)
    return url, where


def _endpoint(run_dir: str) -> tuple[str, Path, dict]:
    for d in (Path(run_dir), Path(run_dir) / "service"):
        if (d / CONTROL_JSON).is_file():
            record = json.loads((d / CONTROL_JSON).read_text())
            return record["url"], d, record
    raise Unreachable(f"no {CONTROL_JSON} in {run_dir} (or its service/): is the job's `mmdit serve` running?")


def _why_unreachable(url: str, record: dict) -> str:
    """What an operator can do when `url` does not answer here."""
    from mmdit.utils.netaddr import is_loopback

    host = record.get("bind", "").rpartition(":")[0].strip("[]")
    if host and is_loopback(host):
        return (f"the control endpoint listens on {host}, which only its own host ({record.get('host', '?')}) "
                "reaches: run `mmdit ctl` there, or start the service with service.control_host set to an address "
                "of its host on the job network")
    return "is the service still running, and is its host reachable from this one?"


def request(run_dir: str, method: str, path: str, body: dict | None = None) -> tuple[int, object]:
    url, where, record = _endpoint(run_dir)
    headers = {"Content-Type": "application/json"}
    if method != "GET":
        try:
            headers["Authorization"] = "Bearer " + (where / CONTROL_TOKEN).read_text().strip()
        except OSError as e:
            raise Unreachable(f"cannot read the token {where / CONTROL_TOKEN}: {e.strerror}") from None
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")
    except (urllib.error.URLError, OSError) as e:
        raise Unreachable(f"cannot reach {url} ({getattr(e, 'reason', e)}): {_why_unreachable(url, record)}") from None


def parse_assignment(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, yaml.safe_load(value) if value else ""
    except yaml.YAMLError:
        return key, value


def preset(name: str) -> dict:
    """The changes that switch a running job to conf/data/<name>.yaml (ValueError if none)."""
    from mmdit.config.data import preset_changes
    from mmdit.config.loader import load_data_preset

    return preset_changes(load_data_preset(name))


def main(argv: list[str]) -> int:
    args = parse(COMMAND, argv)
    run_dir, flags = args.paths[0], args.flags
    try:
        if args.action == "set":
            try:
                changes = preset(flags.preset) if flags.preset else {}
                changes.update(parse_assignment(a) for a in args.overrides)
            except ValueError as e:
                print(f"mmdit ctl: {e}", file=sys.stderr)
                return 2
            if not changes:
                print("mmdit ctl: set needs KEY=VALUE pairs or --preset NAME", file=sys.stderr)
                return 2
            why = flags.why or (f"preset {flags.preset}" if flags.preset else "")
            status, reply = request(run_dir, "POST", "/config", {"changes": changes, "why": why})
        else:
            status, reply = request(run_dir, "GET", "/config" if args.action == "get" else "/history")
    except Unreachable as e:
        print(f"mmdit ctl: {e}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"mmdit ctl: rejected: {reply.get('error', status) if isinstance(reply, dict) else status}",
              file=sys.stderr)
        return 2
    print(json.dumps(reply, indent=1))
    return 0
