"""data/sources.py on small hand-made files: where a dataset is read from, in which order the
sources are tried, how arrays become uint8 (N, C, H, W) images and int64 labels, and every
refusal's whole message. Fast: no full dataset is read (tests/test_data.py reads the real ones)."""

from __future__ import annotations

import gzip
import struct
import zipfile
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
import torchvision

from penrun.data import load_dataset, sources
from penrun.data.sources import DatasetSpec
from penrun.errors import InputError

KEYS = "['x_train', 'y_train', 'x_test', 'y_test']"


def arrays(n_train: int = 6, n_test: int = 3, classes: int = 3, size: int = 4, **changed) -> dict:
    """Image k of a split is filled with the value k; labels cycle through the classes."""
    parts = {
        "x_train": np.arange(n_train, dtype=np.uint8)[:, None, None] * np.ones((1, size, size), np.uint8),
        "y_train": np.arange(n_train) % classes,
        "x_test": np.arange(n_test, dtype=np.uint8)[:, None, None] * np.ones((1, size, size), np.uint8),
        "y_test": np.arange(n_test) % classes,
    }
    return {k: v for k, v in (parts | changed).items() if v is not None}


def npz(path: Path, **changed) -> Path:
    np.savez(path, **arrays(**changed))
    return path


def message(call, *args, **kwargs) -> str:
    with pytest.raises(InputError) as caught:
        call(*args, **kwargs)
    return str(caught.value)


# ---------------------------------------------------------------- the sources
def test_digits_are_sklearns_images_scaled_to_0_255_in_a_fixed_stratified_split() -> None:
    d = load_dataset("digits")
    # sklearn's 17 grey levels 0..16, each times 255/16 rounded (8 -> 127.5 -> 128, half to even)
    levels = [0, 16, 32, 48, 64, 80, 96, 112, 128, 143, 159, 175, 191, 207, 223, 239, 255]
    assert sorted(set(d.x_train.unique().tolist())) == levels
    assert d.x_train.shape == (1437, 1, 8, 8) and d.x_test.shape == (360, 1, 8, 8)
    # stratified: each class has a fifth of its 174..183 examples in the test split
    assert torch.bincount(d.y_test).tolist() == [36, 36, 35, 37, 36, 37, 36, 36, 35, 36]
    assert d.y_train[:8].tolist() == [3, 9, 1, 3, 1, 9, 4, 4]  # the split every digits number rests on
    assert torch.equal(load_dataset("digits").x_test, d.x_test)
    assert d.source == "scikit-learn load_digits (fixed stratified 80/20 split)"
    assert d.class_names == tuple("0123456789") and d.num_classes == 10


class FakeSet:
    """A torchvision dataset class that records how it was built; `targets` or `labels`."""

    built: ClassVar[list] = []
    use_labels = False

    def __init__(self, root: str, download: bool, **split) -> None:
        FakeSet.built.append((root, download, split))
        n = 4 if split in ({"train": True}, {"split": "train"}) else 2
        self.data = np.full((n, 3, 5, 5), n, dtype=np.uint8)
        self.targets = None if FakeSet.use_labels else list(range(n))
        self.labels = np.arange(n) + 10


@pytest.mark.parametrize("use_labels", [False, True], ids=["targets", "labels"])
def test_a_torchvision_loader_reads_train_then_test_with_its_split_keyword(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, use_labels: bool
) -> None:
    monkeypatch.setattr(torchvision.datasets, "Fake", FakeSet, raising=False)
    monkeypatch.setattr(FakeSet, "built", [])
    monkeypatch.setattr(FakeSet, "use_labels", use_labels)
    for split_kw, kwargs in ((sources._train_flag, "train"), (sources._split_name, "split")):
        FakeSet.built.clear()
        (x_tr, y_tr, x_te, y_te), source = sources._torchvision_split("Fake", split_kw)(tmp_path, True)
        assert source == f"torchvision Fake in {tmp_path}"
        assert x_tr.shape == (4, 3, 5, 5) and int(x_tr[0, 0, 0, 0]) == 4 and x_te.shape == (2, 3, 5, 5)
        expected = ([10, 11, 12, 13], [10, 11]) if use_labels else ([0, 1, 2, 3], [0, 1])
        assert (y_tr.tolist(), y_te.tolist()) == expected and isinstance(y_tr, np.ndarray)
        train, test = (
            ({"train": True}, {"train": False})
            if kwargs == "train"
            else (
                {"split": "train"},
                {"split": "test"},
            )
        )
        assert FakeSet.built == [(str(tmp_path), True, train), (str(tmp_path), True, test)]
    sources._torchvision_split("Fake", sources._train_flag)(tmp_path, False)
    assert FakeSet.built[-1][1] is False


