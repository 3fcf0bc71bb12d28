"""task=gan: a DCGAN-style generator G(z, c) and a projection discriminator D(x, c) with the
hinge loss; c as in task=vae (the teacher's normalized penultimate activation, or one-hot
labels). Optional consistency loss (`gan.consistency`): 1 - cos(teacher activation of
G(z, c), c), which asks the generated image to carry the condition the teacher sees."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from penrun.app.errors import ConfigError
from penrun.app.tasks.conditional_generation import GenerationSetup, Generative, run_generation
from penrun.models import Classifier
from penrun.models.generative import Generator, ProjectionDiscriminator, hinge_d_loss, hinge_g_loss
from penrun.train import distributed
from penrun.train.loop import NonFiniteWatch, device_batches, epoch_means, progress, train_steps
from penrun.train.optim import lr_factor, set_lr


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
    gen = Generator(data.channels, data.image_size, setup.sampler.dim, z_dim, width).to(device)
    disc = ProjectionDiscriminator(data.channels, data.image_size, setup.sampler.dim, width).to(device)
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

    def step(x: torch.Tensor, c: torch.Tensor) -> dict[str, torch.Tensor]:
        fake = parallel_gen(torch.randn(len(x), z_dim, device=device), c)
        d_loss = parallel_d_loss(x, fake.detach(), c)
        opts["discriminator"].zero_grad(set_to_none=True)
        d_loss.backward()
        opts["discriminator"].step()
        # G's loss needs D's input gradients only: its weight gradients (and the spectral norm's
        # backward) would be computed, then discarded by the next D step.
        with frozen(disc):
            g_loss = hinge_g_loss(disc(fake, c))
        logs = {"d_loss": d_loss.detach(), "g_loss": g_loss.detach()}
        if weight > 0:
            consistency = consistency_loss(setup.teacher, fake, c)
            g_loss = g_loss + weight * consistency
            logs["consistency"] = consistency.detach()
        opts["generator"].zero_grad(set_to_none=True)
        g_loss.backward()
        opts["generator"].step()
        return logs

    def train_epoch(epoch: int) -> dict[str, float]:
        start, sums, watch = time.perf_counter(), {}, NonFiniteWatch()
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
        bar = progress(
            batches, total=steps, desc=f"epoch {epoch}/{settings.max_epochs}", enabled=settings.progress
        )
        for i, (x, c) in enumerate(bar):
            position = (epoch - 1 + i / steps) / settings.max_epochs
            for opt in opts.values():
                set_lr(opt, settings.lr * lr_factor(settings.schedule, position))
            logs = step(x, c)
            watch.update(logs["d_loss"] + logs["g_loss"], i)
            for name, value in logs.items():
                sums[name] = sums.get(name, 0.0) + value
        watch.check(epoch)
        return {**epoch_means(sums, steps), "epoch_time": time.perf_counter() - start}

    return Generative({"generator": gen, "discriminator": disc}, opts, train_epoch, gen, z_dim)
