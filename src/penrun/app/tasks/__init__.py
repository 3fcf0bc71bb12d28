"""Tasks: one module each with `run(cfg) -> metrics`. Imported lazily, by name, so that
`penrun` starts without loading every task's dependencies."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from penrun.app.errors import ConfigError

TASKS: dict[str, str] = {
    "train_teacher": "penrun.app.tasks.train_teacher",
    "fit": "penrun.app.tasks.fit",
    "distill": "penrun.app.tasks.distill",
    "report": "penrun.app.tasks.report",
    "vae": "penrun.app.tasks.vae",
    "gan": "penrun.app.tasks.gan",
    "record_statistics": "penrun.app.tasks.record_statistics",
}


def get_task(name: str) -> Callable[[Any], dict[str, Any]]:
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; valid: {sorted(TASKS)}")
    return importlib.import_module(TASKS[name]).run
