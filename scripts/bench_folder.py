"""Images per second of an image folder's batches (data=folder): held in memory against streamed
from disk by 0, 1 and 2 DataLoader workers, at each image size, side by side in one run.

    python scripts/bench_folder.py --images 512 --sizes 32 224 --workers 0 1 2

A folder of `--images` JPEG photographs-alike (smooth colour fields with fine noise, 256x320,
quality 90) is generated once. For each size, one epoch of shuffled batches is read as a
training loop reads them (data.batches.read_batches, then penrun's normalization to float):
from the split held in memory (decoded once beforehand; the one-off decode is timed apart) and
streamed (decoded per batch, every epoch). Every streamed batch is checked equal to the
in-memory one.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from penrun.data import epoch_batches, load_folder, normalize, read_batches

from machine import describe_machine


def make_folder(root: Path, count: int, height: int = 256, width: int = 320, test_every: int = 8) -> Path:
    """root/train/<class>/ and root/test/<class>/ (every `test_every`-th image) of two classes,
    JPEG; reused when present."""
    if (root / "done").exists():
        return root
    rng = np.random.default_rng(0)
    grain = rng.integers(-8, 9, (2 * height, 2 * width, 3), dtype=np.int16)  # fine noise, shifted per image
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
        top, left = rng.integers(0, height), rng.integers(0, width)
        pixels = (smooth + grain[top : top + height, left : left + width]).clip(0, 255).astype(np.uint8)
        split = "test" if i % test_every == 0 else "train"
        folder = root / split / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)
    (root / "done").touch()
    return root


def epoch_rate(images, reference: torch.Tensor, batch_size: int) -> float:
    """Images per second of one shuffled epoch read and normalized; each batch checked equal to
    `reference` (the in-memory images)."""
    order = list(epoch_batches(len(reference), batch_size, shuffle=True, seed=0, epoch=1))
    start = time.perf_counter()
    for idx, x in read_batches(images, order):
        normalize(x)
        if images is not reference and not torch.equal(x, reference[idx]):
            raise AssertionError("a streamed batch differs from the in-memory one")
    return len(reference) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "penrun_bench_folder")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads of this process (trainer.num_threads)"
    )
    parser.add_argument(
        "--make-only",
        nargs=3,
        type=int,
        metavar=("HEIGHT", "WIDTH", "TEST_EVERY"),
        help="only write a folder of --images JPEGs of this size (every TEST_EVERY-th a test image) "
        "into --folder, e.g. a large one to stream (BENCHMARKS.md: peak memory)",
    )
    args = parser.parse_args()

    if args.make_only:
        make_folder(args.folder, args.images, *args.make_only)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    print(describe_machine())
    root = make_folder(args.folder / str(args.images), args.images)
    print(f"folder {root}: {args.images} JPEG images of 256x320, batch {args.batch_size}")
    print(
        "| size | in memory (one-off decode) | "
        + " | ".join(f"streamed, {w} workers" for w in args.workers)
        + " |"
    )
    print("|---" * (2 + len(args.workers)) + "|")
    for size in args.sizes:
        start = time.perf_counter()
        held = load_folder(root, image_size=size, channels=3, in_memory=True, workers=max(args.workers))
        load_seconds = time.perf_counter() - start  # includes the check that every file decodes
        cells = [
            f"{epoch_rate(held.x_train, held.x_train, args.batch_size):,.0f} img/s ({load_seconds:.1f} s)"
        ]
        for workers in args.workers:
            streamed = load_folder(root, image_size=size, channels=3, in_memory=False, workers=workers)
            cells.append(f"{epoch_rate(streamed.x_train, held.x_train, args.batch_size):,.0f} img/s")
        print(f"| {size} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
