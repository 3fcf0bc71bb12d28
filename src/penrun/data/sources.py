"""Where datasets come from: `<name>.npz` in a data folder, else the torchvision loader (with
download), scikit-learn's digits, or Debian's Fashion-MNIST files. Every dataset becomes an
`ImageData` of uint8 (N, C, H, W) images; resizing and grey <-> RGB happen once, at load time.
"""

from __future__ import annotations

import gzip
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from penrun.data.dataset import ImageData
from penrun.data.transforms import convert_images
from penrun.errors import InputError

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
# The smallest image side every network takes (LeNet-5 needs 16: models/classifiers.py).
MIN_IMAGE_SIZE = 4
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
# A loader takes (cache folder, download?) and returns the arrays and where they came from.
Loader = Callable[[Path, bool], tuple[Arrays, str]]


# ---------------------------------------------------------------- sources
def _digits(_root: Path, _download: bool) -> tuple[Arrays, str]:
    """scikit-learn's 8x8 digits (ships with the package): a fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, bunch.target, test_size=0.2, random_state=0, stratify=bunch.target
    )
    return (x_tr, y_tr, x_te, y_te), "scikit-learn load_digits (fixed stratified 80/20 split)"


def _torchvision_split(cls_name: str, split_kw: Callable[[bool], dict]) -> Loader:
    def load(root: Path, download: bool) -> tuple[Arrays, str]:
        import torchvision.datasets as tvd

        cls = getattr(tvd, cls_name)
        parts = []
        for train in (True, False):
            ds = cls(str(root), download=download, **split_kw(train))
            labels = getattr(ds, "targets", None)
            if labels is None:
                labels = ds.labels
            parts += [np.asarray(ds.data), np.asarray(labels)]
        return tuple(parts), f"torchvision {cls_name} in {root}"

    return load


def _train_flag(train: bool) -> dict:
    return {"train": train}


def _split_name(train: bool) -> dict:
    return {"split": "train" if train else "test"}


def _read_idx_gz(path: Path) -> np.ndarray:
    """Read a gzipped idx file (the MNIST family's format)."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


def _fashion_mnist(root: Path, download: bool) -> tuple[Arrays, str]:
    """Debian's `dataset-fashion-mnist` files when installed, else torchvision."""
    prefixes = ("train", "t10k")
    files = [
        DEBIAN_FASHION_MNIST / f"{p}-{k}-idx{n}-ubyte.gz"
        for p in prefixes
        for k, n in (("images", 3), ("labels", 1))
    ]
    if all(f.exists() for f in files):
        return tuple(
            _read_idx_gz(f) for f in files
        ), f"Debian dataset-fashion-mnist in {DEBIAN_FASHION_MNIST}"
    return _torchvision_split("FashionMNIST", _train_flag)(root, download)


DIGIT_NAMES = tuple(str(k) for k in range(10))


@dataclass(frozen=True)
class DatasetSpec:
    load: Loader
    npz_names: tuple[str, ...]
    # The classes' names by label (as torchvision's `classes`, SVHN's "10" read as "0"): an image
    # folder's classes are matched to them by name.
    class_names: tuple[str, ...] = DIGIT_NAMES
    # A partial or lossy stand-in in the data folder, used only when neither the full set's npz
    # nor torchvision's files are on disk (metrics.json names the file a run read).
    fallback: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec(_digits, ()),
    "mnist": DatasetSpec(_torchvision_split("MNIST", _train_flag), ("mnist.npz",)),
    "usps": DatasetSpec(_torchvision_split("USPS", _train_flag), ("usps.npz",)),
    "fashion_mnist": DatasetSpec(
        _fashion_mnist,
        ("fashion_mnist.npz",),
        (
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
    ),
    "svhn": DatasetSpec(_torchvision_split("SVHN", _split_name), ("svhn.npz",)),
    # The shared offline copy of CIFAR-10 is a lossy JPEG subset: the full set wins wherever it is.
    "cifar10": DatasetSpec(
        _torchvision_split("CIFAR10", _train_flag),
        ("cifar10.npz",),
        ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        fallback="cifar10_jpeg_subset.npz",
    ),
    "stl10": DatasetSpec(
        _torchvision_split("STL10", _split_name),
        ("stl10.npz",),
        ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"),
    ),
}


# ---------------------------------------------------------------- loading
def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike = "~/.cache/penrun",
    download: bool = True,
    path: str | os.PathLike | None = None,
    image_size: int | None = None,
    channels: int | None = None,
) -> ImageData:
    """Load a dataset by name (or any .npz file with `name="npz", path=...`).

    `image_size` and `channels` convert the images once, so that datasets of different
    native sizes (USPS 16x16, MNIST 28x28) or colours can meet.
    """
    _check_size_args(image_size, channels)
    if name == "npz":
        if not path:
            raise InputError("name='npz' needs path=FILE.npz (keys x_train, y_train, x_test, y_test)")
        arrays, source, num_classes = _read_npz(Path(path)), str(path), None
    else:
        spec = DATASETS.get(name)
        if spec is None:
            raise InputError(f"unknown dataset {name!r}; valid: {sorted([*DATASETS, 'npz'])}")
        arrays, source = _read_source(name, spec, data_dir, Path(cache_dir).expanduser(), download)
        num_classes = spec.num_classes
    data = _to_image_data(name, arrays, source, num_classes, image_size, channels)
    return data if name == "npz" else replace(data, class_names=DATASETS[name].class_names)


