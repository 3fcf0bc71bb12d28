"""Index batches and labelled subsets: which examples a step or a protocol sees, as a function
of (seed, epoch) alone so that a resumed run sees the same ones; and the images of those index
batches, read alike from memory or from disk."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import torch

from penrun.data.folder import FolderImages


def labelled_subset(y: torch.Tensor, per_class: int, num_classes: int, seed: int) -> torch.Tensor:
    """Indices of `per_class` examples of each class, drawn reproducibly from the seed; the
    unlabeled examples (label -1: a flat image folder) count as one more class."""
    rng = torch.Generator().manual_seed(seed)
    groups = [torch.nonzero(y == k).flatten() for k in range(num_classes)] + [torch.nonzero(y < 0).flatten()]
    picks = [group for group in groups if len(group)]  # an aligned set may lack a class (STL-10 has no frog)
    rarest = min(len(group) for group in picks)
    if per_class > rarest:
        raise ValueError(
            f"per_class={per_class} asks for more examples per class than there are (the rarest class has {rarest})"
        )
    return torch.cat([p[torch.randperm(len(p), generator=rng)[:per_class]] for p in picks]).sort().values


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> float in [-1, 1]. One fixed normalization for every dataset, so that a
    teacher sees shifted domains through the same transform as its source."""
    return x.float().div_(127.5).sub_(1.0)


def epoch_batches(
    n: int,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    drop_last: bool = False,
) -> Iterator[torch.Tensor]:
    """Index batches for one epoch; the order depends only on (seed, epoch), so a resumed
    run sees the same batches as an uninterrupted one. A last batch of one example joins the
    batch before it (batch norm cannot train on a batch of one)."""
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    else:
        order = torch.arange(n)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    bounds = [*range(0, stop, batch_size), stop]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        del bounds[-2]
    for start, end in itertools.pairwise(bounds):
        yield order[start:end]


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    if drop_last and n >= batch_size:
        return n // batch_size
    count = -(-n // batch_size)
    return count - 1 if count > 1 and n % batch_size == 1 else count


def read_batches(
    images: torch.Tensor | FolderImages, index_batches: Iterable[torch.Tensor]
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(indices, uint8 images) of each index batch, in the order given: sliced from a tensor in
    memory, or decoded from a folder by its DataLoader workers. The two give the same bytes, so
    a loop that reads its batches here does not know (or care) which one it has."""
    if isinstance(images, FolderImages):
        index_batches = list(index_batches)
        yield from zip(index_batches, images.batches(index_batches), strict=True)
    else:
        for idx in index_batches:
            yield idx, images[idx]
