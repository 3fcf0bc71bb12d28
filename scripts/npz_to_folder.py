"""Write a dataset .npz (keys x_train, y_train, x_test, y_test) as an image folder: the layout a
researcher's own images come in, for trying `data=folder` without one of your own.

    python scripts/npz_to_folder.py $PENRUN_DATA_DIR/mnist.npz /tmp/mnist --per-class 100
    python scripts/npz_to_folder.py $PENRUN_DATA_DIR/usps.npz /tmp/usps --per-class 100 --flat

Labelled (default): DIR/train/<class>/ and DIR/test/<class>/, one PNG per image, the classes
named by --names (default: the label numbers). --flat: every image of both splits in DIR itself,
no labels (an unlabeled transfer set). --per-class keeps the first N images of each class per split.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def chosen(y: np.ndarray, per_class: int | None) -> np.ndarray:
    """The indices of the first `per_class` images of each class (every image when None)."""
    if per_class is None:
        return np.arange(len(y))
    return np.sort(np.concatenate([np.flatnonzero(y == c)[:per_class] for c in np.unique(y)]))


def write_split(x: np.ndarray, y: np.ndarray, folder: Path, names: list[str] | None, split: str) -> int:
    for i, (image, label) in enumerate(zip(x, y, strict=True)):
        target = folder if names is None else folder / names[label]
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(target / f"{split}-{i:06d}.png")
    return len(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("npz", type=Path)
    parser.add_argument("out", type=Path, help="the folder to write (must not exist)")
    parser.add_argument("--per-class", type=int, default=None, help="images per class and split")
    parser.add_argument("--flat", action="store_true", help="unlabeled: every image in OUT itself")
    parser.add_argument("--names", default=None, help="comma-separated class names, in label order")
    args = parser.parse_args()
    if args.out.exists():
        parser.error(f"{args.out} exists: give a new folder")

    with np.load(args.npz, allow_pickle=False) as arrays:
        splits = {split: (arrays[f"x_{split}"], arrays[f"y_{split}"]) for split in ("train", "test")}
    classes = sorted({int(c) for _, y in splits.values() for c in np.unique(y)})
    names = args.names.split(",") if args.names else [str(c) for c in range(max(classes) + 1)]
    if len(names) <= max(classes):
        parser.error(f"--names gives {len(names)} names for labels up to {max(classes)}")
    written = 0
    for split, (x, y) in splits.items():
        keep = chosen(y, args.per_class)
        folder = args.out if args.flat else args.out / split
        written += write_split(x[keep], y[keep], folder, None if args.flat else names, split)
    print(f"{written} images in {args.out}" + (" (unlabeled)" if args.flat else f" ({len(classes)} classes)"))


if __name__ == "__main__":
    main()
