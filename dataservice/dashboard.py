"""Routes of the control endpoint for watching a job: `/metrics` (Prometheus), `/dashboard` (a
live page; every asset comes from this package, so it works on an offline cluster), and the JSON
it reads (`/api/series`, `/api/run`), plus the newest preview images (the trainer's or the
evaluator's). The page shows where the trainer's wall time goes (steps, data wait, checkpoint and
evaluation stalls) and the evaluations by step (held-out loss, OCR word accuracy).
"""

from __future__ import annotations

import json
import time
from http import HTTPStatus
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from mmdit.dataservice.control import ControlServer, HttpError
from mmdit.dataservice.telemetry import PrometheusCollector, Telemetry

STATIC = Path(__file__).parent / "static"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript", ".css": "text/css", ".png": "image/png"}
CONSUMER_SEEN_S = 30.0
"""A client not heard from for this long shows as gone on the dashboard."""


def install(server: ControlServer, coordinator, telemetry: Telemetry, run_dir: str) -> None:
    if telemetry.run_dir is None:  # until a trainer reports its own run dir (evaluations are read there)
        telemetry.run_dir = str(run_dir)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PrometheusCollector(coordinator, telemetry))
    run_dir = Path(run_dir)

    def metrics(_req):
        return HTTPStatus.OK, CONTENT_TYPE_LATEST, generate_latest(registry)

    def static(name: str):
        return lambda _req: (HTTPStatus.OK, _TYPES[Path(name).suffix], (STATIC / name).read_bytes())

    def series(_req):
        return HTTPStatus.OK, "application/json", json.dumps(telemetry.series()).encode()

    def run(_req):
        status = coordinator.status()
        now = time.monotonic()
        processes = _processes(run_dir)
        processes += [{"role": "producer", "name": n, "pid": None, "alive": p["alive"], "returncode": None}
                      for n, p in status["producers"].items() if n not in {q["name"] for q in processes}]
        processes += [{"role": f"trainer dp{c['dp_rank']}", "name": n, "pid": None, "returncode": None,
                       "alive": now - c["last_seen"] < CONSUMER_SEEN_S} for n, c in status["consumers"].items()]
        body = {"history": coordinator.history_dicts(), "config_version": status["config_version"],
                "producers_alive": sum(p["alive"] for p in status["producers"].values()), "processes": processes,
                "samples": _sample_urls(telemetry)}
        return HTTPStatus.OK, "application/json", json.dumps(body).encode()

    def sample(req):
        parts = req["path"].split("/")  # /samples/<i>/<name>.png
        try:
            directory = Path(telemetry.samples[int(parts[2])])
        except (IndexError, ValueError):
            raise HttpError(HTTPStatus.NOT_FOUND, "no such sample") from None
        name = parts[3] if len(parts) == 4 else ""
        path = directory / name
        if not name.endswith(".png") or "/" in name or name.startswith(".") or not path.is_file():
            raise HttpError(HTTPStatus.NOT_FOUND, "no such sample")
        return HTTPStatus.OK, "image/png", path.read_bytes()

    server.route("GET", "/metrics", metrics)
    server.route("GET", "/dashboard", static("dashboard.html"))
    server.route("GET", "/", static("dashboard.html"))
    for name in ("dashboard.js", "uPlot.iife.min.js", "uPlot.min.css"):
        server.route("GET", f"/static/{name}", static(name))
    server.route("GET", "/api/series", series)
    server.route("GET", "/api/run", run)
    server.prefix_route("GET", "/samples/", sample)


def _processes(run_dir: Path) -> list[dict]:
    from mmdit.utils.processes import ProcessTable

    rows = ProcessTable(run_dir).read() if (run_dir / "processes.json").exists() else []
    return [{**r, "alive": r.get("returncode") is None and not r.get("gone") and _alive(r["pid"])} for r in rows]


def _alive(pid: int) -> bool:
    from mmdit.utils.processes import process_alive

    return process_alive(pid)


def _sample_urls(telemetry: Telemetry) -> list[str]:
    """The images of the newest samples directory a trainer reported."""
    if not telemetry.samples:
        return []
    i = len(telemetry.samples) - 1
    directory = Path(telemetry.samples[i])
    return [f"/samples/{i}/{p.name}" for p in sorted(directory.glob("*.png"))[:16]] if directory.is_dir() else []
