"""Datasets: the embedded digits, the offline npz folder, torchvision's own file formats."""

from __future__ import annotations

import bz2
import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from penrun.app.errors import ConfigError
from penrun.data import epoch_batches, load_dataset, normalize, num_batches, resize, sources, to_channels
from penrun.data.batches import labelled_subset
from penrun.errors import InputError

from conftest import compose_config, run_task


def test_digits_is_embedded_and_split_stratified() -> None:
    d = load_dataset("digits")
    assert d.x_train.shape == (1437, 1, 8, 8) and d.x_test.shape == (360, 1, 8, 8)
    assert d.x_train.dtype == torch.uint8 and int(d.x_train.max()) == 255
    assert torch.bincount(d.y_test).min() >= 35 and d.num_classes == 10


def test_mnist_and_usps_from_the_data_folder(data_dir: Path) -> None:
    mnist = load_dataset("mnist", data_dir=data_dir)
    assert mnist.x_train.shape == (60000, 1, 28, 28) and "mnist.npz" in mnist.source
    # The data README's test label counts.
    assert torch.bincount(mnist.y_test).tolist() == [
        980,
        1135,
        1032,
        1010,
        982,
        892,
        958,
        1028,
        974,
        1009,
    ]
    usps = load_dataset("usps", data_dir=data_dir, image_size=28)
    assert usps.x_train.shape == (7291, 1, 28, 28) and usps.x_test.shape == (2007, 1, 28, 28)


def test_cifar10_falls_back_to_the_shared_jpeg_subset(data_dir: Path) -> None:
    cifar = load_dataset("cifar10", data_dir=data_dir, channels=1, image_size=28)
    assert cifar.x_test.shape == (10000, 1, 28, 28) and "jpeg_subset" in cifar.source


def test_resize_and_channels_keep_uint8_range() -> None:
    x = torch.full((2, 1, 16, 16), 200, dtype=torch.uint8)
    y = resize(x, 28)
    assert y.shape == (2, 1, 28, 28) and y.dtype == torch.uint8 and int(y.min()) == int(y.max()) == 200
    rgb = to_channels(x, 3)
    assert rgb.shape == (2, 3, 16, 16)
    assert torch.equal(to_channels(rgb, 1), x)  # luma weights sum to 1


def test_normalize_maps_to_unit_interval() -> None:
    x = torch.tensor([0, 255], dtype=torch.uint8)
    assert normalize(x).tolist() == [-1.0, 1.0]


def test_epoch_batches_depend_only_on_seed_and_epoch() -> None:
    def order(seed: int, epoch: int) -> list[int]:
        return torch.cat(list(epoch_batches(103, 10, shuffle=True, seed=seed, epoch=epoch))).tolist()

    reference = order(3, 2)
    torch.manual_seed(123)  # the global random state plays no part
    torch.rand(7)
    assert order(3, 2) == reference and sorted(reference) == list(range(103))
    assert order(3, 3) != reference and order(4, 2) != reference
    sizes = [len(b) for b in epoch_batches(103, 10, shuffle=True, seed=3, epoch=2, drop_last=True)]
    assert sizes == [10] * 10
    assert [b.tolist() for b in epoch_batches(6, 2, shuffle=False)] == [[0, 1], [2, 3], [4, 5]]
    # A last batch of one joins the one before (batch norm cannot train on one example).
    assert [b.tolist() for b in epoch_batches(5, 2, shuffle=False)] == [[0, 1], [2, 3, 4]]
    for n, size, drop in ((5, 2, False), (6, 2, False), (103, 10, True), (103, 10, False), (1, 4, False)):
        batches = list(epoch_batches(n, size, shuffle=True, seed=1, drop_last=drop))
        assert len(batches) == num_batches(n, size, drop), (n, size, drop)


# ---------------------------------------------------------------- npz files and their errors
def write_npz(path: Path, **overrides: np.ndarray) -> Path:
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (20, 12, 12), dtype=np.uint8),
        "y_train": np.arange(20) % 4,
        "x_test": rng.integers(0, 256, (8, 12, 12), dtype=np.uint8),
        "y_test": np.arange(8) % 4,
    }
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def test_npz_file_loads(tmp_path: Path) -> None:
    d = load_dataset("npz", path=write_npz(tmp_path / "d.npz"))
    assert d.x_train.shape == (20, 1, 12, 12) and d.num_classes == 4


def test_npz_missing_keys(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"lacks keys \['y_test'\]"):
        load_dataset("npz", path=write_npz(tmp_path / "d.npz", y_test=None))


def test_npz_labels_out_of_range(tmp_path: Path) -> None:
    write_npz(tmp_path / "mnist.npz", y_test=np.full(8, 12))
    with pytest.raises(InputError, match=r"mnist y_test has label 12: labels must lie in 0\.\.9"):
        load_dataset("mnist", data_dir=tmp_path, download=False)
    with pytest.raises(InputError, match=r"y_train has label -1"):
        load_dataset("npz", path=write_npz(tmp_path / "d.npz", y_train=np.full(20, -1)))


