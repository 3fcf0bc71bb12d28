"""Image datasets as in-memory uint8 tensors, with batches made by tensor operations.

Every dataset is held as `ImageData`: uint8 images (N, C, H, W) and int64 labels, train and test.
Sources, in order: `<name>.npz` in the data folder, then the torchvision loader (with download).
Resizing and grey <-> RGB happen once at load time; batches are sliced and normalized on the fly.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from penrun.errors import ConfigError

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
# ITU-R 601 luma weights: how RGB images become grey.
LUMA = torch.tensor([0.299, 0.587, 0.114])


@dataclass(frozen=True)
class ImageData:
    """A labelled image dataset in memory: uint8 (N, C, H, W) images, int64 labels."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    source: str

    @property
    def channels(self) -> int:
        return self.x_train.shape[1]

    @property
    def image_size(self) -> int:
        return self.x_train.shape[2]

    def describe(self) -> str:
        c, h, w = self.x_train.shape[1:]
        return (
            f"{self.name}: {len(self.y_train)} train / {len(self.y_test)} test, "
            f"{c}x{h}x{w}, {self.num_classes} classes, from {self.source}"
        )


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


@dataclass(frozen=True)
class DatasetSpec:
    load: Loader
    npz_names: tuple[str, ...]
    num_classes: int = 10


DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec(_digits, ()),
    "mnist": DatasetSpec(_torchvision_split("MNIST", _train_flag), ("mnist.npz",)),
    "usps": DatasetSpec(_torchvision_split("USPS", _train_flag), ("usps.npz",)),
    "fashion_mnist": DatasetSpec(_fashion_mnist, ("fashion_mnist.npz",)),
    "svhn": DatasetSpec(_torchvision_split("SVHN", _split_name), ("svhn.npz",)),
    # The shared offline copy of CIFAR-10 is a lossy JPEG subset; the full set needs download.
    "cifar10": DatasetSpec(
        _torchvision_split("CIFAR10", _train_flag), ("cifar10.npz", "cifar10_jpeg_subset.npz")
    ),
    "stl10": DatasetSpec(_torchvision_split("STL10", _split_name), ("stl10.npz",)),
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
            raise ConfigError("data=npz needs data.path=FILE.npz (keys x_train, y_train, x_test, y_test)")
        arrays, source, num_classes = _read_npz(Path(path)), str(path), None
    else:
        spec = DATASETS.get(name)
        if spec is None:
            raise ConfigError(f"unknown dataset {name!r}; valid: {sorted([*DATASETS, 'npz'])}")
        arrays, source = _read_source(name, spec, data_dir, Path(cache_dir).expanduser(), download)
        num_classes = spec.num_classes
    return _to_image_data(name, arrays, source, num_classes, image_size, channels)


def _check_size_args(image_size: int | None, channels: int | None) -> None:
    if image_size is not None and (not isinstance(image_size, int) or image_size < 4):
        raise ConfigError(f"data.image_size={image_size!r} is invalid: use null or an integer >= 4")
    if channels not in (None, 1, 3):
        raise ConfigError(f"data.channels={channels!r} is invalid: use null, 1 (grey) or 3 (RGB)")


def _read_source(
    name: str,
    spec: DatasetSpec,
    data_dir: str | os.PathLike | None,
    cache_dir: Path,
    download: bool,
) -> tuple[Arrays, str]:
    if data_dir:
        for npz_name in spec.npz_names:
            candidate = Path(data_dir).expanduser() / npz_name
            if candidate.exists():
                return _read_npz(candidate), str(candidate)
    try:
        return spec.load(cache_dir / name, download)
    except (RuntimeError, OSError) as err:  # torchvision: missing files; urllib: no network
        wanted = " or ".join(spec.npz_names)
        raise ConfigError(
            f"dataset {name!r} is not available offline and could not be loaded "
            f"({type(err).__name__}: {err}). Put {wanted} (keys {', '.join(NPZ_KEYS)}) in the data "
            f"folder (paths.data_dir, now {data_dir!r}; default from $PENRUN_DATA_DIR), or allow "
            f"the torchvision download (data.download=true, now {download}) into {cache_dir / name}."
        ) from err


