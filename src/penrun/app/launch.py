"""What the launching process needs before any job runs, without importing torch: folder
names (run_key, the resolvers configs/hydra/penrun.yaml uses; a sweep's own folder), the Hydra
plugins a command asks for, and the rank torchrun gave this process."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from pathlib import Path

from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from penrun.app.errors import ConfigError
from penrun.app.schema import RUNTIME_KEYS

# Hydra plugins penrun's configs use: (module, pip package, penrun extra that installs it).
PLUGINS = {
    "joblib": ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher", None),
    "submitit_local": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher", "cluster"),
    "submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher", "cluster"),
    "optuna": ("hydra_plugins.hydra_optuna_sweeper", "hydra-optuna-sweeper", "search"),
}
# penrun's own launcher presets (configs/launcher/) and the plugin each one needs.
LAUNCHER_PRESETS = {"joblib": "joblib", "local": "submitit_local", "slurm": "submitit_slurm"}

# Jobs that failed in the last sweep of this process (the exit status of `penrun -m`).
failed_jobs: list[Path] = []


def run_key(override_dirname: str) -> str:
    """A run folder name from Hydra's override string: readable, safe, deterministic."""
    key = re.sub(r"[^A-Za-z0-9_.,=+-]", "_", override_dirname) or "default"
    if len(key) > 120:
        key = f"{key[:100]}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    return key


def unnamed_keys() -> list[str]:
    """Overrides left out of run folder names: the task (it has its own folder level), the
    launcher (any launcher resumes another's sweep) and the runtime keys of the schema."""
    return ["task", "launcher", *RUNTIME_KEYS]


OmegaConf.register_new_resolver("run_key", run_key, replace=True)
OmegaConf.register_new_resolver("penrun_unnamed_keys", unnamed_keys, replace=True)


# ---------------------------------------------------------------- launcher plugins
def check_launcher_plugins(argv: list[str]) -> None:
    """A launcher or sweeper asked for on the command line (hparams_search=NAME: Optuna's)
    must be installed; name its pip package."""
    for arg in argv:
        key, _, value = arg.lstrip("+~").partition("=")
        plugin = {
            "hydra/launcher": value,
            "launcher": LAUNCHER_PRESETS.get(value),
            "hydra/sweeper": value,
            "hparams_search": "optuna",
        }.get(key)
        if plugin not in PLUGINS:
            continue
        module, package, extra = PLUGINS[plugin]
        if importlib.util.find_spec(module) is None:
            kind = "sweeper" if plugin == "optuna" else "launcher"
            how = (
                f"pip install 'penrun[{extra}]' (or pip install {package})"
                if extra
                else f"pip install {package}"
            )
            raise ConfigError(
                f"{arg} needs the Hydra {kind} plugin {package!r}, which is not installed: {how}"
            )


# ---------------------------------------------------------------- the sweep's folder
def parse_overrides(lines: list[str]) -> list[Override]:
    loader = GlobalHydra.instance().config_loader()
    return OverridesParser.create(config_loader=loader).parse_overrides(lines)


def own_sweep_dir(config: DictConfig) -> str | None:
    """The folder of a sweep that names none (no experiment, experiment_name or
    hydra.sweep.dir): <output_dir>/multirun/<task>/<its overrides>, so that two different
    sweeps of one task stay apart and the same command finds its folder again. None for a
    sweep that names its folder."""
    if config.hydra.runtime.choices.get("experiment") is not None or any(
        line.startswith("hydra.sweep.dir=") for line in config.hydra.overrides.hydra
    ):
        return None
    overrides = parse_overrides(list(config.hydra.overrides.task))
    keys = {o.key_or_group for o in overrides}
    if "experiment_name" in keys:
        return None
    task = next((o for o in overrides if o.key_or_group == "task"), None)
    tasks = run_key(task.input_line.partition("=")[2]) if task else config.task.name
    # As Hydra names a job (override_dirname): the overrides as typed, sorted.
    named = ",".join(sorted(o.input_line for o in overrides if o.key_or_group not in unnamed_keys()))
    root = Path(config.paths.output_dir) / "multirun" / tasks
    return str(root / run_key(named) if named else root)


def name_sweep_dir(config: DictConfig) -> None:
    """Point the sweep (its launcher, and each job, composed afresh from the master config's
    Hydra overrides) at own_sweep_dir."""
    folder = own_sweep_dir(config)
    if folder is None:
        return
    quoted = folder.replace("'", "\\'")  # Hydra's quoted value: only its quotes are escaped
    with read_write(config.hydra), open_dict(config.hydra):
        config.hydra.sweep.dir = folder
        config.hydra.overrides.hydra.append(f"hydra.sweep.dir='{quoted}'")


def report_command(sweep_dir: str) -> str:
    """The report of a sweep, as a line to paste (sweep folder names hold `=` and `,`)."""
    return f"report: penrun task=report \"sweep_dir='{sweep_dir}'\""


def torchrun_rank() -> int:
    """This process's rank as torchrun set it (0 without torchrun), before the group exists."""
    return int(os.environ.get("RANK", "0"))
