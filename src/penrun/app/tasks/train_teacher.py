"""task=train_teacher: train a classifier with cross-entropy and record what the sampler needs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from penrun.app.config import classifier_spec, load_data, start_task, validation_split
from penrun.train.classifier import train_and_record

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, Any]:
    settings, folder, done = start_task(cfg)
    if done is not None:
        log.info(use_it(folder.last_path))
        return done
    data, validation = validation_split(cfg, load_data(cfg))
    log.info(f"{data.describe()}; {0 if validation is None else len(validation[1])} held out for validation")
    spec = classifier_spec(cfg, "teacher", data)
    metrics = train_and_record(folder, spec, data, settings, seed=cfg.seed, validation=validation)
    log.info(
        f"teacher {cfg.teacher.arch}: test_acc {metrics['test_acc']:.4f} (last epoch; best "
        f"{'validation' if validation else 'test'} epoch {metrics['selected_epoch']}) -> {folder.dir}"
    )
    log.info(use_it(folder.last_path))
    return metrics


def use_it(checkpoint: Path) -> str:
    """The override that hands this teacher to another task, ready to paste into a shell: run
    folder names hold `=` and `,`, which Hydra's parser reads only inside quotes."""
    return f"""use it: penrun "teacher_ckpt='{checkpoint}'" (a run folder works too)"""
