"""Datasets (`ImageData`: in memory, or streamed from an image folder), their sources,
transforms and batches."""

from penrun.data.batches import epoch_batches, labelled_subset, normalize, num_batches, read_batches
from penrun.data.dataset import ImageData, hold_out, subset
from penrun.data.folder import FolderImages, folder_classes, load_folder, match_classes
from penrun.data.sources import DATASETS, load_dataset
from penrun.data.transforms import align_classes, convert_images, resize, shift_images, to_channels

__all__ = [
    "DATASETS",
    "FolderImages",
    "ImageData",
    "align_classes",
    "convert_images",
    "epoch_batches",
    "folder_classes",
    "hold_out",
    "labelled_subset",
    "load_dataset",
    "load_folder",
    "match_classes",
    "normalize",
    "num_batches",
    "read_batches",
    "resize",
    "shift_images",
    "subset",
    "to_channels",
]
