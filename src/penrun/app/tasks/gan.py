"""task=gan: a DCGAN-style generator G(z, c) and a projection discriminator D(x, c) with the
hinge loss; c as in task=vae (the teacher's normalized penultimate activation, or one-hot
labels). Optional consistency loss (`gan.consistency`): 1 - cos(teacher activation of
G(z, c), c), which asks the generated image to carry the condition the teacher sees."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from penrun.app.errors import ConfigError
from penrun.app.generation import GenerationSetup, Generative, run_generation
from penrun.models import Classifier
from penrun.models.generative import Generator, ProjectionDiscriminator, hinge_d_loss, hinge_g_loss
from penrun.train import distributed
from penrun.train.loop import descend, device_batches, on_device, run_epoch, train_steps


def run(cfg: DictConfig) -> dict[str, Any]:
    check_gan_options(cfg)
    return run_generation(cfg, build)


def check_gan_options(cfg: DictConfig) -> None:
    gan = cfg.gan
    if gan.consistency > 0 and cfg.gen.cond != "penultimate":
        raise ConfigError(
            f"gan.consistency={gan.consistency} needs gen.cond=penultimate (it compares the "
            f"teacher's activation of G(z, c) with c), got gen.cond={cfg.gen.cond!r}"
        )
    if len(gan.betas) != 2 or not all(0 <= b < 1 for b in gan.betas):
        raise ConfigError(f"gan.betas={list(gan.betas)!r} is invalid: use two numbers in [0, 1)")
    if cfg.trainer.optimizer != "adam":
        raise ConfigError(
            f"task=gan trains with Adam (betas gan.betas); got trainer.optimizer="
            f"{cfg.trainer.optimizer!r}: use adam"
        )


@contextlib.contextmanager
def frozen(net: nn.Module) -> Iterator[None]:
    """Graphs built inside give `net` no parameter gradients; gradients still flow through it."""
    flags = [p.requires_grad for p in net.parameters()]
    net.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(net.parameters(), flags, strict=True):
            p.requires_grad_(flag)


def consistency_loss(teacher: Classifier, fake: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return 1 - F.cosine_similarity(teacher.features(fake), c, dim=1).mean()


def build(cfg: DictConfig, setup: GenerationSetup) -> Generative:
    settings, data, device = setup.settings, setup.data, setup.settings.device
    z_dim, width, weight = cfg.gen.z_dim, cfg.gen.width, float(cfg.gan.consistency)
    gen = on_device(Generator(data.channels, data.image_size, setup.sampler.dim, z_dim, width), settings)
    disc = on_device(
        ProjectionDiscriminator(data.channels, data.image_size, setup.sampler.dim, width), settings
    )
    opts = {
        name: torch.optim.Adam(
            net.parameters(),
            lr=settings.lr,
            betas=tuple(cfg.gan.betas),
            weight_decay=settings.weight_decay,
        )
        for name, net in (("generator", gen), ("discriminator", disc))
    }
    # drop_last: a batch of one would break batch norm.
    steps = train_steps(len(data.y_train), settings.batch_size, drop_last=True)
    # Under torchrun: G's forward and D's two-pass hinge loss each run through DDP once per
    # step; D's pass in G's loss is local (its gradients there are discarded).
    parallel_gen = distributed.data_parallel(gen)
    parallel_d_loss = distributed.data_parallel(
        disc, lambda x, fake, c: hinge_d_loss(disc(x, c), disc(fake, c))
    )

    def step(x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        fake = parallel_gen(torch.randn(len(x), z_dim, device=device), c)
        d_loss = parallel_d_loss(x, fake.detach(), c)
        descend(opts["discriminator"], d_loss)
        # G's loss needs D's input gradients only: its weight gradients (and the spectral norm's
        # backward) would be computed, then discarded by the next D step.
        with frozen(disc):
            g_loss = hinge_g_loss(disc(fake, c))
        logs = {"d_loss": d_loss.detach(), "g_loss": g_loss.detach()}
        if weight > 0:
            consistency = consistency_loss(setup.teacher, fake, c)
            g_loss = g_loss + weight * consistency
            logs["consistency"] = consistency.detach()
        descend(opts["generator"], g_loss)
        return logs["d_loss"] + logs["g_loss"], logs

    def train_epoch(epoch: int) -> dict[str, float]:
        batches = device_batches(
            setup.images,
            setup.conditions,
            settings.batch_size,
            device,
            shuffle=True,
            seed=setup.seed,
            epoch=epoch,
            drop_last=True,
        )
        return run_epoch(batches, steps, list(opts.values()), step, settings, epoch)

    return Generative({"generator": gen, "discriminator": disc}, opts, train_epoch, gen, z_dim)
