"""task=train_teacher: train a classifier with cross-entropy and record what the sampler needs."""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig

from penrun.app.config import classifier_spec, load_data, start_task
from penrun.train.classifier import train_classifier

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, Any]:
    settings, folder, done = start_task(cfg)
    if done is not None:
        return done
    data = load_data(cfg)
    log.info(data.describe())
    spec = classifier_spec(cfg, "teacher", data)
    metrics = train_classifier(folder, spec, data, settings, seed=cfg.seed)
    log.info(
        f"teacher {cfg.teacher.arch}: test_acc {metrics['test_acc']:.4f} (best {metrics['best_test_acc']:.4f}) -> {folder.dir}"
    )
    return metrics
