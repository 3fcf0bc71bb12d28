"""An image dataset: uint8 images (in memory, or streamed from a folder) and int64 labels."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # for annotations only: data.folder builds ImageData
    from penrun.data.folder import FolderImages


@dataclass(frozen=True)
class ImageData:
    """An image dataset: uint8 (N, C, H, W) images, int64 labels (-1 throughout: unlabeled).
    A split's images are a tensor in memory or `FolderImages` read from disk in batches
    (`data.batches.read_batches` reads either); both index alike (`x[idx]`, `len(x)`, `x.shape`)."""

    name: str
    x_train: torch.Tensor | FolderImages
    y_train: torch.Tensor
    x_test: torch.Tensor | FolderImages
    y_test: torch.Tensor
    num_classes: int
    source: str
    # The classes' names, by label (from the folders of an image folder); () when unnamed.
    class_names: tuple[str, ...] = ()

    @property
    def labelled(self) -> bool:
        return self.num_classes > 0

    @property
    def channels(self) -> int:
        return self.x_train.shape[1]

    @property
    def image_size(self) -> int:
        return self.x_train.shape[2]

    def describe(self) -> str:
        c, h, w = self.x_train.shape[1:]
        classes = f"{self.num_classes} classes" if self.labelled else "unlabeled"
        if self.class_names:
            classes += f" ({', '.join(self.class_names)})"
        return (
            f"{self.name}: {len(self.y_train)} train / {len(self.y_test)} test, "
            f"{c}x{h}x{w}, {classes}, from {self.source}"
        )


def subset(data: ImageData, train: int | None = None, test: int | None = None, seed: int = 0) -> ImageData:
    """A fixed random `train` / `test` examples (None keeps a split whole): for quick runs.
    Random, not the first ones, because some files are sorted by class."""
    rng = torch.Generator().manual_seed(seed)

    def pick(n_keep: int | None, total: int) -> torch.Tensor | slice:
        return (
            slice(None)
            if n_keep is None or n_keep >= total
            else torch.randperm(total, generator=rng)[:n_keep]
        )

    tr, te = pick(train, len(data.y_train)), pick(test, len(data.y_test))
    return replace(
        data,
        x_train=data.x_train[tr],
        y_train=data.y_train[tr],
        x_test=data.x_test[te],
        y_test=data.y_test[te],
    )


def hold_out(data: ImageData, size: int, seed: int = 0) -> tuple[ImageData, torch.Tensor, torch.Tensor]:
    """Split `size` random training examples off as a validation set: (the data without them,
    x_val, y_val). The seed is fixed by default so that every run on a dataset trains and
    validates on the same examples."""
    n = len(data.y_train)
    if not 0 <= size < n:
        raise ValueError(
            f"size={size} must be at least 0 and smaller than the training split of {data.name} ({n} examples)"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held, kept = order[:size].sort().values, order[size:].sort().values
    return (
        replace(data, x_train=data.x_train[kept], y_train=data.y_train[kept]),
        data.x_train[held],
        data.y_train[held],
    )
