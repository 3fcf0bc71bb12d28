"""A classifier's outputs on a set of images, and its accuracy."""

from __future__ import annotations

import torch
from torch import nn

from penrun.data import ImageData, epoch_batches, read_batches
from penrun.train import distributed
from penrun.train.loop import TrainerSettings, network_input


@torch.no_grad()
def predict(
    model: nn.Module, x: torch.Tensor, batch_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate activations and logits of a classifier, on the CPU, for images given by
    `network_input` or uint8 ones. Under torchrun each rank computes a contiguous chunk and
    every rank gets all of them."""
    was_training = model.training
    model.eval()
    local, sizes = distributed.local_chunk(x)
    feats, logits = [], []
    for _, images in read_batches(local, epoch_batches(len(local), batch_size, shuffle=False)):
        h = model.features(network_input(images, device))
        feats.append(h)
        logits.append(model.head(h))
    model.train(was_training)
    return (
        distributed.gather_chunks(torch.cat(feats), sizes).cpu(),
        distributed.gather_chunks(torch.cat(logits), sizes).cpu(),
    )


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(1) == y).float().mean().item()


def test_accuracy(model: nn.Module, data: ImageData, settings: TrainerSettings) -> float:
    """A classifier's accuracy on the test split of `data`."""
    _, logits = predict(model, data.x_test, settings.eval_batch_size, settings.device)
    return accuracy(logits, data.y_test)
