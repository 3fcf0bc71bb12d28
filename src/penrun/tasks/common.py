"""What every task needs from the config: validated trainer settings, data, networks, runs.

Only tasks read DictConfig; this module turns it into plain arguments for the library.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from penrun import distributed
from penrun.data import ImageData, load_dataset, subset
from penrun.engine import (
    OPTIMIZERS,
    SCHEDULES,
    Run,
    TrainerSettings,
    resolve_device,
    seed_everything,
    set_threads,
)
from penrun.errors import ConfigError
from penrun.models import build_classifier

# Keys that change neither the numbers nor the meaning of a run; ignored when a run folder
# is checked against the config that asks to reuse it.
RUNTIME_TRAINER_KEYS = ("progress", "device", "num_threads")
VOLATILE_KEYS = tuple(
    ["paths"]
    + [
        f"{node}.{key}"
        for node in ("trainer", "teacher_trainer", "evaluator_trainer")
        for key in RUNTIME_TRAINER_KEYS
    ]
)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def trainer_settings(cfg: DictConfig, key: str = "trainer") -> TrainerSettings:
    """Validated settings of a trainer node (`trainer`, or `teacher_trainer` for cached teachers)."""
    t = cfg[key]
    _require(
        isinstance(t.max_epochs, int) and t.max_epochs >= 1,
        f"{key}.max_epochs={t.max_epochs!r} is invalid: use an integer >= 1",
    )
    for name in ("batch_size", "eval_batch_size"):
        value = t[name]
        _require(
            isinstance(value, int) and value >= 1,
            f"{key}.{name}={value!r} is invalid: use an integer >= 1",
        )
    _require(
        isinstance(t.lr, int | float) and t.lr > 0,
        f"{key}.lr={t.lr!r} is invalid: use a number > 0",
    )
    _require(
        isinstance(t.weight_decay, int | float) and t.weight_decay >= 0,
        f"{key}.weight_decay={t.weight_decay!r} is invalid: use a number >= 0",
    )
    _require(
        t.optimizer in OPTIMIZERS,
        f"{key}.optimizer={t.optimizer!r} is invalid; valid: {list(OPTIMIZERS)}",
    )
    _require(
        t.schedule in SCHEDULES,
        f"{key}.schedule={t.schedule!r} is invalid; valid: {list(SCHEDULES)}",
    )
    threads = t.num_threads
    _require(
        threads is None or (isinstance(threads, int) and threads >= 1),
        f"{key}.num_threads={threads!r} is invalid: use null or an integer >= 1",
    )
    distributed.check_batch_size(t.batch_size, key)
    device = distributed.process_device(resolve_device(str(t.device)), str(t.device))
    return TrainerSettings(
        max_epochs=t.max_epochs,
        batch_size=t.batch_size,
        eval_batch_size=t.eval_batch_size,
        lr=float(t.lr),
        optimizer=t.optimizer,
        weight_decay=float(t.weight_decay),
        schedule=t.schedule,
        device=device,
        num_threads=threads,
        progress=bool(t.progress),
    )


def setup(cfg: DictConfig) -> TrainerSettings:
    """Validate the trainer, join torchrun's process group if there is one, then seed and set
    threads: the first thing every task does."""
    _require(
        isinstance(cfg.seed, int) and cfg.seed >= 0,
        f"seed={cfg.seed!r} is invalid: use an integer >= 0",
    )
    settings = trainer_settings(cfg)
    distributed.init(settings.device)
    set_threads(settings.num_threads)
    seed_everything(cfg.seed)
    return settings


def load_data(data_cfg: DictConfig, paths: DictConfig) -> ImageData:
    data = load_dataset(
        data_cfg.name,
        data_dir=paths.data_dir,
        cache_dir=paths.cache_dir,
        download=bool(data_cfg.download),
        path=data_cfg.get("path"),
        image_size=data_cfg.image_size,
        channels=data_cfg.channels,
    )
    if data_cfg.limit_train is not None or data_cfg.limit_test is not None:
        data = subset(data, data_cfg.limit_train, data_cfg.limit_test)
    return data


def classifier_spec(net_cfg: DictConfig, data: ImageData) -> dict[str, Any]:
    """The arguments of `build_classifier` for a network config on a dataset (saved in
    checkpoints so that a classifier can be rebuilt from its file alone)."""
    spec = dict(
        arch=net_cfg.arch,
        channels=data.channels,
        image_size=data.image_size,
        num_classes=data.num_classes,
        penultimate_dim=net_cfg.penultimate_dim,
        head=net_cfg.head,
        scale=net_cfg.scale,
        bias=net_cfg.bias,
        feature_relu=net_cfg.feature_relu,
        width=net_cfg.width,
    )
    build_classifier(**spec)  # fail on bad values now, before any training
    return spec


def run_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config that identifies a run (volatile keys removed)."""
    config = OmegaConf.to_container(cfg, resolve=True)
    for key in VOLATILE_KEYS:
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    return config


def run_dir() -> Path:
    """This job's folder: Hydra's run (or sweep) dir; the cwd when Hydra is not running."""
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(os.getcwd())


def open_run(cfg: DictConfig, directory: Path | None = None) -> Run:
    return Run(directory or run_dir(), run_config(cfg), progress=bool(cfg.trainer.progress))


def start_run(cfg: DictConfig) -> tuple[TrainerSettings, Run, dict[str, Any] | None]:
    """Validate, seed, open the run folder; the metrics of a finished run of this config
    come back too (the task then returns them instead of running again)."""
    settings = setup(cfg)
    run = open_run(cfg)
    run.claim()
    done = run.finished_metrics()
    if done is not None:
        run.close()
        print(f"{run.dir} is finished: reusing its results")
    return settings, run, done
