"""One job of the `penrun` command: run its task, return its objective, and say what went
wrong. Imported when a job starts (by app/cli.py), so that composing a config, --help and
tab completion never import torch."""

from __future__ import annotations

import errno
import shutil
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from penrun.app import sweeps
from penrun.app.config import close_folders, job_folder
from penrun.app.errors import ConfigError, fail
from penrun.app.tasks import get_task
from penrun.errors import InputError
from penrun.train import distributed
from penrun.train.loop import TrainingDiverged
from penrun.train.run_folder import FolderRefused

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


def run_job(cfg: DictConfig, sweep: bool) -> float | None:
    """One job, returning its objective. In a sweep a failure is recorded in the job's folder
    (failed.json) and the sweep goes on; a single run stops with the error, and so does a
    search (Optuna's) whose trial is refused as bad input: the next trials, drawn from the same
    space, would be refused alike, and a search of refused trials has nothing to choose from."""
    folder = job_folder()
    try:
        metrics = get_task(cfg.task.name)(cfg)
        # Only a sweeper reads the objective: a single run is not refused once its work is saved.
        value = objective(metrics, cfg.objective) if sweep else None
    except Exception as err:
        searching = sweep and sweeps.chooses_as_it_goes(HydraConfig.get())
        report_failure(err, folder, sweep and not (searching and isinstance(err, InputError)))
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


def discard_unstarted(folder: Path) -> None:
    """The folder of a single run refused before it computed anything: Hydra made it, and
    penrun may have written only its start files there."""
    if folder.is_dir() and {p.name for p in folder.iterdir()} <= {".hydra", ".lock", "penrun.log"}:
        shutil.rmtree(folder, ignore_errors=True)
