"""The common corruptions (data/corruptions.py) on real CIFAR-10 images, their cache, the refused
inputs, and the CIFAR-10-C experiments (pair=cifar10_c, configs/experiment/cifar10_c_*.yaml)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from penrun.app import schema
from penrun.app.cli import config_dir
from penrun.app.errors import ConfigError
from penrun.app.teachers import teacher_identity
from penrun.data import ImageData
from penrun.data import corruptions as corr
from penrun.errors import InputError

from conftest import SHARED_DATA, compose_config, run_task

SUBSET = SHARED_DATA / "cifar10_jpeg_subset.npz"
# Hendrycks & Dietterich's ImageNet-C std of gaussian_noise at severities 1..5, in units of 0..1.
GAUSSIAN_NOISE_STD = (0.08, 0.12, 0.18, 0.26, 0.38)


@pytest.fixture(scope="module")
def cifar() -> ImageData:
    """Four real CIFAR-10 test images of four classes (the subset is sorted by class), and four
    training images: a small dataset of the shared lossy subset."""
    if not SUBSET.exists():
        pytest.skip(f"{SUBSET} not found (set PENRUN_DATA_DIR)")
    with np.load(SUBSET, allow_pickle=False) as f:
        x_train, y_train = f["x_train"][1::2500][:4], f["y_train"][1::2500][:4]
        x_test, y_test = f["x_test"][::2500][:4], f["y_test"][::2500][:4]

    def images(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()

    return ImageData(
        name="cifar10",
        x_train=images(x_train),
        y_train=torch.from_numpy(y_train),
        x_test=images(x_test),
        y_test=torch.from_numpy(y_test),
        num_classes=10,
        source=str(SUBSET),
    )


@pytest.fixture(scope="module")
def package():
    return pytest.importorskip("imagecorruptions")


def rms_distance(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2)))


def corrupt(package, images: torch.Tensor, name: str, severity: int, seed: int = 0) -> np.ndarray:
    return corr.corrupt_array(package, images.numpy(), name, severity, np.random.SeedSequence(seed))


# ---------------------------------------------------------------- the corruptions themselves
def test_the_names_are_the_packages_fifteen_common_corruptions_by_family(package) -> None:
    assert tuple(package.get_corruption_names("common")) == corr.CORRUPTIONS
    for family, names in corr.FAMILIES.items():
        assert names == tuple(package.get_corruption_names(family)), family


# glass_blur compiles its numba kernel on first use (seconds).
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n == "glass_blur" else n for n in corr.CORRUPTIONS]
)
def test_every_corruption_changes_a_real_image_and_keeps_its_shape(package, cifar, name: str) -> None:
    clean = cifar.x_test
    out = corrupt(package, clean, name, 3)
    assert out.shape == tuple(clean.shape) and out.dtype == np.uint8
    for before, after in zip(clean, out, strict=True):
        assert rms_distance(before, after) > 2.0, name  # every image changed, by more than rounding


@pytest.mark.parametrize("name", ["gaussian_noise", "defocus_blur"])
def test_the_distance_from_the_clean_image_grows_with_severity(package, cifar, name: str) -> None:
    distances = [rms_distance(cifar.x_test, corrupt(package, cifar.x_test, name, s)) for s in corr.SEVERITIES]
    assert distances == sorted(distances) and len(set(distances)) == 5, distances


def test_gaussian_noise_has_the_published_std(package) -> None:
    """On a mid-grey image nothing is clipped at severities 1..2 (4 std from the middle stay
    inside 0..255), so the noise's std is the published one."""
    grey = torch.full((2, 3, 32, 32), 128, dtype=torch.uint8)
    for severity in (1, 2):
        noise = corrupt(package, grey, "gaussian_noise", severity).astype(np.float64) - 128
        assert abs(noise.mean()) < 2.0
        assert noise.std() == pytest.approx(255 * GAUSSIAN_NOISE_STD[severity - 1], rel=0.05)


def test_grey_images_stay_grey_and_the_seed_decides_the_noise(package) -> None:
    grey = torch.full((2, 1, 32, 32), 100, dtype=torch.uint8)
    a, b = corrupt(package, grey, "gaussian_noise", 2), corrupt(package, grey, "gaussian_noise", 2, seed=1)
    assert a.shape == (2, 1, 32, 32)
    assert np.array_equal(a, corrupt(package, grey, "gaussian_noise", 2))
    assert not np.array_equal(a, b)


def test_numpys_global_generator_is_left_as_it_was(package, cifar) -> None:
    np.random.seed(123)
    expected = np.random.random(3)
    np.random.seed(123)
    corrupt(package, cifar.x_test[:1], "gaussian_noise", 3)
    assert np.array_equal(np.random.random(3), expected)


