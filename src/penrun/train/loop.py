"""The epoch loop: batches on a device, optimizer steps, checkpoints, resume. CUDA graphs are in
`cuda_graphs.py`, evaluation in `evaluation.py`."""

from __future__ import annotations

import itertools
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from penrun.data import FolderImages, epoch_batches, normalize, num_batches, read_batches
from penrun.errors import InputError
from penrun.train import distributed
from penrun.train.checkpoint import checkpoint_payload, restore_random_states
from penrun.train.cuda_graphs import GraphedStep, Step, capturable
from penrun.train.files import save_torch
from penrun.train.optim import lr_factor, set_lr
from penrun.train.run_folder import RunFolder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainerSettings:
    """Validated trainer options (tasks build them from the `trainer` config node)."""

    max_epochs: int
    batch_size: int
    eval_batch_size: int
    lr: float
    optimizer: str
    weight_decay: float
    schedule: str
    device: torch.device
    num_threads: int | None
    progress: bool
    cuda_graphs: bool = False
    precision: str = "32"
    channels_last: bool = False


# Lightning's names: "32" float32 throughout; "bf16" ("bf16-mixed" there) float32 weights and
# optimizer state, the forward passes under bfloat16 autocast.
PRECISIONS = ("32", "bf16")


def forward_precision(settings: TrainerSettings) -> AbstractContextManager:
    """Where a training step's forward passes and losses run: under "bf16", autocast computes
    the ops it lists (matrix products, convolutions) in bfloat16 and keeps the rest (losses,
    softmax, norms) in float32; under "32" nothing changes. Evaluation (`evaluation.predict`)
    and the recorded activation statistics stay float32 either way."""
    if settings.precision == "bf16":
        return torch.autocast(settings.device.type, dtype=torch.bfloat16)
    return nullcontext()


def on_device(module: nn.Module, settings: TrainerSettings) -> nn.Module:
    """A network moved to the training device; with `channels_last` its 4-d weights in the
    channels-last (NHWC) layout, which its convolutions then also give their outputs in (the
    input converts at the first one). Networks without 4-d weights are unchanged by it."""
    layout = torch.channels_last if settings.channels_last else torch.preserve_format
    return module.to(settings.device, memory_format=layout)


# ---------------------------------------------------------------- batches on a device
def progress(iterable: Iterable, *, total: int, desc: str, enabled: bool) -> Iterable:
    """A tqdm bar, quiet when disabled, when stderr is not a terminal, and on ranks other than 0."""
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        leave=False,
        dynamic_ncols=True,
        disable=not (enabled and sys.stderr.isatty() and distributed.is_main()),
    )


def train_steps(n: int, batch_size: int, drop_last: bool = False) -> int:
    """Optimizer steps per epoch of `device_batches`; refuses a training set too small to
    train on (batch norm needs two examples in a batch)."""
    if n < 2:
        raise InputError(f"the training set has {n} example(s): training needs at least 2")
    return num_batches(n, batch_size, drop_last or distributed.is_distributed())


def network_input(x: torch.Tensor | FolderImages, device: torch.device) -> torch.Tensor | FolderImages:
    """Images on `device` as a network takes them: uint8 normalized to float, float as given.
    Tasks convert their image sets once per run, so that no step or evaluation converts or
    copies the same images again (slicing a converted set returns the same numbers). A split
    streamed from a folder stays on disk: each batch read from it is converted here."""
    if isinstance(x, FolderImages):
        return x
    x = x.to(device, non_blocking=True)
    return x if x.is_floating_point() else normalize(x)


def device_batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    device: torch.device,
    *,
    shuffle: bool,
    seed: int,
    epoch: int,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Training batches of (normalized images, labels) on `device`, sliced from images given
    by `network_input` (or uint8 ones, converted per batch). Under torchrun each rank takes its
    shard of every global batch of `batch_size` and the last partial batch is dropped, so that
    all ranks step on equal shards."""
    drop_last = drop_last or distributed.is_distributed()
    order = epoch_batches(len(y), batch_size, shuffle=shuffle, seed=seed, epoch=epoch, drop_last=drop_last)
    for idx, images in read_batches(x, map(distributed.shard, order)):  # in memory or streamed alike
        yield network_input(images, device), y[idx].to(device, non_blocking=True)


LossFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def optimize_epoch(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    settings: TrainerSettings,
    epoch: int,
) -> dict[str, float]:
    """One epoch of one optimizer minimizing `loss_fn` (a loss and logged terms of a batch),
    each step eager or replayed from a CUDA graph (`settings.cuda_graphs`); the epoch's row
    as `run_epoch` gives it, with train_loss first."""
    step: Step = partial(eager_step, optimizer, loss_fn)
    with ExitStack() as stack:
        if settings.cuda_graphs:
            stack.enter_context(capturable(optimizer, settings.device))
            step = GraphedStep(step)
        return run_epoch(batches, steps, [optimizer], step, settings, epoch)


def eager_step(
    optimizer: torch.optim.Optimizer, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimizer step on `loss_fn`'s loss; logs the loss first, then its terms."""
    loss, logs = loss_fn(x, y)
    descend(optimizer, loss)
    return loss, {"loss": loss.detach(), **logs}