def _check_size_args(image_size: int | None, channels: int | None) -> None:
    if image_size is not None and (not isinstance(image_size, int) or image_size < 4):
        raise InputError(f"image_size={image_size!r} is invalid: use null or an integer >= 4")
    if channels not in (None, 1, 3):
        raise InputError(f"channels={channels!r} is invalid: use null, 1 (grey) or 3 (RGB)")


def _read_source(
    name: str,
    spec: DatasetSpec,
    data_dir: str | os.PathLike | None,
    cache_dir: Path,
    download: bool,
) -> tuple[Arrays, str]:
    folder = Path(data_dir).expanduser() if data_dir else None
    for npz_name in spec.npz_names if folder else ():
        if (folder / npz_name).exists():
            return _read_npz(folder / npz_name), str(folder / npz_name)
    if folder and spec.fallback and (folder / spec.fallback).exists():
        try:  # the full set, if torchvision's files are already on disk
            return spec.load(cache_dir / name, False)
        except (RuntimeError, OSError):
            return _read_npz(folder / spec.fallback), str(folder / spec.fallback)
    try:
        return spec.load(cache_dir / name, download)
    except (RuntimeError, OSError) as err:  # torchvision: missing files; urllib: no network
        wanted = " or ".join((*spec.npz_names, *filter(None, [spec.fallback])))
        raise InputError(
            f"dataset {name!r} is not available offline and could not be loaded "
            f"({type(err).__name__}: {err}). Put {wanted} (keys {', '.join(NPZ_KEYS)}) in the data "
            f"folder (data_dir={data_dir!r}), or allow the torchvision download (download=True, now "
            f"{download}) into {cache_dir / name}."
        ) from err


def _read_npz(path: Path) -> Arrays:
    if not path.is_file():
        raise InputError(f"path={str(path)!r} {'is a folder' if path.is_dir() else 'does not exist'}")
    if not zipfile.is_zipfile(path):
        raise InputError(
            f"path={str(path)!r} is not an .npz file (a zip archive of .npy arrays, as numpy.savez writes)"
        )
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in NPZ_KEYS if k not in f.files]
            if missing:
                raise InputError(
                    f"{path} lacks keys {missing}: an npz dataset needs {list(NPZ_KEYS)}, found {f.files}"
                )
            return tuple(f[k] for k in NPZ_KEYS)
    except InputError:  # (a ValueError) the missing keys, said once
        raise
    except (ValueError, OSError) as err:
        raise InputError(f"{path} is not a readable .npz file: {err}") from err


def _to_image_data(
    name: str,
    arrays: Arrays,
    source: str,
    num_classes: int | None,
    image_size: int | None,
    channels: int | None,
) -> ImageData:
    x_tr, y_tr, x_te, y_te = (
        _images_to_nchw(arrays[0], f"{name} x_train"),
        _labels(arrays[1], f"{name} y_train"),
        _images_to_nchw(arrays[2], f"{name} x_test"),
        _labels(arrays[3], f"{name} y_test"),
    )
    for x, y, split in ((x_tr, y_tr, "train"), (x_te, y_te, "test")):
        if len(x) != len(y):
            raise InputError(f"{name}: {len(x)} {split} images but {len(y)} {split} labels")
        if not len(y):
            raise InputError(f"{name}: the {split} split is empty")
    num_classes = num_classes or int(max(y_tr.max(), y_te.max())) + 1
    for y, split in ((y_tr, "y_train"), (y_te, "y_test")):
        bad = y[(y < 0) | (y >= num_classes)]
        if len(bad):
            raise InputError(
                f"{name} {split} has label {int(bad[0])}: labels must lie in 0..{num_classes - 1}"
            )
    _check_every_class(name, y_tr, num_classes)
    if x_tr.shape[2:] != x_te.shape[2:] and image_size is None:
        raise InputError(
            f"{name}: train images are {tuple(x_tr.shape[2:])} but test images "
            f"{tuple(x_te.shape[2:])}; set image_size to bring both to one size"
        )
    data = convert_images(ImageData(name, x_tr, y_tr, x_te, y_te, num_classes, source), image_size, channels)
    height, width = data.x_train.shape[2:]
    if height != width or height < MIN_IMAGE_SIZE:
        raise InputError(
            f"{name}: images are {height}x{width}; penrun needs square images of at least "
            f"{MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE}: set image_size to resize them"
        )
    return data


def _check_every_class(name: str, y: torch.Tensor, num_classes: int) -> None:
    """Labels are 0..K-1 with every class in the training split: one stray label (99999 in a
    ten-class file) must not make a 100000-class model."""
    counts = torch.bincount(y, minlength=num_classes)
    missing = int((counts == 0).sum())
    if missing:
        seen = torch.nonzero(counts).flatten().tolist()
        shown = seen if len(seen) <= 20 else [*seen[:10], "...", *seen[-5:]]
        raise InputError(
            f"{name} y_train: labels must be 0..K-1 with every class in the training split, but "
            f"{missing} of the {num_classes} classes up to the largest label have no training "
            f"example; labels found: {shown}"
        )


def _images_to_nchw(x: np.ndarray, what: str) -> torch.Tensor:
    if x.dtype != np.uint8:
        raise InputError(f"{what} has dtype {x.dtype}: images must be uint8 (0..255)")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise InputError(
            f"{what} has shape {x.shape}: expected (N,H,W), (N,H,W,C) or (N,C,H,W) with C in (1, 3)"
        )
    return torch.from_numpy(np.ascontiguousarray(x))


def _labels(y: np.ndarray, what: str) -> torch.Tensor:
    if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1:
        raise InputError(f"{what} has dtype {y.dtype} and shape {y.shape}: labels must be 1-D integers")
    return torch.from_numpy(y.astype(np.int64))
