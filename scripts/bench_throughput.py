"""Training throughput of the real `penrun task=train_teacher` (MNIST, LeNet-5) on one device,
eager and with `trainer.cuda_graphs=true`.

    PENRUN_DATA_DIR=../shared/data python scripts/bench_throughput.py --device cpu --threads 2
    python scripts/bench_throughput.py --device cuda --variants eager graphs

Each variant is one fresh run of 3 epochs at the trainer's defaults (batch 64, adam, cosine);
samples/s = training images / the epoch's training time (evaluation, checkpoints and start-up
excluded; the wall time says the rest), for the median of epochs 2 and 3 (epoch 1 includes warm-up).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import describe_machine

MNIST_TRAIN = 60000


def run(device: str, graphs: bool, threads: int | None, epochs: int) -> dict:
    args = [
        "task=train_teacher",
        "data=mnist",
        "net@teacher=lenet5",
        f"trainer.max_epochs={epochs}",
        "trainer.progress=false",
        f"trainer.device={device}",
        f"trainer.cuda_graphs={str(graphs).lower()}",
        "hydra.run.dir=run",
    ]
    if threads:
        args.append(f"trainer.num_threads={threads}")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "penrun", *args], cwd=tmp, check=True, capture_output=True)
        wall = time.perf_counter() - start
        metrics = json.loads((Path(tmp) / "run" / "metrics.json").read_text())
    images = MNIST_TRAIN - metrics["val_size"]
    epoch_time = statistics.median(row["epoch_time"] for row in metrics["history"][1:])
    return {"rate": images / epoch_time, "epoch": epoch_time, "wall": wall, "test_acc": metrics["test_acc"]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variants", nargs="+", default=["eager"], choices=["eager", "graphs"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    print(describe_machine("cuda" if args.device.startswith("cuda") else "cpu"))
    print("| device | variant | samples/s | epoch (s) | wall (s) | test_acc |")
    print("|---|---|---|---|---|---|")
    for variant in args.variants:
        r = run(args.device, variant == "graphs", args.threads, args.epochs)
        print(
            f"| {args.device} | {variant} | {r['rate']:.0f} | {r['epoch']:.2f} | {r['wall']:.1f} | {r['test_acc']:.4f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