def test_npz_mismatched_sizes_need_image_size(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "d.npz", x_test=np.zeros((8, 16, 16), np.uint8))
    with pytest.raises(
        InputError,
        match=r"train images are \(12, 12\) but test images \(16, 16\); set image_size to bring both",
    ):
        load_dataset("npz", path=path)
    assert load_dataset("npz", path=path, image_size=16).x_train.shape == (20, 1, 16, 16)


def test_npz_bad_dtype_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="must be uint8"):
        load_dataset("npz", path=write_npz(tmp_path / "d.npz", x_train=np.zeros((20, 12, 12), np.float32)))
    with pytest.raises(InputError, match="does not exist"):
        load_dataset("npz", path=tmp_path / "nope.npz")


def test_unknown_dataset_and_bad_sizes() -> None:
    with pytest.raises(InputError, match=r"unknown dataset 'imagenet'; valid: \['cifar10', 'digits'"):
        load_dataset("imagenet")
    # The library names its argument; the app names the config key (test_bad_sizes_name_config_keys).
    with pytest.raises(InputError, match=r"^channels=2 is invalid: use null, 1 \(grey\) or 3 \(RGB\)$"):
        load_dataset("digits", channels=2)
    with pytest.raises(InputError, match=r"^image_size=3 is invalid: use null or an integer >= 4$"):
        load_dataset("digits", image_size=3)


def test_offline_and_missing_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(
        InputError,
        match=r"Put svhn.npz .* in the data folder \(data_dir='.*'\), or allow the torchvision "
        r"download \(download=True, now False\)",
    ):
        load_dataset("svhn", data_dir=str(tmp_path), cache_dir=tmp_path / "cache", download=False)


# ---------------------------------------------------------------- the same errors in config keys
def test_bad_sizes_name_config_keys(tmp_path: Path) -> None:
    """What the library says of its arguments, the app says of the keys a user sets."""
    from penrun.app.config import load_data

    # The schema refuses a value outside its choices when the task starts...
    with pytest.raises(ConfigError, match=r"^data.channels=2 is invalid; valid: null, 1, 3$"):
        run_task(["task=train_teacher", "data.channels=2"], tmp_path / "run")
    with pytest.raises(ConfigError, match=r"^transfer.image_size=3 is invalid: use an integer >= 4"):
        run_task(["transfer.image_size=3"], tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
    # ...and load_data turns the library's argument names into the node's keys.
    cfg = compose_config(["data.channels=2"])
    with pytest.raises(ConfigError, match=r"^data.channels=2 is invalid: use null, 1 \(grey\) or 3 \(RGB\)$"):
        load_data(cfg)
    cfg = compose_config(["transfer.image_size=3"])
    with pytest.raises(ConfigError, match=r"^transfer.image_size=3 is invalid: use null or an integer >= 4$"):
        load_data(cfg, "transfer")


def test_offline_and_missing_names_config_keys(tmp_path: Path) -> None:
    from penrun.app.config import load_data

    cfg = compose_config(
        [
            "data@transfer=svhn",
            "transfer.download=false",
            f"paths.data_dir={tmp_path}",
            f"paths.cache_dir={tmp_path / 'cache'}",
        ]
    )
    with pytest.raises(
        ConfigError,
        match=r"Put svhn.npz .* in the data folder \(paths.data_dir='.*'\), or allow the torchvision "
        r"download \(transfer.download=True, now False\)",
    ):
        load_data(cfg, "transfer")


# ---------------------------------------------------------------- torchvision's own formats
def idx_bytes(array: np.ndarray) -> bytes:
    code = 0x08  # unsigned byte
    header = struct.pack(">HBB", 0, code, array.ndim) + b"".join(struct.pack(">I", s) for s in array.shape)
    return header + array.astype(np.uint8).tobytes()


def fake_digit_arrays(n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(n)
    return rng.integers(0, 256, (n, size, size), dtype=np.uint8), (np.arange(n) % 10).astype(np.uint8)


def test_torchvision_mnist_loader_reads_its_raw_files(tmp_path: Path) -> None:
    raw = tmp_path / "cache" / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", 30), ("t10k", 10)):
        x, y = fake_digit_arrays(n, 28)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(idx_bytes(x))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(y))
    d = load_dataset("mnist", data_dir=None, cache_dir=tmp_path / "cache", download=False)
    x, y = fake_digit_arrays(30, 28)
    assert torch.equal(d.x_train[:, 0], torch.from_numpy(x)) and d.y_train.tolist() == y.tolist()
    assert "torchvision MNIST" in d.source


def test_torchvision_usps_loader_reads_its_bz2_files(tmp_path: Path) -> None:
    root = tmp_path / "cache" / "usps"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("usps.bz2", 12), ("usps.t.bz2", 6)):
        values = rng.uniform(-1, 1, (n, 256))
        lines = [
            f"{k % 10 + 1} " + " ".join(f"{j + 1}:{v:.6f}" for j, v in enumerate(row))
            for k, row in enumerate(values)
        ]
        (root / name).write_bytes(bz2.compress(("\n".join(lines) + "\n").encode()))
    d = load_dataset("usps", cache_dir=tmp_path / "cache", download=False)
    assert d.x_train.shape == (12, 1, 16, 16) and d.y_train.tolist() == [k % 10 for k in range(12)]


