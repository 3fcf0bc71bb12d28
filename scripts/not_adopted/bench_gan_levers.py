"""Levers on the MNIST GAN step, the generation table's longest job, on the CPU: the step as
task=gan takes it (D frozen while G's loss is built), with D's weight gradients built and
discarded (the step before 2026-11-27), with channels-last tensors, and under bf16 autocast.

    python scripts/not_adopted/bench_gan_levers.py --threads 1 --batch-size 64 --rounds 3

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
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from penrun.app.tasks.gan import frozen
from penrun.models.generative import Generator, ProjectionDiscriminator, hinge_d_loss, hinge_g_loss

# The helpers shared by the scripts one folder up.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machine import add_allocator_option, describe_machine, set_allocator
from timing import interleaved, per_step

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
    times = interleaved(
        {name: partial(per_step, step, args.steps) for name, step in steps.items()}, args.rounds
    )
    fastest = {name: min(rounds) for name, rounds in times.items()}
    reference = fastest[next(iter(fastest))]
    print(f"# {describe_machine(torch.device('cpu'))}; batch {args.batch_size}, {args.threads} thread(s)")
    print("| variant | ms/step (fastest round) | all rounds | against the task's step |\n|---|---|---|---|")
    for name, rounds in times.items():
        all_rounds = ", ".join(f"{1000 * t:.1f}" for t in rounds)
        print(f"| {name} | {1000 * fastest[name]:.1f} | {all_rounds} | {reference / fastest[name]:.2f}x |")


if __name__ == "__main__":
    main()
