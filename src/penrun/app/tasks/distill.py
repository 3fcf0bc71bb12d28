"""task=distill: knowledge distillation under domain shift (docs/method.md#5-distillation).

The teacher knows the source domain (`data`); the student learns from a transfer set
(`transfer`: another dataset or a shifted copy of the source) with a weighted sum of the loss
terms in `penrun.distill`, and is evaluated every epoch on both test sets.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from omegaconf import DictConfig

from penrun.app.config import classifier_spec, load_data, start_task
from penrun.app.errors import ConfigError, config_keys
from penrun.app.teachers import obtain_classifier, penultimate_model
from penrun.core.losses import (
    LOSSES,
    SAME_DIM_LOSSES,
    DistillBatch,
    DistillSetup,
    class_similarity,
    entropy,
    matched_smoothing,
    synthetic_soft_targets,
    total_loss,
)
from penrun.core.penultimate import PenultimateModel
from penrun.data import ImageData, align_classes, convert_images, labelled_subset, shift_images
from penrun.models import Classifier, build_classifier
from penrun.train import distributed
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
from penrun.train.seeding import seed_everything

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, Any]:
    settings, folder, done = start_task(cfg, check=check_options)
    if done is not None:
        log.info(summary(done))
        return done
    options = cfg.distill
    weights = loss_weights(options)
    labels = labels_option(options.labels)
    source = load_data(cfg)
    transfer = transfer_data(cfg, source)
    student_spec = classifier_spec(cfg, "student", source)
    x_train, y_train = transfer_training_set(transfer, labels, cfg.seed)
    if cfg.teacher_ckpt is None:  # the teacher is trained here: check before training it
        check_student(weights, student_spec, cfg.teacher.penultimate_dim)
    teacher, ckpt, teacher_path = obtain_classifier(cfg, source)
    check_student(weights, student_spec, teacher.penultimate_dim)
    seed_everything(cfg.seed)
    teacher.to(settings.device)
    model = penultimate_model(teacher, ckpt, teacher_path, cfg.vmf)
    generator = torch.Generator(settings.device).manual_seed(cfg.seed)
    shared = DistillSetup(
        teacher=teacher,
        model=model,
        tau=float(options.tau),
        similarity=class_similarity(teacher.head.effective_weight().detach()),
        dirichlet_beta=float(options.dirichlet_beta),
        smooth_epsilon=smoothing_for(model, teacher, float(options.tau), generator)
        if weights["smooth"] > 0
        else 0.0,
        synthetic_batch=settings.batch_size // distributed.world_size(),
        generator=generator,
    )
    if distributed.rank():  # each rank draws its own synthetic activations; rank 0 as one process
        generator.manual_seed(cfg.seed + 1_000_003 * distributed.rank())
    teacher_accs = {
        "teacher_source_acc": accuracy(
            predict(teacher, source.x_test, settings.eval_batch_size, settings.device)[1],
            source.y_test,
        ),
        "teacher_transfer_acc": accuracy(
            predict(teacher, transfer.x_test, settings.eval_batch_size, settings.device)[1],
            transfer.y_test,
        ),
    }
    log.info(
        f"teacher {teacher_path}: source {teacher_accs['teacher_source_acc']:.4f}, transfer {teacher_accs['teacher_transfer_acc']:.4f}"
    )
    history = train_student(
        folder,
        student_spec,
        shared,
        weights,
        (x_train, y_train if labels is not None else None),
        source,
        transfer,
        settings,
        cfg.seed,
    )
    metrics = final_metrics(
        history, teacher_accs, weights, options, source, transfer, len(y_train), teacher_path
    )
    folder.write_metrics(metrics, status="complete")
    folder.close()
    log.info(summary(metrics))
    return metrics


# ---------------------------------------------------------------- checks before training
def check_options(cfg: DictConfig) -> None:
    """What the schema cannot say of the distill options, before the run folder is opened."""
    weights = loss_weights(cfg.distill)
    if labels_option(cfg.distill.labels) is None and weights["ce"] > 0:
        raise ConfigError(
            "distill.losses.ce > 0 needs labels, but distill.labels=none; set distill.labels=all or N, or ce=0"
        )


def loss_weights(options: DictConfig) -> dict[str, float]:
    """Every term's weight (the schema checked each one)."""
    weights = {name: float(options.losses[name]) for name in LOSSES}
    if not any(w > 0 for w in weights.values()):
        raise ConfigError(
            f"all loss weights are zero: set at least one of distill.losses.{{{', '.join(LOSSES)}}} > 0"
        )
    return weights


def labels_option(value: Any) -> int | str | None:
    """`none` -> None (unlabeled), `all`, or a positive number of labels per class."""
    if value in (None, "none"):
        return None
    if value == "all" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise ConfigError(
        f"distill.labels={value!r} is invalid: use none, all, or a number of labels per class >= 1"
    )


def check_student(weights: dict[str, float], student_spec: dict[str, Any], teacher_dim: int) -> None:
    for name in SAME_DIM_LOSSES:
        if weights[name] > 0 and student_spec["penultimate_dim"] != teacher_dim:
            raise ConfigError(
                f"distill.losses.{name} needs the student's penultimate space to match the teacher's: "
                f"student penultimate_dim={student_spec['penultimate_dim']}, teacher penultimate_dim="
                f"{teacher_dim}; set student.penultimate_dim={teacher_dim}"
            )


