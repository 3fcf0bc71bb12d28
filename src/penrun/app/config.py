"""What every task needs from the config: checked values, trainer settings, data, networks, the
run folder. Only app/ reads DictConfig; this module turns it into plain arguments for the
library, and library errors into messages that name config keys.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from penrun.app.errors import ConfigError, config_keys
from penrun.app.schema import IDENTITY_DEFAULTS, RUNTIME_KEYS, check_values
from penrun.data import ImageData, hold_out, load_dataset, load_folder, match_classes, subset
from penrun.errors import InputError
from penrun.models import build_classifier
from penrun.models.networks import (
    Normalization,
    check_arch,
    input_normalization,
    library_spec,
    library_weights,
)
from penrun.train import distributed
from penrun.train.devices import keep_freed_memory, resolve_device, set_threads
from penrun.train.files import atomic_write
from penrun.train.loop import TrainerSettings
from penrun.train.run_folder import RunFolder, made_by
from penrun.train.seeding import seed_everything

log = logging.getLogger(__name__)


def trainer_settings(cfg: DictConfig, key: str = "trainer") -> TrainerSettings:
    """The settings of a trainer node (`trainer`, or `teacher_trainer` for cached teachers);
    its values were checked against the schema when the task started."""
    trainer = cfg[key]
    with config_keys(batch_size=f"{key}.batch_size", device=f"{key}.device"):
        distributed.check_batch_size(trainer.batch_size)
        device = distributed.process_device(resolve_device(trainer.device), trainer.device)
    if trainer.cuda_graphs:
        check_cuda_graphs(trainer, key, device)
    names = [f.name for f in dataclasses.fields(TrainerSettings) if f.name != "device"]
    return TrainerSettings(device=device, **{name: trainer[name] for name in names})


def check_cuda_graphs(trainer: DictConfig, key: str, device: torch.device) -> None:
    """CUDA graphs replay a fixed step: they need a CUDA device, a capturable optimizer and one
    process (DDP's gradient hooks are not captured)."""
    if trainer.optimizer not in ("adam", "adamw"):
        raise ConfigError(
            f"{key}.cuda_graphs=true needs {key}.optimizer=adam or adamw, not {trainer.optimizer!r}"
        )
    if trainer.precision != "32":
        raise ConfigError(f"{key}.cuda_graphs=true captures float32 steps: set {key}.precision=32")
    if device.type != "cuda":
        raise ConfigError(
            f"{key}.cuda_graphs=true needs a CUDA device, but {key}.device={trainer.device!r} is {device}; "
            f"set {key}.cuda_graphs=false"
        )
    if distributed.is_distributed():
        raise ConfigError(f"{key}.cuda_graphs=true runs in one process; under torchrun set it to false")


def setup(cfg: DictConfig) -> TrainerSettings:
    """Join torchrun's process group if there is one, then seed, set threads and tune the
    allocator."""
    check_networks(cfg)
    if cfg.trainer.cuda_graphs and cfg.task.name != "train_teacher":
        raise ConfigError(
            f"trainer.cuda_graphs=true: task={cfg.task.name} trains eagerly; CUDA graphs serve classifier "
            "training (task=train_teacher, teacher_trainer.cuda_graphs, evaluator_trainer.cuda_graphs)"
        )
    settings = trainer_settings(cfg)
    distributed.init(settings.device)
    set_threads(settings.num_threads)
    keep_freed_memory()
    seed_everything(cfg.seed)
    return settings


def load_data(cfg: DictConfig, node: str = "data", like: ImageData | None = None) -> ImageData:
    """The dataset of a data node (`data`, or `transfer`). An image folder given `like` (the
    source a transfer set must fit) is decoded at its size and channels and relabelled into its
    classes by name."""
    options = cfg[node]
    if options.name == "folder":
        data = load_image_folder(options, node, like)
    else:
        keys = {name: f"{node}.{name}" for name in ("name", "path", "download", "image_size", "channels")}
        with config_keys(**keys, data_dir="paths.data_dir"):
            data = load_dataset(
                options.name,
                data_dir=cfg.paths.data_dir,
                cache_dir=cfg.paths.cache_dir,
                download=options.download,
                path=options.path,
                image_size=options.image_size,
                channels=options.channels,
            )
    if options.limit_train is not None or options.limit_test is not None:
        data = subset(data, options.limit_train, options.limit_test)
    return data


def load_image_folder(options: DictConfig, node: str, like: ImageData | None) -> ImageData:
    """`data=folder` (or `data@transfer=folder`): the folder `root`, checked before training."""
    names = ("root", "image_size", "channels", "in_memory", "skip_corrupt")  # those its errors name
    with config_keys(**{name: f"{node}.{name}" for name in names}):
        data = load_folder(
            options.root,
            image_size=like.image_size if like is not None else options.image_size,
            channels=like.channels if like is not None else options.channels,
            test_fraction=options.test_fraction,
            in_memory=options.in_memory,
            memory_mb=options.memory_mb,
            workers=options.workers,
            skip_corrupt=options.skip_corrupt,
        )
        if like is not None and data.labelled:
            unnamed = tuple(str(k) for k in range(like.num_classes))  # an npz file: labels 0..K-1
            data = match_classes(data, like.class_names or unnamed, like.name)
    streamed = not isinstance(data.x_train, torch.Tensor) or not isinstance(data.x_test, torch.Tensor)
    if streamed and options.get("shift", "none") != "none":  # shifts transform whole tensors
        raise ConfigError(
            f"{node}.shift={options.shift} needs the images in memory: set {node}.in_memory=true"
        )
    log.info(data.describe())
    return data


def validation_split(
    cfg: DictConfig, data: ImageData
) -> tuple[ImageData, tuple[torch.Tensor, torch.Tensor] | None]:
    """The training split less `data.val_size` examples (a tenth when null), and those
    examples (None when val_size=0)."""
    size = cfg.data.val_size if cfg.data.val_size is not None else len(data.y_train) // 10
    with config_keys(size="data.val_size"):
        train, x_val, y_val = hold_out(data, size)
    return train, (x_val, y_val) if size else None


def classifier_spec(cfg: DictConfig, node: str, data: ImageData) -> dict[str, Any]:
    """The arguments of `build_classifier` for a network node (`teacher`, `student`,
    `evaluator`) on a dataset, saved in checkpoints so that a classifier can be rebuilt from
    its file alone. The network is built once here: bad values fail now, before any training,
    and a library network's spec records its head layer and width."""
    net_cfg = cfg[node]
    shape = dict(channels=data.channels, image_size=data.image_size, num_classes=data.num_classes)
    if net_cfg.source == "penrun":
        spec = dict(
            arch=net_cfg.arch,
            **shape,
            penultimate_dim=net_cfg.penultimate_dim,
            head=net_cfg.head,
            scale=net_cfg.scale,
            bias=net_cfg.bias,
            feature_relu=net_cfg.feature_relu,
            width=net_cfg.width,
        )
        keys = {name: f"{node}.{name}" for name in ("arch", "head", "penultimate_dim", "width", "scale")}
        with config_keys(**keys, image_size="data.image_size"):
            build_classifier(**spec)
        return spec
    spec = dict(source=net_cfg.source, arch=net_cfg.arch, **shape, head_layer=net_cfg.head_layer)
    normalization = asked_normalization(net_cfg, node, data.channels)
    with network_keys(node):
        if net_cfg.pretrained:  # into the library's cache now: offline, refused before any training
            library_weights(net_cfg.source, net_cfg.arch)
            spec |= dict(pretrained=True)
        if normalization is not None:  # none (the default without pretrained) leaves the spec as before
            spec |= dict(normalization=normalization)
        net = build_classifier(**(spec | {"pretrained": False}))
    return spec | library_spec(net)


def asked_normalization(net_cfg: DictConfig, node: str, channels: int) -> Normalization | None:
    """The (mean, std) that a library network node's `normalization` key asks for."""
    with network_keys(node):
        return input_normalization(
            net_cfg.normalization,
            source=net_cfg.source,
            arch=net_cfg.arch,
            pretrained=net_cfg.pretrained,
            channels=channels,
        )


NETWORK_NODES = ("teacher", "student", "evaluator")


def check_networks(cfg: DictConfig) -> None:
    """Each network node's `arch` is one of its source's classifiers (a cheap check of names,
    before any data is loaded or network trained; the network is built later)."""
    for node in NETWORK_NODES:
        net_cfg = cfg.get(node)
        if net_cfg is None:
            continue
        library_only = {
            "pretrained": "true" if net_cfg.pretrained else None,
            "head_layer": net_cfg.head_layer,
            "normalization": None if net_cfg.normalization in ("auto", "none") else net_cfg.normalization,
        }
        given = [f"{key}={value}" for key, value in library_only.items() if value is not None]
        if net_cfg.source == "penrun" and given:
            raise ConfigError(
                f"{node}.{given[0]} is for torchvision and timm networks: choose one with "
                f"net@{node}=torchvision|timm {node}.arch=NAME"
            )
        with network_keys(node):
            check_arch(net_cfg.source, net_cfg.arch)


@contextmanager
def network_keys(node: str) -> Iterator[None]:
    """Library errors about a network node's arguments in the words of its config keys."""
    names = ("source", "arch", "pretrained", "penultimate_dim", "normalization")
    keys = {name: f"{node}.{name}" for name in names}
    with config_keys(**keys, head=f"{node}.head_layer", head_layer=f"{node}.head_layer",
                     image_size="data.image_size", channels="data.channels"):  # fmt: skip
        yield


def run_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config that identifies a run: without the runtime keys (they change no
    number) and without the nodes other tasks use (null here)."""
    return strip_runtime_keys(OmegaConf.to_container(cfg, resolve=True))


def strip_runtime_keys(config: dict[str, Any]) -> dict[str, Any]:
    """A config without the schema's runtime keys and without top-level nulls."""
    config = {key: value for key, value in config.items() if value is not None}
    for key in RUNTIME_KEYS:
        node, _, leaf = key.rpartition(".")
        if not node:
            config.pop(leaf, None)
        elif isinstance(config.get(node), dict):
            config[node] = {k: v for k, v in config[node].items() if k != leaf}
    return {key: value for key, value in config.items() if value != {}}


def job_folder() -> Path:
    """This job's folder: Hydra's run (or sweep) dir; the cwd when Hydra is not running."""
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(os.getcwd())


def open_folder(cfg: DictConfig, directory: Path | None = None) -> RunFolder:
    return RunFolder(directory or job_folder(), run_config(cfg), IDENTITY_DEFAULTS)


# The folders this process opened for its current job: the entry point closes them when the
# job ends, however it ends (a sweep runs its jobs one after another in one process).
_open_folders: list[RunFolder] = []


def close_folders() -> None:
    while _open_folders:
        _open_folders.pop().close()


def start_task(
    cfg: DictConfig, check: Callable[[DictConfig], None] | None = None
) -> tuple[TrainerSettings, RunFolder, dict[str, Any] | None]:
    """Check the config (the schema's values, then the task's own `check`), seed, open the
    run folder; the metrics of a finished run of this config come back too (the task then
    returns them instead of running again)."""
    check_values(cfg)
    if check is not None:
        check(cfg)
    settings = setup(cfg)
    folder = open_folder(cfg)
    if cfg.rerun and (old := folder.move_aside()) is not None:
        log.info(f"rerun=true: moved the previous run aside to {old}")
    _open_folders.append(folder)
    writable = folder.claim()
    done = folder.finished_metrics()  # refuses a folder of another config, writing nothing
    if done is None and not writable:
        raise InputError(
            f"run folder {folder.dir} cannot be written to (read-only?): make it writable, or set "
            "paths.output_dir to a folder that is"
        )
    if writable:
        folder.remove_orphans()
    if done is not None:
        folder.close()
        log.info(f"{folder.dir} is finished: reusing its results ({made_by(done)})")
        return settings, folder, done
    folder.start_log()
    save_hydra_files(cfg, folder.dir)
    return settings, folder, None


def save_hydra_files(cfg: DictConfig, directory: Path) -> None:
    """What Hydra writes into a job's .hydra/ (penrun turns that off so that nothing is
    written before it holds the folder): the config, Hydra's own, the overrides."""
    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    files = {
        "config.yaml": cfg,
        "hydra.yaml": OmegaConf.create({"hydra": hydra_cfg}),
        "overrides.yaml": OmegaConf.create(list(hydra_cfg.overrides.task)),
    }
    for name, content in files.items():
        text = OmegaConf.to_yaml(content)
        atomic_write(directory / ".hydra" / name, lambda path, text=text: path.write_text(text))