def descend(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """One update of `optimizer` down the gradient of `loss` alone (earlier gradients dropped),
    outside the forward pass's autocast: each backward op runs in its forward op's precision."""
    with torch.autocast(loss.device.type, enabled=False):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def run_epoch(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    optimizers: Sequence[torch.optim.Optimizer],
    step: Step,
    settings: TrainerSettings,
    epoch: int,
) -> dict[str, float]:
    """One epoch of `step` on every batch, after the per-step learning-rate schedule is set on
    every one of `optimizers` (the ones `step` updates). `step` returns the loss whose
    non-finite values stop the run and the terms to log; the epoch's row is each logged term's
    mean as train_<name>, and its wall time."""
    start, sums, watch = time.perf_counter(), {}, NonFiniteWatch()
    bar = progress(
        batches, total=steps, desc=f"epoch {epoch}/{settings.max_epochs}", enabled=settings.progress
    )
    shown = not getattr(bar, "disable", True)  # reading the loss waits for the device: only for a bar
    for i, (x, y) in enumerate(bar):
        position = (epoch - 1 + i / steps) / settings.max_epochs
        for optimizer in optimizers:
            set_lr(optimizer, settings.lr * lr_factor(settings.schedule, position))
        with forward_precision(settings):
            loss, logs = step(x, y)
        watch.update(loss, i)
        if shown and i % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4g}", refresh=False)
        for name, value in logs.items():
            sums[name] = sums.get(name, 0.0) + value
    watch.check(epoch)
    return {**epoch_means(sums, steps), "epoch_time": time.perf_counter() - start}


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""

    def __init__(self, epoch: int, step: int):
        super().__init__(
            f"the training loss became NaN or infinite at epoch {epoch}, step {step}; the run stopped "
            "there (a smaller learning rate, temperature or loss weight usually helps)"
        )


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training, with the epoch it stopped in; last.pt holds the epochs before."""

    def __init__(self, epoch: int, max_epochs: int):
        super().__init__(f"in epoch {epoch} of {max_epochs} ({epoch - 1} saved)")


class NonFiniteWatch:
    """The first step of an epoch whose loss is not finite, found without waiting for the
    device at every step (one check at the end of the epoch)."""

    NONE = 2**62

    def __init__(self) -> None:
        self.first: torch.Tensor | None = None

    def update(self, loss: torch.Tensor, step: int) -> None:
        candidate = torch.where(torch.isfinite(loss.detach()), self.NONE, step)
        self.first = candidate if self.first is None else torch.minimum(self.first, candidate)

    def check(self, epoch: int) -> None:
        if self.first is not None and (step := int(self.first)) < self.NONE:
            raise TrainingDiverged(epoch, step + 1)


def epoch_means(sums: dict[str, torch.Tensor | float], steps: int) -> dict[str, float]:
    """train_<name>: the epoch's mean of each summed term, over all ranks under torchrun."""
    if not sums:
        return {}
    means = distributed.mean_over_ranks(
        torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in sums.values()]) / steps
    )
    return {f"train_{name}": float(value) for name, value in zip(sums, means, strict=True)}


def train_epochs(
    folder: RunFolder,
    *,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    max_epochs: int,
    train_epoch: Callable[[int], dict[str, float]],
    evaluate: Callable[[int], dict[str, float]],
    monitor: str,
    generators: dict[str, torch.Generator] | None = None,
    extra: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """The epoch loop: train, evaluate, log, checkpoint. Resumes from last.pt when present;
    random states (global and the task's own `generators`) are restored with the weights, so
    a resumed run reproduces the uninterrupted one."""
    generators = generators or {}
    history: list[dict[str, Any]] = []
    start = 1
    ckpt = folder.load_last()
    if ckpt is not None:
        for name, module in modules.items():
            module.load_state_dict(ckpt["modules"][name])
        for name, opt in optimizers.items():
            opt.load_state_dict(ckpt["optimizers"][name])
        restore_random_states(ckpt["rng"], generators)
        history, start = ckpt["history"], ckpt["epoch"] + 1
        if distributed.is_main():
            log.info(f"resuming {folder.dir} from epoch {ckpt['epoch']}")
    best = max((row[monitor] for row in history), default=-math.inf)
    for epoch in range(start, max_epochs + 1):
        try:
            trained = train_epoch(epoch)
        except TrainingDiverged as err:
            folder.write_metrics({"history": history, "error": str(err)}, status="diverged")
            raise
        except KeyboardInterrupt:
            raise Interrupted(epoch, max_epochs) from None
        row = {"epoch": epoch, **trained, **evaluate(epoch)}
        history.append(row)
        log.info(describe_epoch(row, max_epochs))
        folder.log_scalars(row, epoch)
        payload = checkpoint_payload(folder.config, modules, optimizers, generators, epoch, history, extra)
        if row[monitor] > best:
            best = row[monitor]
            save_torch(folder.best_path, payload)
        save_torch(folder.last_path, payload)
        folder.write_metrics({"history": history}, status="running")
        distributed.barrier()  # no rank reads last.pt before rank 0 has written it
    return history


def stability(values: list[float], last: int = 5) -> dict[str, float]:
    """Std over the last epochs and the largest drop between consecutive epochs."""
    tail = values[-last:]
    drops = [a - b for a, b in itertools.pairwise(values)]
    return {
        "std_last": float(np.std(tail)) if tail else 0.0,
        "max_drop": float(max([0.0, *drops])),
    }


def describe_epoch(row: dict[str, Any], max_epochs: int) -> str:
    """One line per epoch for the console and the run's log: its numbers, rounded."""
    numbers = (f"{k} {v:.4g}" for k, v in row.items() if k != "epoch" and isinstance(v, float))
    return f"epoch {row['epoch']}/{max_epochs}: " + "  ".join(numbers)