# ---------------------------------------------------------------- the cache
def test_a_split_is_computed_once_per_key_then_read_from_its_file(
    package, cifar, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    original = corr.corrupt_array
    monkeypatch.setattr(corr, "corrupt_array", lambda *a: calls.append(a[2:4]) or original(*a))

    first = corr.corrupt_images(cifar, "gaussian_noise", 3, 0, tmp_path)
    files = sorted(tmp_path.glob("*.npz"))
    assert len(calls) == 2 and len(files) == 2  # train and test
    mtimes = [f.stat().st_mtime_ns for f in files]
    again = corr.corrupt_images(cifar, "gaussian_noise", 3, 0, tmp_path)
    assert len(calls) == 2 and [f.stat().st_mtime_ns for f in files] == mtimes
    assert torch.equal(first.x_train, again.x_train) and torch.equal(first.x_test, again.x_test)
    assert first.name == "cifar10+gaussian_noise(3)" and str(SUBSET) in first.source
    assert torch.equal(first.y_test, cifar.y_test)
    assert not torch.equal(first.x_train, cifar.x_train)

    # Each of severity, seed, corruption and the images themselves makes a file of its own.
    corr.corrupt_images(cifar, "gaussian_noise", 2, 0, tmp_path)
    corr.corrupt_images(cifar, "gaussian_noise", 3, 1, tmp_path)
    corr.corrupt_images(cifar, "fog", 3, 0, tmp_path)
    other = ImageData(**{**vars(cifar), "x_test": cifar.x_test.flip(0)})
    corr.corrupt_images(other, "gaussian_noise", 3, 0, tmp_path)
    assert len(calls) == 2 + 2 + 2 + 2 + 1  # the other images share the training split
    assert len(list(tmp_path.glob("*.npz"))) == 9
    seed1 = corr.corrupt_images(cifar, "gaussian_noise", 3, 1, tmp_path)
    assert not torch.equal(seed1.x_train, first.x_train)
    with np.load(files[0], allow_pickle=False) as stored:
        assert json.loads(str(stored["key"]))["severity"] == 3


def test_a_cache_file_is_read_without_pickle(package, cifar, tmp_path: Path) -> None:
    corr.corrupt_images(cifar, "contrast", 1, 0, tmp_path)
    path = next(tmp_path.glob("cifar10-test-*.npz"))
    np.savez(path, images=np.array([object()], dtype=object))  # a file that would need pickle
    with pytest.raises(ValueError, match="allow_pickle"):
        corr.corrupt_images(cifar, "contrast", 1, 0, tmp_path)


# ---------------------------------------------------------------- refused input
@pytest.mark.parametrize("name", ["gauss", "speckle_noise", "", None])
def test_an_unknown_corruption_is_refused_listing_the_fifteen(cifar, tmp_path: Path, name) -> None:
    with pytest.raises(InputError) as err:
        corr.corrupt_images(cifar, name, 3, 0, tmp_path)
    message = str(err.value)
    assert f"corruption={name!r} is invalid" in message and "\n" not in message
    assert all(valid in message for valid in corr.CORRUPTIONS)


@pytest.mark.parametrize("severity", [0, 6, -1, 2.5, True, None])
def test_a_severity_outside_1_to_5_is_refused(cifar, tmp_path: Path, severity) -> None:
    with pytest.raises(InputError, match=rf"severity={severity!r} is invalid: use an integer from 1 to 5"):
        corr.corrupt_images(cifar, "fog", severity, 0, tmp_path)
    assert not list(tmp_path.iterdir())


def test_a_missing_package_is_refused_naming_the_extra(
    cifar, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "imagecorruptions", None)  # `import imagecorruptions` fails
    with pytest.raises(InputError) as err:
        corr.corrupt_images(cifar, "fog", 3, 0, tmp_path)
    message = str(err.value)
    assert "pip install 'penrun[corruptions]'" in message and "imagecorruptions" in message
    assert "\n" not in message and not list(tmp_path.iterdir())


def test_images_smaller_than_the_package_takes_are_refused(package, tmp_path: Path) -> None:
    small = ImageData("mnist", *(torch.zeros(2, 1, 28, 28, dtype=torch.uint8), torch.zeros(2)) * 2, 10, "x")
    with pytest.raises(InputError, match=r"at least 32x32 .* mnist's are 28x28"):
        corr.corrupt_images(small, "fog", 3, 0, tmp_path)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("transfer.corruption=gauss", "transfer.corruption='gauss' is invalid; valid: gaussian_noise, "),
        ("transfer.severity=6", "transfer.severity=6 is invalid: use an integer >= 1 and <= 5"),
        ("transfer.shift=corrupt", "transfer.shift='corrupt' is invalid; valid: none, "),
    ],
)
def test_the_config_refuses_bad_corruption_options(override: str, expected: str) -> None:
    cfg = compose_config(["pair=cifar10_c", override])
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(")):
        schema.check_values(cfg)


def test_the_corruption_options_are_null_for_other_shifts() -> None:
    """Runs of the other pairs keep their configs (and so their run folders and results)."""
    cfg = compose_config(["pair=digits_shifted"])
    assert cfg.transfer.corruption is None and cfg.transfer.severity is None
    schema.check_values(compose_config(["pair=cifar10_c"]))


# ---------------------------------------------------------------- the experiments
TABLES = {
    "cifar10_c_labelled": "cifar10_c_search_labelled",
    "cifar10_c_unlabeled": "cifar10_c_search_unlabeled",
    "cifar10_c_generation": "cifar10_c_search_generation",
}


def sweep(experiment: str) -> tuple[dict, dict[str, list[str]]]:
    """The experiment's composed config and its sweep's values per key."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    params = {key: str(value).split(",") for key, value in cfg.hydra.sweeper.params.items()}
    return cfg, params


def jobs(experiment: str) -> list[list[str]]:
    """Jobs that between them take every value of the sweep: each value of each key, the other
    keys at their first value (the keys do not interact in composing)."""
    _, params = sweep(experiment)
    first = {key: values[0] for key, values in params.items()}
    return [
        [f"experiment={experiment}", *(f"{k}={v}" for k, v in {**first, key: value}.items())]
        for key, values in params.items()
        for value in values
    ]


@pytest.mark.parametrize("experiment", [*TABLES, *TABLES.values(), "cifar10_c_search_kappa_labelled"])
def test_every_job_of_each_experiment_composes_with_valid_values(experiment: str) -> None:
    for job in jobs(experiment):
        cfg = compose_config(job)
        schema.check_values(cfg)
        if cfg.task.name == "distill":
            assert cfg.transfer.shift == "corruption" and cfg.transfer.severity == 3
            assert cfg.teacher.arch == "resnet20" and cfg.student.arch == "resnet8"
        assert cfg.data.name == "cifar10"


def test_the_tables_sweep_what_issue_25_asks() -> None:
    _, labelled = sweep("cifar10_c_labelled")
    corruptions = labelled["transfer.corruption"]
    # one corruption per family
    assert sorted(next(f for f, names in corr.FAMILIES.items() if c in names) for c in corruptions) == sorted(
        corr.FAMILIES
    )
    assert labelled["distill.labels"] == ["10", "50"] and len(labelled["seed"]) == 5
    _, unlabeled = sweep("cifar10_c_unlabeled")
    assert len(unlabeled["transfer.corruption"]) >= 2 and len(unlabeled["seed"]) == 3
    _, generation = sweep("cifar10_c_generation")
    assert generation["+row_cifar10_c_generation"] == ["baseline", "weights_x1", "class_mean_fitted"]
    assert len(generation["seed"]) == 3


def test_the_three_tables_share_one_cached_teacher() -> None:
    """generation copies pair=cifar10_c's teacher settings: one resnet20 is trained, not two."""
    identities = [teacher_identity(compose_config([f"experiment={name}"])) for name in TABLES]
    assert identities[0]["teacher"]["arch"] == "resnet20"
    assert all(identity == identities[0] for identity in identities)


@pytest.mark.parametrize(("table", "search"), TABLES.items())
def test_each_search_gives_every_row_the_same_budget_on_other_seeds_or_the_digits_grid(
    table: str, search: str
) -> None:
    _, rows = sweep(table)
    _, grid = sweep(search)
    # the search sweeps the digits rows (+row_labelled); the table, the rows it chose (+row_cifar10_c_labelled)
    row_key = next(k for k in grid if k.startswith("+"))
    chosen_key = next(k for k in rows if k.startswith("+"))
    assert set(grid[row_key]) <= set(rows[chosen_key]) and len(grid["seed"]) == 2
    digits = {
        "cifar10_c_search_labelled": "search_labelled",
        "cifar10_c_search_unlabeled": "search_unlabeled",
    }
    if search in digits:  # the same budget as the digits tables' searches
        _, theirs = sweep(digits[search])
        assert {k: v for k, v in grid.items() if k != row_key} == {
            k: v for k, v in theirs.items() if k != row_key
        }


# ---------------------------------------------------------------- end to end
@pytest.mark.slow
def test_a_small_cifar10_c_run_records_its_data_and_caches_the_corruption(package, tmp_path: Path) -> None:
    if not SUBSET.exists():
        pytest.skip(f"{SUBSET} not found")
    small = [
        f"{node}.{split}=300" for node in ("data", "transfer") for split in ("limit_train", "limit_test")
    ]
    overrides = ["pair=cifar10_c", "method=ce", "distill.labels=10", "teacher_trainer.max_epochs=1"]
    metrics = run_task([*overrides, *small, "trainer.max_epochs=1"], tmp_path, SHARED_DATA)
    assert metrics["transfer"] == "cifar10+gaussian_noise(3)"
    assert metrics["source_data"].endswith("cifar10_jpeg_subset.npz")
    assert "corrupted by imagecorruptions" in metrics["transfer_data"]
    assert (
        len(list((tmp_path / "outputs" / "corruptions").glob("cifar10-*-gaussian_noise-s3-seed0-*.npz"))) == 2
    )
