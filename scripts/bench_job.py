"""Where one penrun job's time goes: the job runs in this process under cProfile and its
wall time is split into training steps, evaluation, frozen-teacher passes, data loading,
file writes and the rest (start-up: imports, Hydra, the first optimizer's lazy imports).

    PENRUN_DATA_DIR=../shared/data python scripts/bench_job.py --out /tmp/bench \
        -- task=distill pair=mnist_usps method=ce_kd distill.labels=50 trainer.batch_size=32

The job's folder goes under --out (a fresh job each time: pass a new --out or delete it).
Run it with PYTHONPATH pointing at another checkout's src/ to profile that code side by side.
The split uses cumulative times of named functions, so it holds for any penrun version that
keeps these names; cProfile itself slows Python-heavy parts, so the unprofiled wall time of
the shares matter more than the absolute seconds.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time

from machine import describe_machine

# Cumulative times of named functions, which do not nest within one category. Evaluation is
# `predict` (and a generative model's samples and metrics) less the frozen teacher's passes that
# use it; training steps are the epochs' steps less the teacher's forward passes inside them
# (before they were computed once per run).
CATEGORIES = {
    "training steps": [("train/loop.py", "run_epoch")],
    "evaluation": [
        ("train/evaluation.py", "predict"),
        ("app/generation.py", "sample_images"),
        ("core/metrics.py", "generation_metrics"),
    ],
    "teacher passes": [
        ("core/losses.py", "teacher_features"),
        ("app/tasks/distill.py", "teacher_outputs"),
        ("app/generation.py", "training_conditions"),
    ],
    "data loading": [
        ("app/config.py", "load_data"),
        ("data/transforms.py", "convert_images"),
        ("data/transforms.py", "shift_images"),
    ],
    "file writes": [
        ("train/files.py", "save_torch"),
        ("train/run_folder.py", "write_metrics"),
        ("train/run_folder.py", "log_scalars"),
        ("train/files.py", "save_image_grid"),
    ],
}
CORRECTIONS = {
    "training steps": [("core/losses.py", "teacher_features")],
    "evaluation": [
        ("app/tasks/distill.py", "teacher_outputs"),
        ("app/generation.py", "training_conditions"),
    ],
}


def cumulative(stats: pstats.Stats, suffix: str, name: str) -> float:
    return sum(
        entry[3]
        for (path, _, func), entry in stats.stats.items()  # entry[3]: cumulative seconds
        if func == name and path.replace("\\", "/").endswith(suffix)
    )


def split(stats: pstats.Stats) -> dict[str, float]:
    seconds = {c: sum(cumulative(stats, *f) for f in fs) for c, fs in CATEGORIES.items()}
    for category, inner in CORRECTIONS.items():
        seconds[category] -= sum(cumulative(stats, *f) for f in inner)
    return seconds


def run_job(overrides: list[str]) -> float:
    from penrun.app.cli import main

    sys.argv = ["penrun", *overrides]
    start = time.perf_counter()
    main()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="paths.output_dir of the profiled job")
    parser.add_argument("overrides", nargs="*", help="penrun overrides of the job")
    args = parser.parse_args()
    print(describe_machine())
    overrides = [*args.overrides, f"paths.output_dir={args.out}", "trainer.progress=false"]
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.runcall(run_job, overrides)
    wall = time.perf_counter() - start
    stats = pstats.Stats(profiler)
    print(f"\njob: penrun {' '.join(args.overrides)}\nwall time under cProfile: {wall:.2f} s")
    parts = split(stats)
    for category, seconds in parts.items():
        print(f"  {category:16s} {seconds:7.2f} s  {100 * seconds / wall:5.1f} %")
    rest = wall - sum(parts.values())
    print(f"  {'start-up, rest':16s} {rest:7.2f} s  {100 * rest / wall:5.1f} %")


if __name__ == "__main__":
    main()
