"""task=record_statistics: the per-class activation statistics that the `vmf` options beyond
the weights read (a linear head's radius, `direction: class_mean`, `kappa: fitted | matched`),
computed on the training split of `data` less the `data.val_size` examples held out for
validation, as train_teacher does.

A penrun checkpoint made without them (by an older penrun) is completed in place:
    penrun task=record_statistics teacher_ckpt=PATH data=NAME
A torchvision or timm network's state_dict (or, without teacher_ckpt, the library's pretrained
weights) becomes a penrun checkpoint with them, whose `teacher_ckpt=` override is printed:
    penrun task=record_statistics net@teacher=torchvision teacher.arch=resnet18 teacher_ckpt=SD.pt data=NAME
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from penrun.app.config import load_data, setup, validation_split
from penrun.app.errors import ConfigError
from penrun.app.schema import check_values
from penrun.app.teachers import check_fits_data, is_penrun_checkpoint, library_checkpoint
from penrun.data import ImageData
from penrun.train.checkpoint import load_checkpoint, load_classifier
from penrun.train.classifier import statistics_of
from penrun.train.files import save_torch
from penrun.train.loop import TrainerSettings

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, Any]:
    check_values(cfg)
    library = cfg.teacher.source != "penrun"
    if cfg.teacher_ckpt is None and not (library and cfg.teacher.pretrained):
        raise ConfigError(
            "task=record_statistics needs teacher_ckpt=PATH (a penrun checkpoint to complete, or with "
            "net@teacher=torchvision|timm a state_dict of that network; or teacher.pretrained=true) "
            "and data=NAME (the data it was trained on)"
        )
    settings = setup(cfg)
    data = load_data(cfg)
    if library and (cfg.teacher_ckpt is None or not is_penrun_checkpoint(cfg.teacher_ckpt)):
        path = library_checkpoint(cfg, data, settings, net_key="teacher", ckpt_key="teacher_ckpt")
        print(f"teacher_ckpt={path.resolve()}")  # the override that gives every task this teacher
        stats = load_checkpoint(path)["activation_stats"]
    else:
        path = Path(cfg.teacher_ckpt)
        stats = complete(path, validation_split(cfg, data)[0], settings)
    return {
        "task": "record_statistics",
        "checkpoint": str(path),
        "data": data.describe(),
        "fitted_kappa": stats["fitted_kappa"].tolist(),
    }


def complete(path: Path, data: ImageData, settings: TrainerSettings) -> dict[str, torch.Tensor]:
    """Record the statistics into a penrun checkpoint, in place."""
    model, ckpt = load_classifier(path)
    check_fits_data(ckpt["classifier"], data, "teacher", path)
    stats = ckpt["activation_stats"] = statistics_of(model.to(settings.device), data, settings)
    save_torch(path, ckpt)  # atomic: the checkpoint is whole, with or without them
    log.info(
        f"recorded the activation statistics of {data.name}'s {len(data.y_train)} training images into {path}"
    )
    return stats
