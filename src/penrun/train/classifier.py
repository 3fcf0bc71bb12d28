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
from penrun.train.files import save_torch
from penrun.train.loop import (
    TrainerSettings,
    accuracy,
    device_batches,
    optimize_epoch,
    predict,
    stability,
    train_epochs,
    train_steps,
)
from penrun.train.optim import build_optimizer
from penrun.train.run_folder import RunFolder
from penrun.train.seeding import seed_everything


def train_classifier(
    folder: RunFolder, spec: dict[str, Any], data: ImageData, settings: TrainerSettings, seed: int
) -> dict[str, Any]:
    """Train (or resume), record the activation statistics, write the final metrics."""
    model, history = fit_classifier(folder, spec, data, settings, seed)
    record_statistics(folder, model, data, settings)
    accs = [row["test_acc"] for row in history]
    metrics = {
        "task": "train_teacher",
        "test_acc": accs[-1],
        "best_test_acc": max(accs),
        "best_epoch": accs.index(max(accs)) + 1,
        "stability": stability(accs),
        "num_params": sum(p.numel() for p in model.parameters()),
        "data": data.describe(),
        "checkpoint": str(folder.last_path),
        "history": history,
    }
    folder.write_metrics(metrics, status="complete")
    folder.close()
    return metrics


def fit_classifier(
    folder: RunFolder, spec: dict[str, Any], data: ImageData, settings: TrainerSettings, seed: int
) -> tuple[Classifier, list[dict[str, Any]]]:
    """Cross-entropy training with per-epoch test evaluation; resumes from last.pt."""
    device = settings.device
    seed_everything(seed)
    model = build_classifier(**spec).to(device)
    optimizer = build_optimizer(settings.optimizer, model.parameters(), settings.lr, settings.weight_decay)
    steps = train_steps(len(data.y_train), settings.batch_size)

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = model(x)
        return F.cross_entropy(logits, y), {"acc": (logits.argmax(1) == y).float().mean()}

    parallel_step = distributed.data_parallel(model, step)

    def train_epoch(epoch: int) -> dict[str, float]:
        model.train()
        batches = device_batches(
            data.x_train,
            data.y_train,
            settings.batch_size,
            device,
            shuffle=True,
            seed=seed,
            epoch=epoch,
        )
        return optimize_epoch(batches, steps, optimizer, parallel_step, settings, epoch)

    def evaluate(epoch: int) -> dict[str, float]:
        _, logits = predict(model, data.x_test, settings.eval_batch_size, device)
        return {"test_acc": accuracy(logits, data.y_test)}

    history = train_epochs(
        folder,
        modules={"model": model},
        optimizers={"optimizer": optimizer},
        max_epochs=settings.max_epochs,
        train_epoch=train_epoch,
        evaluate=evaluate,
        monitor="test_acc",
        extra={"classifier": spec, "data": {"name": data.name, "num_classes": data.num_classes}},
    )
    return model, history


def record_statistics(
    folder: RunFolder, model: Classifier, data: ImageData, settings: TrainerSettings
) -> None:
    """Store the training set's activation statistics in last.pt and best.pt, each for its
    own weights (the teacher a later task loads is last.pt: best.pt is chosen on test data).
    `model` holds the last weights; best.pt reuses their statistics when it is the same epoch."""
    stats = {}
    for path in (folder.last_path, folder.best_path):
        ckpt = load_checkpoint(path)
        if ckpt["epoch"] not in stats:
            model.load_state_dict(ckpt["modules"]["model"])
            h, _ = predict(model, data.x_train, settings.eval_batch_size, settings.device)
            stats[ckpt["epoch"]] = activation_statistics(h, data.y_train, data.num_classes)
        ckpt["activation_stats"] = stats[ckpt["epoch"]]
        save_torch(path, ckpt)
