"""torch.compile against penrun's eager step: LeNet-5 (penrun's network) trained with Adam on
MNIST batches, eager, with the network compiled, and with the whole step (forward, backward,
Adam) compiled.

    PENRUN_DATA_DIR=../shared/data python scripts/not_adopted/bench_compile.py --threads 2
    python scripts/not_adopted/bench_compile.py --device cuda

Every variant starts from the same weights; the first step's loss is checked to agree before
timing. "compile" is the wall time of the first step (tracing and code generation); the step
times are the median of 3 rounds of `--steps` steps after 10 warm-up steps.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from penrun.models import build_classifier
from penrun.train.loop import eager_step

# The helpers shared by the scripts one folder up.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machine import LENET5, describe_machine, mnist_images, start, step_options
from timing import timed


def variant(name: str, device: torch.device):
    """A fresh network (seed 0), its optimizer and a step function of (x, y) -> loss."""
    torch.manual_seed(0)
    net = build_classifier(**LENET5).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    model = torch.compile(net) if name == "compiled network" else net

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return eager_step(optimizer, lambda a, b: (F.cross_entropy(model(a), b), {}), x, y)[0]

    return torch.compile(step) if name == "compiled step" else step


def main() -> None:
    args = step_options(__doc__, steps=200).parse_args()
    device = start(args)
    print(describe_machine(device))
    images, labels = mnist_images(device)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, len(labels), (args.batch,), generator=g) for _ in range(args.steps + 10)]

    def steps(step: Callable, chosen: list[torch.Tensor]) -> None:
        for idx in chosen:
            step(images[idx], labels[idx])

    rows, first_losses = {}, {}
    for name in ("eager", "compiled network", "compiled step"):
        step = variant(name, device)
        first, compile_time = timed(partial(step, images[batches[0]], labels[batches[0]]), device)
        first_losses[name] = float(first.detach())
        steps(step, batches[1:10])
        rounds = [timed(partial(steps, step, batches[10:]), device)[1] / args.steps for _ in range(3)]
        rows[name] = (compile_time, statistics.median(rounds))
    reference = first_losses["eager"]
    assert all(abs(v - reference) < 1e-4 * max(1, abs(reference)) for v in first_losses.values()), (
        first_losses
    )

    print(f"LeNet-5, batch {args.batch}, Adam, {args.steps} steps x 3 rounds, {args.threads} threads")
    print("| variant | first step (compile) | ms per step | samples/s | vs eager |")
    print("|---|---|---|---|---|")
    base = rows["eager"][1]
    for name, (compile_time, t) in rows.items():
        print(f"| {name} | {compile_time:.1f} s | {t * 1e3:.2f} | {args.batch / t:.0f} | {base / t:.2f}x |")


if __name__ == "__main__":
    main()