def idx_gz(path: Path, array: np.ndarray) -> None:
    """An idx file (the MNIST family's format) by its specification, gzipped."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + b"".join(struct.pack(">I", s) for s in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_fashion_mnist_reads_debians_four_files_in_order_else_torchvision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(0)
    parts = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (5, 28, 28)),
        "train-labels-idx1-ubyte.gz": np.arange(5) % 10,
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (3, 28, 28)),
        "t10k-labels-idx1-ubyte.gz": np.array([9, 8, 7]),
    }
    for name, array in parts.items():
        idx_gz(tmp_path / name, array)
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", tmp_path)
    read, source = sources._fashion_mnist(tmp_path / "cache", False)
    assert source == f"Debian dataset-fashion-mnist in {tmp_path}"
    assert all(np.array_equal(a, b) for a, b in zip(read, parts.values(), strict=True))
    assert read[0].flags.writeable  # a copy, not a view of the file's bytes
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()  # one file missing: torchvision's set instead
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeSet)
    monkeypatch.setattr(FakeSet, "built", [])
    _, source = sources._fashion_mnist(tmp_path / "cache", True)
    assert source == f"torchvision FashionMNIST in {tmp_path / 'cache'}"
    assert FakeSet.built[0] == (str(tmp_path / "cache"), True, {"train": True})


def test_read_idx_takes_the_dimensions_from_the_header(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    idx_gz(tmp_path / "a.gz", array)
    assert np.array_equal(sources._read_idx_gz(tmp_path / "a.gz"), array)
    idx_gz(tmp_path / "b.gz", np.array([5, 6, 7]))
    assert sources._read_idx_gz(tmp_path / "b.gz").tolist() == [5, 6, 7]


def test_each_named_dataset_has_its_classes() -> None:
    assert {name: spec.num_classes for name, spec in sources.DATASETS.items()} == dict.fromkeys(
        sources.DATASETS, 10
    )
    assert DatasetSpec(lambda r, d: None, (), ("a", "b", "c")).num_classes == 3


# ---------------------------------------------------------------- which source is read
class FakeLoader:
    """A dataset's loader that records its calls and fails or returns small arrays."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error, self.calls = error, []

    def __call__(self, root: Path, download: bool):
        self.calls.append((root, download))
        if self.error is not None:
            raise self.error
        return tuple(arrays().values()), "the full set"


def test_a_partial_fallback_is_read_only_when_the_full_set_cannot_be(tmp_path: Path) -> None:
    data, cache = tmp_path / "data", tmp_path / "cache"
    data.mkdir()
    npz(data / "part.npz", n_train=9)
    for error in (RuntimeError("no files"), OSError("no files")):
        load = FakeLoader(error)
        spec = DatasetSpec(load, ("full.npz",), fallback="part.npz")
        read, source = sources._read_source("x", spec, data, cache, True)
        assert source == str(data / "part.npz") and len(read[1]) == 9
        assert load.calls == [(cache / "x", False)]  # never downloads when a fallback is there
    load = FakeLoader()
    read, source = sources._read_source(
        "x", DatasetSpec(load, ("full.npz",), fallback="part.npz"), data, cache, True
    )
    assert source == "the full set" and load.calls == [(cache / "x", False)]
    npz(data / "full.npz", n_train=12)  # the full set's npz wins over both
    read, source = sources._read_source(
        "x", DatasetSpec(load, ("full.npz",), fallback="part.npz"), data, cache, True
    )
    assert source == str(data / "full.npz") and len(read[1]) == 12 and len(load.calls) == 1


