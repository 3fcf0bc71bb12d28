"""The teacher (or evaluator) a task uses: `teacher_ckpt=PATH`, or one trained for the configured
`data` and `teacher` and cached under `paths.output_dir/teachers/`, keyed by everything that
shapes it. A torchvision or timm network (`net@teacher=torchvision`) given as a bare state_dict
or as the library's pretrained weights becomes a penrun checkpoint with its activation
statistics once, cached under `paths.output_dir/statistics/` (keyed by the weights' content
hash, the network's spec and the data)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from penrun.app.config import (
    asked_normalization,
    classifier_spec,
    network_keys,
    strip_runtime_keys,
    trainer_settings,
    validation_split,
)
from penrun.app.errors import ConfigError
from penrun.app.schema import IDENTITY_DEFAULTS
from penrun.core.penultimate import PenultimateModel
from penrun.data import ImageData
from penrun.models import Classifier, HookedClassifier, build_classifier
from penrun.models.networks import head_classes, load_weights, pretrained_info
from penrun.train import distributed
from penrun.train.checkpoint import CHECKPOINT_FORMAT, load_classifier, load_state_dict, read_weights_only
from penrun.train.classifier import statistics_of, train_and_record
from penrun.train.evaluation import test_accuracy
from penrun.train.files import exclusive_lock, save_json, save_torch
from penrun.train.loop import TrainerSettings
from penrun.train.run_folder import RunFolder, made_by

log = logging.getLogger(__name__)


def penultimate_model(
    teacher: Classifier, ckpt: dict[str, Any], path: str | Path, vmf: DictConfig
) -> PenultimateModel:
    """The vMF model (the `vmf` node) of a teacher's final layer; a checkpoint that cannot
    give one (a linear head without recorded activation statistics) is a ConfigError."""
    try:
        return PenultimateModel.from_classifier(
            teacher,
            ckpt.get("activation_stats"),
            radius=vmf.radius,
            kappa=vmf.kappa,
            kappa_scale=vmf.kappa_scale,
            direction=vmf.direction,
        )
    except ValueError as err:
        hint = ""
        if "activation_stats" in str(err):
            hint = f"; record them with: penrun task=record_statistics teacher_ckpt='{path}' data=<its training data>"
        raise ConfigError(f"teacher checkpoint {str(path)!r} cannot define p(a | y): {err}{hint}") from err


def library_checkpoint(
    cfg: DictConfig,
    data: ImageData,
    settings: TrainerSettings,
    *,
    net_key: str,
    ckpt_key: str,
) -> Path:
    """A torchvision or timm network's weights (the state_dict at `cfg[ckpt_key]`, or the
    library's pretrained ones when it is null) as a penrun checkpoint: the state_dict, the
    network's spec, and the activation statistics of the training split less validation.
    Made once and cached, keyed by the weights' content hash, the spec and the data; its path."""
    given = cfg.get(ckpt_key)
    if given is None:  # the library's own weights, used as they are: their classes must be the data's
        net_cfg = cfg[net_key]
        with network_keys(net_key):
            classes, _ = pretrained_info(net_cfg.source, net_cfg.arch)
        check_classes(classes, data, f"{net_key}.pretrained=true ({net_cfg.source}'s {net_cfg.arch})")
    train, _ = validation_split(cfg, data)
    spec = classifier_spec(cfg, net_key, train)
    weights = f"sha256:{file_sha256(given)}" if given is not None else f"{spec['source']}:pretrained"
    data_node = OmegaConf.to_container(cfg.data, resolve=True)
    # how the data are read (in memory or streamed, by how many workers) is not what they are
    identity = {"weights": weights, "spec": spec, **strip_runtime_keys({"data": data_node})}
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    path = Path(cfg.paths.output_dir) / "statistics" / f"{data.name}-{spec['arch']}-{digest}.pt"
    with cache_lock(path):
        cached = distributed.broadcast_object(path.is_file())
        if cached:
            log.info(f"using cached statistics {path} of {net_key} {spec['arch']} ({weights})")
        else:
            net = library_network(cfg, spec, train, net_key, ckpt_key)
            log.info(
                f"{net_key} {spec['arch']}: activation statistics of {len(train.y_train)} training images"
            )
            stats = statistics_of(net.to(settings.device), train, settings)
            save_torch(path, classifier_checkpoint(spec, net, stats, identity))
    distributed.barrier()
    return path


