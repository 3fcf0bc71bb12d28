"""The epoch loop: batches on a device, optimizer steps, evaluation, checkpoints, resume."""

from __future__ import annotations

import itertools
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from penrun.data import ImageData, epoch_batches, normalize, num_batches
from penrun.errors import InputError
from penrun.train import distributed
from penrun.train.checkpoint import checkpoint_payload, restore_random_states
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


def network_input(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Images on `device` as a network takes them: uint8 normalized to float, float as given.
    Tasks convert their image sets once per run, so that no step or evaluation converts or
    copies the same images again (slicing a converted set returns the same numbers)."""
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
    for idx in epoch_batches(
        len(y), batch_size, shuffle=shuffle, seed=seed, epoch=epoch, drop_last=drop_last
    ):
        idx = distributed.shard(idx)
        yield network_input(x[idx], device), y[idx].to(device, non_blocking=True)


StepFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def optimize_epoch(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    optimizer: torch.optim.Optimizer,
    loss_fn: StepFn,
    settings: TrainerSettings,
    epoch: int,
) -> dict[str, float]:
    """One epoch of optimizer steps with a per-step learning-rate schedule; returns the mean
    of the loss and of every logged term as train_<name>, and the epoch's wall time."""
    start, sums, watch = time.perf_counter(), {}, NonFiniteWatch()
    bar = progress(
        batches, total=steps, desc=f"epoch {epoch}/{settings.max_epochs}", enabled=settings.progress
    )
    shown = not getattr(bar, "disable", True)  # reading the loss waits for the device: only for a bar
    with ExitStack() as stack:
        if settings.cuda_graphs:
            stack.enter_context(capturable(optimizer, settings.device))
            step_fn: StepFn = GraphedStep(optimizer, loss_fn)
        else:
            step_fn = partial(eager_step, optimizer, loss_fn)
        for step, (x, y) in enumerate(bar):
            position = (epoch - 1 + step / steps) / settings.max_epochs
            set_lr(optimizer, settings.lr * lr_factor(settings.schedule, position))
            loss, logs = step_fn(x, y)
            watch.update(loss, step)
            if shown and step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.4g}", refresh=False)
            for name, value in {"loss": loss.detach(), **logs}.items():
                sums[name] = sums.get(name, 0.0) + value
    watch.check(epoch)
    return {**epoch_means(sums, steps), "epoch_time": time.perf_counter() - start}


def eager_step(
    optimizer: torch.optim.Optimizer, loss_fn: StepFn, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss, logs = loss_fn(x, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss, logs


class GraphedStep:
    """Optimizer steps (forward, backward, update) replayed from one CUDA graph per epoch
    (`trainer.cuda_graphs`): a small network's step is a hundred tiny kernels, which Python
    launches one by one far slower than the GPU runs them; a replay launches them at once.
    The first WARMUP steps run eagerly on a side stream (lazy initialization must not happen
    during capture); a batch of another shape (the epoch's last, partial one) runs eagerly."""

    WARMUP = 3

    def __init__(self, optimizer: torch.optim.Optimizer, loss_fn: StepFn):
        self.optimizer, self.loss_fn = optimizer, loss_fn
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager_steps = 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.graph is not None and x.shape == self.static_x.shape and y.shape == self.static_y.shape:
            self.static_x.copy_(x)
            self.static_y.copy_(y)
            self.graph.replay()
            return self.outputs
        if self.graph is None and self.eager_steps >= self.WARMUP:
            return self.capture(x, y)
        self.graph = None  # a partial batch ends the epoch's replays
        self.eager_steps += 1
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            outputs = eager_step(self.optimizer, self.loss_fn, x, y)
        torch.cuda.current_stream().wait_stream(side)
        return outputs

    def capture(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.static_x, self.static_y = x.clone(), y.clone()
        self.optimizer.zero_grad(set_to_none=True)  # the graph allocates (and owns) the gradients
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            loss, logs = self.loss_fn(self.static_x, self.static_y)
            loss.backward()
            self.optimizer.step()
        self.outputs = (loss, logs)
        self.graph.replay()  # capturing records the step without running it
        return self.outputs


@contextmanager
def capturable(optimizer: torch.optim.Optimizer, device: torch.device) -> Iterator[None]:
    """Adam(W) in its capturable form for one epoch: the learning rate a device tensor that the
    schedule fills in place, step counters on the device. Restored afterwards, so that
    checkpoints hold the ordinary form and resume anywhere."""
    for group in optimizer.param_groups:
        group["capturable"], group["lr"] = True, torch.tensor(float(group["lr"]), device=device)
    for state in optimizer.state.values():
        if "step" in state:
            state["step"] = state["step"].to(device, torch.float32)
    try:
        yield
    finally:
        for group in optimizer.param_groups:
            group["capturable"], group["lr"] = False, float(group["lr"])


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
    for idx in epoch_batches(len(local), batch_size, shuffle=False):
        h = model.features(network_input(local[idx], device))
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
