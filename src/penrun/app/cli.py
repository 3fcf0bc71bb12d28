"""The `penrun` entry point: Hydra composes the config, the task named by `task.name` runs.

This module and what it imports stay free of torch: composing a config, --help and tab
completion answer at once; a job's code (app/job.py) is imported when a job starts."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from penrun.app import (
    launch,
    schema,  # noqa: F401 (registers the config schema before Hydra composes)
)
from penrun.app.errors import composition_error, fail
from penrun.errors import InputError


def config_dir() -> Path:
    """configs/ inside an installed wheel, else the source checkout's top-level configs/."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "configs", here.parents[2] / "configs"):
        if (candidate / "config.yaml").exists():
            return candidate
    raise FileNotFoundError(f"penrun's configs/ not found next to {here}: reinstall penrun")


# Jobs this process has started: an exception before the first comes from composing the config.
jobs_started: list[str] = []


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    jobs_started.append(cfg.task.name)
    # Imported here, once a job starts: torch and the tasks' code load after composition.
    from penrun.app.job import run_job

    return run_job(cfg, sweep=HydraConfig.get().mode == RunMode.MULTIRUN)


def main() -> None:
    jobs_started.clear()
    launch.failed_jobs.clear()
    try:
        launch.check_launcher_plugins(sys.argv[1:])
    except InputError as err:
        fail(str(err))
    if launch.torchrun_rank() > 0:
        # Ranks other than 0 print nothing and leave Hydra's files to rank 0.
        sys.argv.append("hydra/job_logging=disabled")
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
    # Hydra's composition errors (an unknown key, a value of the wrong type) reach us as
    # exceptions, to be told in one line, instead of Hydra's report with exit status 1.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _hydra_main()
    except KeyboardInterrupt as stop:  # Ctrl-C: the finished epochs are in last.pt
        where = f" {stop}" if str(stop) else ""  # train.loop.Interrupted names the epoch
        fail(f"interrupted{where}; run the same command to resume", status=130)
    except Exception as err:
        if jobs_started:  # an error of penrun's own, after composition: a bug to report
            raise
        fail(composition_error(err))
    if launch.failed_jobs:
        sys.exit(1)


if __name__ == "__main__":
    main()
