"""The `penrun` entry point: Hydra composes the config, the task named by `task.name` runs."""

from __future__ import annotations

import errno
import os
import shutil
import sys
from pathlib import Path
from typing import Any, NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from penrun.app import (
    schema,  # noqa: F401 (registers the config schema before Hydra composes)
    sweeps,
)
from penrun.app.config import close_folders, job_folder
from penrun.app.errors import ConfigError, composition_error
from penrun.app.tasks import get_task
from penrun.errors import InputError
from penrun.train import distributed
from penrun.train.loop import Interrupted, TrainingDiverged
from penrun.train.run_folder import FolderRefused


def config_dir() -> Path:
    """configs/ inside an installed wheel, else the source checkout's top-level configs/."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "configs", here.parents[2] / "configs"):
        if (candidate / "config.yaml").exists():
            return candidate
    raise FileNotFoundError(f"penrun's configs/ not found next to {here}: reinstall penrun")


# Jobs this process has started: an exception before the first comes from composing the config.
jobs_started: list[str] = []


# The number a sweeper that optimizes (hydra/sweeper=optuna) maximizes for each job: the
# run's validation score, never a test score (generation has no held-out data: its cond_acc
# scores generated images alone).
OBJECTIVES = ("best_val_acc", "best_val_agreement", "cond_acc")


def objective(metrics: dict[str, Any], key: str | None = None) -> float | None:
    """A job's return value: the metric `key` names (config `objective`), else its first
    OBJECTIVES metric; None for a task without one."""
    if key is None:
        return next((float(metrics[k]) for k in OBJECTIVES if k in metrics), None)
    if not isinstance(metrics.get(key), int | float):
        numbers = sorted(
            k for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)
        )
        raise ConfigError(f"objective={key!r} is not a number in this task's metrics; valid: {numbers}")
    return float(metrics[key])


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    """One job, returning its objective. In a sweep a failure is recorded in the job's folder
    (failed.json) and the sweep goes on; a single run stops with the error."""
    jobs_started.append(cfg.task.name)
    folder = job_folder()
    sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        value = objective(get_task(cfg.task.name)(cfg), cfg.objective)
    except Exception as err:
        report_failure(err, folder, sweep)
        return None
    else:
        sweeps.clear_failure(folder)
        return value
    finally:
        close_folders()
        distributed.shutdown()


def report_failure(err: Exception, folder: Path, sweep: bool) -> None:
    """A sweep records why a job failed (failed.json) and goes on; a single run says it in
    one line and stops, unless the error is a bug (then its traceback). A folder that holds
    another run is never written to; a refused single run leaves no folder of its own."""
    if sweep:
        if not isinstance(err, FolderRefused):
            sweeps.record_failure(folder, err)
        print(f"penrun: job {folder} failed: {type(err).__name__}: {err}", file=sys.stderr)
        return
    if isinstance(err, InputError):
        close_folders()
        if not isinstance(err, FolderRefused):
            discard_unstarted(folder)
        fail(str(err))
    sweeps.record_failure(folder, err)
    if isinstance(err, TrainingDiverged):
        fail(str(err), status=1)
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        fail(
            f"no space left on device writing {err.filename or folder}: free space, then run the "
            "same command again to resume (the files already written are intact)",
            status=1,
        )
    raise err


def main() -> None:
    jobs_started.clear()
    sweeps.failed_jobs.clear()
    try:
        sweeps.check_launcher_plugins(sys.argv[1:])
    except InputError as err:
        fail(str(err))
    if distributed.launched_rank() > 0:
        # Ranks other than 0 print nothing and leave Hydra's files to rank 0.
        sys.argv.append("hydra/job_logging=disabled")
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
    # Hydra's composition errors (an unknown key, a value of the wrong type) reach us as
    # exceptions, to be told in one line, instead of Hydra's report with exit status 1.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _hydra_main()
    except KeyboardInterrupt as stop:  # Ctrl-C: the finished epochs are in last.pt
        where = f" {stop}" if isinstance(stop, Interrupted) else ""
        fail(f"interrupted{where}; run the same command to resume", status=130)
    except Exception as err:
        if jobs_started:  # an error of penrun's own, after composition: a bug to report
            raise
        fail(composition_error(err))
    if sweeps.failed_jobs:
        sys.exit(1)


def fail(message: str, status: int = 2) -> NoReturn:
    print(f"penrun: error: {message}", file=sys.stderr)
    sys.exit(status)


def discard_unstarted(folder: Path) -> None:
    """The folder of a single run refused before it computed anything: Hydra made it, and
    penrun may have written only its start files there."""
    if folder.is_dir() and {p.name for p in folder.iterdir()} <= {".hydra", ".lock", "penrun.log"}:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
