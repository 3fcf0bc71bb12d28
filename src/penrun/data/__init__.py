"""Datasets in memory (`ImageData`), their sources, transforms and batches."""

from penrun.data.batches import epoch_batches, labelled_subset, normalize, num_batches
from penrun.data.dataset import ImageData, hold_out, subset
from penrun.data.sources import DATASETS, load_dataset
from penrun.data.transforms import align_classes, convert_images, resize, shift_images, to_channels

__all__ = [
    "DATASETS",
    "ImageData",
    "align_classes",
    "convert_images",
    "epoch_batches",
    "hold_out",
    "labelled_subset",
    "load_dataset",
    "normalize",
    "num_batches",
    "resize",
    "shift_images",
    "subset",
    "to_channels",
]
