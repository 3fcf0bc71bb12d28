"""Conditional VAE and GAN networks for small images (docs/method.md#6-class-conditional-generation).

The condition c is a vector: a one-hot label, or a unit-length penultimate activation of a
teacher. Every network has two stride-2 stages, so it works at a side of 4 * ceil(size / 4)
and resizes at its ends when the data's side is not a multiple of 4 (8x8 digits and 28x28
MNIST need no resize). Images are in [-1, 1] like `penrun.data.normalize`'s.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


def working_side(image_size: int) -> int:
    return 4 * math.ceil(image_size / 4)


def fit_side(x: torch.Tensor, side: int) -> torch.Tensor:
    if x.shape[-1] == side:
        return x
    return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)


def check_sizes(channels: int, image_size: int, cond_dim: int, z_dim: int, width: int) -> None:
    for name, value, low in (
        ("channels", channels, 1),
        ("image_size", image_size, 4),
        ("cond_dim", cond_dim, 1),
        ("z_dim", z_dim, 1),
        ("width", width, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}={value!r} is invalid: use an integer >= {low}")


class ConvFeatures(nn.Module):
    """x -> flat features: two 4x4 stride-2 convolutions (width, 2 * width channels)."""

    def __init__(self, channels: int, image_size: int, width: int, spectral: bool):
        super().__init__()
        wrap = spectral_norm if spectral else (lambda m: m)
        self.side = working_side(image_size)
        self.net = nn.Sequential(
            wrap(nn.Conv2d(channels, width, 4, 2, 1)),
            nn.LeakyReLU(0.2),
            wrap(nn.Conv2d(width, 2 * width, 4, 2, 1)),
            # Batch statistics would couple a discriminator's real and fake batches.
            nn.Identity() if spectral else nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(0.2),
            nn.Flatten(),
        )
        self.out_dim = 2 * width * (self.side // 4) ** 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(fit_side(x, self.side))


class ImageDecoder(nn.Module):
    """[z, c] -> image logits: a linear layer to (2 * width, side/4, side/4), then two 4x4
    stride-2 transposed convolutions (DCGAN-style, batch norm and ReLU between)."""

    def __init__(self, channels: int, image_size: int, in_dim: int, width: int):
        super().__init__()
        side = working_side(image_size)
        base = side // 4
        self.image_size = image_size
        self.net = nn.Sequential(
            nn.Linear(in_dim, 2 * width * base * base),
            nn.BatchNorm1d(2 * width * base * base),
            nn.ReLU(),
            nn.Unflatten(1, (2 * width, base, base)),
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.ConvTranspose2d(width, channels, 4, 2, 1),
        )

    def forward(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return fit_side(self.net(torch.cat([z, c], dim=1)), self.image_size)


class ConditionalVAE(nn.Module):
    """Encoder q(z | x, c), decoder p(x | z, c) with a Bernoulli likelihood per pixel (grey
    levels as soft targets in [0, 1]), standard normal prior."""

    def __init__(self, channels: int, image_size: int, cond_dim: int, z_dim: int = 16, width: int = 32):
        super().__init__()
        check_sizes(channels, image_size, cond_dim, z_dim, width)
        self.z_dim = z_dim
        self.features = ConvFeatures(channels, image_size, width, spectral=False)
        self.posterior = nn.Sequential(
            nn.Linear(self.features.out_dim + cond_dim, 8 * width),
            nn.LeakyReLU(0.2),
            nn.Linear(8 * width, 2 * z_dim),
        )
        self.decoder = ImageDecoder(channels, image_size, z_dim + cond_dim, width)

    def encode(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_var = self.posterior(torch.cat([self.features(x), c], dim=1)).chunk(2, dim=1)
        return mean, log_var

    def loss(
        self, x: torch.Tensor, c: torch.Tensor, kl_weight: float = 1.0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Negative ELBO per image (nats), with the KL term weighted (warm-up)."""
        mean, log_var = self.encode(x, c)
        z = mean + torch.randn_like(mean) * (0.5 * log_var).exp()
        logits = self.decoder(z, c)
        recon = F.binary_cross_entropy_with_logits(logits, (x + 1) / 2, reduction="sum") / len(x)
        kl = 0.5 * (mean.square() + log_var.exp() - 1 - log_var).sum() / len(x)
        return recon + kl_weight * kl, {"recon": recon.detach(), "kl": kl.detach()}

    def forward(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1]: the decoder's mean for latent z and condition c."""
        return 2 * torch.sigmoid(self.decoder(z, c)) - 1


class Generator(nn.Module):
    """G(z, c): the image decoder with a tanh output."""

    def __init__(self, channels: int, image_size: int, cond_dim: int, z_dim: int = 64, width: int = 32):
        super().__init__()
        check_sizes(channels, image_size, cond_dim, z_dim, width)
        self.z_dim = z_dim
        self.decoder = ImageDecoder(channels, image_size, z_dim + cond_dim, 2 * width)

    def forward(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.decoder(z, c))


class ProjectionDiscriminator(nn.Module):
    """D(x, c) = psi(phi(x)) + <E c, phi(x)> (Miyato & Koyama 2018), spectrally normalized.
    E is linear in c, so one-hot labels (an embedding) and continuous activations share it."""

    def __init__(self, channels: int, image_size: int, cond_dim: int, width: int = 32):
        super().__init__()
        check_sizes(channels, image_size, cond_dim, 1, width)
        self.features = ConvFeatures(channels, image_size, width, spectral=True)
        hidden = 8 * width
        self.phi = nn.Sequential(spectral_norm(nn.Linear(self.features.out_dim, hidden)), nn.LeakyReLU(0.2))
        self.psi = spectral_norm(nn.Linear(hidden, 1))
        self.embed = spectral_norm(nn.Linear(cond_dim, hidden, bias=False))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.phi(self.features(x))
        return self.psi(h).squeeze(1) + (self.embed(c) * h).sum(1)


def hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return F.relu(1 - real).mean() + F.relu(1 + fake).mean()


def hinge_g_loss(fake: torch.Tensor) -> torch.Tensor:
    return -fake.mean()
