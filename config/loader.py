"""Loading the job config: Hydra composes conf/ with command-line overrides over `JobConfig`.

Overrides are Hydra's `key=value`; a key that moved (config/train.py `MOVED_KEYS`) is renamed
with one warning, so command lines that worked before keep working.
"""

import logging
import re
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mmdit.config import ConfigError
from mmdit.config.data import preset_changes
from mmdit.config.job import JobConfig, check_job
from mmdit.config.train import MOVED_KEYS

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

log = logging.getLogger("mmdit.config")

_OVERRIDE_KEY = re.compile(r"^(?P<prefix>[+~]{0,2})(?P<key>[\w.]+)(?P<rest>=.*|$)", re.S)


def upgrade_overrides(overrides: list[str]) -> list[str]:
    """Overrides with moved keys renamed (`train.lr=1e-4` -> `optimizer.lr=1e-4`), one warning each."""
    out = []
    for override in overrides:
        m = _OVERRIDE_KEY.match(override)
        key = m and next((old for old in MOVED_KEYS if m["key"] == old or m["key"].startswith(old + ".")), None)
        if key:
            new = MOVED_KEYS[key] + m["key"][len(key):]
            log.warning("%s is now %s (the old key still works)", m["key"], new)
            override = f"{m['prefix']}{new}{m['rest']}"
        out.append(override)
    return out


def compose_config(overrides: list[str] = (), config_name: str = "config"):
    """Compose conf/ + overrides into a DictConfig (types checked, values not yet)."""
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            return compose(config_name=config_name, overrides=upgrade_overrides(list(overrides)))
    except Exception as e:  # hydra/omegaconf raise many types; surface one with the reason
        raise ConfigError(f"invalid config: {_reason(e)}") from e


def to_job_config(cfg) -> JobConfig:
    """Resolve interpolations and build the dataclasses, running their value checks, then the
    checks that span groups."""
    try:
        job = OmegaConf.to_object(cfg)
        check_job(job)
    except Exception as e:
        raise ConfigError(f"invalid config: {_reason(e)}") from e
    job.data.curriculum = [expand_preset(entry) for entry in job.data.curriculum]
    return job


def load_config(overrides: list[str] = (), config_name: str = "config") -> JobConfig:
    return to_job_config(compose_config(overrides, config_name))


def config_yaml(cfg: JobConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def data_presets() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "data").glob("*.yaml"))


def load_data_preset(name: str):
    """conf/data/<name>.yaml composed over the DataConfig defaults."""
    if name not in data_presets():
        raise ConfigError(f"invalid config: no data preset {name!r} (conf/data has {', '.join(data_presets())})")
    return to_job_config(compose_config([f"data={name}"])).data


def expand_preset(entry: dict) -> dict:
    """A curriculum entry {step: N, preset: stage5} -> {step: N, <every field stage5 sets>}."""
    if "preset" not in entry:
        return entry
    rest = {k: v for k, v in entry.items() if k not in ("step", "preset")}
    return {"step": entry["step"], **preset_changes(load_data_preset(str(entry["preset"]))), **rest}


def _reason(e: BaseException) -> str:
    """One line: the first line of each message along the exception's cause chain."""
    parts: list[str] = []
    while e is not None and len(parts) < 4:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if first not in parts and "$VALUE" not in first:
            parts.append(first.rstrip("."))
        e = e.__cause__ or e.__context__
    return ": ".join(parts)
