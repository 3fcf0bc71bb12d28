"""The common corruptions of Hendrycks & Dietterich (2019): 15 corruptions in four families at
severities 1..5, computed by the `imagecorruptions` package (the optional extra
`penrun[corruptions]`) and cached as .npz files, since some take milliseconds per image.

The package applies ImageNet-C's parameters at any image size, so CIFAR-10 corrupted here is
harsher than the published CIFAR-10-C, whose script (make_cifar_c.py) has parameters of its own
for 32x32 images: at severity 3, gaussian_noise std 0.18 here against 0.08 there, defocus_blur
radius 6 against 0.5, jpeg_compression quality 15 against 58. Numbers on it are not comparable
with published CIFAR-10-C numbers.

A cache file is keyed by the images' bytes (so a lossy subset and the full dataset never share
one), the corruption, the severity, the seed and the package's version; it is written once
(atomically, under a lock shared by parallel jobs) and read back with `allow_pickle=False`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from filelock import FileLock

from penrun.data.dataset import ImageData
from penrun.data.transforms import to_channels
from penrun.errors import InputError

# imagecorruptions.get_corruption_names('common'), by family; the package's four validation
# corruptions (speckle_noise, gaussian_blur, spatter, saturate) are not among them.
FAMILIES: dict[str, tuple[str, ...]] = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
    "weather": ("snow", "frost", "fog", "brightness"),
    "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression"),
}
CORRUPTIONS: tuple[str, ...] = tuple(name for family in FAMILIES.values() for name in family)
SEVERITIES = (1, 2, 3, 4, 5)
# The package refuses smaller images.
MIN_SIDE = 32
# Each split draws its own noise from the run's seed.
SPLIT_STREAMS = {"train": 0, "test": 1}
# Corruptions that draw from a seed argument rather than from numpy's global generator.
SEEDED_BY_ARGUMENT = ("impulse_noise", "glass_blur")
# The maintained fork of bethgelab's package (same module, same corruptions): the original
# 1.1.2 imports pkg_resources (gone from setuptools >= 82) and fails under NumPy 2 (fog) and
# scikit-image >= 0.19 (glass_blur).
DISTRIBUTION = "imagecorruptions-imaug"


def check_corruption(corruption: str, severity: int) -> None:
    if corruption not in CORRUPTIONS:
        raise InputError(f"corruption={corruption!r} is invalid; valid: {', '.join(CORRUPTIONS)}")
    if not isinstance(severity, int) or isinstance(severity, bool) or severity not in SEVERITIES:
        raise InputError(f"severity={severity!r} is invalid: use an integer from 1 to 5")


def corruption_package() -> ModuleType:
    """The `imagecorruptions` module, imported only when images are corrupted: it takes about a
    second and brings OpenCV, scikit-image and numba."""
    try:
        import imagecorruptions
    except ImportError as err:
        raise InputError(
            f"corruptions need the optional package {DISTRIBUTION} ({err}): pip install 'penrun[corruptions]'"
        ) from err
    return imagecorruptions


def corrupt_images(
    data: ImageData, corruption: str, severity: int, seed: int, cache_dir: str | os.PathLike
) -> ImageData:
    """Both splits of `data` corrupted, each once per (images, corruption, severity, seed) and
    cached in `cache_dir`; the name becomes e.g. `cifar10+fog(3)`."""
    check_corruption(corruption, severity)
    package = corruption_package()  # refuse a missing package before any work
    for split, x in (("train", data.x_train), ("test", data.x_test)):
        if not isinstance(x, torch.Tensor):
            raise InputError(f"corruption={corruption!r} needs {data.name}'s {split} images in memory")
    if min(data.image_size, data.x_train.shape[3]) < MIN_SIDE:
        raise InputError(
            f"corruption={corruption!r} needs images of at least {MIN_SIDE}x{MIN_SIDE} pixels, but "
            f"{data.name}'s are {data.image_size}x{data.x_train.shape[3]}: resize them to {MIN_SIDE}x{MIN_SIDE} or more"
        )
    splits = {
        split: cached_corruption(package, x, data.name, split, corruption, severity, seed, Path(cache_dir))
        for split, x in (("train", data.x_train), ("test", data.x_test))
    }
    return replace(
        data,
        name=f"{data.name}+{corruption}({severity})",
        x_train=splits["train"],
        x_test=splits["test"],
        source=f"{data.source}, corrupted by {DISTRIBUTION} {package_version()}",
    )


def package_version() -> str:
    for name in (DISTRIBUTION, "imagecorruptions"):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


def cache_path(
    images: torch.Tensor, dataset: str, split: str, corruption: str, severity: int, seed: int, cache_dir: Path
) -> Path:
    """The file of one corrupted split: readable names, and a digest of everything that shapes it."""
    digest = hashlib.sha1(json.dumps(cache_key(corruption, severity, seed)).encode())
    digest.update(str(tuple(images.shape)).encode())
    digest.update(images.contiguous().numpy().tobytes())
    return cache_dir / f"{dataset}-{split}-{corruption}-s{severity}-seed{seed}-{digest.hexdigest()[:12]}.npz"


def cache_key(corruption: str, severity: int, seed: int) -> dict[str, object]:
    return {"corruption": corruption, "severity": severity, "seed": seed, "package": package_version()}


def cached_corruption(
    package: ModuleType,
    images: torch.Tensor,
    dataset: str,
    split: str,
    corruption: str,
    severity: int,
    seed: int,
    cache_dir: Path,
) -> torch.Tensor:
    """The corrupted split from its cache file, computed and written first if there is none.
    Parallel jobs that need the same file: one computes it, the others wait and read it."""
    path = cache_path(images, dataset, split, corruption, severity, seed, cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(cache_dir / f".{path.name}.lock"):
        if not path.exists():
            stream = seed_stream(seed, split)
            corrupted = corrupt_array(package, images.numpy(), corruption, severity, stream)
            write_npz(path, images=corrupted, key=np.array(json.dumps(cache_key(corruption, severity, seed))))
    with np.load(path, allow_pickle=False) as stored:
        return torch.from_numpy(stored["images"])


def seed_stream(seed: int, split: str) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed, SPLIT_STREAMS[split]])


def corrupt_array(
    package: ModuleType, images: np.ndarray, corruption: str, severity: int, stream: np.random.SeedSequence
) -> np.ndarray:
    """uint8 (N, C, H, W) images corrupted one by one, each from its own seed (an image's noise
    does not depend on the others). The package draws from numpy's global generator: its state
    is restored afterwards."""
    seeds = stream.generate_state(len(images))
    out = np.empty_like(images)
    state = np.random.get_state()
    try:
        for i, (image, image_seed) in enumerate(zip(images, seeds, strict=True)):
            np.random.seed(image_seed)
            extra = {"seed": int(image_seed)} if corruption in SEEDED_BY_ARGUMENT else {}
            # The package takes and returns (H, W, 3) images; grey ones go in as three equal channels.
            rgb = package.corrupt(
                np.ascontiguousarray(image.transpose(1, 2, 0)),
                severity=severity,
                corruption_name=corruption,
                **extra,
            )
            out[i] = to_image(rgb, images.shape[1])
    finally:
        np.random.set_state(state)
    return out


def to_image(rgb: np.ndarray, channels: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (channels, H, W) uint8 (grey by the luma weights)."""
    x = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None]
    return to_channels(x, channels)[0].numpy() if channels == 1 else x[0].numpy()


def write_npz(path: Path, **arrays: np.ndarray) -> None:
    """Write through a temporary file in the same folder, then rename: a reader sees the whole
    file or none (train/files.atomic_write does this for the library's upper layers)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
