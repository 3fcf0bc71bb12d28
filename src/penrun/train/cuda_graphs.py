"""Optimizer steps replayed from a CUDA graph (`trainer.cuda_graphs`): a small network's step is a
hundred tiny kernels, which Python launches one by one far slower than the GPU runs them; a
replay launches them at once."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

# One optimizer step (or several) on a batch: its loss and logged terms, as device tensors.
Step = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class GraphedStep:
    """`step` (forward, backward, update) replayed from one CUDA graph per epoch. The first
    WARMUP steps run eagerly on a side stream (lazy initialization must not happen during
    capture); a batch of another shape (the epoch's last, partial one) runs eagerly. `step`
    sets the gradients to None before its backward pass: during capture that makes the graph
    allocate (and own) them, so every replay writes them afresh."""

    WARMUP = 3

    def __init__(self, step: Step):
        self.step = step
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
            outputs = self.step(x, y)
        torch.cuda.current_stream().wait_stream(side)
        return outputs

    def capture(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.static_x, self.static_y = x.clone(), y.clone()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = self.step(self.static_x, self.static_y)
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
