"""The `penrun` entry point: Hydra composes the config, the task named by `task.name` runs."""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from penrun.errors import ConfigError


def config_dir() -> Path:
    """configs/ inside an installed wheel, else the source checkout's top-level configs/."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parents[1] / "configs"):
        if (candidate / "config.yaml").exists():
            return candidate
    raise FileNotFoundError(f"penrun's configs/ not found next to {here}: reinstall penrun")


def run_key(override_dirname: str) -> str:
    """A run folder name from Hydra's override string: readable, safe, deterministic."""
    key = re.sub(r"[^A-Za-z0-9_.,=+-]", "_", override_dirname) or "default"
    if len(key) > 120:
        key = f"{key[:100]}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    return key


OmegaConf.register_new_resolver("run_key", run_key, replace=True)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    from penrun.tasks import get_task

    try:
        get_task(cfg.task.name)(cfg)
    except ConfigError as err:
        print(f"penrun: error: {err}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
