"""Tasks: one module each with `run(cfg) -> metrics`. Imported lazily, by name, so that
`penrun` starts without loading every task's dependencies."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from penrun.errors import ConfigError

TASKS: dict[str, str] = {
    "train_teacher": "penrun.tasks.train_teacher",
    "fit": "penrun.tasks.fit",
    "distill": "penrun.tasks.distill",
    "report": "penrun.tasks.report",
    "vae": "penrun.tasks.vae",
    "gan": "penrun.tasks.gan",
}


def get_task(name: str) -> Callable[[Any], dict[str, Any]]:
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; valid: {sorted(TASKS)}")
    return importlib.import_module(TASKS[name]).run
