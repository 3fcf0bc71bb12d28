"""task=distill: knowledge distillation under domain shift (docs/method.md#5-distillation).

The teacher knows the source domain (`data`); the student learns from a transfer set
(`transfer`: another dataset or a shifted copy of the source) with a weighted sum of the loss
terms in `penrun.core.losses`. Each epoch is scored on held-out transfer examples (which choose
the epoch) and on the protocol's test set (the transfer domain's with labels, the source
domain's without; every `distill.test_every` epochs, the last and the chosen one); the other
domain's test set is evaluated once, at the end.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from penrun.app.config import classifier_spec, load_data, start_task
from penrun.app.errors import ConfigError, config_keys
from penrun.app.teachers import cached_test_accuracy, obtain_classifier, penultimate_model, vmf_record
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
from penrun.data.corruptions import corrupt_images
from penrun.models import Classifier, build_classifier
from penrun.train import distributed
from penrun.train.checkpoint import load_checkpoint
from penrun.train.evaluation import accuracy, predict, test_accuracy
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
    held = held_out_indices(transfer, options.held_out, options.val_per_class, source.num_classes)
    examples = student_examples(transfer, labels, held, cfg.seed)
    if cfg.teacher_ckpt is None and cfg.teacher.source == "penrun":  # trained here: check before
        check_student(weights, student_spec, cfg.teacher.penultimate_dim)
    teacher, ckpt, teacher_path = obtain_classifier(cfg, source)
    check_student(weights, student_spec, teacher.penultimate_dim)
    seed_everything(cfg.seed)
    on_device(teacher, settings)
    model = penultimate_model(teacher, ckpt, teacher_path, cfg.vmf)
    shared = distill_setup(options, weights, teacher, model, settings, cfg.seed)
    output_dir = Path(cfg.paths.output_dir)
    accuracy_of = partial(
        cached_test_accuracy, teacher, teacher_path, settings=settings, output_dir=output_dir
    )
    teacher_accs = {"teacher_source_acc": accuracy_of(source)}
    if transfer.labelled:  # a flat folder of images has no labels to score against
        teacher_accs["teacher_transfer_acc"] = accuracy_of(transfer)
    log.info(f"teacher {teacher_path}: " + ", ".join(f"{k[8:]} {v:.4f}" for k, v in teacher_accs.items()))
    protocol = Protocol(source, transfer, labelled=labels is not None, test_every=options.test_every)
    student, history = train_student(
        folder, student_spec, shared, weights, examples, protocol, settings, cfg.seed
    )
    outcome = Outcome(
        protocol=protocol,
        weights=weights,
        labels=options.labels,
        train_size=len(examples.x_train),
        val_size=len(examples.x_val),
        teacher_path=teacher_path,
        teacher_accs=teacher_accs,
        history=history,
        selected_score=selected_test_score(folder, student, history, protocol, settings),
        other_domain_acc=(
            test_accuracy(student, protocol.other_data, settings) if protocol.other_data.labelled else None
        ),
    )
    used_vmf = any(weights[name] > 0 for name in VMF_LOSSES)
    metrics = final_metrics(outcome) | vmf_record(cfg.vmf, model if used_vmf else None)
    folder.write_metrics(metrics, status="complete")
    folder.close()
    log.info(summary(metrics))
    return metrics


def distill_setup(
    options: DictConfig,
    weights: dict[str, float],
    teacher: Classifier,
    model: PenultimateModel,
    settings: TrainerSettings,
    seed: int,
) -> DistillSetup:
    """What the loss terms share, from the `distill` options: tau, the Dirichlet's beta, and
    the label smoothing matched to the synthetic targets (when the smooth term is on)."""
    generator = torch.Generator(settings.device).manual_seed(seed)
    tau = float(options.tau)
    shared = DistillSetup(
        teacher=teacher,
        model=model,
        tau=tau,
        similarity=class_similarity(teacher.head.effective_weight().detach()),
        dirichlet_beta=float(options.dirichlet_beta),
        smooth_epsilon=smoothing_for(model, teacher, tau, generator) if weights["smooth"] > 0 else 0.0,
        synthetic_batch=settings.batch_size // distributed.world_size(),
        generator=generator,
    )
    if distributed.rank():  # each rank draws its own synthetic activations; rank 0 as one process
        generator.manual_seed(distributed.rank_seed(seed))
    return shared


# ---------------------------------------------------------------- checks before training
def check_options(cfg: DictConfig) -> None:
    """What the schema cannot say of the distill options, before the run folder is opened."""
    weights = loss_weights(cfg.distill)
    if labels_option(cfg.distill.labels) is None and weights["ce"] > 0:
        raise ConfigError(
            "distill.losses.ce > 0 needs labels, but distill.labels=none; set distill.labels=all or N, or ce=0"
        )
    if labels_option(cfg.distill.labels) is None and cfg.distill.held_out == "balanced":
        raise ConfigError(
            "distill.held_out=balanced reads transfer labels, which the unlabeled protocol "
            "(distill.labels=none) must not; use distill.held_out=seeded"
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
    transfer = align_classes(load_data(cfg, "transfer", like=source), source.name)
    if not transfer.labelled and labels_option(cfg.distill.labels) is not None:
        raise ConfigError(
            f"distill.labels={cfg.distill.labels!r}: {transfer.name} is unlabeled; use distill.labels=none"
        )
    transfer = convert_images(transfer, source.image_size, source.channels)
    if cfg.transfer.shift == "corruption":  # computed once, cached beside the teachers
        with config_keys(corruption="transfer.corruption", severity="transfer.severity"):
            cache = f"{cfg.paths.output_dir}/corruptions"
            transfer = corrupt_images(
                transfer, cfg.transfer.corruption, cfg.transfer.severity, cfg.seed, cache
            )
    elif cfg.transfer.shift != "none":
        with config_keys(shift="transfer.shift", strength="transfer.shift_strength"):
            transfer = shift_images(transfer, cfg.transfer.shift, cfg.transfer.shift_strength, seed=cfg.seed)
    top = int(max(transfer.y_train.max(), transfer.y_test.max()))
    if top >= source.num_classes:
        raise ConfigError(
            f"transfer set {transfer.name} has label {top}, outside the teacher's {source.num_classes} "
            f"classes (0..{source.num_classes - 1}) of {source.name}"
        )
    return transfer


# The terms that draw from the vMF (smooth matches its label smoothing to the synthetic targets).
VMF_LOSSES = ("synthetic_targets", "synthetic_head", "smooth")

# The two domains a student is scored on.
DOMAINS = ("source", "transfer")

# Every run on a transfer set validates on the same held-out examples, whatever its seed.
VALIDATION_SEED = 0


def held_out_indices(transfer: ImageData, rule: str, per_class: int, classes: int) -> torch.Tensor:
    """The transfer training images held out to choose the epoch, the same for every run and
    seed (docs/method.md, 5.4): `per_class` of each class by their labels (balanced), or
    `per_class` x the teacher's `classes` drawn without reading a label (seeded: the unlabeled
    protocol's, and a flat folder's, which has no labels to balance)."""
    if rule == "balanced":
        with config_keys(per_class="distill.val_per_class"):
            return labelled_subset(transfer.y_train, per_class, transfer.num_classes, VALIDATION_SEED)
    count, available = per_class * classes, len(transfer.x_train)
    if count > available:
        raise ConfigError(
            f"distill.val_per_class={per_class} holds out {count} images ({per_class} x {classes} "
            f"classes), more than the {available} training images of {transfer.name}"
        )
    order = torch.randperm(available, generator=torch.Generator().manual_seed(VALIDATION_SEED))
    return order[:count].sort().values


def transfer_training_set(
    transfer: ImageData, labels: int | str | None, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(labels, int):
        with config_keys(per_class="distill.labels"):
            idx = labelled_subset(transfer.y_train, labels, transfer.num_classes, seed)
        return transfer.x_train[idx], transfer.y_train[idx]
    return transfer.x_train, transfer.y_train


@dataclass(frozen=True)
class StudentExamples:
    """The transfer images a student trains on and the held-out ones that choose its epoch,
    with their labels in the labelled protocol; without labels (None) the unlabeled protocol
    cannot read them."""

    x_train: torch.Tensor
    y_train: torch.Tensor | None
    x_val: torch.Tensor
    y_val: torch.Tensor | None


def student_examples(
    transfer: ImageData, labels: int | str | None, held: torch.Tensor, seed: int
) -> StudentExamples:
    """The held-out examples (`held`: indices into the transfer training split) and the
    training examples from the rest: all of them, or `labels` per class drawn with the seed."""
    kept = torch.ones(len(transfer.x_train), dtype=torch.bool)
    kept[held] = False
    pool = replace(transfer, x_train=transfer.x_train[kept], y_train=transfer.y_train[kept])
    x_train, y_train = transfer_training_set(pool, labels, seed)
    if labels is None:
        return StudentExamples(x_train, None, transfer.x_train[held], None)
    return StudentExamples(x_train, y_train, transfer.x_train[held], transfer.y_train[held])


def smoothing_for(
    model: PenultimateModel, teacher: Classifier, tau: float, generator: torch.Generator
) -> float:
    """Label smoothing whose targets have the mean entropy of the synthetic soft targets."""
    y = torch.arange(model.num_classes, device=generator.device).repeat(200)
    _, targets = synthetic_soft_targets(model, teacher, y, tau, generator)
    return matched_smoothing(entropy(targets).mean().item(), model.num_classes)


# ---------------------------------------------------------------- training
@dataclass(frozen=True)
class Protocol:
    """The domain whose test set gives a protocol's curve and stability (evaluated every
    `test_every` epochs and at the last): the target domain with labels (Table 2), the source domain without (Table 1: the
    student should keep the teacher's source accuracy). The other domain is evaluated once,
    after training. The epoch is chosen on held-out transfer examples: accuracy with labels,
    agreement with the teacher without."""

    source: ImageData
    transfer: ImageData
    labelled: bool
    test_every: int = 1  # the test split is scored every N epochs and at the last

    def scores_test(self, epoch: int, max_epochs: int) -> bool:
        return epoch % self.test_every == 0 or epoch == max_epochs

    @property
    def domain(self) -> str:
        return "transfer" if self.labelled else "source"

    @property
    def other_domain(self) -> str:
        return "source" if self.labelled else "transfer"

    @property
    def metric(self) -> str:
        return f"{self.domain}_acc"

    @property
    def test_data(self) -> ImageData:
        return self.transfer if self.labelled else self.source

    @property
    def other_data(self) -> ImageData:
        return self.source if self.labelled else self.transfer

    @property
    def val_metric(self) -> str:
        return "val_acc" if self.labelled else "val_agreement"


def reads_teacher_images(weights: dict[str, float], labelled: bool) -> bool:
    """Whether a term needs the teacher's outputs on the transfer images (the unlabeled
    protocol takes every class from the teacher's prediction)."""
    return weights["kd"] > 0 or weights["feature"] > 0 or not labelled


def teacher_outputs(
    teacher: Classifier, images: torch.Tensor, settings: TrainerSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen teacher's features and logits of the whole transfer set, once per run: it
    sees the same un-augmented images every epoch, so each step reads its rows by index."""
    features, logits = predict(teacher, images, settings.eval_batch_size, settings.device)
    return features.to(settings.device), logits.to(settings.device)


def train_student(
    folder: RunFolder,
    student_spec: dict[str, Any],
    shared: DistillSetup,
    weights: dict[str, float],
    examples: StudentExamples,
    protocol: Protocol,
    settings: TrainerSettings,
    seed: int,
) -> tuple[Classifier, list[dict[str, Any]]]:
    """Train a student in `folder` (resuming from its last.pt): the epochs' history, and the
    student of the last epoch."""
    device = settings.device
    student = on_device(build_classifier(**student_spec), settings)
    optimizer = build_optimizer(settings.optimizer, student.parameters(), settings.lr, settings.weight_decay)
    steps = train_steps(len(examples.x_train), settings.batch_size)
    images, index = network_input(examples.x_train, device), torch.arange(len(examples.x_train))
    labels = examples.y_train.to(device) if examples.y_train is not None else None
    cached = (
        teacher_outputs(shared.teacher, images, settings)
        if reads_teacher_images(weights, labels is not None)
        else None
    )

    def step(x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        y = labels[idx] if labels is not None else None
        outputs = (cached[0][idx], cached[1][idx]) if cached is not None else None
        return total_loss(DistillBatch(shared, student, x, y, outputs), weights)

    # Terms such as synthetic_head leave the student's body without gradient.
    parallel_step = distributed.data_parallel(student, step, some_unused=True)

    def train_epoch(epoch: int) -> dict[str, float]:
        student.train()
        batches = device_batches(
            images, index, settings.batch_size, device, shuffle=True, seed=seed, epoch=epoch
        )
        return optimize_epoch(batches, steps, optimizer, parallel_step, settings, epoch)

    test_set = protocol.test_data
    test_images = network_input(test_set.x_test, device)

    val_images = network_input(examples.x_val, device)
    val_targets = (
        examples.y_val
        if examples.y_val is not None
        else predict(shared.teacher, val_images, settings.eval_batch_size, device)[1].argmax(1)
    )

    def evaluate(epoch: int) -> dict[str, float]:
        _, val_logits = predict(student, val_images, settings.eval_batch_size, device)
        scores = {protocol.val_metric: accuracy(val_logits, val_targets)}
        if protocol.scores_test(epoch, settings.max_epochs):
            _, logits = predict(student, test_images, settings.eval_batch_size, device)
            scores[protocol.metric] = accuracy(logits, test_set.y_test)
        return scores

    history = train_epochs(
        folder,
        modules={"model": student},
        optimizers={"optimizer": optimizer},
        max_epochs=settings.max_epochs,
        train_epoch=train_epoch,
        evaluate=evaluate,
        monitor=protocol.val_metric,
        generators={"synthetic": shared.generator},
        extra={"classifier": student_spec},
    )
    return student, history


def selected_test_score(
    folder: RunFolder,
    student: Classifier,
    history: list[dict[str, Any]],
    protocol: Protocol,
    settings: TrainerSettings,
) -> float:
    """The test score of the epoch chosen on validation: its history row's, or, when training
    skipped its test split (`distill.test_every` > 1), that of best.pt's student (the first of
    equal scores, as `selected_epoch` chooses). The history is left as trained, so that every
    run's curve holds the same epochs."""
    row = history[selected_epoch(history, protocol.val_metric)]
    if protocol.metric in row:
        return row[protocol.metric]
    ckpt = load_checkpoint(folder.best_path)
    if ckpt["epoch"] != row["epoch"]:
        raise RuntimeError(f"{folder.best_path} holds epoch {ckpt['epoch']}, not the selected {row['epoch']}")
    best = copy.deepcopy(student)
    best.load_state_dict(ckpt["modules"]["model"])
    return test_accuracy(best, protocol.test_data, settings)


@dataclass(frozen=True)
class Outcome:
    """What a distill run measured, for its metrics.json."""

    protocol: Protocol
    weights: dict[str, float]
    labels: Any  # the `distill.labels` option as given: none, all or N
    train_size: int  # the student's transfer training examples
    val_size: int  # the held-out transfer examples that choose the epoch
    teacher_path: Path
    teacher_accs: dict[str, float]  # teacher_source_acc, teacher_transfer_acc
    history: list[dict[str, Any]]
    selected_score: float  # the test score of the epoch chosen on validation
    # the last student's accuracy on the other domain's test set (None: an unlabeled one)
    other_domain_acc: float | None


def selected_epoch(history: list[dict[str, Any]], val_metric: str) -> int:
    """The index of the epoch with the best validation score (the first of equals, as best.pt
    keeps it); never chosen on a test set."""
    scores = [row[val_metric] for row in history]
    return scores.index(max(scores))


def final_metrics(outcome: Outcome) -> dict[str, Any]:
    protocol, history, weights = outcome.protocol, outcome.history, outcome.weights
    # The test split's scores: every `distill.test_every` epochs and the last
    curve = [row[protocol.metric] for row in history if protocol.metric in row]
    selected = selected_epoch(history, protocol.val_metric)
    return {
        "task": "distill",
        "source": protocol.source.name,
        "transfer": protocol.transfer.name,
        # Where the images came from (e.g. the lossy CIFAR-10 subset or the full set): tables say which.
        "source_data": protocol.source.source,
        "transfer_data": protocol.transfer.source,
        "method": "+".join(k for k, v in weights.items() if v > 0),
        "labels": outcome.labels,
        "transfer_train_size": outcome.train_size,
        "losses": {k: v for k, v in weights.items() if v > 0},
        protocol.metric: curve[-1],
        **(
            {}
            if outcome.other_domain_acc is None
            else {f"{protocol.other_domain}_acc": outcome.other_domain_acc}
        ),
        # The epoch with the best validation score, and its test accuracy.
        "selected_epoch": selected + 1,
        f"selected_{protocol.metric}": outcome.selected_score,
        f"best_{protocol.val_metric}": history[selected][protocol.val_metric],
        "val_size": outcome.val_size,
        "stability": {protocol.domain: stability(curve)},
        **outcome.teacher_accs,
        "teacher_ckpt": str(outcome.teacher_path),
        "history": history,
    }


def accuracies(m: dict[str, Any], prefix: str = "") -> str:
    """The source and transfer accuracies a run has (an unlabeled transfer set has none)."""
    return "  ".join(f"{d}_acc {m[f'{prefix}{d}_acc']:.4f}" for d in DOMAINS if f"{prefix}{d}_acc" in m)


def summary(m: dict[str, Any]) -> str:
    return (
        f"{m['source']} -> {m['transfer']}, losses {m['losses']}, labels {m['labels']}\n"
        f"teacher: {accuracies(m, 'teacher_')}\n"
        f"student: {accuracies(m)}  "
        f"(at the best validation epoch {m['selected_epoch']}: "
        f"{', '.join(f'{k} {v:.4f}' for k, v in m.items() if k.startswith('selected_') and k != 'selected_epoch')})"
    )
