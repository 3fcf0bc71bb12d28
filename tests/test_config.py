"""app/config.py: trainer settings, data and network nodes, run configs and the start of a task,
each checked on configs built by hand (tests/test_configs.py checks the config tree itself)."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from penrun.app import config
from penrun.app.cli import config_dir
from penrun.app.errors import ConfigError
from penrun.data import load_dataset
from penrun.data.dataset import ImageData
from penrun.errors import InputError
from penrun.models.networks import NORMALIZATIONS
from penrun.train.devices import resolve_device
from test_data import write_npz
from test_folder import image_folder, write_images

from conftest import QUICK, compose_config


@pytest.fixture(scope="module")
def base() -> DictConfig:
    return compose_config([*QUICK, "task=distill"])


def with_values(cfg: DictConfig, **values: object) -> DictConfig:
    """A copy of `cfg` with dotted keys (written `a__b` for `a.b`) set."""
    cfg = cfg.copy()
    for key, value in values.items():
        OmegaConf.update(cfg, key.replace("__", "."), value, merge=False)
    return cfg


def node(**values: object) -> DictConfig:
    return OmegaConf.create(values)


# ---------------------------------------------------------------- trainer settings
def test_trainer_settings_read_the_node_they_are_asked_for(base: DictConfig) -> None:
    cfg = with_values(
        base, teacher_trainer__lr=0.123, teacher_trainer__max_epochs=7, teacher_trainer__batch_size=48,
        teacher_trainer__device="cpu", trainer__lr=0.5,
    )  # fmt: skip
    settings = config.trainer_settings(cfg, "teacher_trainer")
    assert (settings.lr, settings.max_epochs, settings.batch_size) == (0.123, 7, 48)
    assert settings.device == torch.device("cpu")
    assert config.trainer_settings(cfg).lr == 0.5  # `trainer` by default
    assert config.trainer_settings(cfg).device == resolve_device("auto")


def test_trainer_settings_errors_name_the_node(base: DictConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it for two processes
    cfg = with_values(base, teacher_trainer__batch_size=33)
    with pytest.raises(
        ConfigError, match=r"^teacher_trainer\.batch_size=33 cannot be split evenly over the 2"
    ):
        config.trainer_settings(cfg, "teacher_trainer")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = with_values(base, teacher_trainer__device="cuda")
    with pytest.raises(ConfigError, match=r"^teacher_trainer\.device='cuda' but CUDA is not available"):
        config.trainer_settings(cfg, "teacher_trainer")
    cfg = with_values(base, teacher_trainer__cuda_graphs=True, teacher_trainer__optimizer="sgd")
    with pytest.raises(
        ConfigError, match=r"^teacher_trainer\.cuda_graphs=true needs teacher_trainer\.optimizer"
    ):
        config.trainer_settings(cfg, "teacher_trainer")


def test_torchrun_asking_more_gpus_than_a_node_has_names_the_device_key(
    base: DictConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError) as refused:
        config.trainer_settings(with_values(base, teacher_trainer__device="cuda"), "teacher_trainer")
    assert str(refused.value).startswith(
        "torchrun started 4 processes on this node but it has 1 CUDA device(s) (teacher_trainer.device='cuda')"
    )


CUDA = torch.device("cuda")  # a device object needs no GPU


@pytest.mark.parametrize(
    ("values", "device", "distributed", "message"),
    [
        ({"optimizer": "sgd"}, CUDA, False,
         "evaluator_trainer.cuda_graphs=true needs evaluator_trainer.optimizer=adam or adamw, not 'sgd'"),
        ({"precision": "bf16"}, CUDA, False,
         "evaluator_trainer.cuda_graphs=true captures float32 steps: set evaluator_trainer.precision=32"),
        ({"device": "cpu"}, torch.device("cpu"), False,
         "evaluator_trainer.cuda_graphs=true needs a CUDA device, but evaluator_trainer.device='cpu' is cpu; "
         "set evaluator_trainer.cuda_graphs=false"),
        ({}, CUDA, True, "evaluator_trainer.cuda_graphs=true runs in one process; under torchrun set it to false"),
    ],
)  # fmt: skip
def test_cuda_graphs_are_refused_where_they_cannot_replay(
    values: dict, device: torch.device, distributed: bool, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(config.distributed, "is_distributed", lambda: distributed)
    trainer = node(**({"optimizer": "adamw", "precision": "32", "device": "cuda"} | values))
    with pytest.raises(ConfigError) as refused:
        config.check_cuda_graphs(trainer, "evaluator_trainer", device)
    assert str(refused.value) == message


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_cuda_graphs_pass_with_a_capturable_optimizer_on_cuda(
    optimizer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(config.distributed, "is_distributed", lambda: False)
    config.check_cuda_graphs(node(optimizer=optimizer, precision="32", device="cuda"), "trainer", CUDA)


def test_setup_seeds_sets_threads_and_checks_the_networks_first(base: DictConfig) -> None:
    random.seed(0)
    config.setup(with_values(base, seed=5, trainer__num_threads=2, trainer__device="cpu"))
    try:
        assert torch.get_num_threads() == 2
        tensor, array, number = torch.rand(3), np.random.rand(), random.random()
    finally:
        torch.set_num_threads(1)
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    assert torch.equal(tensor, torch.rand(3)) and array == np.random.rand() and number == random.random()
    with pytest.raises(ConfigError, match=r"^student\.arch='mlp9' is not a penrun classifier"):
        config.setup(with_values(base, student__arch="mlp9", trainer__cuda_graphs=True))


def test_setup_joins_torchrun_s_group_on_the_trainer_s_device(
    base: DictConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    joined = []
    monkeypatch.setattr(config.distributed, "init", joined.append)
    config.setup(with_values(base, trainer__device="cpu"))
    assert joined == [torch.device("cpu")]


def test_setup_refuses_cuda_graphs_outside_classifier_training(base: DictConfig) -> None:
    with pytest.raises(ConfigError) as refused:
        config.setup(with_values(base, trainer__cuda_graphs=True))
    assert str(refused.value) == (
        "trainer.cuda_graphs=true: task=distill trains eagerly; CUDA graphs serve classifier training "
        "(task=train_teacher, teacher_trainer.cuda_graphs, evaluator_trainer.cuda_graphs)"
    )
    teacher = compose_config([*QUICK, "task=train_teacher", "trainer.cuda_graphs=true"])
    with pytest.raises(ConfigError, match=r"^trainer\.cuda_graphs=true needs a CUDA device"):
        config.setup(with_values(teacher, trainer__device="cpu"))  # past the task check


# ---------------------------------------------------------------- data nodes
def test_a_catalogue_dataset_is_cut_to_its_limits(base: DictConfig) -> None:
    digits = load_dataset("digits")
    data = config.load_data(with_values(base, data__limit_train=50, data__limit_test=None))
    assert (len(data.y_train), len(data.y_test)) == (50, len(digits.y_test))
    data = config.load_data(with_values(base, data__limit_train=None, data__limit_test=20))
    assert (len(data.y_train), len(data.y_test)) == (len(digits.y_train), 20)
    whole = config.load_data(with_values(base, data__limit_train=None, data__limit_test=None))
    assert torch.equal(whole.x_train, digits.x_train) and whole.name == "digits"


def test_an_offline_catalogue_dataset_names_the_folder_and_download_keys(
    base: DictConfig, tmp_path: Path
) -> None:
    (tmp_path / "empty").mkdir()
    cfg = with_values(base, data__name="mnist", paths__data_dir=str(tmp_path / "empty"),
                      paths__cache_dir=str(tmp_path / "cache"), data__download=False)  # fmt: skip
    with pytest.raises(InputError) as refused:
        config.load_data(cfg)
    assert str(refused.value).endswith(
        f"in the data folder (paths.data_dir='{tmp_path / 'empty'}'), or allow the torchvision download "
        f"(data.download=True, now False) into {tmp_path / 'cache' / 'mnist'}."
    )


def npz_transfer(base: DictConfig, path: Path, **values: object) -> DictConfig:
    cfg = compose_config([*QUICK, "task=distill", "data@transfer=npz", f"transfer.path={path}"])
    return with_values(cfg, **values)


def test_an_npz_transfer_set_is_read_at_the_asked_size(base: DictConfig, tmp_path: Path) -> None:
    path = write_npz(tmp_path / "set.npz")
    data = config.load_data(
        npz_transfer(base, path, transfer__image_size=16, transfer__channels=3), "transfer"
    )
    assert data.x_train.shape == (20, 3, 16, 16) and data.x_test.shape == (8, 3, 16, 16)
    assert torch.equal(data.y_train, torch.arange(20) % 4)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"transfer__path": "/no/such.npz"}, "transfer.path='/no/such.npz' does not exist"),
        ({"transfer__image_size": 3}, "transfer.image_size=3 is invalid: use null or an integer >= 4"),
        ({"transfer__channels": 2}, "transfer.channels=2 is invalid: use null, 1 (grey) or 3 (RGB)"),
        ({"transfer__path": None}, "transfer.name='npz' needs transfer.path=FILE.npz"),
    ],
)
def test_a_data_node_s_errors_name_its_keys(
    base: DictConfig, tmp_path: Path, values: dict, message: str
) -> None:
    cfg = npz_transfer(base, write_npz(tmp_path / "set.npz"), **values)
    with pytest.raises(InputError) as refused:
        config.load_data(cfg, "transfer")
    assert str(refused.value).startswith(message), refused.value


def folder_node(folder: Path, **values: object) -> DictConfig:
    defaults = dict(
        name="folder", root=str(folder), image_size=12, channels=1, test_fraction=0.2, in_memory="auto",
        memory_mb=2048.0, workers=0, skip_corrupt=False, limit_train=None, limit_test=None, shift="none",
    )  # fmt: skip
    return node(transfer=defaults | values)


def test_a_folder_is_read_at_its_node_s_size_and_channels(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = image_folder(tmp_path / "f", ["dog", "cat", "bird"], per_class=2)
    with caplog.at_level(logging.INFO, logger="penrun.app.config"):
        data = config.load_data(folder_node(root), "transfer")
    assert data.x_train.shape[1:] == (1, 12, 12) and isinstance(data.x_train, torch.Tensor)
    assert data.class_names == ("bird", "cat", "dog")
    assert data.describe() in caplog.messages


def digits_like(image_size: int, channels: int, classes: int, names: tuple[str, ...]) -> ImageData:
    x = torch.zeros(2, channels, image_size, image_size, dtype=torch.uint8)
    return ImageData(
        "like", x, torch.zeros(2, dtype=torch.long), x, torch.zeros(2, dtype=torch.long), classes, "", names
    )


def test_a_transfer_folder_takes_the_source_s_size_and_classes_by_name(tmp_path: Path) -> None:
    root = tmp_path / "f"
    for k, (name, count) in enumerate({"dog": 1, "cat": 2, "bird": 3}.items()):
        for split in ("train", "test"):
            write_images(root / split / name, count, seed=k)
    like = digits_like(8, 3, 4, ("dog", "cat", "bird", "fish"))
    data = config.load_data(folder_node(root, image_size=12, channels=1), "transfer", like)
    assert data.x_train.shape[1:] == (3, 8, 8)
    assert data.class_names == like.class_names and data.num_classes == 4
    assert torch.bincount(data.y_train, minlength=4).tolist() == [1, 2, 3, 0]


def test_an_unnamed_source_s_classes_are_its_labels(tmp_path: Path) -> None:
    """A source without class names (an npz file) has classes "0".."K-1": folder 10 is label 10."""
    root = image_folder(tmp_path / "f", ["0", "1", "10"], per_class=1)
    data = config.load_data(folder_node(root), "transfer", digits_like(8, 1, 11, ()))
    assert data.num_classes == 11 and sorted(set(data.y_train.tolist())) == [0, 1, 10]


def test_an_unlabeled_transfer_folder_is_not_matched(tmp_path: Path) -> None:
    write_images(tmp_path / "flat", 6)
    data = config.load_data(folder_node(tmp_path / "flat"), "transfer", digits_like(8, 1, 3, ("a", "b", "c")))
    assert not data.labelled and len(data.y_train) + len(data.y_test) == 6


def test_a_folder_s_split_fraction_and_memory_budget_reach_the_loader(tmp_path: Path) -> None:
    root = tmp_path / "f"
    for name in ("a", "b"):
        write_images(root / name, 10)
    data = config.load_data(folder_node(root, test_fraction=0.5, memory_mb=1e-4), "transfer")
    assert (len(data.y_train), len(data.y_test)) == (10, 10)
    assert not isinstance(data.x_train, torch.Tensor)  # 1e-4 MiB: streamed
    with pytest.raises(ConfigError) as refused:
        config.load_data(folder_node(root, memory_mb=1e-4, shift="rotate"), "transfer")
    assert (
        str(refused.value) == "transfer.shift=rotate needs the images in memory: set transfer.in_memory=true"
    )
    shifted = config.load_data(folder_node(root, memory_mb=1e-4, in_memory=True, shift="rotate"), "transfer")
    assert isinstance(shifted.x_test, torch.Tensor)


def test_a_shift_is_refused_when_either_split_is_streamed(tmp_path: Path) -> None:
    root = tmp_path / "f"
    for name in ("a", "b"):
        write_images(root / name, 10)  # 16 training and 4 test images of 144 bytes
    budget = 1000 / 2**20  # MiB: the test split fits, the training split does not
    data = config.load_data(folder_node(root, channels=1, memory_mb=budget), "transfer")
    assert not isinstance(data.x_train, torch.Tensor) and isinstance(data.x_test, torch.Tensor)
    with pytest.raises(ConfigError, match=r"^transfer\.shift=rotate needs the images in memory"):
        config.load_data(folder_node(root, channels=1, memory_mb=budget, shift="rotate"), "transfer")
    unshifted = folder_node(root, channels=1, memory_mb=budget)
    del unshifted.transfer["shift"]  # a data node without the key: no shift
    assert len(config.load_data(unshifted, "transfer").y_test) == 4


def test_a_transfer_folder_s_unknown_class_is_refused_naming_the_source(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "f", ["cat", "zebra"], per_class=1)
    with pytest.raises(InputError, match=r"^f has classes \['zebra'\] that like lacks"):
        config.load_data(folder_node(root), "transfer", digits_like(8, 1, 2, ("cat", "dog")))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"root": "/no/such/folder"}, "transfer.root='/no/such/folder' does not exist: give a folder"),
        ({"image_size": 3}, "transfer.image_size=3 is invalid: a folder's images need an integer size >= 4"),
        ({"channels": 2}, "transfer.channels=2 is invalid: use 1 (grey) or 3 (RGB)"),
        ({"in_memory": "sometimes"}, "transfer.in_memory='sometimes' is invalid: use auto, true or false"),
    ],
)
def test_a_folder_node_s_errors_name_its_keys(tmp_path: Path, values: dict, message: str) -> None:
    root = image_folder(tmp_path / "f", ["a", "b"], per_class=1)
    with pytest.raises(InputError) as refused:
        config.load_data(folder_node(root, **values), "transfer")
    assert str(refused.value) == message


def test_a_corrupt_image_is_named_by_its_key_or_skipped(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "f", ["a", "b"], per_class=2)
    (root / "train" / "a" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match=r"or set transfer\.skip_corrupt=true to skip them$"):
        config.load_data(folder_node(root), "transfer")
    data = config.load_data(folder_node(root, skip_corrupt=True), "transfer")
    assert len(data.y_train) == 5  # 2 + 2 and the grey one; the broken file skipped


def test_a_streamed_folder_is_decoded_by_its_workers(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "f", ["a", "b"], per_class=2)
    data = config.load_data(folder_node(root, in_memory=False, workers=2), "transfer")
    assert data.x_train.workers == 2


# ---------------------------------------------------------------- validation split
@pytest.mark.parametrize(("val_size", "held"), [(None, 143), (100, 100), (0, 0)])
def test_the_validation_split_is_val_size_or_a_tenth(
    base: DictConfig, val_size: int | None, held: int
) -> None:
    data = load_dataset("digits")  # 1437 training examples: a tenth is 143
    train, val = config.validation_split(with_values(base, data__val_size=val_size), data)
    assert len(train.y_train) == len(data.y_train) - held
    assert (val is None) if held == 0 else (len(val[0]) == len(val[1]) == held)


def test_a_validation_split_too_large_names_its_key(base: DictConfig) -> None:
    with pytest.raises(ConfigError, match=r"^data\.val_size=1437 must be at least 0"):
        config.validation_split(with_values(base, data__val_size=1437), load_dataset("digits"))


# ---------------------------------------------------------------- network nodes
def rgb(size: int = 32, classes: int = 10) -> ImageData:
    return digits_like(size, 3, classes, ())


def test_a_penrun_network_s_spec_is_its_node_on_the_data(base: DictConfig) -> None:
    cfg = with_values(base, student__arch="lenet5", student__penultimate_dim=12, student__width=0.5,
                      student__head="cosine", student__scale=8.0, student__bias=False, student__feature_relu=True)  # fmt: skip
    assert config.classifier_spec(cfg, "student", rgb(16, 7)) == dict(
        arch="lenet5", channels=3, image_size=16, num_classes=7, penultimate_dim=12, head="cosine",
        scale=8.0, bias=False, feature_relu=True, width=0.5,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("values", "size", "message"),
    [
        (
            {"student__arch": "lenet5"},
            8,
            "student.arch='lenet5' needs images of at least 16x16, got data.image_size=8",
        ),
        ({"student__penultimate_dim": 1}, 8, "student.penultimate_dim=1 is invalid: it must be >= 2"),
        ({"student__width": 0.0}, 8, "student.width=0.0 is invalid: it must be > 0"),
        ({"student__head": "cosine", "student__scale": 0.0}, 8, "student.scale=0.0 is invalid"),
        ({"student__head": "arc"}, 8, "student.head='arc' is invalid"),
        ({"student__arch": "mlp9"}, 8, "student.arch='mlp9' is invalid"),
    ],
)
def test_a_penrun_network_s_errors_name_its_keys(
    base: DictConfig, values: dict, size: int, message: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        config.classifier_spec(with_values(base, **values), "student", rgb(size))
    assert str(refused.value).startswith(message), refused.value


def library_node(base: DictConfig, **values: object) -> DictConfig:
    cfg = compose_config([*QUICK, "task=distill", "net@student=torchvision"])
    return with_values(cfg, **{f"student__{key}": value for key, value in values.items()})


def test_a_library_network_s_spec_records_its_head_and_normalization(base: DictConfig) -> None:
    spec = config.classifier_spec(library_node(base, arch="resnet18"), "student", rgb())
    assert spec == dict(source="torchvision", arch="resnet18", channels=3, image_size=32, num_classes=10,
                        head_layer="fc", penultimate_dim=512)  # fmt: skip
    spec = config.classifier_spec(library_node(base, normalization="imagenet"), "student", rgb())
    assert spec["normalization"] == NORMALIZATIONS["imagenet"]


def test_a_library_network_s_pretrained_weights_are_fetched_before_training(
    base: DictConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked = []
    library = torchvision.models.resnet18(num_classes=1000).state_dict()
    monkeypatch.setattr(
        config, "library_weights", lambda source, arch: asked.append((source, arch)) or library
    )
    spec = config.classifier_spec(library_node(base, pretrained=True), "student", rgb())
    assert asked == [("torchvision", "resnet18")]
    assert (
        spec["pretrained"] is True and spec["normalization"] == NORMALIZATIONS["imagenet"]
    )  # auto: the weights'

    def offline(source: str, arch: str) -> None:
        raise ValueError("pretrained=True: not in the cache (arch=resnet18)")

    monkeypatch.setattr(config, "library_weights", offline)
    with pytest.raises(
        ConfigError, match=r"^student\.pretrained=True: not in the cache \(student\.arch=resnet18\)$"
    ):
        config.classifier_spec(library_node(base, pretrained=True), "student", rgb())


@pytest.mark.parametrize(
    ("values", "data", "message"),
    [
        ({"normalization": "cifar"}, rgb(), "student.normalization='cifar' is invalid; valid: auto, none, imagenet"),
        ({"normalization": "imagenet"}, digits_like(32, 1, 10, ()),
         "student.normalization=imagenet standardizes images of 3 channels, not of 1"),
        ({"head_layer": "avgpool"}, rgb(), "student.head_layer='avgpool' is a AdaptiveAvgPool2d"),
    ],
)  # fmt: skip
def test_a_library_network_s_errors_name_its_keys(
    base: DictConfig, values: dict, data: ImageData, message: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        config.classifier_spec(library_node(base, **values), "student", data)
    assert str(refused.value).startswith(message), refused.value


def test_auto_normalization_is_the_pretrained_weights_of_the_node_s_source() -> None:
    """timm's test_vit was trained on images standardized by mean = std = 0.5, torchvision's
    alexnet (which timm lacks) on ImageNet's (their libraries' metadata)."""
    timm_node = node(source="timm", arch="test_vit", pretrained=True, normalization="auto")
    assert config.asked_normalization(timm_node, "teacher", 3) == ([0.5] * 3, [0.5] * 3)
    torchvision_node = node(source="torchvision", arch="alexnet", pretrained=True, normalization="auto")
    assert config.asked_normalization(torchvision_node, "teacher", 3) == NORMALIZATIONS["imagenet"]


def test_network_keys_speak_in_the_node_s_keys() -> None:
    with pytest.raises(ConfigError) as refused, config.network_keys("evaluator"):
        raise ValueError("source=a arch=b pretrained=c penultimate_dim=d normalization=e head=f "
                         "head_layer=g image_size=h channels=i")  # fmt: skip
    assert str(refused.value) == (
        "evaluator.source=a evaluator.arch=b evaluator.pretrained=c evaluator.penultimate_dim=d "
        "evaluator.normalization=e evaluator.head_layer=f evaluator.head_layer=g data.image_size=h data.channels=i"
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["teacher.pretrained=true", "teacher.head_layer=fc"],
         "teacher.pretrained=true is for torchvision and timm networks: choose one with "
         "net@teacher=torchvision|timm teacher.arch=NAME"),
        (["student.head_layer=fc"], "student.head_layer=fc is for torchvision and timm networks"),
        (["student.normalization=imagenet"], "student.normalization=imagenet is for torchvision and timm networks"),
        (["student.arch=mlp9"], "student.arch='mlp9' is not a penrun classifier; valid:"),
        (["net@teacher=torchvision", "teacher.arch=resnet19"],
         "teacher.arch='resnet19' is not a torchvision classifier; close names: resnet18"),
        (["task=vae", "net@evaluator=torchvision", "evaluator.arch=resnet19"], "evaluator.arch='resnet19'"),
    ],
)  # fmt: skip
def test_each_network_node_s_names_are_checked(overrides: list[str], message: str) -> None:
    cfg = compose_config([*QUICK, "task=distill", *overrides])
    with pytest.raises(ConfigError) as refused:
        config.check_networks(cfg)
    assert str(refused.value).startswith(message), refused.value


@pytest.mark.parametrize("normalization", ["auto", "none"])
def test_a_penrun_network_s_default_normalization_passes(normalization: str) -> None:
    config.check_networks(compose_config([*QUICK, f"teacher.normalization={normalization}"]))


# ---------------------------------------------------------------- run configs and run folders
def test_runtime_keys_and_empty_nodes_are_not_part_of_a_run_s_identity() -> None:
    stored = {
        "seed": 3, "rerun": True, "objective": "x", "evaluator": None,
        "trainer": {"lr": 0.1, "device": "cpu", "num_threads": 2, "progress": False, "cuda_graphs": False,
                    "channels_last": True},
        "data": {"name": "digits", "in_memory": "auto", "memory_mb": 1.0, "workers": 2},
        "paths": {"data_dir": "d", "cache_dir": "c", "output_dir": "o"},
        "method": {"device": "kept: not a runtime key of this node"},
    }  # fmt: skip
    assert config.strip_runtime_keys(stored) == {
        "seed": 3,
        "trainer": {"lr": 0.1},
        "data": {"name": "digits"},
        "method": {"device": "kept: not a runtime key of this node"},
    }


def test_a_run_config_is_resolved_and_stripped(base: DictConfig) -> None:
    run = config.run_config(with_values(base, seed=4, distill__labels=None))
    assert run["seed"] == 4 and run["distill"]["held_out"] == "seeded"  # interpolated from labels
    assert "rerun" not in run and "device" not in run["trainer"] and "evaluator" not in run


def test_outside_hydra_a_job_s_folder_is_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert config.job_folder() == tmp_path
    config.save_hydra_files(node(seed=1), tmp_path)
    assert not (tmp_path / ".hydra").exists()


def fit_config(**values: object) -> DictConfig:
    return with_values(compose_config([*QUICK, "task=fit", "fit.samples_per_class=2"]), **values)


def test_start_task_checks_seeds_and_opens_the_job_s_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    checked = []
    cfg = fit_config(seed=8)
    settings, folder, done = config.start_task(cfg, checked.append)
    try:
        assert checked == [cfg] and done is None and folder.dir == tmp_path
        assert settings.device == resolve_device("auto") and (tmp_path / "penrun.log").exists()
        assert torch.equal(torch.rand(2), torch.rand(2, generator=torch.Generator().manual_seed(8)))
        (tmp_path / ".orphan.tmp").write_text("left by a killed write")
        folder.write_metrics({"test_acc": 0.5}, "complete")
    finally:
        config.close_folders()
    # A run stored before a key existed lacks it: at its default, it is the same config.
    stored = json.loads((tmp_path / "metrics.json").read_text())
    del stored["config"]["trainer"]["weight_decay"]  # 0.0005, the schema's default
    (tmp_path / "metrics.json").write_text(json.dumps(stored))
    with caplog.at_level(logging.INFO, logger="penrun.app.config"):
        again = config.start_task(cfg)
    config.close_folders()
    assert again[2]["test_acc"] == 0.5  # a finished run's metrics come back
    assert not (tmp_path / ".orphan.tmp").exists()
    # The stamp of the penrun that wrote it (its version; "or older" when a run has none).
    reused = f"{tmp_path} is finished: reusing its results (made by penrun {stored['penrun']['version']}"
    assert caplog.messages[-1].startswith(reused) and "or older" not in caplog.messages[-1]


def test_start_task_refuses_bad_values_before_opening_a_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    def refuse(cfg: DictConfig) -> None:
        raise ConfigError("the task's own check")

    with pytest.raises(ConfigError, match="the task's own check"):
        config.start_task(fit_config(), refuse)
    with pytest.raises(ConfigError, match=r"^trainer\.lr=-1"):
        config.start_task(fit_config(trainer__lr=-1.0), refuse)  # the schema's values first
    assert list(tmp_path.iterdir()) == []


def test_rerun_moves_a_finished_run_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "job").mkdir()
    monkeypatch.chdir(tmp_path / "job")
    with caplog.at_level(logging.INFO, logger="penrun.app.config"):
        _, folder, _ = config.start_task(fit_config(rerun=True))  # nothing to move yet
        folder.write_metrics({"test_acc": 0.5}, "complete")
        config.close_folders()
        _, folder, done = config.start_task(fit_config(rerun=True))
        config.close_folders()
    assert done is None and not (tmp_path / "job" / "metrics.json").exists()
    (old,) = set(tmp_path.iterdir()) - {tmp_path / "job"}  # the old run kept beside it
    assert old.name.startswith("job.old-") and (old / "metrics.json").exists()
    assert [m for m in caplog.messages if "rerun" in m] == [
        f"rerun=true: moved the previous run aside to {old}"
    ]


def test_a_read_only_folder_without_a_finished_run_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(config.RunFolder, "claim", lambda self: False)
    with pytest.raises(InputError) as refused:
        config.start_task(fit_config())
    config.close_folders()
    assert str(refused.value) == (
        f"run folder {tmp_path} cannot be written to (read-only?): make it writable, or set "
        "paths.output_dir to a folder that is"
    )


@pytest.fixture
def under_hydra(tmp_path: Path) -> Iterator[DictConfig]:
    """A job's config as Hydra's run sets it up: HydraConfig holds its `hydra` node."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[*QUICK, "seed=3"], return_hydra_config=True)
    OmegaConf.update(cfg, "hydra.runtime.output_dir", str(tmp_path / "job"))
    HydraConfig.instance().set_config(cfg)
    try:
        with open_dict(cfg):
            del cfg["hydra"]
        yield cfg
    finally:
        HydraConfig.instance().cfg = None


def test_under_hydra_a_job_writes_hydra_s_files_into_its_own_folder(
    under_hydra: DictConfig, tmp_path: Path
) -> None:
    assert config.job_folder() == tmp_path / "job"
    config.save_hydra_files(under_hydra, tmp_path / "job")
    hydra_files = tmp_path / "job" / ".hydra"
    assert OmegaConf.load(hydra_files / "config.yaml") == under_hydra
    assert OmegaConf.load(hydra_files / "overrides.yaml") == [*QUICK, "seed=3"]
    assert OmegaConf.load(hydra_files / "hydra.yaml").hydra.runtime.output_dir == str(tmp_path / "job")