def library_network(
    cfg: DictConfig, spec: dict[str, Any], data: ImageData, net_key: str, ckpt_key: str
) -> HookedClassifier:
    """The network of a library spec with the weights `library_checkpoint` describes: a
    state_dict's head must have the data's class count, and the rest fit the network."""
    given = cfg.get(ckpt_key)
    # classifier_spec built this network already: its arguments are known to be valid here
    if given is None:  # the library's own weights (their classes checked), used as they are
        return build_classifier(**spec).eval()
    net = build_classifier(**(spec | {"pretrained": False}))
    state = load_state_dict(given)
    head = spec["head_layer"]
    classes = head_classes(head, state)
    if classes is not None:
        check_classes(classes, data, f"{ckpt_key}={str(given)!r} (head {head})")
    try:
        load_weights(net.module, state)
    except ValueError as err:
        raise ConfigError(
            f"{ckpt_key}={str(given)!r} does not fit {net_key}.arch={spec['arch']}: {err}"
        ) from err
    return net.eval()


def check_classes(classes: int, data: ImageData, what: str) -> None:
    """A teacher's head defines its classes: the data must have as many."""
    if classes != data.num_classes:
        raise ConfigError(
            f"{what} has {classes} classes, the data {data.name} {data.num_classes}: use the data the "
            "network was trained on"
        )


def classifier_checkpoint(
    spec: dict[str, Any], net: HookedClassifier, stats: dict[str, torch.Tensor], identity: dict[str, Any]
) -> dict[str, Any]:
    """A penrun checkpoint of a network whose weights came from elsewhere (load_classifier
    rebuilds it from the spec alone: the weights are in the file, not fetched again)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "epoch": 0,
        "classifier": spec | {"pretrained": False},
        "modules": {"model": net.state_dict()},
        "activation_stats": stats,
        "made_from": json.dumps(identity, sort_keys=True),
    }


def is_penrun_checkpoint(path: str | Path) -> bool:
    """A checkpoint written by penrun (not a bare state_dict)."""
    ckpt = read_weights_only(path, "save the model's state_dict alone: torch.save(model.state_dict(), path)")
    return isinstance(ckpt, dict) and ckpt.get("format") == CHECKPOINT_FORMAT


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(Path(path).expanduser(), "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def vmf_record(vmf: DictConfig, model: PenultimateModel | None) -> dict[str, Any]:
    """How a run drew activations, for its metrics and reports: the `vmf` option ('none' when
    the run used no vMF) and the sampler's mean kappa."""
    if model is None:
        return {"vmf": "none"}
    return {
        "vmf": f"{vmf.direction}/{vmf.kappa} x{vmf.kappa_scale:g}",
        "vmf_mean_kappa": model.kappa.mean().item(),
    }


def check_fits_data(spec: dict[str, Any], data: ImageData, what: str, path: str | Path) -> None:
    """A classifier checkpoint must take the configured data's images and classes."""
    wanted = {
        "num_classes": data.num_classes,
        "channels": data.channels,
        "image_size": data.image_size,
    }
    diff = [f"{k} {spec[k]} (data {data.name}: {v})" for k, v in wanted.items() if spec[k] != v]
    if diff:
        raise ConfigError(
            f"{what} checkpoint {str(path)!r} does not fit the data: {', '.join(diff)}. Use a "
            f"{what} trained on this data, or set data.image_size / data.channels to match it"
        )


# A network node's keys that only a library's networks read.
LIBRARY_KEYS = ("source", "pretrained", "head_layer")
# Keys that joined the schema after teachers were first cached, by the node of the identity they
# sit in: left out while they hold their default (which trains as before), so the teachers cached
# then stay found.
ADDED_KEYS = {
    "data": ("root", "test_fraction", "skip_corrupt"),
    "trainer": ("precision",),
    "teacher": ("normalization",),
}


def teacher_identity(
    cfg: DictConfig,
    net_key: str = "teacher",
    trainer_key: str = "teacher_trainer",
    seed_key: str = "teacher_seed",
) -> dict[str, Any]:
    """Everything that determines a cached classifier's weights: the config of the
    train_teacher run that makes it."""
    net = OmegaConf.to_container(cfg[net_key], resolve=True)
    if net["source"] == "penrun":  # as before network sources: the teachers cached then stay found
        net = {key: value for key, value in net.items() if key not in LIBRARY_KEYS}
    identity = {
        "task": {"name": "train_teacher"},
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "teacher": net,
        "trainer": OmegaConf.to_container(cfg[trainer_key], resolve=True),
        "seed": cfg[seed_key],
    }
    for node, keys in ADDED_KEYS.items():
        for key in keys:
            if identity[node].get(key) == IDENTITY_DEFAULTS[f"{node}.{key}"]:
                del identity[node][key]
    return strip_runtime_keys(identity)