def test_fashion_mnist_from_debian_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for prefix, n in (("train", 20), ("t10k", 10)):
        x, y = fake_digit_arrays(n, 28)
        for kind, arr, dims in (("images", x, 3), ("labels", y, 1)):
            (tmp_path / f"{prefix}-{kind}-idx{dims}-ubyte.gz").write_bytes(gzip.compress(idx_bytes(arr)))
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", tmp_path)
    d = load_dataset("fashion_mnist", cache_dir=tmp_path / "cache", download=False)
    assert d.x_test.shape == (10, 1, 28, 28) and "Debian" in d.source


def test_labelled_subset_takes_per_class_of_each_class():
    """Exactly per_class indices of each class, sorted and unique, the same for the same seed
    and different for another. Fails if the indices are left unsorted, the seed is ignored,
    or one class too many or too few is taken."""
    y = torch.tensor([0] * 12 + [1] * 7 + [2] * 20)[
        torch.randperm(39, generator=torch.Generator().manual_seed(0))
    ]
    picks = labelled_subset(y, 5, 3, seed=1)
    assert np.bincount(y[picks].numpy(), minlength=3).tolist() == [5, 5, 5]
    assert picks.tolist() == sorted(set(picks.tolist()))
    assert torch.equal(labelled_subset(y, 5, 3, seed=1), picks)
    assert not torch.equal(labelled_subset(y, 5, 3, seed=2), picks)


def write_cifar10(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision's CIFAR-10 files (cifar-10-batches-py: pickled dicts of (N, 3072) uint8 rows),
    ten images per batch, their checksums switched off for these small stand-ins."""
    import pickle

    import torchvision

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    names = [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8), "labels": list(range(10))}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(
        pickle.dumps({"label_names": list(sources.DATASETS["cifar10"].class_names)})
    )
    cifar = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cifar, "train_list", [[name, None] for name, _ in cifar.train_list])
    monkeypatch.setattr(cifar, "test_list", [[name, None] for name, _ in cifar.test_list])
    monkeypatch.setattr(cifar, "meta", {**cifar.meta, "md5": None})


def test_full_cifar10_wins_over_the_lossy_subset_wherever_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lossy subset in the data folder is read only when neither cifar10.npz nor torchvision's
    files are on disk; the run's data names the file it read (tables say which CIFAR-10 ran)."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    x = np.zeros((10, 32, 32, 3), dtype=np.uint8)
    np.savez(
        data_dir / "cifar10_jpeg_subset.npz", x_train=x, y_train=np.arange(10), x_test=x, y_test=np.arange(10)
    )
    cache = tmp_path / "cache"
    subset = load_dataset("cifar10", data_dir=data_dir, cache_dir=cache, download=False)
    assert subset.source.endswith("cifar10_jpeg_subset.npz") and len(subset.y_train) == 10
    write_cifar10(cache / "cifar10", monkeypatch)
    full = load_dataset("cifar10", data_dir=data_dir, cache_dir=cache, download=False)
    assert "cifar10_jpeg_subset" not in full.source and len(full.y_train) == 50 and len(full.y_test) == 10
    np.savez(data_dir / "cifar10.npz", x_train=x, y_train=np.arange(10), x_test=x[:5], y_test=np.arange(5))
    assert load_dataset("cifar10", data_dir=data_dir, cache_dir=cache).source.endswith("cifar10.npz")


def test_epoch_batch_boundaries_and_defaults() -> None:
    """Boundaries by hand: a last batch of one joins the batch before it, in short and long
    epochs alike; num_batches agrees with the batches drawn; seed and epoch default to 0."""

    def plain(n: int, size: int) -> list[list[int]]:
        return [b.tolist() for b in epoch_batches(n, size, shuffle=False)]

    assert plain(3, 2) == [[0, 1, 2]]
    assert plain(7, 2) == [[0, 1], [2, 3], [4, 5, 6]]
    assert (num_batches(3, 2), num_batches(7, 4), num_batches(7, 4, drop_last=True)) == (1, 2, 1)
    drawn = [b.tolist() for b in epoch_batches(9, 4, shuffle=True)]
    assert drawn == [b.tolist() for b in epoch_batches(9, 4, shuffle=True, seed=0, epoch=0)]


def test_labelled_subset_takes_up_to_the_rarest_class_and_says_when_it_cannot() -> None:
    y = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    assert sorted(y[labelled_subset(y, 3, 2, seed=0)].tolist()) == [0, 0, 0, 1, 1, 1]
    with pytest.raises(
        ValueError,
        match=r"per_class=4 asks for more examples per class than there are \(the rarest class has 3\)",
    ):
        labelled_subset(y, 4, 2, seed=0)
