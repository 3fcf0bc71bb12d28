"""trainer.precision (32 | bf16) and trainer.channels_last side by side: ResNet-20 training steps
per second on CIFAR-10 images, as classifier training takes them (`optimize_epoch`: Adam,
cross-entropy, batches sliced from the converted training images), the four variants measured
in interleaved rounds (the load of a shared machine hits them alike); the medians are printed.
With --evaluation: float32 evaluation (`predict`, as every epoch's scoring takes it) of ResNet-20
and ResNet-8 in images per second, by evaluation batch size and layout.

    python scripts/bench_precision.py --threads 1 --batch 64 --steps 2 --rounds 4
    python scripts/bench_precision.py --threads 1 --evaluation --images 2048 --rounds 3

Images: the offline CIFAR-10 subset (or full CIFAR-10) from $PENRUN_DATA_DIR. Each variant is
warmed up first (oneDNN builds its kernels on the first steps of a shape and layout).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from penrun.data import load_dataset
from penrun.models import build_classifier
from penrun.train.evaluation import predict
from penrun.train.loop import TrainerSettings, device_batches, network_input, on_device, optimize_epoch
from penrun.train.optim import build_optimizer
from penrun.train.seeding import seed_everything

from machine import describe_machine, start, step_options
from timing import interleaved, medians, timed

RESNET20 = dict(arch="resnet20", channels=3, image_size=32, num_classes=10, penultimate_dim=64)
VARIANTS = {
    "32": dict(precision="32", channels_last=False),
    "32 channels_last": dict(precision="32", channels_last=True),
    "bf16": dict(precision="bf16", channels_last=False),
    "bf16 channels_last": dict(precision="bf16", channels_last=True),
}


def seconds_per_step(
    settings: TrainerSettings, images: torch.Tensor, labels: torch.Tensor, steps: int
) -> Callable[[], float]:
    """A measurement of one variant: `steps` optimizer steps of a ResNet-20 from seed 0."""
    seed_everything(0)
    model = on_device(build_classifier(**RESNET20), settings)
    optimizer = build_optimizer("adam", model.parameters(), settings.lr, settings.weight_decay)
    epoch = itertools.count(1)

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return F.cross_entropy(model(x), y), {}

    def measure() -> float:
        batches = device_batches(
            images, labels, settings.batch_size, settings.device, shuffle=True, seed=0, epoch=next(epoch)
        )
        run = itertools.islice(batches, steps)
        _, seconds = timed(
            lambda: optimize_epoch(run, steps, optimizer, loss_fn, settings, 1), settings.device
        )
        return seconds / steps

    measure()  # warm-up
    return measure


def seconds_per_image(
    arch: str, channels_last: bool, batch: int, images: torch.Tensor
) -> Callable[[], float]:
    """A measurement of float32 evaluation: seconds per image of `predict` over `images`."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = build_classifier(**(RESNET20 | {"arch": arch})).to(images.device, memory_format=layout)

    def measure() -> float:
        return timed(lambda: predict(model, images, batch, images.device), images.device)[1] / len(images)

    measure()  # warm-up
    return measure


def evaluation(images: torch.Tensor, rounds: int) -> None:
    measures = {
        (arch, batch, layout): seconds_per_image(arch, layout == "channels_last", batch, images)
        for arch in ("resnet20", "resnet8")
        for batch in (256, 1024)
        for layout in ("contiguous", "channels_last")
    }
    times = medians(interleaved(measures, rounds))
    print(f"float32 evaluation of {len(images)} images, {rounds} interleaved rounds")
    print("| network | eval batch | layout | images/s (median) | x batch 1024 contiguous |")
    print("|---|---|---|---|---|")
    for (arch, batch, layout), seconds in times.items():
        base = times[(arch, 1024, "contiguous")]
        print(f"| {arch} | {batch} | {layout} | {1 / seconds:.0f} | {base / seconds:.2f} |")


def main() -> None:
    parser = step_options(__doc__, steps=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--evaluation", action="store_true", help="evaluation speed instead of training")
    parser.add_argument("--images", type=int, default=2048, help="images per evaluation round")
    args = parser.parse_args()
    device = start(args)
    print(describe_machine(device))
    data = load_dataset("cifar10", data_dir=os.environ.get("PENRUN_DATA_DIR"), download=False)
    images = network_input(data.x_train, device)
    if args.evaluation:
        evaluation(images[: args.images], args.rounds)
        return
    common = dict(
        max_epochs=1,
        batch_size=args.batch,
        eval_batch_size=1024,
        lr=1e-3,
        optimizer="adam",
        weight_decay=5e-4,
        schedule="cosine",
        device=device,
        num_threads=args.threads,
        progress=False,
    )
    measures = {
        name: seconds_per_step(TrainerSettings(**common, **variant), images, data.y_train, args.steps)
        for name, variant in VARIANTS.items()
    }
    times = interleaved(measures, args.rounds)
    base = medians(times)["32"]
    print(
        f"ResNet-20, batch {args.batch}, {args.steps} steps x {args.rounds} interleaved rounds ({data.name})"
    )
    print("| variant | steps/s (median) | x 32 | seconds per step, each round |")
    print("|---|---|---|---|")
    for name, median in medians(times).items():
        rounds = ", ".join(f"{t:.2f}" for t in times[name])
        print(f"| {name} | {1 / median:.3g} | {base / median:.2f} | {rounds} |")


if __name__ == "__main__":
    main()
