"""Metrics of generated images in an evaluator's feature space
(docs/method.md#6-class-conditional-generation): conditional accuracy, Frechet distance, diversity."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def gaussian_moments(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) covariance of (n, d) features, in float64."""
    f = features.double()
    return f.mean(0), torch.cov(f.T).reshape(f.shape[1], f.shape[1])


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix (eigenvalues clamped at 0,
    which rounding can push slightly below)."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(
    mean1: torch.Tensor, cov1: torch.Tensor, mean2: torch.Tensor, cov2: torch.Tensor
) -> float:
    """|m1 - m2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2): the Frechet (2-Wasserstein)
    distance of two Gaussians. tr((S1 S2)^1/2) is taken from the eigenvalues of the symmetric
    S1^1/2 S2 S1^1/2, which avoids the complex square roots of a general sqrtm."""
    mean1, cov1, mean2, cov2 = (t.double() for t in (mean1, cov1, mean2, cov2))
    root1 = _psd_sqrt(cov1)
    middle = root1 @ cov2 @ root1
    cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    value = (mean1 - mean2).square().sum() + cov1.trace() + cov2.trace() - 2 * cross
    return max(value.item(), 0.0)


def frechet_distance_of(features1: torch.Tensor, features2: torch.Tensor) -> float:
    return frechet_distance(*gaussian_moments(features1), *gaussian_moments(features2))


def mean_pairwise_distance(features: torch.Tensor) -> float:
    """Mean Euclidean distance over distinct pairs of rows."""
    return torch.pdist(features.double()).mean().item() if len(features) > 1 else math.nan


def per_class(
    fn: Callable[[torch.Tensor], float], values: torch.Tensor, y: torch.Tensor, num_classes: int
) -> list[float]:
    return [fn(values[y == k]) for k in range(num_classes)]


def class_accuracies(logits: torch.Tensor, y: torch.Tensor, num_classes: int) -> list[float]:
    """Accuracy of the predictions `logits` against the requested classes y, per class."""
    hits = (logits.argmax(1) == y).float()
    return per_class(lambda v: v.mean().item(), hits, y, num_classes)


def generation_metrics(
    features: torch.Tensor,
    logits: torch.Tensor,
    y: torch.Tensor,
    real_features: torch.Tensor,
    num_classes: int,
    seed: int = 0,
) -> dict[str, float | int | list[float]]:
    """Evaluator metrics of images generated for classes y, from the evaluator's penultimate
    features and logits of them: cond_acc (accuracy against the requested class; mean of the
    per-class values), frechet (distance of evaluator features of fake and real images, equal
    counts: a fixed random subset of the larger set), diversity (mean pairwise feature
    distance within a class, averaged over classes)."""
    acc = class_accuracies(logits, y, num_classes)
    diversity = per_class(mean_pairwise_distance, features, y, num_classes)
    count = min(len(features), len(real_features))
    rng = torch.Generator().manual_seed(seed)
    pick_fake = torch.randperm(len(features), generator=rng)[:count]
    pick_real = torch.randperm(len(real_features), generator=rng)[:count]
    return {
        "cond_acc": sum(acc) / num_classes,
        "frechet": frechet_distance_of(features[pick_fake], real_features[pick_real]),
        "diversity": sum(diversity) / num_classes,
        "frechet_count": count,
        "cond_acc_per_class": acc,
        "diversity_per_class": diversity,
    }
