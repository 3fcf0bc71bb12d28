"""torch.compile against penrun's eager step: LeNet-5 (penrun's network) trained with Adam on
MNIST batches, eager, with the network compiled, and with the whole step (forward, backward,
Adam) compiled.

    PENRUN_DATA_DIR=../shared/data python scripts/bench_compile.py --threads 2
    python scripts/bench_compile.py --device cuda

Every variant starts from the same weights; the first step's loss is checked to agree before
timing. "compile" is the wall time of the first step (tracing and code generation); the step
times are the median of 3 rounds of `--steps` steps after 10 warm-up steps.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from penrun.models import build_classifier
from penrun.train.loop import eager_step

from machine import describe_machine, mnist_images

SPEC = dict(arch="lenet5", channels=1, image_size=28, num_classes=10, penultimate_dim=64, head="cosine")


def variant(name: str, device: torch.device):
    """A fresh network (seed 0), its optimizer and a step function of (x, y) -> loss."""
    torch.manual_seed(0)
    net = build_classifier(**SPEC).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    model = torch.compile(net) if name == "compiled network" else net

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return eager_step(optimizer, lambda a, b: (F.cross_entropy(model(a), b), {}), x, y)[0]

    return torch.compile(step) if name == "compiled step" else step


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(describe_machine(device))
    images, labels = mnist_images(device)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, len(labels), (args.batch,), generator=g) for _ in range(args.steps + 10)]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    rows, first_losses = {}, {}
    for name in ("eager", "compiled network", "compiled step"):
        step = variant(name, device)
        start = time.perf_counter()
        first_losses[name] = float(step(images[batches[0]], labels[batches[0]]).detach())
        sync()
        compile_time = time.perf_counter() - start
        for idx in batches[1:10]:
            step(images[idx], labels[idx])
        times = []
        for _ in range(3):
            sync()
            start = time.perf_counter()
            for idx in batches[10:]:
                step(images[idx], labels[idx])
            sync()
            times.append((time.perf_counter() - start) / args.steps)
        rows[name] = (compile_time, statistics.median(times))
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
