"""What task=vae and task=gan share (docs/method.md#6-class-conditional-generation): options,
the conditions (from a teacher or labels), the independent evaluator, per-epoch evaluation,
metrics.json and samples.png.

A task supplies `build(cfg, setup) -> Generative` (its networks, optimizers and epoch);
`run_generation` does the rest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from penrun.app.config import load_data, start_task
from penrun.app.errors import ConfigError
from penrun.app.teachers import obtain_classifier, penultimate_model, vmf_record
from penrun.core.conditions import (
    ConditionSampler,
    Decoder,
    balanced_labels,
    generate,
    sample_grid,
)
from penrun.core.metrics import class_accuracies, generation_metrics, mean_pairwise_distance, per_class
from penrun.data import ImageData
from penrun.models import Classifier
from penrun.train.evaluation import accuracy, predict
from penrun.train.files import save_image_grid
from penrun.train.loop import TrainerSettings, network_input, train_epochs
from penrun.train.seeding import seed_everything

log = logging.getLogger(__name__)


@dataclass
class GenerationSetup:
    """Everything a generative model trains and is evaluated with."""

    data: ImageData
    settings: TrainerSettings
    seed: int
    images: torch.Tensor  # the training images as the networks take them, on the device
    conditions: torch.Tensor  # (N, cond_dim): c of every training image, on the device
    sampler: ConditionSampler  # c for requested classes
    teacher: Classifier | None  # None for one-hot conditions
    evaluator: Classifier
    real_features: torch.Tensor  # evaluator features of the test images
    info: dict[str, Any]  # checkpoints used, evaluator reference numbers


@dataclass
class Generative:
    """What a model-specific task hands to the shared loop."""

    modules: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    train_epoch: Callable[[int], dict[str, float]]
    decoder: Decoder  # (z, c) -> images in [-1, 1]
    z_dim: int


def check_options(cfg: DictConfig) -> None:
    """What the schema cannot say of the shared options, before any data is loaded or network
    trained: the evaluator must be independent of the teacher."""
    independent = cfg.evaluator_ckpt is not None or cfg.teacher_ckpt is not None
    if not independent and cfg.evaluator == cfg.teacher and cfg.evaluator_seed == cfg.teacher_seed:
        raise ConfigError(
            "the evaluator must be independent of the teacher, but evaluator and teacher have the "
            f"same network and seed ({cfg.teacher_seed}); change evaluator_seed or net@evaluator"
        )


def condition_sampler(
    cfg: DictConfig, data: ImageData
) -> tuple[Classifier | None, ConditionSampler, dict[str, Any]]:
    """The teacher and its vMF model for `gen.cond=penultimate`; labels for `onehot`."""
    if cfg.gen.cond == "onehot":
        return None, ConditionSampler(data.num_classes), vmf_record(cfg.vmf, None)
    teacher, ckpt, path = obtain_classifier(cfg, data)
    model = penultimate_model(teacher, ckpt, path, cfg.vmf)
    return (
        teacher.requires_grad_(False),
        ConditionSampler(data.num_classes, model),
        {"teacher_ckpt": str(path), **vmf_record(cfg.vmf, model)},
    )


def training_conditions(
    data: ImageData, teacher: Classifier | None, batch_size: int, device: torch.device
) -> torch.Tensor:
    """c of every training image: one-hot labels, or (given a teacher) its normalized
    penultimate activation of the image, without labels."""
    if teacher is None:
        return F.one_hot(data.y_train, data.num_classes).float()
    h, _ = predict(teacher, data.x_train, batch_size, device)
    return F.normalize(h.float(), dim=1)


def prepare(cfg: DictConfig, settings: TrainerSettings) -> GenerationSetup:
    data = load_data(cfg)
    log.info(data.describe())
    if not data.labelled:
        raise ConfigError(
            f"task={cfg.task.name} generates images of given classes, but {data.name} is unlabeled (a flat "
            "folder of images): give data.root a folder of class folders"
        )
    teacher, sampler, info = condition_sampler(cfg, data)
    evaluator, _, eval_path = obtain_classifier(
        cfg,
        data,
        ckpt_key="evaluator_ckpt",
        net_key="evaluator",
        trainer_key="evaluator_trainer",
        seed_key="evaluator_seed",
        cache="evaluators",
    )
    device, batch = settings.device, settings.eval_batch_size
    evaluator.to(device)
    if teacher is not None:
        teacher.to(device)
    images = network_input(data.x_train, device)
    conditions = training_conditions(data, teacher, batch, device).to(device)
    real_features, real_logits = predict(evaluator, data.x_test, batch, device)
    diversity_real = per_class(mean_pairwise_distance, real_features, data.y_test, data.num_classes)
    info |= {
        "evaluator_ckpt": str(eval_path),
        "evaluator_real_acc": accuracy(real_logits, data.y_test),
        "diversity_real": sum(diversity_real) / len(diversity_real),
    }
    return GenerationSetup(
        data, settings, cfg.seed, images, conditions, sampler, teacher, evaluator, real_features, info
    )


def run_generation(
    cfg: DictConfig, build: Callable[[DictConfig, GenerationSetup], Generative]
) -> dict[str, Any]:
    settings, folder, done = start_task(cfg, check=check_options)
    if done is not None:
        log.info(summary(done))
        return done
    setup = prepare(cfg, settings)
    # The networks start from the seed alone, whether a teacher or evaluator was just trained
    # (which draws from the global random state) or loaded from the cache.
    seed_everything(cfg.seed)
    model = build(cfg, setup)
    options, k = cfg.gen, setup.data.num_classes
    labels = balanced_labels(k, options.eval_per_class)

    def train_epoch(epoch: int) -> dict[str, float]:
        for module in model.modules.values():
            module.train()
        return model.train_epoch(epoch)

    # The curve and the best epoch need cond_acc alone; the Frechet distance and diversity
    # are measured once, after training.
    def evaluate(epoch: int) -> dict[str, float]:
        start = time.perf_counter()
        _, logits = evaluator_outputs(model, setup, labels, cfg.seed)
        accs = class_accuracies(logits, labels, k)
        grid = samples_grid(model, setup, options.grid_per_class, cfg.seed + 1)
        folder.writer.add_image("samples", grid, epoch)
        return {"cond_acc": sum(accs) / k, "eval_time": time.perf_counter() - start}

    history = train_epochs(
        folder,
        modules=model.modules,
        optimizers=model.optimizers,
        max_epochs=settings.max_epochs,
        train_epoch=train_epoch,
        evaluate=evaluate,
        monitor="cond_acc",
        extra={"cond": options.cond, "cond_dim": setup.sampler.dim},
    )
    metrics = {
        "task": cfg.task.name,
        "cond": options.cond,
        **evaluate_samples(model, setup, options.eval_per_class, cfg.seed),
        "samples_per_class": options.eval_per_class,
        "data": setup.data.describe(),
        # the classes of the per-class lists, in their order (an image folder's: its folders, sorted)
        "class_names": list(setup.data.class_names),
        **setup.info,
        "epoch_time": sum(row["epoch_time"] for row in history) / len(history),
        "history": history,
    }
    save_image_grid(
        samples_grid(model, setup, options.grid_per_class, cfg.seed + 1), folder.dir / "samples.png"
    )
    folder.write_metrics(metrics, status="complete")
    folder.close()
    log.info(f"{summary(metrics)} -> {folder.dir}")
    return metrics


def evaluator_outputs(
    model: Generative, setup: GenerationSetup, labels: torch.Tensor, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The evaluator's penultimate features and logits of images generated for `labels`."""
    fake = sample_images(model, setup, labels, seed)
    return predict(setup.evaluator, fake, setup.settings.eval_batch_size, setup.settings.device)


