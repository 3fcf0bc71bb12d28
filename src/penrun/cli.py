"""The `penrun` entry point: Hydra composes the config, the task named by `task.name` runs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from penrun import distributed, sweeps
from penrun.errors import ConfigError


def config_dir() -> Path:
    """configs/ inside an installed wheel, else the source checkout's top-level configs/."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parents[1] / "configs"):
        if (candidate / "config.yaml").exists():
            return candidate
    raise FileNotFoundError(f"penrun's configs/ not found next to {here}: reinstall penrun")


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    """One job. In a sweep a failure is recorded in the job's folder (failed.json) and the
    sweep goes on; a single run stops with the error."""
    from penrun.tasks import get_task
    from penrun.tasks.common import run_dir

    folder = run_dir()
    try:
        get_task(cfg.task.name)(cfg)
    except Exception as err:
        sweeps.record_failure(folder, err)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            print(f"penrun: job {folder} failed: {type(err).__name__}: {err}", file=sys.stderr)
            return
        if isinstance(err, ConfigError):
            print(f"penrun: error: {err}", file=sys.stderr)
            sys.exit(2)
        raise
    else:
        sweeps.clear_failure(folder)
    finally:
        distributed.shutdown()


def main() -> None:
    try:
        sweeps.check_launcher_plugins(sys.argv[1:])
    except ConfigError as err:
        print(f"penrun: error: {err}", file=sys.stderr)
        sys.exit(2)
    if distributed.launched_rank() > 0:
        # Ranks other than 0 print nothing and leave Hydra's files to rank 0.
        sys.argv.append("hydra.output_subdir=null")
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
    _hydra_main()
    if sweeps.failed_jobs:
        sys.exit(1)


if __name__ == "__main__":
    main()
