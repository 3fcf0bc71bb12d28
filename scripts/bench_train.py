"""penrun's training epoch against a bare PyTorch loop over the same model, data, batch size
and threads, measured side by side in one process.

    python scripts/bench_train.py --data mnist --arch lenet5 --epochs 2

Both paths are warmed up first on a small subset (lazy imports are start-up, not epoch time).
The bare loop is the fastest plain loop we could write: data pre-normalized to float once,
a random permutation per epoch, forward/backward/step, then a test pass. penrun's loop also
converts uint8 batches on the fly, evaluates, writes checkpoints, metrics.json and TensorBoard
every epoch; the one-off activation statistics after training are timed separately.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from penrun.data import load_dataset, normalize, subset
from penrun.models import build_classifier
from penrun.train.classifier import record_statistics, train_cross_entropy
from penrun.train.loop import TrainerSettings
from penrun.train.run_folder import RunFolder
from penrun.train.seeding import seed_everything

from machine import add_allocator_option, describe_machine, set_allocator


def bare_loop(spec: dict, data, settings: TrainerSettings, epochs: int, seed: int) -> float:
    seed_everything(seed)
    model = build_classifier(**spec)
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    x_train, x_test = normalize(data.x_train), normalize(data.x_test)
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x_train)).split(settings.batch_size):
            loss = F.cross_entropy(model(x_train[idx]), data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            correct = sum(
                (model(xb).argmax(1) == yb).sum().item()
                for xb, yb in zip(x_test.split(1024), data.y_test.split(1024), strict=True)
            )
    elapsed = time.perf_counter() - start
    print(f"bare loop: test_acc {correct / len(x_test):.4f}")
    return elapsed


def penrun_loop(spec: dict, data, settings: TrainerSettings, seed: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        run = RunFolder(tmp, {"bench": True})
        start = time.perf_counter()
        model, history = train_cross_entropy(run, spec, data, settings, seed)
        train_time = time.perf_counter() - start
        start = time.perf_counter()
        record_statistics(run, model, data, settings)
        stats_time = time.perf_counter() - start
    print(f"penrun: test_acc {history[-1]['test_acc']:.4f}")
    return train_time, stats_time


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="mnist")
    parser.add_argument("--data-dir", default=None, help="defaults to $PENRUN_DATA_DIR")
    parser.add_argument("--arch", default="lenet5")
    parser.add_argument("--penultimate-dim", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    add_allocator_option(parser)
    args = parser.parse_args()
    set_allocator(args)

    torch.set_num_threads(args.threads)
    data = load_dataset(args.data, data_dir=args.data_dir or os.environ.get("PENRUN_DATA_DIR"))
    spec = dict(
        arch=args.arch,
        channels=data.channels,
        image_size=data.image_size,
        num_classes=data.num_classes,
        penultimate_dim=args.penultimate_dim,
    )
    settings = TrainerSettings(
        max_epochs=args.epochs,
        batch_size=args.batch_size,
        eval_batch_size=1024,
        lr=1e-3,
        optimizer="adam",
        weight_decay=5e-4,
        schedule="constant",
        device=torch.device("cpu"),
        num_threads=args.threads,
        progress=False,
    )
    # Warm up both paths on a small subset: one-time lazy imports (optimizer, TensorBoard)
    # are process start-up, not epoch time.
    warm = subset(data, 512, 256)
    bare_loop(spec, warm, settings, 1, args.seed)
    penrun_loop(spec, warm, replace(settings, max_epochs=1), args.seed)
    # Interleave the two so that machine noise hits both alike.
    bare_first = bare_loop(spec, data, settings, args.epochs, args.seed)
    penrun_time, stats_time = penrun_loop(spec, data, settings, args.seed)
    bare_second = bare_loop(spec, data, settings, args.epochs, args.seed)
    bare = min(bare_first, bare_second)
    print(f"\n{describe_machine()} | {data.describe()}")
    print("| loop | seconds per epoch (train + test pass) |\n|---|---|")
    print(f"| bare PyTorch (best of 2) | {bare / args.epochs:.2f} |")
    print(f"| penrun (incl. checkpoints, metrics, TensorBoard) | {penrun_time / args.epochs:.2f} |")
    print(f"| penrun overhead | {100 * (penrun_time / bare - 1):+.1f} % |")
    print(f"| one-off activation statistics after training | {stats_time:.2f} s |")


if __name__ == "__main__":
    main()
