"""How penrun scales out: one train_teacher run on 1 and on N processes (torchrun), eager or
with CUDA graphs, and a sweep of 4 jobs one after another against Hydra's joblib launcher.
Every run is the real `penrun` command in a fresh folder; numbers come from its metrics.json
and the wall clock.

    PENRUN_DATA_DIR=../shared/data python scripts/bench_scaling.py ddp --procs 1 2
    python scripts/bench_scaling.py sweep --jobs 4
    python scripts/bench_scaling.py ddp --device cuda --procs 1 --epochs 3 --variants eager graphs

ddp: MNIST, LeNet-5, the trainer's defaults (batch 64, adam, cosine), `--epochs` epochs (1 by
default); samples/s = training images / the epoch's training time (rank 0's clock; evaluation,
checkpoints and start-up excluded, the wall time says the rest), for the median of the epochs
after the first when there are several (the first includes warm-up). "graphs" is
`trainer.cuda_graphs=true` (CUDA only). With P processes on the CPU each takes cores // P
threads, so every row uses the same cores.
sweep: 4 train_teacher jobs (MNIST, LeNet-5, one epoch, seeds 0-3); the sequential row gives each job
every core, the joblib rows give each of n_jobs parallel jobs cores // n_jobs threads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from machine import describe_machine
from timing import PENRUN, run_command


def bench_ddp(procs: list[int], device: str, cores: int, epochs: int, variants: list[str]) -> None:
    print("| processes | threads each | variant | samples/s | epoch (s) | wall (s) | test_acc |")
    print("|---|---|---|---|---|---|---|")
    base = None
    for p, variant in [(p, v) for p in procs for v in variants]:
        with tempfile.TemporaryDirectory() as tmp:
            args = [
                "task=train_teacher",
                "data=mnist",
                "net@teacher=lenet5",
                f"trainer.max_epochs={epochs}",
                "trainer.progress=false",
                f"trainer.device={device}",
                f"trainer.cuda_graphs={str(variant == 'graphs').lower()}",
                "hydra.run.dir=run",
            ]
            threads = max(1, cores // p)
            if device == "cpu":
                args.append(f"trainer.num_threads={threads}")
            launcher = (
                PENRUN
                if p == 1
                else [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--standalone",
                    f"--nproc_per_node={p}",
                    "-m",
                    "penrun",
                ]
            )
            wall = run_command([*launcher, *args], Path(tmp), {"OMP_NUM_THREADS": str(threads)})
            metrics = json.loads((Path(tmp) / "run" / "metrics.json").read_text())
            epoch = statistics.median(
                row["epoch_time"] for row in metrics["history"][1:] or metrics["history"]
            )
            # Training images per epoch (MNIST less the validation split): under torchrun the
            # global batches the run stepped on.
            images = 60000 - metrics.get("val_size", 0)
            rate = images // 64 * 64 / epoch if p > 1 else images / epoch
            base = base or rate
            print(
                f"| {p} | {threads} | {variant} | {rate:.0f} ({rate / base:.2f}x) | {epoch:.2f} | {wall:.1f} | "
                f"{metrics['test_acc']:.4f} |",
                flush=True,
            )


def bench_sweep(jobs: int, cores: int) -> None:
    seeds = ",".join(str(s) for s in range(jobs))
    common = [
        "-m",
        "task=train_teacher",
        "data=mnist",
        "net@teacher=lenet5",
        "trainer.max_epochs=1",
        "trainer.progress=false",
        f"seed={seeds}",
    ]
    rows = [("one after another (basic launcher)", [f"trainer.num_threads={cores}"], cores)]
    for n in sorted({2, jobs}):
        threads = max(1, cores // n)
        rows.append(
            (
                f"joblib, n_jobs={n}",
                ["launcher=joblib", f"hydra.launcher.n_jobs={n}", f"trainer.num_threads={threads}"],
                threads,
            )
        )
    print("| launcher | threads per job | wall (s) |")
    print("|---|---|---|")
    base = None
    for name, extra, threads in rows:
        with tempfile.TemporaryDirectory() as tmp:
            wall = run_command([*PENRUN, *common, *extra], Path(tmp), {"OMP_NUM_THREADS": str(threads)})
        base = base or wall
        print(f"| {name} | {threads} | {wall:.1f} ({base / wall:.2f}x) |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="what", required=True)
    ddp = sub.add_parser("ddp")
    ddp.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ddp.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ddp.add_argument("--epochs", type=int, default=1)
    ddp.add_argument("--variants", nargs="+", default=["eager"], choices=["eager", "graphs"])
    sweep = sub.add_parser("sweep")
    sweep.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    args = parser.parse_args()
    print(describe_machine("cuda" if getattr(args, "device", "cpu") == "cuda" else "cpu"))
    if args.what == "ddp":
        bench_ddp(args.procs, args.device, args.cores, args.epochs, args.variants)
    else:
        bench_sweep(args.jobs, args.cores)


if __name__ == "__main__":
    main()