def obtain_classifier(
    cfg: DictConfig,
    data: ImageData,
    *,
    ckpt_key: str = "teacher_ckpt",
    net_key: str = "teacher",
    trainer_key: str = "teacher_trainer",
    seed_key: str = "teacher_seed",
    cache: str = "teachers",
) -> tuple[Classifier, dict[str, Any], Path]:
    """Load `cfg[ckpt_key]`, or train (once) and cache a classifier for `cfg[net_key]` on `data`.
    A torchvision or timm network's state_dict, or (no checkpoint) the library's pretrained
    weights, comes with the statistics computed once (`library_checkpoint`)."""
    path = cfg.get(ckpt_key)
    net_cfg = cfg[net_key]
    library = net_cfg.source != "penrun"
    if path is None and library and net_cfg.pretrained:
        path = library_checkpoint(cfg, data, trainer_settings(cfg), net_key=net_key, ckpt_key=ckpt_key)
    elif path is None:
        path = _train_cached(cfg, data, net_key, trainer_key, seed_key, cache)
    elif library and Path(path).expanduser().is_file() and not is_penrun_checkpoint(path):
        path = library_checkpoint(cfg, data, trainer_settings(cfg), net_key=net_key, ckpt_key=ckpt_key)
    elif Path(path).is_dir():  # a run folder stands for its last checkpoint
        last = Path(path) / "checkpoints" / "last.pt"
        if not last.is_file():
            raise ConfigError(
                f"{ckpt_key}={str(path)!r} is a folder without checkpoints/last.pt: pass a "
                "checkpoint file or a run folder"
            )
        path = last
    with network_keys(net_key):
        model, ckpt = load_classifier(path)
    check_fits_data(ckpt["classifier"], data, net_key, path)
    if library and net_cfg.normalization != "auto":
        check_saved_normalization(net_cfg, ckpt["classifier"], net_key, path, data.channels)
    return model, ckpt, Path(path)


def check_saved_normalization(
    net_cfg: DictConfig, spec: dict[str, Any], net_key: str, path: str | Path, channels: int
) -> None:
    """A penrun checkpoint keeps the normalization its statistics were recorded under and uses
    it: a `normalization` asked for on the command line that differs is refused, not ignored."""
    asked = asked_normalization(net_cfg, net_key, channels)
    saved = spec.get("normalization")
    if _as_lists(asked) != _as_lists(saved):
        raise ConfigError(
            f"{net_key}.normalization={net_cfg.normalization}: {str(path)!r} was recorded with "
            f"{'none' if saved is None else f'mean/std {_as_lists(saved)}'}, which it uses; drop the "
            "option, or record the state_dict again with it"
        )


def _as_lists(normalization: Any) -> list[list[float]] | None:
    return None if normalization is None else [[float(v) for v in part] for part in normalization]


def _train_cached(
    cfg: DictConfig, data: ImageData, net_key: str, trainer_key: str, seed_key: str, cache: str
) -> Path:
    identity = teacher_identity(cfg, net_key, trainer_key, seed_key)
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    path = (
        Path(cfg.paths.output_dir) / cache / f"{data.name}-{cfg[net_key].arch}-seed{cfg[seed_key]}-{digest}"
    )
    folder = RunFolder(path, identity)
    settings = trainer_settings(cfg, trainer_key)
    # Parallel jobs of a sweep that need the same classifier: one trains it, the others wait.
    with cache_lock(path):
        # Rank 0 decides for all ranks: they train together or not at all.
        finished = folder.finished_metrics()
        cached = distributed.broadcast_object(finished is not None)
        if cached:
            log.info(f"using cached {net_key} {path} ({made_by(finished)})")
        else:
            log.info(
                f"training {net_key} {cfg[net_key].arch} on {data.name} into {path} (cached for later runs)"
            )
            train, validation = validation_split(cfg, data)
            spec = classifier_spec(cfg, net_key, train)
            train_and_record(folder, spec, train, settings, seed=cfg[seed_key], validation=validation)
    distributed.barrier()
    return folder.last_path


@contextmanager
def cache_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on a cache folder across processes (held by rank 0 under torchrun)."""
    if not distributed.is_main():
        yield
        return
    with exclusive_lock(folder.parent / f".{folder.name}.lock", wait=True):
        yield


def cached_test_accuracy(
    teacher: Classifier, teacher_path: Path, data: ImageData, settings: TrainerSettings, output_dir: Path
) -> float:
    """A frozen teacher's accuracy on a test split, computed once per (checkpoint content,
    test images and labels) and kept in `output_dir/teachers/test_accuracy/`: every run of a
    sweep reports it, and on a CPU scoring 20k CIFAR images took longer than training a
    student on 100. Keyed by content hashes, so a changed file or shift never reads a stale
    score. Streamed test splits (an image folder) are scored every time."""
    if not isinstance(data.x_test, torch.Tensor):
        return test_accuracy(teacher, data, settings)
    split = hashlib.sha256(data.x_test.numpy().tobytes())
    split.update(data.y_test.numpy().tobytes())
    path = output_dir / "teachers" / "test_accuracy" / f"{file_sha256(teacher_path)[:16]}.json"
    with exclusive_lock(path.with_suffix(".lock"), wait=True):
        scores = json.loads(path.read_text()) if path.exists() else {}
        key = split.hexdigest()[:16]
        if key not in scores:
            scores[key] = test_accuracy(teacher, data, settings)
            save_json(path, scores)
    return scores[key]
