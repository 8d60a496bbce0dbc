"""`mmdit status RUN_DIR [--json]`: one screen on a run, live or finished.

It reads only the run directory (and its service/, where `mmdit demo` puts the data service):
processes.json (every process, alive or not), the last line of metrics.jsonl, service.json (the
coordinator's state, rewritten every second while it runs), control.json (the dashboard's URL)
and the checkpoints. Whether a process lives is checked only for processes of this host (its pid
space, utils/processes.py): one of another host is shown as `remote`, with its host, never
judged by a local pid that happens to exist or not.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from mmdit.launch.args import Action, Command, Flag, parse

COMMAND = Command("status", __doc__, actions=(Action(
    paths={"RUN_DIR": "a run directory (live or finished)"},
    flags=(Flag("json", "everything as one JSON object"),), overrides=None),))


def _last_line(path: Path) -> dict | None:
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - 65536))
        lines = [line for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not record.get("eval"):
            return record
    return None


def gather(run_dir: Path) -> dict:
    from mmdit.consumer.checkpoint import checkpoints
    from mmdit.utils.processes import ProcessTable, is_local, process_alive

    dirs = [d for d in (run_dir, run_dir / "service") if d.is_dir()]
    processes = []
    for d in dirs:
        if (d / "processes.json").is_file():
            for row in ProcessTable(d).read():
                ended = row.get("returncode") is not None or row.get("gone")
                remote = not ended and not is_local(row)  # its pid means nothing here
                alive = None if remote else (not ended and process_alive(row["pid"]))
                processes.append({**row, "alive": alive, "remote": remote})
    service = next((json.loads((d / "service.json").read_text()) for d in dirs if (d / "service.json").is_file()), None)
    control = next((json.loads((d / "control.json").read_text()) for d in dirs if (d / "control.json").is_file()), None)
    ckpts = [p for p in checkpoints(run_dir) if (p / "trainer.json").is_file()]
    return {"run_dir": str(run_dir), "processes": processes, "metrics": _last_line(run_dir / "metrics.jsonl"),
            "service": service, "dashboard": f"{control['url']}/dashboard" if control else None,
            "last_checkpoint": ckpts[0].name if ckpts else None,
            "summary": json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file()
            else None}


def render(info: dict) -> str:
    live = any(p["alive"] for p in info["processes"])
    remote = any(p.get("remote") for p in info["processes"])
    state = "running" if live else ("processes on other hosts, not checked from here" if remote else "not running")
    lines = [f"run {info['run_dir']}: {state}"]
    if info["dashboard"]:
        lines.append(f"dashboard {info['dashboard']}")
    m = info["metrics"]
    if m:
        mfu = "n/a" if m.get("mfu") is None else f"{100 * m['mfu']:.1f}%"
        lines.append(f"step {m['step']} | loss {m['loss']:.4f} | {m['samples_per_second']:.2f} samples/s | "
                     f"{m['tflops_per_gpu']:.3f} TFLOP/s/dev | MFU {mfu} | data wait "
                     f"{100 * m['data_wait_fraction']:.1f}% | config v{m['config_version']}")
    else:
        lines.append("no training step yet")
    s = info["service"]
    if s:
        alive = [n for n, p in s["producers"].items() if p["alive"]]
        age = time.time() - s.get("time", 0)
        lines.append(f"service: {len(alive)} producers alive of {len(s['producers'])}, config version "
                     f"{s['config_version']}, {s['counters']['batches_done']} batches done"
                     + (f" (as of {age:.0f}s ago)" if age > 5 else ""))
    lines.append(f"last checkpoint: {info['last_checkpoint'] or 'none'}")
    lines.append("processes:")
    for p in info["processes"]:
        state = ("remote" if p.get("remote") else "alive" if p["alive"] else
                 "gone" if p.get("gone") else f"exited {p.get('returncode')}")
        lines.append(f"  {p['role']:<12} {p['name']:<40} pid {p['pid']:<8} {p.get('host', ''):<16} {state}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parse(COMMAND, argv)
    run_dir = Path(args.paths[0])
    if not run_dir.is_dir():
        print(f"mmdit status: {run_dir} is not a directory", flush=True)
        return 2
    info = gather(run_dir)
    print(json.dumps(info, indent=1) if args.flags.json else render(info))
    return 0
