"""Conditions for class-conditional generation from a classifier's final layer
(docs/method.md#6-class-conditional-generation), shared by the VAE and the GAN.

A condition c is a one-hot label ("onehot") or a unit penultimate activation of a teacher
("penultimate"): at training time the teacher's normalized activation of the real image, and
to generate class y a draw from p(a | y) of the teacher's final layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from penrun.core.penultimate import PenultimateModel

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
    rng = torch.Generator().manual_seed(seed)
    parts = []
    for idx in torch.arange(len(y)).split(batch_size):
        c = sampler(y[idx], rng)
        z = torch.randn(len(idx), z_dim, generator=rng)
        parts.append(to_uint8(decoder(z.to(device), c.to(device)).cpu()))
    return torch.cat(parts)


def balanced_labels(num_classes: int, per_class: int) -> torch.Tensor:
    """0,0,...,1,1,...: per_class of each class, grouped (a grid's rows)."""
    return torch.arange(num_classes).repeat_interleave(per_class)


# ---------------------------------------------------------------- pictures
def sample_grid(images: torch.Tensor, per_row: int, min_side: int = 28) -> torch.Tensor:
    """A float (C, H, W) grid in [0, 1] of uint8 images, `per_row` a row; small images are
    enlarged (nearest neighbour) to at least `min_side` pixels so the grid is legible."""
    from torchvision.utils import make_grid  # torchvision is slow to import: only for pictures

    x = images.float() / 255
    scale = math.ceil(min_side / x.shape[-1])
    if scale > 1:
        x = F.interpolate(x, scale_factor=scale, mode="nearest")
    return make_grid(x, nrow=per_row, padding=2, pad_value=0.5)