def evaluate_samples(model: Generative, setup: GenerationSetup, per_class: int, seed: int) -> dict[str, Any]:
    """The evaluator's judgement of `per_class` images generated for each class of the data
    (conditional accuracy, Frechet distance to the real test images, diversity)."""
    k = setup.data.num_classes
    labels = balanced_labels(k, per_class)
    features, logits = evaluator_outputs(model, setup, labels, seed)
    return generation_metrics(features, logits, labels, setup.real_features, k, seed)


def sample_images(model: Generative, setup: GenerationSetup, labels: torch.Tensor, seed: int) -> torch.Tensor:
    """uint8 images of the classes `labels`, from the networks in eval mode."""
    for module in model.modules.values():
        module.eval()
    batch, device = setup.settings.eval_batch_size, setup.settings.device
    return generate(model.decoder, setup.sampler, labels, model.z_dim, seed, batch, device)


def samples_grid(model: Generative, setup: GenerationSetup, per_class: int, seed: int) -> torch.Tensor:
    """A grid of samples, one row per class; the same z and c every epoch (their own generator:
    training's random state is untouched)."""
    images = sample_images(model, setup, balanced_labels(setup.data.num_classes, per_class), seed)
    return sample_grid(images, per_class)


def summary(metrics: dict[str, Any]) -> str:
    return (
        f"{metrics['task']} cond={metrics['cond']}: cond_acc {metrics['cond_acc']:.4f} "
        f"({metrics['samples_per_class']}/class; evaluator on real test {metrics['evaluator_real_acc']:.4f}), "
        f"frechet {metrics['frechet']:.3f} ({metrics['frechet_count']} vs {metrics['frechet_count']}), "
        f"diversity {metrics['diversity']:.3f} (real {metrics['diversity_real']:.3f})"
    )