def transfer_data(cfg: DictConfig, source: ImageData) -> ImageData:
    """The transfer set at the source's size and channels (what the teacher takes), shifted
    if asked; its labels must be among the teacher's classes."""
    transfer = align_classes(load_data(cfg, "transfer"), source.name)
    transfer = convert_images(transfer, source.image_size, source.channels)
    if cfg.transfer.shift != "none":
        with config_keys(shift="transfer.shift", strength="transfer.shift_strength"):
            transfer = shift_images(transfer, cfg.transfer.shift, cfg.transfer.shift_strength, seed=cfg.seed)
    top = int(max(transfer.y_train.max(), transfer.y_test.max()))
    if top >= source.num_classes:
        raise ConfigError(
            f"transfer set {transfer.name} has label {top}, outside the teacher's {source.num_classes} "
            f"classes (0..{source.num_classes - 1}) of {source.name}"
        )
    return transfer


def transfer_training_set(
    transfer: ImageData, labels: int | str | None, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(labels, int):
        with config_keys(per_class="distill.labels"):
            idx = labelled_subset(transfer.y_train, labels, transfer.num_classes, seed)
        return transfer.x_train[idx], transfer.y_train[idx]
    return transfer.x_train, transfer.y_train


def smoothing_for(
    model: PenultimateModel, teacher: Classifier, tau: float, generator: torch.Generator
) -> float:
    """Label smoothing whose targets have the mean entropy of the synthetic soft targets."""
    y = torch.arange(model.num_classes, device=generator.device).repeat(200)
    _, targets = synthetic_soft_targets(model, teacher, y, tau, generator)
    return matched_smoothing(entropy(targets).mean().item(), model.num_classes)


# ---------------------------------------------------------------- training
def train_student(
    run,
    student_spec: dict[str, Any],
    shared: DistillSetup,
    weights: dict[str, float],
    train_set: tuple[torch.Tensor, torch.Tensor | None],
    source: ImageData,
    transfer: ImageData,
    settings: TrainerSettings,
    seed: int,
) -> list[dict[str, Any]]:
    x_train, y_train = train_set
    device = settings.device
    student = build_classifier(**student_spec).to(device)
    optimizer = build_optimizer(settings.optimizer, student.parameters(), settings.lr, settings.weight_decay)
    labels = y_train if y_train is not None else torch.zeros(len(x_train), dtype=torch.long)
    steps = train_steps(len(x_train), settings.batch_size)

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return total_loss(DistillBatch(shared, student, x, y if y_train is not None else None), weights)

    # Terms such as synthetic_head leave the student's body without gradient.
    parallel_step = distributed.data_parallel(student, step, some_unused=True)

    def train_epoch(epoch: int) -> dict[str, float]:
        student.train()
        batches = device_batches(
            x_train, labels, settings.batch_size, device, shuffle=True, seed=seed, epoch=epoch
        )
        return optimize_epoch(batches, steps, optimizer, parallel_step, settings, epoch)

    def evaluate(epoch: int) -> dict[str, float]:
        return {
            "source_acc": accuracy(
                predict(student, source.x_test, settings.eval_batch_size, device)[1], source.y_test
            ),
            "transfer_acc": accuracy(
                predict(student, transfer.x_test, settings.eval_batch_size, device)[1],
                transfer.y_test,
            ),
        }

    monitor = "source_acc" if y_train is None else "transfer_acc"
    return train_epochs(
        run,
        modules={"model": student},
        optimizers={"optimizer": optimizer},
        max_epochs=settings.max_epochs,
        train_epoch=train_epoch,
        evaluate=evaluate,
        monitor=monitor,
        generators={"synthetic": shared.generator},
        extra={"classifier": student_spec},
    )


def final_metrics(
    history, teacher_accs, weights, options, source, transfer, n_train, teacher_path
) -> dict[str, Any]:
    source_accs = [row["source_acc"] for row in history]
    transfer_accs = [row["transfer_acc"] for row in history]
    return {
        "task": "distill",
        "source": source.name,
        "transfer": transfer.name,
        "method": "+".join(k for k, v in weights.items() if v > 0),
        "labels": options.labels,
        "transfer_train_size": n_train,
        "losses": {k: v for k, v in weights.items() if v > 0},
        "source_acc": source_accs[-1],
        "transfer_acc": transfer_accs[-1],
        "best_source_acc": max(source_accs),
        "best_transfer_acc": max(transfer_accs),
        "stability": {"source": stability(source_accs), "transfer": stability(transfer_accs)},
        **teacher_accs,
        "teacher_ckpt": str(teacher_path),
        "history": history,
    }


def summary(m: dict[str, Any]) -> str:
    return (
        f"{m['source']} -> {m['transfer']}, losses {m['losses']}, labels {m['labels']}\n"
        f"teacher: source_acc {m['teacher_source_acc']:.4f}  transfer_acc {m['teacher_transfer_acc']:.4f}\n"
        f"student: source_acc {m['source_acc']:.4f} (best {m['best_source_acc']:.4f})  "
        f"transfer_acc {m['transfer_acc']:.4f} (best {m['best_transfer_acc']:.4f})"
    )
