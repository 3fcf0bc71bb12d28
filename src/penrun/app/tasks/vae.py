"""task=vae: a conditional VAE whose condition is the teacher's normalized penultimate
activation (`gen.cond=penultimate`, no labels) or the one-hot label (`onehot`, the baseline);
to generate class y, c is drawn from p(a | y) of the teacher's final layer."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from penrun.app.generation import GenerationSetup, Generative, run_generation
from penrun.models.generative import ConditionalVAE
from penrun.train import distributed
from penrun.train.loop import device_batches, on_device, optimize_epoch, train_steps
from penrun.train.optim import build_optimizer


def run(cfg: DictConfig) -> dict[str, Any]:
    return run_generation(cfg, build)


def kl_weight(epoch: int, warmup_epochs: int) -> float:
    """Linear KL warm-up over the first epochs (1 from the start when warmup_epochs is 0)."""
    return min(1.0, epoch / warmup_epochs) if warmup_epochs else 1.0


def build(cfg: DictConfig, setup: GenerationSetup) -> Generative:
    settings, data = setup.settings, setup.data
    vae = ConditionalVAE(data.channels, data.image_size, setup.sampler.dim, cfg.gen.z_dim, cfg.gen.width)
    net = on_device(vae, settings)
    optimizer = build_optimizer(settings.optimizer, net.parameters(), settings.lr, settings.weight_decay)
    # drop_last: a batch of one would break batch norm.
    steps = train_steps(len(data.y_train), settings.batch_size, drop_last=True)
    loss = distributed.data_parallel(net, net.loss)

    def train_epoch(epoch: int) -> dict[str, float]:
        beta = kl_weight(epoch, cfg.vae.kl_warmup_epochs)
        batches = device_batches(
            setup.images,
            setup.conditions,
            settings.batch_size,
            settings.device,
            shuffle=True,
            seed=setup.seed,
            epoch=epoch,
            drop_last=True,
        )
        row = optimize_epoch(batches, steps, optimizer, lambda x, c: loss(x, c, beta), settings, epoch)
        return {**row, "kl_weight": beta}

    return Generative({"vae": net}, {"optimizer": optimizer}, train_epoch, net, cfg.gen.z_dim)