def test_without_a_data_folder_or_its_files_the_loader_runs_with_the_download_option(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    npz(tmp_path / "part.npz")
    for data_dir in (None, "", tmp_path / "elsewhere"):
        load = FakeLoader()
        spec = DatasetSpec(load, ("full.npz",), fallback="part.npz")
        assert sources._read_source("x", spec, data_dir, tmp_path / "c", True)[1] == "the full set"
        assert load.calls == [(tmp_path / "c" / "x", True)]
    monkeypatch.setenv("HOME", str(tmp_path))  # ~ in the data folder is the home folder
    load = FakeLoader()
    spec = DatasetSpec(load, ("part.npz",))
    assert sources._read_source("x", spec, "~", tmp_path / "c", False)[1] == str(tmp_path / "part.npz")
    assert load.calls == []


def test_a_source_that_cannot_be_loaded_says_what_to_put_where(tmp_path: Path) -> None:
    error = OSError("no network")
    spec = DatasetSpec(FakeLoader(error), ("full.npz",), fallback="part.npz")
    with pytest.raises(InputError) as caught:
        sources._read_source("x", spec, str(tmp_path), tmp_path / "c", False)
    assert str(caught.value) == (
        "dataset 'x' is not available offline and could not be loaded (OSError: no network). Put "
        "full.npz or part.npz (keys x_train, y_train, x_test, y_test) in the data folder "
        f"(data_dir='{tmp_path}'), or allow the torchvision download (download=True, now False) "
        f"into {tmp_path / 'c' / 'x'}."
    )
    assert caught.value.__cause__ is error
    spec = DatasetSpec(FakeLoader(RuntimeError("gone")), ("a.npz",))
    assert "(RuntimeError: gone). Put a.npz (keys" in message(
        sources._read_source, "y", spec, None, tmp_path, True
    )
    with pytest.raises(ValueError, match="a bug"):  # only missing files and networks are the user's
        sources._read_source("y", DatasetSpec(FakeLoader(ValueError("a bug")), ()), None, tmp_path, True)


def test_load_dataset_passes_its_folders_and_names_the_classes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert message(load_dataset, "svhn", cache_dir="~/cache", download=False).endswith(
        f"(download=True, now False) into {tmp_path / 'cache' / 'svhn'}."
    )
    npz(tmp_path / "mnist.npz", classes=10, n_train=10, size=6)
    mnist = load_dataset("mnist", data_dir=tmp_path, download=False, image_size=8, channels=3)
    assert mnist.source == str(tmp_path / "mnist.npz") and mnist.x_train.shape == (10, 3, 8, 8)
    assert mnist.num_classes == 10 and mnist.class_names == tuple("0123456789") and mnist.name == "mnist"
    plain = load_dataset("npz", path=npz(tmp_path / "d.npz"))
    assert plain.class_names == () and plain.num_classes == 3 and plain.name == "npz"
    assert plain.source == str(tmp_path / "d.npz")
    assert message(load_dataset, "npz") == (
        "name='npz' needs path=FILE.npz (keys x_train, y_train, x_test, y_test)"
    )
    assert message(load_dataset, "npz", path="").startswith("name='npz' needs path=")
    assert message(load_dataset, "imagenet") == (
        "unknown dataset 'imagenet'; valid: ['cifar10', 'digits', 'fashion_mnist', 'mnist', 'npz', "
        "'stl10', 'svhn', 'usps']"
    )


def test_a_named_dataset_has_its_own_number_of_classes(tmp_path: Path) -> None:
    """Ten classes for mnist even when the file's largest label is 3: every class must then
    have a training example."""
    npz(tmp_path / "mnist.npz", classes=4, n_train=8)
    text = message(load_dataset, "mnist", data_dir=tmp_path, download=False)
    assert "6 of the 10 classes up to the largest label" in text


def test_image_size_and_channels_are_checked_before_anything_is_read(tmp_path: Path) -> None:
    for size in (3, 4.0, "8", 2):
        assert message(load_dataset, "npz", path=tmp_path / "none.npz", image_size=size) == (
            f"image_size={size!r} is invalid: use null or an integer >= 4"
        )
    assert message(load_dataset, "npz", path=tmp_path / "none.npz", channels=2) == (
        "channels=2 is invalid: use null, 1 (grey) or 3 (RGB)"
    )
    path = npz(tmp_path / "d.npz", size=6)
    assert load_dataset("npz", path=path, image_size=4).x_train.shape == (6, 1, 4, 4)
    assert load_dataset("npz", path=path, channels=1).x_train.shape == (6, 1, 6, 6)
    assert load_dataset("npz", path=path, channels=3).x_train.shape == (6, 3, 6, 6)


# ---------------------------------------------------------------- npz files
def test_an_npz_file_is_read_whole_and_refused_in_one_line_when_it_is_not_one(tmp_path: Path) -> None:
    read = sources._read_npz(npz(tmp_path / "d.npz"))
    assert [a.tolist() for a in read] == [a.tolist() for a in arrays().values()]
    assert message(sources._read_npz, tmp_path) == f"path={str(tmp_path)!r} is a folder"
    missing = tmp_path / "none.npz"
    assert message(sources._read_npz, missing) == f"path={str(missing)!r} does not exist"
    text = tmp_path / "t.npz"
    text.write_text("not a zip")
    assert message(sources._read_npz, text) == (
        f"path={str(text)!r} is not an .npz file (a zip archive of .npy arrays, as numpy.savez writes)"
    )
    short = npz(tmp_path / "s.npz", y_test=None)
    assert message(sources._read_npz, short) == (
        f"{short} lacks keys ['y_test']: an npz dataset needs {KEYS}, found ['x_train', 'y_train', 'x_test']"
    )


def test_an_npz_file_with_pickled_or_damaged_arrays_is_refused(tmp_path: Path) -> None:
    pickled = tmp_path / "p.npz"
    np.savez(pickled, **arrays(y_test=np.array([0, "a"], dtype=object)))
    assert message(sources._read_npz, pickled).startswith(f"{pickled} is not a readable .npz file: ")
    damaged = tmp_path / "d.npz"
    with zipfile.ZipFile(damaged, "w") as archive:
        for key in ("x_train", "y_train", "x_test", "y_test"):
            archive.writestr(f"{key}.npy", b"\x93NUMPY garbage")
    assert message(sources._read_npz, damaged).startswith(f"{damaged} is not a readable .npz file: ")


# ---------------------------------------------------------------- arrays to images and labels
def to_data(parts: dict, num_classes: int | None = None, image_size: int | None = None, channels=None):
    return sources._to_image_data("d", tuple(parts.values()), "src", num_classes, image_size, channels)


def test_images_in_each_layout_become_uint8_nchw() -> None:
    rng = np.random.default_rng(1)
    nhwc = rng.integers(0, 256, (2, 5, 5, 3), dtype=np.uint8)
    out = sources._images_to_nchw(nhwc, "x")
    assert out.shape == (2, 3, 5, 5) and out.is_contiguous()
    assert all(
        out[n, c, h, w] == nhwc[n, h, w, c] for n, c, h, w in [(0, 2, 1, 4), (1, 0, 3, 2), (1, 1, 0, 0)]
    )
    grey = sources._images_to_nchw(nhwc[..., :1], "x")
    assert grey.shape == (2, 1, 5, 5) and torch.equal(grey[:, 0], torch.from_numpy(nhwc[..., 0]))
    flat = sources._images_to_nchw(nhwc[..., 0], "x")
    assert torch.equal(flat, grey)
    nchw = rng.integers(0, 256, (2, 3, 5, 3), dtype=np.uint8)  # C first wins when both could be C
    assert torch.equal(sources._images_to_nchw(nchw, "x"), torch.from_numpy(nchw))
    assert sources._images_to_nchw(np.zeros((2, 1, 4, 1), np.uint8), "x").shape == (2, 1, 4, 1)


def test_images_of_another_dtype_or_shape_are_refused() -> None:
    assert message(sources._images_to_nchw, np.zeros((2, 4, 4), np.float32), "d x_train") == (
        "d x_train has dtype float32: images must be uint8 (0..255)"
    )
    for shape in [(2, 4), (2, 2, 4, 4), (1, 2, 2, 4, 4), (2, 4, 4, 2)]:
        assert message(sources._images_to_nchw, np.zeros(shape, np.uint8), "d x_test") == (
            f"d x_test has shape {shape}: expected (N,H,W), (N,H,W,C) or (N,C,H,W) with C in (1, 3)"
        )


def test_labels_are_1d_integers_as_int64() -> None:
    labels = sources._labels(np.array([3, 0, 255], dtype=np.uint8), "y")
    assert labels.dtype == torch.int64 and labels.tolist() == [3, 0, 255]
    assert message(sources._labels, np.array([0.0, 1.0]), "d y_train") == (
        "d y_train has dtype float64 and shape (2,): labels must be 1-D integers"
    )
    assert message(sources._labels, np.zeros((2, 1), np.int32), "d y_test") == (
        "d y_test has dtype int32 and shape (2, 1): labels must be 1-D integers"
    )


def test_image_data_of_arrays_counts_the_classes_and_keeps_the_order() -> None:
    d = to_data(arrays(n_train=6, n_test=4, classes=4, y_test=np.array([0, 3, 1, 3])))
    assert d.num_classes == 4  # the largest label of either split, + 1
    assert d.x_train[:, 0, 0, 0].tolist() == list(range(6)) and d.y_test.tolist() == [0, 3, 1, 3]
    assert (d.name, d.source) == ("d", "src") and d.x_train.dtype == torch.uint8


def test_labels_outside_the_classes_and_missing_classes_are_refused() -> None:
    assert message(to_data, arrays(y_test=np.array([0, 5, 1])), num_classes=3) == (
        "d y_test has label 5: labels must lie in 0..2"
    )
    assert message(to_data, arrays(y_train=np.array([0, 1, 2, 3, -1, 1]))) == (
        "d y_train has label -1: labels must lie in 0..3"
    )
    assert message(to_data, arrays(y_test=np.array([0, 1, 3])), num_classes=3) == (
        "d y_test has label 3: labels must lie in 0..2"
    )
    assert message(to_data, arrays(y_train=np.array([0, 0, 2, 2, 0, 2]))) == (
        "d y_train: labels must be 0..K-1 with every class in the training split, but 1 of the 3 "
        "classes up to the largest label have no training example; labels found: [0, 2]"
    )


def test_a_missing_class_lists_the_labels_found_briefly() -> None:
    y = torch.arange(0, 42, 2)  # 21 even labels of 42 classes: 21 missing
    with pytest.raises(InputError) as caught:
        sources._check_every_class("d", y, 42)
    assert str(caught.value).endswith(
        "21 of the 42 classes up to the largest label have no training example; labels found: "
        "[0, 2, 4, 6, 8, 10, 12, 14, 16, 18, '...', 32, 34, 36, 38, 40]"
    )
    with pytest.raises(InputError) as caught:
        sources._check_every_class("d", y[:20], 40)  # 20 found: all of them listed
    assert str(caught.value).endswith(f"labels found: {list(range(0, 40, 2))}")
    sources._check_every_class("d", torch.tensor([1, 0, 2]), 3)


def test_splits_must_match_their_labels_and_not_be_empty() -> None:
    assert message(to_data, arrays(y_train=np.arange(5) % 3)) == "d: 6 train images but 5 train labels"
    assert message(to_data, arrays(y_test=np.arange(4) % 3)) == "d: 3 test images but 4 test labels"
    empty = arrays(x_test=np.zeros((0, 4, 4), np.uint8), y_test=np.zeros(0, np.int64))
    assert message(to_data, empty, num_classes=3) == "d: the test split is empty"
    empty = arrays(x_train=np.zeros((0, 4, 4), np.uint8), y_train=np.zeros(0, np.int64))
    assert message(to_data, empty, num_classes=3) == "d: the train split is empty"


def test_images_must_be_square_of_one_size_and_at_least_4_pixels() -> None:
    odd = arrays(x_test=np.zeros((3, 5, 5), np.uint8))
    assert message(to_data, odd) == (
        "d: train images are (4, 4) but test images (5, 5); set image_size to bring both to one size"
    )
    assert to_data(odd, image_size=6).x_test.shape == (3, 1, 6, 6)
    wide = arrays(x_train=np.zeros((6, 4, 5), np.uint8), x_test=np.zeros((3, 4, 5), np.uint8))
    assert message(to_data, wide) == (
        "d: images are 4x5; penrun needs square images of at least 4x4: set image_size to resize them"
    )
    tiny = arrays(size=3)
    assert message(to_data, tiny).startswith("d: images are 3x3; penrun needs square images of at least 4x4")
    assert to_data(arrays(size=4)).x_train.shape == (6, 1, 4, 4)
    assert to_data(arrays(size=4), channels=3).x_train.shape == (6, 3, 4, 4)
