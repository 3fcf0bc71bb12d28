"""Levers on the MNIST GAN step, the generation table's longest job, on the CPU: the step as
task=gan takes it (D frozen while G's loss is built), with D's weight gradients built and
discarded (the step before 2026-11-27), with channels-last tensors, and under bf16 autocast.

    python scripts/bench_gan_levers.py --threads 1 --batch-size 64 --rounds 3

The networks and losses are penrun's (Generator, ProjectionDiscriminator, hinge losses, Adam with
the task's betas); the step is written out here so that each variant can change one thing.
Images are random in [-1, 1] (speed does not depend on them); conditions are unit vectors in
d = 32, the generation table's mlp teacher. Each variant runs in this process, in rounds that
alternate the variants, so that machine noise hits all alike; the table gives each variant's
fastest round.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from penrun.app.tasks.gan import frozen
from penrun.models.generative import Generator, ProjectionDiscriminator, hinge_d_loss, hinge_g_loss

from machine import add_allocator_option, describe_machine, set_allocator

Z_DIM, COND_DIM, WIDTH = 64, 32, 32
VARIANTS = {
    "task=gan's step (D frozen for G's loss)": dict(freeze=True),
    "D's weight gradients built and discarded (before)": dict(freeze=False),
    "channels-last tensors": dict(freeze=True, channels_last=True),
    "bf16 autocast (changes the numbers)": dict(freeze=True, autocast=True),
}


def make_step(batch: int, freeze: bool, channels_last: bool = False, autocast: bool = False) -> Callable:
    torch.manual_seed(0)
    gen, disc = Generator(1, 28, COND_DIM, Z_DIM, WIDTH), ProjectionDiscriminator(1, 28, COND_DIM, WIDTH)
    x = torch.rand(batch, 1, 28, 28) * 2 - 1
    if channels_last:
        gen, disc = gen.to(memory_format=torch.channels_last), disc.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    c = F.normalize(torch.randn(batch, COND_DIM), dim=1)
    opt_g, opt_d = (torch.optim.Adam(net.parameters(), 1e-3, betas=(0.5, 0.999)) for net in (gen, disc))
    precision = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
    no_d_weights = (lambda: frozen(disc)) if freeze else contextlib.nullcontext

    def step() -> None:
        with precision():
            fake = gen(torch.randn(batch, Z_DIM), c)
            d_loss = hinge_d_loss(disc(x, c), disc(fake.detach(), c))
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        with precision(), no_d_weights():
            g_loss = hinge_g_loss(disc(fake, c))
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()

    return step


def ms_per_step(step: Callable, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return 1000 * (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30, help="steps timed per round")
    parser.add_argument("--rounds", type=int, default=3)
    add_allocator_option(parser)
    args = parser.parse_args()
    set_allocator(args)
    torch.set_num_threads(args.threads)
    steps = {name: make_step(args.batch_size, **options) for name, options in VARIANTS.items()}
    for step in steps.values():  # warm-up: first calls allocate and pick kernels
        for _ in range(5):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            times[name].append(ms_per_step(step, args.steps))
    print(f"# {describe_machine(torch.device('cpu'))}; batch {args.batch_size}, {args.threads} thread(s)")
    print("| variant | ms/step (fastest round) | all rounds | against the task's step |\n|---|---|---|---|")
    reference = min(times[next(iter(times))])
    for name, rounds in times.items():
        print(
            f"| {name} | {min(rounds):.1f} | {', '.join(f'{t:.1f}' for t in rounds)} | "
            f"{reference / min(rounds):.2f}x |"
        )


if __name__ == "__main__":
    main()
