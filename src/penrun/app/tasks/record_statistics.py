"""task=record_statistics: write into a classifier checkpoint the per-class activation
statistics that the `vmf` options beyond the weights read (a linear head's radius,
`direction: class_mean`, `kappa: fitted | matched`), computed on the training split of `data`
less the `data.val_size` examples held out for validation, as train_teacher does.

penrun's train_teacher records them itself; this completes a checkpoint made without them (by
an older penrun, or converted from elsewhere into penrun's format):
    penrun task=record_statistics teacher_ckpt=PATH data=NAME
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from penrun.app.config import load_data, setup, validation_split
from penrun.app.errors import ConfigError
from penrun.app.schema import check_values
from penrun.app.teachers import check_fits_data
from penrun.train.checkpoint import load_classifier
from penrun.train.classifier import statistics_of
from penrun.train.files import save_torch

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, Any]:
    check_values(cfg)
    if cfg.teacher_ckpt is None:
        raise ConfigError(
            "task=record_statistics needs teacher_ckpt=PATH (the checkpoint to complete) and "
            "data=NAME (the data it was trained on)"
        )
    settings = setup(cfg)
    path = Path(cfg.teacher_ckpt)
    data, _ = validation_split(cfg, load_data(cfg))
    model, ckpt = load_classifier(path)
    check_fits_data(ckpt["classifier"], data, "teacher", path)
    stats = ckpt["activation_stats"] = statistics_of(model.to(settings.device), data, settings)
    save_torch(path, ckpt)  # atomic: the checkpoint is whole, with or without them
    log.info(
        f"recorded the activation statistics of {data.name}'s {len(data.y_train)} training images into {path}"
    )
    return {
        "task": "record_statistics",
        "checkpoint": str(path),
        "data": data.describe(),
        "fitted_kappa": stats["fitted_kappa"].tolist(),
    }
