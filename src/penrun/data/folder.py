"""Folders of images: the ImageFolder layout (root/train/<class>/ and root/test/<class>/, or
root/<class>/ split by a fixed seeded fraction), or a flat folder of unlabeled images.

Every image is decoded the same way, wherever it is decoded (in this process, in a DataLoader
worker, at load time or per batch): PIL reads it, converts it to grey or RGB, the shorter side
is resized to `image_size` (PIL's antialiased bilinear filter: torch's interpolate is several
times slower per image and slower still when its threads compete) and the centre is cropped. So a split held in memory and the same split streamed from disk give the same bytes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from penrun.data.dataset import ImageData
from penrun.errors import InputError

log = logging.getLogger(__name__)

# What counts as an image (by extension, case-insensitive); other files are ignored.
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
# The label of an image of a flat (unlabeled) folder.
UNLABELED = -1
# The split of a folder without train/ and test/ is the same for every run, whatever its seed.
SPLIT_SEED = 0
# Images decoded per DataLoader batch when a whole split is read (checked or loaded).
READ_CHUNK = 64


# ---------------------------------------------------------------- decoding
def decode_image(path: str, size: int, channels: int) -> torch.Tensor:
    """One image file as uint8 (channels, size, size): grey or RGB, shorter side resized to
    `size`, centre cropped. A JPEG is decoded at the smallest of its reduced scales (1/2, 1/4,
    1/8) that is still at least `size` (libjpeg's DCT scaling: far faster for small sizes)."""
    mode = "RGB" if channels == 3 else "L"
    with Image.open(path) as image:
        image.draft(mode, (size, size))
        square = resize_and_crop(image.convert(mode), size)
    pixels = np.asarray(square)
    channels_first = pixels.transpose(2, 0, 1) if pixels.ndim == 3 else pixels[None]
    # numpy's copy (contiguous, writable): torch's copy kernel waits for its thread pool, slow when loaded
    return torch.from_numpy(channels_first.copy())


def resize_and_crop(image: Image.Image, size: int) -> Image.Image:
    """The shorter side resized to `size` (the longer one in proportion, rounded down; PIL's
    antialiased bilinear filter), then the centre size x size (the extra pixel of an odd margin
    on the bottom / right)."""
    width, height = image.size
    if min(width, height) != size:
        shape = (int(width * size / height), size) if height <= width else (size, int(height * size / width))
        image = image.resize(shape, Image.Resampling.BILINEAR)
        width, height = shape
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


def unreadable_reason(path: str) -> str | None:
    """Why an image file cannot be decoded (None when it can): the whole file is decoded, so a
    truncated JPEG is found too."""
    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        return f"{type(err).__name__}: {err}"
    return None


class _Decoded(torch.utils.data.Dataset):
    """The files as a map-style dataset of decoded images (what DataLoader workers read)."""

    def __init__(self, files: Sequence[str], size: int, channels: int):
        self.files, self.size, self.channels = files, size, channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        return decode_image(self.files[i], self.size, self.channels)


class _Checked(torch.utils.data.Dataset):
    def __init__(self, files: Sequence[str]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> str | None:
        return unreadable_reason(self.files[i])


def _one_thread(_worker: int) -> None:
    """Workers decode one image at a time: torch's thread pool in each would oversubscribe the CPU."""
    torch.set_num_threads(1)


def _loader(dataset: torch.utils.data.Dataset, index_batches: Iterable, workers: int, collate=None):
    """A DataLoader that reads the given index batches in the given order (no shuffling of its
    own: the order is the caller's seeded permutation)."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=[[int(i) for i in idx] for idx in index_batches],
        num_workers=workers,
        worker_init_fn=_one_thread if workers else None,
        collate_fn=collate,
        # Its own generator: a DataLoader draws its workers' base seed from the global random
        # state otherwise, and a streamed run would then draw other numbers than one in memory.
        generator=torch.Generator(),
    )


def _as_list(batch: list) -> list:
    return batch


def _stack(images: list[torch.Tensor]) -> torch.Tensor:
    """A batch of decoded images, stacked by numpy (torch.stack waits for its thread pool, which
    costs more than the copy when the CPU is busy)."""
    return torch.from_numpy(np.stack([x.numpy() for x in images]))


# ---------------------------------------------------------------- streamed images
@dataclass(frozen=True, eq=False)
class FolderImages:
    """uint8 (N, channels, size, size) images that stay on disk: indexing selects files (no
    decoding), `batches` decodes index batches through a DataLoader with `workers` processes,
    `load` decodes all of them into one tensor. The other implementation of a split's images
    is a uint8 tensor in memory; `data.batches.read_batches` reads either."""

    files: tuple[str, ...]
    size: int
    channels: int
    workers: int = 0

    def __len__(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.files), self.channels, self.size, self.size))

    @property
    def dtype(self) -> torch.dtype:
        return torch.uint8

    @property
    def nbytes(self) -> int:
        """The size of the decoded images."""
        return len(self.files) * self.channels * self.size * self.size

    def __getitem__(self, index: slice | torch.Tensor | Sequence[int]) -> FolderImages:
        """The images at `index` (a slice, integer indices or a boolean mask), still on disk."""
        if isinstance(index, slice):
            files = self.files[index]
        else:
            index = torch.as_tensor(index)
            if index.dtype == torch.bool:
                index = torch.nonzero(index).flatten()
            files = tuple(self.files[i] for i in index.tolist())
        return FolderImages(files, self.size, self.channels, self.workers)

    def tensor_split(self, parts: int) -> tuple[FolderImages, ...]:
        """`parts` contiguous chunks, as torch.tensor_split makes them."""
        return tuple(self[chunk] for chunk in torch.arange(len(self)).tensor_split(parts))

    def batches(self, index_batches: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        """The decoded images of each index batch, in the order given."""
        yield from _loader(
            _Decoded(self.files, self.size, self.channels), index_batches, self.workers, _stack
        )

    def load(self) -> torch.Tensor:
        """All the images decoded, in memory."""
        out = torch.empty(self.shape, dtype=torch.uint8)
        chunks = torch.arange(len(self)).split(READ_CHUNK)
        for chunk, images in zip(chunks, self.batches(chunks), strict=True):
            out[int(chunk[0]) : int(chunk[-1]) + 1] = images
        return out


# ---------------------------------------------------------------- scanning
@dataclass(frozen=True)
class FolderSplits:
    """The image files of a folder, split, with their labels (UNLABELED for a flat folder)."""

    train: tuple[str, ...]
    y_train: torch.Tensor
    test: tuple[str, ...]
    y_test: torch.Tensor
    class_names: tuple[str, ...]
    layout: str


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _entries(folder: Path) -> tuple[list[Path], list[Path], int]:
    """(image files, subfolders, how many other files), sorted by name."""
    images, folders, others = [], [], 0
    for entry in sorted(folder.iterdir()):
        if entry.is_dir():
            if not entry.name.startswith("."):
                folders.append(entry)
        elif is_image(entry):
            images.append(entry)
        else:
            others += 1
    return images, folders, others


def _class_files(split_dir: Path) -> tuple[dict[str, list[str]], int]:
    """{class name: its image files} of an ImageFolder split, refusing an empty class folder."""
    images, folders, ignored = _entries(split_dir)
    if images:
        raise InputError(
            f"{split_dir} holds both image files (e.g. {images[0].name}) and class folders: put every "
            "image in the folder of its class"
        )
    classes = {}
    for folder in folders:
        files, _, others = _entries(folder)
        ignored += others
        if not files:
            raise InputError(
                f"class folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}): add some or remove it"
            )
        classes[folder.name] = [str(f) for f in files]
    if ignored:
        log.info(f"{split_dir}: ignored {ignored} file(s) that are not images (by extension)")
    return classes, ignored


def folder_classes(root: str | os.PathLike) -> tuple[str, ...]:
    """The class names of an image folder (sorted), without reading any image; () for a flat
    folder."""
    root = _checked_root(root)
    top = root / "train" if (root / "train").is_dir() else root
    return tuple(folder.name for folder in _entries(top)[1])


def _checked_root(root: str | os.PathLike | None) -> Path:
    if not root:
        raise InputError("root is not set: give the folder of images (root=DIR)")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise InputError(
            f"root={str(root)!r} {'is a file' if path.exists() else 'does not exist'}: give a folder"
        )
    return path


def scan_folder(root: str | os.PathLike, test_fraction: float) -> FolderSplits:
    """The files of `root`, split: root/train/ and root/test/ as they are, else a fixed seeded
    `test_fraction` of each class (of all images, for a flat folder) as the test split."""
    root = _checked_root(root)
    if (root / "train").is_dir() or (root / "test").is_dir():
        for split in ("train", "test"):
            if not (root / split).is_dir():
                raise InputError(f"{root} has no {split}/ folder: give both train/ and test/, or neither")
        train, _ = _class_files(root / "train")
        test, _ = _class_files(root / "test")
        if not train:
            raise InputError(f"{root / 'train'} holds no class folders")
        stray = sorted(set(test) - set(train))
        if stray:
            raise InputError(
                f"{root / 'test'} has class folders that {root / 'train'} lacks: {stray}; classes are "
                f"matched by name (train has {sorted(train)})"
            )
        names = tuple(sorted(train))
        return FolderSplits(*_labelled(train, names), *_labelled(test, names), names, "train/test")
    images, folders, ignored = _entries(root)
    if images and folders:
        raise InputError(
            f"{root} holds both image files (e.g. {images[0].name}) and folders (e.g. {folders[0].name}/): "
            "give class folders (labelled) or only images (unlabeled)"
        )
    if images:
        if ignored:
            log.info(f"{root}: ignored {ignored} file(s) that are not images (by extension)")
        by_class, names, layout = {"": [str(f) for f in images]}, (), "flat (unlabeled)"
    else:
        by_class, _ = _class_files(root)
        if not by_class:
            raise InputError(f"{root} holds no images and no class folders ({', '.join(IMAGE_EXTENSIONS)})")
        names, layout = tuple(sorted(by_class)), f"classes split by test_fraction={test_fraction:g}"
    train, test = _split_by_fraction(by_class, test_fraction)
    return FolderSplits(*_labelled(train, names), *_labelled(test, names), names, layout)


def _labelled(by_class: dict[str, list[str]], names: tuple[str, ...]) -> tuple[tuple[str, ...], torch.Tensor]:
    """All files (class by class, in the order of `names`) and their labels."""
    if not names:
        files = tuple(by_class.get("", ()))
        return files, torch.full((len(files),), UNLABELED, dtype=torch.int64)
    files = [(f, k) for k, name in enumerate(names) for f in by_class.get(name, ())]
    return tuple(f for f, _ in files), torch.tensor([k for _, k in files], dtype=torch.int64)


def _split_by_fraction(
    by_class: dict[str, list[str]], fraction: float
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Each class's files split: round(fraction * n) of them, drawn from a fixed seed, to test
    (at least one to each side)."""
    rng = torch.Generator().manual_seed(SPLIT_SEED)
    train, test = {}, {}
    for name, files in by_class.items():
        if len(files) < 2:
            raise InputError(
                f"class {name!r} has {len(files)} image: a folder without train/ and test/ is split, which "
                "needs at least 2 images of each class"
            )
        n_test = min(max(round(fraction * len(files)), 1), len(files) - 1)
        order = torch.randperm(len(files), generator=rng)
        held = set(order[:n_test].tolist())
        test[name] = [f for i, f in enumerate(files) if i in held]
        train[name] = [f for i, f in enumerate(files) if i not in held]
    return train, test


# ---------------------------------------------------------------- loading
def unreadable_files(files: Sequence[str], workers: int) -> list[tuple[str, str]]:
    """(file, why) of each file that cannot be decoded."""
    chunks = torch.arange(len(files)).split(READ_CHUNK)
    reasons = [r for batch in _loader(_Checked(files), chunks, workers, _as_list) for r in batch]
    return [(f, r) for f, r in zip(files, reasons, strict=True) if r is not None]


def _readable(files: tuple[str, ...], y: torch.Tensor, workers: int, skip_corrupt: bool, what: str):
    """The files that decode (and their labels); an unreadable one is refused, or skipped with a
    logged count under skip_corrupt."""
    bad = unreadable_files(files, workers)
    if not bad:
        return files, y
    first, why = bad[0]
    if not skip_corrupt:
        raise InputError(
            f"{len(bad)} image(s) of the {what} cannot be read, first {first} ({why}); remove them, or "
            "set skip_corrupt=true to skip them"
        )
    log.warning(f"skipped {len(bad)} unreadable image(s) of the {what}, first {first} ({why})")
    skipped = {f for f, _ in bad}
    keep = torch.tensor([f not in skipped for f in files])
    return tuple(f for f in files if f not in skipped), y[keep]


def load_folder(
    root: str | os.PathLike,
    *,
    image_size: int,
    channels: int,
    test_fraction: float = 0.2,
    in_memory: str | bool = "auto",
    memory_mb: float = 2048,
    workers: int = 0,
    skip_corrupt: bool = False,
) -> ImageData:
    """An image folder as an `ImageData`: each split in memory (a uint8 tensor) or streamed from
    disk (`FolderImages`). in_memory="auto" keeps a split in memory when its decoded size is under
    `memory_mb` MiB. Every image is decoded once here to find unreadable ones before training."""
    if not isinstance(image_size, int) or image_size < 4:
        raise InputError(f"image_size={image_size!r} is invalid: a folder's images need an integer size >= 4")
    if channels not in (1, 3):
        raise InputError(f"channels={channels!r} is invalid: use 1 (grey) or 3 (RGB)")
    if in_memory not in ("auto", True, False):
        raise InputError(f"in_memory={in_memory!r} is invalid: use auto, true or false")
    splits = scan_folder(root, test_fraction)
    images = {}
    for split, files, y in (("train", splits.train, splits.y_train), ("test", splits.test, splits.y_test)):
        files, y = _readable(files, y, workers, skip_corrupt, f"{split} split of {root}")
        if not files:
            raise InputError(f"the {split} split of {root} has no readable images")
        streamed = FolderImages(files, image_size, channels, workers)
        keep = in_memory is True or (in_memory == "auto" and streamed.nbytes < memory_mb * 2**20)
        images[split] = (streamed.load() if keep else streamed, y)
        log.info(
            f"{root} {split}: {len(files)} images, {streamed.nbytes / 2**20:.1f} MiB decoded, "
            f"{'in memory' if keep else f'streamed by {workers} worker(s)'}"
        )
    (x_train, y_train), (x_test, y_test) = images["train"], images["test"]
    name = Path(root).expanduser().resolve().name
    source = f"image folder {root} ({splits.layout})"
    return ImageData(
        name, x_train, y_train, x_test, y_test, len(splits.class_names), source, splits.class_names
    )


def match_classes(data: ImageData, class_names: Sequence[str], source: str) -> ImageData:
    """A labelled dataset relabelled into the classes `class_names` (of the dataset `source`) by
    name; a class of `data` that `source` lacks is refused, naming both sets of classes."""
    if not data.class_names or tuple(data.class_names) == tuple(class_names):
        return data
    index = {name: k for k, name in enumerate(class_names)}
    unknown = [name for name in data.class_names if name not in index]
    if unknown:
        raise InputError(
            f"{data.name} has classes {unknown} that {source} lacks: classes are matched by name; "
            f"{source} has {list(class_names)}, {data.name} has {list(data.class_names)}"
        )
    table = torch.tensor([index[name] for name in data.class_names])
    return ImageData(
        data.name,
        data.x_train,
        table[data.y_train],
        data.x_test,
        table[data.y_test],
        len(class_names),
        data.source,
        tuple(class_names),
    )
