"""Training the seeds of one sweep cell together: S LeNet-5 classifiers (penrun's network, one
per seed) stepped one after another, against the same S networks stacked and stepped as one
vectorized model (torch.func.stack_module_state + functional_call + vmap, one Adam over the
stacked parameters), each seed on its own batches of MNIST.

    PENRUN_DATA_DIR=../shared/data python scripts/not_adopted/bench_vmap.py --seeds 5 --steps 100 --threads 2

Both paths compute the same per-seed losses at the first step (checked before timing); the
times are the median of 3 rounds of `--steps` optimizer steps after 5 warm-up steps.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state

from penrun.models import build_classifier
from penrun.train.loop import eager_step

# The helpers shared by the scripts one folder up.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machine import LENET5, describe_machine, mnist_images, start, step_options
from timing import interleaved, medians, timed


def networks(seeds: int, device: torch.device) -> list[torch.nn.Module]:
    nets = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        nets.append(build_classifier(**LENET5).to(device))
    return nets


def sequential_step(nets, optimizers, xs, ys) -> torch.Tensor:
    """penrun's own eager step (train/loop.py), once per seed."""
    losses = [
        eager_step(opt, lambda x, y, net=net: (F.cross_entropy(net(x), y), {}), x, y)[0].detach()
        for net, opt, x, y in zip(nets, optimizers, xs, ys, strict=True)
    ]
    return torch.stack(losses)


class Stacked:
    """S networks as one: parameters and buffers stacked along a leading seed dimension."""

    def __init__(self, nets: list[torch.nn.Module]):
        self.params, self.buffers = stack_module_state(nets)
        self.base = copy.deepcopy(nets[0]).to("meta")
        self.optimizer = torch.optim.Adam(self.params.values(), lr=1e-3)

    def losses(self, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        def one(params, buffers, x, y):
            return F.cross_entropy(functional_call(self.base, (params, buffers), (x,)), y)

        return torch.vmap(one)(self.params, self.buffers, xs, ys)

    def step(self, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        losses = self.losses(xs, ys)
        self.optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()  # the seeds' parameters are disjoint: each gets its own gradient
        self.optimizer.step()
        return losses.detach()


def main() -> None:
    parser = step_options(__doc__, steps=100)
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    device = start(args)
    print(describe_machine(device))
    images, labels = mnist_images(device)
    g = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, len(labels), (args.seeds, args.batch), generator=g) for _ in range(args.steps + 5)
    ]

    nets = networks(args.seeds, device)
    stacked = Stacked(nets)
    xs, ys = images[batches[0]], labels[batches[0]]
    with torch.no_grad():
        reference = torch.stack([F.cross_entropy(n(x), y) for n, x, y in zip(nets, xs, ys, strict=True)])
        assert torch.allclose(stacked.losses(xs, ys), reference, rtol=1e-4), "vmap disagrees"
    optimizers = [torch.optim.Adam(n.parameters(), lr=1e-3) for n in nets]

    def seconds(step) -> float:
        """Seconds of the timed steps, after 5 warm-up steps."""
        for idx in batches[:5]:
            step(images[idx], labels[idx])
        return timed(lambda: [step(images[idx], labels[idx]) for idx in batches[5:]], device)[1]

    rows = interleaved(
        {
            "one after another": lambda: seconds(lambda x, y: sequential_step(nets, optimizers, x, y)),
            "vmap (stacked)": lambda: seconds(stacked.step),
        },
        rounds=3,
    )
    samples = args.seeds * args.batch * args.steps
    median = medians(rows)
    print(f"{args.seeds} seeds x batch {args.batch}, {args.steps} steps, {args.threads} threads")
    print("| path | s per step (all seeds) | samples/s | vs one after another |")
    print("|---|---|---|---|")
    for name, t in median.items():
        print(
            f"| {name} | {t / args.steps * 1e3:.1f} ms | {samples / t:.0f} | "
            f"{median['one after another'] / t:.2f}x |"
        )


if __name__ == "__main__":
    main()
