"""Per-step cost of distillation with synthetic activations against kd alone, side by side.

    python scripts/bench_distill.py --steps 200

A LeNet-5 teacher (cosine head, d = 64) and a half-width student on USPS images at 28x28
(the MNIST -> USPS setting), batch 64. Each loss setting runs the same number of optimizer
steps; the settings are interleaved over several rounds so that machine noise hits them alike,
and the median step time of each is compared with kd's. Weights are untrained: the cost of a
step does not depend on them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from penrun.core.losses import LOSSES, DistillBatch, DistillSetup, class_similarity, total_loss
from penrun.core.penultimate import PenultimateModel
from penrun.data import load_dataset, normalize
from penrun.models import build_classifier

from machine import describe_machine

SETTINGS = {
    "kd": {"kd": 1.0},
    "kd + synthetic_targets": {"kd": 1.0, "synthetic_targets": 1.0},
    "kd + synthetic_head": {"kd": 1.0, "synthetic_head": 1.0},
    "synthetic_targets": {"synthetic_targets": 1.0},
}


def time_steps(
    weights: dict[str, float],
    shared: DistillSetup,
    student,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    batch: int,
) -> float:
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    full = {name: weights.get(name, 0.0) for name in LOSSES}
    start = time.perf_counter()
    for step in range(steps):
        i = (step * batch) % (len(x) - batch)
        loss, _ = total_loss(
            DistillBatch(shared, student, normalize(x[i : i + batch]), y[i : i + batch]), full
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    data = load_dataset("usps", data_dir=os.environ.get("PENRUN_DATA_DIR"), image_size=28)
    x, y = data.x_train.to(device), data.y_train.to(device)
    spec = dict(channels=1, image_size=28, num_classes=10, penultimate_dim=64)
    teacher = build_classifier("lenet5", **spec).to(device).eval()
    student = build_classifier("lenet5", width=0.5, **spec).to(device)
    model = PenultimateModel.from_classifier(teacher)
    generator = torch.Generator(device).manual_seed(0)
    shared = DistillSetup(
        teacher,
        model,
        4.0,
        class_similarity(teacher.head.effective_weight().detach()),
        1.0,
        0.0,
        args.batch_size,
        generator,
    )
    times: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for _ in range(args.rounds):
        for name, weights in SETTINGS.items():
            times[name].append(time_steps(weights, shared, student, x, y, args.steps, args.batch_size))
    print(f"{describe_machine(device)} | batch {args.batch_size}")
    base = statistics.median(times["kd"])
    print("| losses | ms per step (median of rounds) | vs kd |\n|---|---|---|")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"| {name} | {1000 * med:.2f} | {100 * (med / base - 1):+.1f} % |")


if __name__ == "__main__":
    main()