def _read_npz(path: Path) -> Arrays:
    if not path.exists():
        raise ConfigError(f"data.path={str(path)!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in NPZ_KEYS if k not in f.files]
            if missing:
                raise ConfigError(
                    f"{path} lacks keys {missing}: an npz dataset needs {list(NPZ_KEYS)}, found {f.files}"
                )
            return tuple(f[k] for k in NPZ_KEYS)
    except (ValueError, OSError) as err:
        raise ConfigError(f"{path} is not a readable .npz file: {err}") from err


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
            raise ConfigError(f"{name}: {len(x)} {split} images but {len(y)} {split} labels")
    num_classes = num_classes or int(max(y_tr.max(), y_te.max())) + 1
    for y, split in ((y_tr, "y_train"), (y_te, "y_test")):
        bad = y[(y < 0) | (y >= num_classes)]
        if len(bad):
            raise ConfigError(
                f"{name} {split} has label {int(bad[0])}: labels must lie in 0..{num_classes - 1}"
            )
    if x_tr.shape[2:] != x_te.shape[2:] and image_size is None:
        raise ConfigError(
            f"{name}: train images are {tuple(x_tr.shape[2:])} but test images "
            f"{tuple(x_te.shape[2:])}; set data.image_size to bring both to one size"
        )
    data = ImageData(name, x_tr, y_tr, x_te, y_te, num_classes, source)
    return convert_images(data, image_size, channels)


def _images_to_nchw(x: np.ndarray, what: str) -> torch.Tensor:
    if x.dtype != np.uint8:
        raise ConfigError(f"{what} has dtype {x.dtype}: images must be uint8 (0..255)")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ConfigError(
            f"{what} has shape {x.shape}: expected (N,H,W), (N,H,W,C) or (N,C,H,W) with C in (1, 3)"
        )
    return torch.from_numpy(np.ascontiguousarray(x))


def _labels(y: np.ndarray, what: str) -> torch.Tensor:
    if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1:
        raise ConfigError(f"{what} has dtype {y.dtype} and shape {y.shape}: labels must be 1-D integers")
    return torch.from_numpy(y.astype(np.int64))


def convert_images(data: ImageData, image_size: int | None, channels: int | None) -> ImageData:
    """Bring both splits to `image_size` x `image_size` and `channels` (None keeps them)."""

    def convert(x: torch.Tensor) -> torch.Tensor:
        if channels is not None and x.shape[1] != channels:
            x = to_channels(x, channels)
        if image_size is not None and x.shape[2:] != (image_size, image_size):
            x = resize(x, image_size)
        return x

    return replace(data, x_train=convert(data.x_train), x_test=convert(data.x_test))


def to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 grey <-> RGB."""
    if channels == 3:
        return x.expand(-1, 3, -1, -1).contiguous()
    grey = torch.einsum("nchw,c->nhw", x.float(), LUMA)
    return grey.round_().clamp_(0, 255).to(torch.uint8)[:, None]


def resize(x: torch.Tensor, size: int, chunk: int = 8192) -> torch.Tensor:
    """Antialiased bilinear resize of uint8 images, in chunks to bound memory."""
    out = torch.empty((len(x), x.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, len(x), chunk):
        part = x[start : start + chunk].float()
        part = F.interpolate(part, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start : start + chunk] = part.round_().clamp_(0, 255).to(torch.uint8)
    return out


# ---------------------------------------------------------------- domain shifts
def _affine(x: torch.Tensor, angle_deg: float, zoom: float) -> torch.Tensor:
    """Rotate by `angle_deg` and zoom by `zoom` about the centre (zeros fill the corners)."""
    theta = torch.tensor(angle_deg * torch.pi / 180)
    rot = (
        torch.stack([torch.stack([theta.cos(), -theta.sin()]), torch.stack([theta.sin(), theta.cos()])])
        / zoom
    )
    matrix = torch.cat([rot, torch.zeros(2, 1)], dim=1).expand(len(x), 2, 3)
    grid = F.affine_grid(matrix, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, round(3 * sigma))
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1) / sigma) ** 2)
    taps = (taps / taps.sum()).to(x.dtype)
    c = x.shape[1]
    x = F.conv2d(
        F.pad(x, (radius, radius, 0, 0), mode="replicate"),
        taps.view(1, 1, 1, -1).expand(c, 1, 1, -1),
        groups=c,
    )
    return F.conv2d(
        F.pad(x, (0, 0, radius, radius), mode="replicate"),
        taps.view(1, 1, -1, 1).expand(c, 1, -1, 1),
        groups=c,
    )


# Each shift maps float images in [0, 255] to shifted ones; `strength` means:
SHIFTS: dict[str, tuple[str, Callable[[torch.Tensor, float, torch.Generator], torch.Tensor]]] = {
    "invert": (
        "blend towards the negative image, 0..1",
        lambda x, s, g: (1 - s) * x + s * (255 - x),
    ),
    "rotate": ("rotation in degrees", lambda x, s, g: _affine(x, s, 1.0)),
    "scale": ("zoom factor (< 1 shrinks)", lambda x, s, g: _affine(x, 0.0, s)),
    "noise": (
        "std of Gaussian pixel noise, in units of the 0..255 range",
        lambda x, s, g: x + 255 * s * torch.randn(x.shape, generator=g),
    ),
    "blur": ("Gaussian blur sigma in pixels", lambda x, s, g: _gaussian_blur(x, s)),
}


def shift_images(data: ImageData, kind: str, strength: float, seed: int = 0) -> ImageData:
    """A shifted copy of both splits (a domain shift of one dataset)."""
    if kind not in SHIFTS:
        raise ConfigError(f"transfer.shift={kind!r} is invalid; valid: none, {', '.join(SHIFTS)}")
    if not isinstance(strength, int | float) or strength <= 0 or (kind == "invert" and strength > 1):
        raise ConfigError(
            f"transfer.shift_strength={strength!r} is invalid for {kind}: use {SHIFTS[kind][0]} (> 0)"
        )
    gen = torch.Generator().manual_seed(seed)
    fn = SHIFTS[kind][1]

    def apply(x: torch.Tensor) -> torch.Tensor:
        return fn(x.float(), float(strength), gen).round_().clamp_(0, 255).to(torch.uint8)

    name = f"{data.name}+{kind}({strength:g})"
    return replace(data, name=name, x_train=apply(data.x_train), x_test=apply(data.x_test))


# Where one dataset's classes sit in another's label space (None: no counterpart). STL-10 has
# a monkey where CIFAR-10 has a frog, and orders car/bird the other way round.
CLASS_ALIGNMENT: dict[tuple[str, str], list[int | None]] = {
    ("stl10", "cifar10"): [0, 2, 1, 3, 4, 5, 7, None, 8, 9],
}


def align_classes(data: ImageData, target: str) -> ImageData:
    """Relabel `data` into the classes of dataset `target` where they differ, dropping the
    examples of classes `target` lacks; unchanged when no alignment is known."""
    mapping = CLASS_ALIGNMENT.get((data.name, target))
    if mapping is None:
        return data
    table = torch.tensor([-1 if m is None else m for m in mapping])

    def relabel(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        new = table[y]
        keep = new >= 0
        return x[keep], new[keep]

    x_train, y_train = relabel(data.x_train, data.y_train)
    x_test, y_test = relabel(data.x_test, data.y_test)
    return replace(
        data, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, num_classes=len(table)
    )


def labelled_subset(y: torch.Tensor, per_class: int, num_classes: int, seed: int) -> torch.Tensor:
    """Indices of `per_class` examples of each class, drawn reproducibly from the seed."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.bincount(y, minlength=num_classes)
    present = counts[counts > 0]  # an aligned set may lack a class (STL-10 has no frog)
    if per_class > present.min():
        raise ConfigError(
            f"distill.labels={per_class} asks for more examples per class than the transfer set has "
            f"(the rarest class has {int(present.min())}); use at most that, 'all' or 'none'"
        )
    picks = [torch.nonzero(y == k).flatten() for k in range(num_classes) if counts[k]]
    return torch.cat([p[torch.randperm(len(p), generator=gen)[:per_class]] for p in picks]).sort().values


# ---------------------------------------------------------------- batches
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
    run sees the same batches as an uninterrupted one."""
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    else:
        order = torch.arange(n)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        yield order[start : start + batch_size]


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    return n // batch_size if drop_last and n >= batch_size else -(-n // batch_size)


def subset(data: ImageData, train: int | None = None, test: int | None = None, seed: int = 0) -> ImageData:
    """A fixed random `train` / `test` examples (None keeps a split whole): for quick runs.
    Random, not the first ones, because some files are sorted by class."""
    gen = torch.Generator().manual_seed(seed)

    def pick(n_keep: int | None, total: int) -> torch.Tensor | slice:
        return (
            slice(None)
            if n_keep is None or n_keep >= total
            else torch.randperm(total, generator=gen)[:n_keep]
        )

    tr, te = pick(train, len(data.y_train)), pick(test, len(data.y_test))
    return replace(
        data,
        x_train=data.x_train[tr],
        y_train=data.y_train[tr],
        x_test=data.x_test[te],
        y_test=data.y_test[te],
    )
