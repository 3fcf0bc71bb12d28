"""Class-conditional generation from a classifier's final layer (METHOD.md 3b): conditions,
evaluator metrics and sample grids, shared by the VAE and the GAN.

A condition c is a one-hot label ("onehot") or a unit penultimate activation of a teacher
("penultimate"): at training time the teacher's normalized activation of the real image, and
to generate class y a draw from p(a | y) of the teacher's final layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from penrun.data import epoch_batches
from penrun.engine import atomic_write, predict
from penrun.penultimate import PenultimateModel

CONDITIONS = ("onehot", "penultimate")
# A decoder: (z, c) -> images in [-1, 1].
Decoder = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class ConditionSampler:
    """c for requested classes: one-hot vectors, or draws from the vMF model of a final layer."""

    def __init__(self, num_classes: int, model: PenultimateModel | None = None):
        self.num_classes = num_classes
        self.model = model

    @property
    def dim(self) -> int:
        return self.num_classes if self.model is None else self.model.dim

    def __call__(self, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.model is None:
            return F.one_hot(y, self.num_classes).float()
        return self.model.sample(len(y), y=y, generator=generator)[0].float()


def training_conditions(
    y: torch.Tensor,
    num_classes: int,
    teacher: nn.Module | None,
    x: torch.Tensor | None,
    batch_size: int,
    device: torch.device,
) -> torch.Tensor:
    """c of every training image: one-hot labels, or (given a teacher) its normalized
    penultimate activation of the uint8 images x, without labels."""
    if teacher is None:
        return F.one_hot(y, num_classes).float()
    h, _ = predict(teacher, x, batch_size, device)
    return F.normalize(h.float(), dim=1)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8, as images are stored (and real ones are evaluated)."""
    return ((images.float() + 1) * 127.5).round_().clamp_(0, 255).to(torch.uint8)


@torch.no_grad()
def generate(
    decoder: Decoder,
    sampler: ConditionSampler,
    y: torch.Tensor,
    z_dim: int,
    seed: int,
    batch_size: int,
    device: torch.device,
) -> torch.Tensor:
    """uint8 images (on the CPU) of the classes y; z and c are drawn (on the CPU) from a
    generator seeded with `seed`, so the same seed gives the same images."""
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for idx in epoch_batches(len(y), batch_size, shuffle=False):
        c = sampler(y[idx], gen)
        z = torch.randn(len(idx), z_dim, generator=gen)
        parts.append(to_uint8(decoder(z.to(device), c.to(device)).cpu()))
    return torch.cat(parts)


def balanced_labels(num_classes: int, per_class: int) -> torch.Tensor:
    """0,0,...,1,1,...: per_class of each class, grouped (a grid's rows)."""
    return torch.arange(num_classes).repeat_interleave(per_class)


# ---------------------------------------------------------------- metrics
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


def generation_metrics(
    evaluator: nn.Module,
    fake: torch.Tensor,
    fake_y: torch.Tensor,
    real_features: torch.Tensor,
    num_classes: int,
    batch_size: int,
    device: torch.device,
    seed: int = 0,
) -> dict[str, float | int | list[float]]:
    """Evaluator metrics of uint8 images `fake` generated for classes fake_y:
    cond_acc (accuracy against the requested class; mean of the per-class values),
    frechet (distance of evaluator features of fake and real images, equal counts: a fixed
    random subset of the larger set), diversity (mean pairwise feature distance within a
    class, averaged over classes)."""
    h, logits = predict(evaluator, fake, batch_size, device)
    hits = (logits.argmax(1) == fake_y).float()
    acc = per_class(lambda v: v.mean().item(), hits, fake_y, num_classes)
    diversity = per_class(mean_pairwise_distance, h, fake_y, num_classes)
    count = min(len(h), len(real_features))
    gen = torch.Generator().manual_seed(seed)
    pick_fake = torch.randperm(len(h), generator=gen)[:count]
    pick_real = torch.randperm(len(real_features), generator=gen)[:count]
    return {
        "cond_acc": sum(acc) / num_classes,
        "frechet": frechet_distance_of(h[pick_fake], real_features[pick_real]),
        "diversity": sum(diversity) / num_classes,
        "frechet_count": count,
        "cond_acc_per_class": acc,
        "diversity_per_class": diversity,
    }


# ---------------------------------------------------------------- pictures
def sample_grid(images: torch.Tensor, per_row: int, min_side: int = 28) -> torch.Tensor:
    """A float (C, H, W) grid in [0, 1] of uint8 images, `per_row` a row; small images are
    enlarged (nearest neighbour) to at least `min_side` pixels so the grid is legible."""
    from torchvision.utils import make_grid

    x = images.float() / 255
    scale = math.ceil(min_side / x.shape[-1])
    if scale > 1:
        x = F.interpolate(x, scale_factor=scale, mode="nearest")
    return make_grid(x, nrow=per_row, padding=2, pad_value=0.5)


def save_grid(grid: torch.Tensor, path: Path) -> None:
    from torchvision.utils import save_image

    atomic_write(path, lambda tmp: save_image(grid, str(tmp), format="png"))
