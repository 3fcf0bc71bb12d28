"""Sweeps that resume, on any Hydra launcher (basic, joblib, submitit).

Every job's folder is named after its overrides, so launching the same sweep again finds its
jobs: complete ones are reused, interrupted ones resume from last.pt, failed ones (failed.json)
run again. Before any job starts, `SweepCallback` checks that no folder holds a run of a
different config and prints the plan; when all jobs are back it writes sweep_status.json and
names the failures.
"""

from __future__ import annotations

import importlib.util
import itertools
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.types import Override
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict

from penrun.app.config import run_config
from penrun.app.errors import ConfigError, composition_error
from penrun.app.launch import failed_jobs, name_sweep_dir, parse_overrides, report_command
from penrun.app.schema import IDENTITY_DEFAULTS
from penrun.errors import InputError
from penrun.train import distributed
from penrun.train.checkpoint import load_checkpoint
from penrun.train.files import save_json
from penrun.train.run_folder import config_difference, read_json

FAILED_FILE = "failed.json"
STATUS_FILE = "sweep_status.json"


# ---------------------------------------------------------------- job states
def record_failure(folder: Path, err: BaseException) -> None:
    """failed.json in the job's folder: the error, its traceback, and how often it failed."""
    path = folder / FAILED_FILE
    attempts = (read_json(path) or {}).get("attempts", 0)
    save_json(
        path,
        {
            "error": f"{type(err).__name__}: {err}",
            "traceback": traceback.format_exception(err)[-20:],
            "attempts": attempts + 1,
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
    )


def clear_failure(folder: Path) -> None:
    if distributed.is_main():
        (folder / FAILED_FILE).unlink(missing_ok=True)


def job_state(folder: Path) -> tuple[str, str]:
    """(state, description) of a job folder; state: complete, failed, interrupted or new. An
    unreadable metrics.json counts as interrupted: the job rebuilds it from last.pt."""
    metrics_path = folder / "metrics.json"
    metrics = read_json(metrics_path) or {}
    if metrics.get("status") == "complete":
        return "complete", "complete"
    if (folder / FAILED_FILE).exists():
        failure = read_json(folder / FAILED_FILE) or {"error": "failed.json unreadable", "attempts": "?"}
        return "failed", f"failed: {failure.get('error')} (attempt {failure.get('attempts')})"
    if metrics_path.exists() and not metrics:
        return "interrupted", "metrics.json unreadable (rebuilt from last.pt when the job runs)"
    epochs = len(metrics.get("history", []))
    if epochs or (folder / "checkpoints" / "last.pt").exists():
        return "interrupted", f"interrupted after {epochs} epoch(s)"
    return "new", "no metrics.json (not started, or killed before its first epoch)"


def stored_config(folder: Path) -> dict[str, Any] | None:
    """The config a job folder's run was made with (metrics.json, else last.pt), if any."""
    metrics = read_json(folder / "metrics.json")
    if metrics is not None:
        return metrics.get("config")
    last = folder / "checkpoints" / "last.pt"
    if last.exists():
        return load_checkpoint(last).get("config")
    return None


# ---------------------------------------------------------------- the sweep's plan
@dataclass(frozen=True)
class PlannedJob:
    folder: Path
    overrides: list[str]
    config: dict[str, Any]  # penrun's run config (what a finished run records)


def sweep_combinations(overrides: list[Override]) -> list[list[str]]:
    """Every job's overrides, in the order Hydra's BasicSweeper launches them: the cartesian
    product of the sweep overrides' values. A key given twice (in an experiment's sweep, then on
    the command line) takes its last values, in the place of its first, as BasicSweeper does."""
    choices: dict[str, list[str]] = {}
    for override in overrides:
        key = override.get_key_element()
        values = (
            override.sweep_string_iterator()
            if override.is_sweep_override()
            else [override.get_value_element_as_str()]
        )
        choices[key] = [f"{key}={value}" for value in values]
    return [list(combination) for combination in itertools.product(*choices.values())]


def plan_jobs(config: DictConfig) -> list[PlannedJob]:
    """Every job of a basic-sweeper sweep, composed as the launcher will compose it."""
    loader = GlobalHydra.instance().config_loader()
    # As BasicSweeper does: the config's hydra.sweeper.params, then the command line.
    params = [f"{key}={value}" for key, value in (config.hydra.sweeper.get("params") or {}).items()]
    parsed = parse_overrides(params + list(config.hydra.overrides.task))
    jobs = []
    for overrides in sweep_combinations(parsed):
        job_cfg = loader.load_sweep_config(config, overrides)
        folder = Path(job_cfg.hydra.sweep.dir) / job_cfg.hydra.sweep.subdir
        with open_dict(job_cfg):
            del job_cfg["hydra"]
        jobs.append(PlannedJob(folder, overrides, run_config(job_cfg)))
    return jobs


def check_same_configs(jobs: list[PlannedJob]) -> None:
    """Refuse a sweep whose folders hold runs of other configs (e.g. an edited experiment
    file): resuming them would mix two experiments in one table."""
    clashes = []
    for job in jobs:
        old = stored_config(job.folder)
        diff = config_difference(old, job.config, IDENTITY_DEFAULTS) if old is not None else []
        if diff:
            clashes.append(f"{job.folder} ({'; '.join(diff[:3])})")
    if clashes:
        raise ConfigError(
            f"the sweep folder holds runs of a different config in {len(clashes)} of {len(jobs)} "
            f"job folder(s): {', '.join(clashes[:3])}. Set experiment_name or hydra.sweep.dir "
            "to a new folder, or add rerun=true to move the old runs aside and start afresh"
        )


def describe_plan(sweep_dir: str, jobs: list[PlannedJob]) -> str:
    counts: dict[str, int] = {}
    for job in jobs:
        state = job_state(job.folder)[0]
        counts[state] = counts.get(state, 0) + 1
    actions = {
        "complete": "complete (reused)",
        "interrupted": "interrupted (resume from last.pt)",
        "failed": "failed before (retried)",
        "new": "new",
    }
    parts = [f"{counts[s]} {text}" for s, text in actions.items() if counts.get(s)]
    return f"sweep {sweep_dir}: {len(jobs)} jobs: {', '.join(parts)}"


def chooses_as_it_goes(hydra: DictConfig) -> bool:
    """Whether a sweep's sweeper (the `hydra` node) draws each job from the results of the
    previous ones (Optuna), rather than launching a planned list (BasicSweeper)."""
    return not str(hydra.sweeper._target_).endswith("BasicSweeper")


def quiet_optuna() -> None:
    """Optuna's own log lines (a study created, a trial's result) go to the console with
    Hydra's, on stdout, instead of to stderr, which keeps to errors."""
    if importlib.util.find_spec("optuna") is None:
        return
    import optuna  # (~1 s) only for a search

    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()


class SweepCallback(Callback):
    """Registered in configs/hydra/penrun.yaml (callbacks); runs in the launching process."""

    def __init__(self) -> None:
        self.jobs: list[PlannedJob] = []

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Hydra turns a callback's exception into a warning: stop here, with exit status 2.
        try:
            name_sweep_dir(config)
            if chooses_as_it_goes(config.hydra):
                sweeper = str(config.hydra.sweeper._target_).rsplit(".", 1)[-1]
                print(f"sweep {config.hydra.sweep.dir}: jobs chosen as it goes by {sweeper}")
                quiet_optuna()
                return
            self.jobs = plan_jobs(config)
            if not config.get("rerun"):  # rerun=true: each job moves its old folder aside
                check_same_configs(self.jobs)
        except InputError as err:
            print(f"penrun: error: {err}", file=sys.stderr)
            sys.exit(2)
        except Exception as err:  # composing a job's config: a bad value in the sweep
            print(f"penrun: error: {composition_error(err)}", file=sys.stderr)
            sys.exit(2)
        if config.get("rerun"):
            held = sum(job.folder.is_dir() and any(job.folder.iterdir()) for job in self.jobs)
            print(
                f"sweep {config.hydra.sweep.dir}: {len(self.jobs)} jobs, all afresh "
                f"(rerun=true: {held} old folder(s) moved aside to <folder>.old-<time>)"
            )
        else:
            print(describe_plan(config.hydra.sweep.dir, self.jobs))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.jobs:  # another sweeper's jobs
            print(report_command(config.hydra.sweep.dir))
            return
        states = {job.folder: job_state(job.folder) for job in self.jobs}
        failed_jobs[:] = [folder for folder, (state, _) in states.items() if state != "complete"]
        save_json(
            Path(config.hydra.sweep.dir) / STATUS_FILE,
            {
                "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                "jobs": [
                    {"folder": str(job.folder), "overrides": job.overrides, "state": s, "description": d}
                    for job, (s, d) in zip(self.jobs, states.values(), strict=True)
                ],
            },
        )
        done = len(self.jobs) - len(failed_jobs)
        print(f"sweep {config.hydra.sweep.dir}: {done} of {len(self.jobs)} jobs complete")
        for folder in failed_jobs:
            print(f"  {folder}: {states[folder][1]}", file=sys.stderr)
        if failed_jobs:
            print("launch the same command again to retry them", file=sys.stderr)
        if done:
            print(report_command(config.hydra.sweep.dir))
