"""Per-step cost of distillation with synthetic activations against kd alone, side by side.

    python scripts/bench_distill.py --steps 200

A LeNet-5 teacher (cosine head, d = 64) and a half-width student on USPS images at 28x28
(the MNIST -> USPS setting), batch 64. Each loss setting runs the same number of optimizer
steps; the settings are interleaved over several rounds so that machine noise hits them alike,
and the median step time of each is compared with kd's. Weights are untrained: the cost of a
step does not depend on them.
"""

from __future__ import annotations

import os
from functools import partial

import torch

from penrun.core.losses import LOSSES, DistillBatch, DistillSetup, class_similarity, total_loss
from penrun.core.penultimate import PenultimateModel
from penrun.data import load_dataset, normalize
from penrun.models import build_classifier

from machine import describe_machine, start, step_options
from timing import interleaved, medians, per_step

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
    offsets = iter(range(0, steps * batch, batch))

    def step() -> None:
        i = next(offsets) % (len(x) - batch)
        loss, _ = total_loss(
            DistillBatch(shared, student, normalize(x[i : i + batch]), y[i : i + batch]), full
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return per_step(step, steps, x.device)


def main() -> None:
    parser = step_options(__doc__, steps=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    device = start(args)
    torch.manual_seed(0)
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
        args.batch,
        generator,
    )
    times = interleaved(
        {
            name: partial(time_steps, weights, shared, student, x, y, args.steps, args.batch)
            for name, weights in SETTINGS.items()
        },
        args.rounds,
    )
    print(f"{describe_machine(device)} | batch {args.batch}")
    median = medians(times)
    print("| losses | ms per step (median of rounds) | vs kd |\n|---|---|---|")
    for name, t in median.items():
        print(f"| {name} | {1000 * t:.2f} | {100 * (t / median['kd'] - 1):+.1f} % |")


if __name__ == "__main__":
    main()
