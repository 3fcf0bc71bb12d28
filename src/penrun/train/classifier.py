"""Training a classifier with cross-entropy, and recording what the sampler needs from it."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from penrun.core.statistics import activation_statistics
from penrun.data import ImageData
from penrun.models import Classifier, build_classifier
from penrun.train import distributed
from penrun.train.checkpoint import load_checkpoint
from penrun.train.evaluation import accuracy, predict, test_accuracy
from penrun.train.files import save_torch
from penrun.train.loop import (
    TrainerSettings,
    device_batches,
    network_input,
    on_device,
    optimize_epoch,
    stability,
    train_epochs,
    train_steps,
)
from penrun.train.optim import build_optimizer
from penrun.train.run_folder import RunFolder
from penrun.train.seeding import seed_everything

Validation = tuple[torch.Tensor, torch.Tensor]  # (x_val, y_val) held out of the training split


def monitored(validation: Validation | None) -> str:
    """The per-epoch score that chooses best.pt: validation accuracy, or test accuracy without a
    validation set."""
    return "val_acc" if validation is not None else "test_acc"


def train_and_record(
    folder: RunFolder,
    spec: dict[str, Any],
    data: ImageData,
    settings: TrainerSettings,
    seed: int,
    validation: Validation | None = None,
) -> dict[str, Any]:
    """Train (or resume), record the activation statistics, write the final metrics. With a
    validation set the epochs are scored on it (best.pt, selected_epoch) and the test split is
    evaluated once, at the end; without one, every epoch on the test split."""
    model, history = train_cross_entropy(folder, spec, data, settings, seed, validation)
    test_acc = test_accuracy(model, data, settings)  # last weights
    record_statistics(folder, model, data, settings)  # leaves best.pt's weights in `model`
    monitor = monitored(validation)
    curve = [row[monitor] for row in history]
    metrics = {
        "task": "train_teacher",
        "test_acc": test_acc,
        f"best_{monitor}": max(curve),
        "selected_epoch": curve.index(max(curve)) + 1,
        "stability": stability(curve),
        "val_size": 0 if validation is None else len(validation[1]),
        "num_params": sum(p.numel() for p in model.parameters()),
        "data": data.describe(),
        "checkpoint": str(folder.last_path),
        "history": history,
    }
    folder.write_metrics(metrics, status="complete")
    folder.close()
    return metrics


def train_cross_entropy(
    folder: RunFolder,
    spec: dict[str, Any],
    data: ImageData,
    settings: TrainerSettings,
    seed: int,
    validation: Validation | None = None,
) -> tuple[Classifier, list[dict[str, Any]]]:
    """Cross-entropy training with per-epoch evaluation on the validation set (the test split
    without one); resumes from last.pt."""
    device = settings.device
    seed_everything(seed)
    model = on_device(build_classifier(**spec), settings)
    optimizer = build_optimizer(settings.optimizer, model.parameters(), settings.lr, settings.weight_decay)
    steps = train_steps(len(data.y_train), settings.batch_size)
    images = network_input(data.x_train, device)

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = model(x)
        return F.cross_entropy(logits, y), {"acc": (logits.argmax(1) == y).float().mean()}

    parallel_step = distributed.data_parallel(model, step)

    def train_epoch(epoch: int) -> dict[str, float]:
        model.train()
        batches = device_batches(
            images, data.y_train, settings.batch_size, device, shuffle=True, seed=seed, epoch=epoch
        )
        return optimize_epoch(batches, steps, optimizer, parallel_step, settings, epoch)

    monitor = monitored(validation)
    x_eval, y_eval = validation if validation is not None else (data.x_test, data.y_test)
    eval_images = network_input(x_eval, device)

    def evaluate(epoch: int) -> dict[str, float]:
        _, logits = predict(model, eval_images, settings.eval_batch_size, device)
        return {monitor: accuracy(logits, y_eval)}

    history = train_epochs(
        folder,
        modules={"model": model},
        optimizers={"optimizer": optimizer},
        max_epochs=settings.max_epochs,
        train_epoch=train_epoch,
        evaluate=evaluate,
        monitor=monitor,
        extra={"classifier": spec, "data": {"name": data.name, "num_classes": data.num_classes}},
    )
    return model, history


def statistics_of(model: Classifier, data: ImageData, settings: TrainerSettings) -> dict[str, torch.Tensor]:
    """The per-class activation statistics of a classifier on the training split of `data`."""
    h, _ = predict(model, data.x_train, settings.eval_batch_size, settings.device)
    return activation_statistics(h, data.y_train, data.num_classes)


def record_statistics(
    folder: RunFolder, model: Classifier, data: ImageData, settings: TrainerSettings
) -> None:
    """Store the training set's activation statistics in last.pt and best.pt, each for its
    own weights (the teacher a later task loads is last.pt).
    `model` holds the last weights; best.pt reuses their statistics when it is the same epoch."""
    stats = {}
    for path in (folder.last_path, folder.best_path):
        ckpt = load_checkpoint(path)
        if ckpt["epoch"] not in stats:
            model.load_state_dict(ckpt["modules"]["model"])
            stats[ckpt["epoch"]] = statistics_of(model, data, settings)
        ckpt["activation_stats"] = stats[ckpt["epoch"]]
        save_torch(path, ckpt)
