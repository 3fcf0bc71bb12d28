"""Distillation losses as small named components (docs/method.md#5-distillation).

A student is trained on a batch of transfer images with a weighted sum of these terms. Each
term is a function of a `DistillBatch`, which computes the student's and the teacher's outputs
at most once per step, and only when a term asks for them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from penrun.core.penultimate import PenultimateModel


@dataclass
class DistillSetup:
    """What the loss terms share across steps."""

    teacher: nn.Module  # a classifier: features(x) -> h, head(h) -> logits
    model: PenultimateModel  # the vMF model of the teacher's final layer
    tau: float
    similarity: torch.Tensor  # class_similarity of the teacher's final layer (dirichlet)
    dirichlet_beta: float
    smooth_epsilon: float
    synthetic_batch: int
    generator: torch.Generator


@dataclass
class DistillBatch:
    setup: DistillSetup
    student: nn.Module
    x: torch.Tensor
    y: torch.Tensor | None  # transfer labels, None in the unlabeled protocol
    # The frozen teacher's (features, logits) of x when computed ahead (once per run for an
    # un-augmented transfer set, read by index at each step); None: computed here.
    teacher_outputs: tuple[torch.Tensor, torch.Tensor] | None = None

    @cached_property
    def student_features(self) -> torch.Tensor:
        return self.student.features(self.x)

    @cached_property
    def student_logits(self) -> torch.Tensor:
        return self.student.head(self.student_features)

    @cached_property
    def teacher_features(self) -> torch.Tensor:
        if self.teacher_outputs is not None:
            return self.teacher_outputs[0]
        with torch.no_grad():
            return self.setup.teacher.features(self.x)

    @cached_property
    def teacher_logits(self) -> torch.Tensor:
        if self.teacher_outputs is not None:
            return self.teacher_outputs[1]
        with torch.no_grad():
            return self.setup.teacher.head(self.teacher_features)

    @cached_property
    def classes(self) -> torch.Tensor:
        """The class of each example: its label, or the teacher's prediction when unlabeled."""
        return self.y if self.y is not None else self.teacher_logits.argmax(1)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, tau: float) -> torch.Tensor:
    """tau^2 * KL(targets || softmax(logits / tau)), averaged over the batch (Hinton et al.)."""
    log_p = F.log_softmax(logits / tau, dim=1)
    return tau**2 * F.kl_div(log_p, targets, reduction="batchmean")


def synthetic_soft_targets(
    model: PenultimateModel,
    teacher: nn.Module,
    y: torch.Tensor,
    tau: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw a ~ p(a | y) from the teacher's final layer; return (a, softmax(T_head(a) / tau))."""
    a, _ = model.sample(len(y), y=y, generator=generator, space="input")
    with torch.no_grad():
        return a, F.softmax(teacher.head(a) / tau, dim=1)


def class_similarity(weight: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of the final layer's rows, min-max normalized per row to [0, 1]
    (Nayak et al. 2019); floored so that every Dirichlet concentration stays positive."""
    w = F.normalize(weight, dim=1)
    sim = w @ w.T
    low, high = sim.min(dim=1, keepdim=True).values, sim.max(dim=1, keepdim=True).values
    return ((sim - low) / (high - low)).clamp_min(1e-3)


def dirichlet_targets(similarity: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """Soft targets p ~ Dir(beta * similarity[y]); their mean is similarity[y] normalized."""
    return torch.distributions.Dirichlet(beta * similarity[y]).sample()


def smoothed_targets(y: torch.Tensor, num_classes: int, epsilon: float) -> torch.Tensor:
    """(1 - eps) on the class, eps spread evenly over the others."""
    targets = torch.full((len(y), num_classes), epsilon / (num_classes - 1), device=y.device)
    return targets.scatter_(1, y[:, None], 1 - epsilon)


def entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-30).log()).sum(-1)


def matched_smoothing(target_entropy: float, num_classes: int) -> float:
    """The label-smoothing epsilon whose targets have the given entropy (bisection; the
    entropy rises monotonically with eps on [0, (K-1)/K])."""
    low, high = 0.0, (num_classes - 1) / num_classes
    target_entropy = min(target_entropy, math.log(num_classes))
    for _ in range(60):
        mid = (low + high) / 2
        h = entropy(smoothed_targets(torch.zeros(1, dtype=torch.long), num_classes, mid)).item()
        low, high = (mid, high) if h < target_entropy else (low, mid)
    return (low + high) / 2


# ---------------------------------------------------------------- the loss terms
def ce_loss(b: DistillBatch) -> torch.Tensor:
    return F.cross_entropy(b.student_logits, b.y)


def kd_loss(b: DistillBatch) -> torch.Tensor:
    return soft_cross_entropy(b.student_logits, F.softmax(b.teacher_logits / b.setup.tau, dim=1), b.setup.tau)


def synthetic_targets_loss(b: DistillBatch) -> torch.Tensor:
    s = b.setup
    _, targets = synthetic_soft_targets(s.model, s.teacher, b.classes, s.tau, s.generator)
    return soft_cross_entropy(b.student_logits, targets, s.tau)


def synthetic_head_loss(b: DistillBatch) -> torch.Tensor:
    """The student's head alone, on class-balanced synthetic activations of the teacher."""
    s = b.setup
    y = torch.randint(
        s.model.num_classes, (s.synthetic_batch,), generator=s.generator, device=s.generator.device
    )
    a, targets = synthetic_soft_targets(s.model, s.teacher, y, s.tau, s.generator)
    return soft_cross_entropy(b.student.head(a), targets, s.tau)


def feature_loss(b: DistillBatch) -> torch.Tensor:
    return 1 - F.cosine_similarity(b.student_features, b.teacher_features, dim=1).mean()


def dirichlet_loss(b: DistillBatch) -> torch.Tensor:
    s = b.setup
    return soft_cross_entropy(
        b.student_logits, dirichlet_targets(s.similarity, b.classes, s.dirichlet_beta), s.tau
    )


def smooth_loss(b: DistillBatch) -> torch.Tensor:
    s = b.setup
    targets = smoothed_targets(b.classes, s.model.num_classes, s.smooth_epsilon)
    return soft_cross_entropy(b.student_logits, targets, s.tau)


LOSSES: dict[str, Callable[[DistillBatch], torch.Tensor]] = {
    "ce": ce_loss,
    "kd": kd_loss,
    "synthetic_targets": synthetic_targets_loss,
    "synthetic_head": synthetic_head_loss,
    "feature": feature_loss,
    "dirichlet": dirichlet_loss,
    "smooth": smooth_loss,
}
# Terms that compare the student's penultimate space with the teacher's.
SAME_DIM_LOSSES = ("synthetic_head", "feature")


def total_loss(batch: DistillBatch, weights: dict[str, float]) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted sum of the active terms, and each term's value for the log."""
    terms = {name: LOSSES[name](batch) for name, w in weights.items() if w > 0}
    total = sum(weights[name] * value for name, value in terms.items())
    return total, {name: value.detach() for name, value in terms.items()}
