"""The teacher a task uses: `teacher_ckpt=PATH`, or one trained for the configured `data` and
`teacher` and cached under `paths.output_dir/teachers/`, keyed by everything that shapes it."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from penrun.app.config import classifier_spec, strip_runtime_keys, trainer_settings, validation_split
from penrun.app.errors import ConfigError, config_keys
from penrun.core.penultimate import PenultimateModel
from penrun.data import ImageData
from penrun.models import Classifier, HookedClassifier
from penrun.train import distributed
from penrun.train.checkpoint import load_classifier, load_state_dict
from penrun.train.classifier import statistics_of, train_classifier
from penrun.train.files import exclusive_lock
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


def external_teacher(
    cfg: DictConfig, data: ImageData, settings: TrainerSettings
) -> tuple[HookedClassifier, dict[str, Any], Path]:
    """`teacher_torchvision=NAME teacher_ckpt=STATE_DICT`: a torchvision classifier trained
    elsewhere, its penultimate activations caught by a hook on `teacher_head_layer`; the
    activation statistics its vMF options need are computed here, on the training split."""
    import torchvision.models  # (~1 s) only for a classifier from elsewhere

    name, path = cfg.teacher_torchvision, cfg.teacher_ckpt
    if path is None:
        raise ConfigError(
            f"teacher_torchvision={name!r} needs teacher_ckpt=PATH: the model's state_dict "
            "(torch.save(model.state_dict(), PATH))"
        )
    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ConfigError(
            f"teacher_torchvision={name!r} is not a torchvision classifier; valid: e.g. resnet18, "
            "mobilenet_v3_small (torchvision.models.list_models())"
        )
    module = torchvision.models.get_model(name, num_classes=data.num_classes)
    with config_keys(head="teacher_head_layer"):
        net = HookedClassifier(module, cfg.teacher_head_layer)
    try:
        module.load_state_dict(load_state_dict(path))
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
        raise ConfigError(
            f"teacher_ckpt={str(path)!r} does not fit torchvision's {name} with {data.num_classes} classes: {first}"
        ) from err
    net.eval().to(settings.device)
    log.info(f"teacher {name} from {path}: activation statistics of {len(data.y_train)} training images")
    return net, {"activation_stats": statistics_of(net, data, settings)}, Path(path)


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


def teacher_identity(
    cfg: DictConfig,
    net_key: str = "teacher",
    trainer_key: str = "teacher_trainer",
    seed_key: str = "teacher_seed",
) -> dict[str, Any]:
    """Everything that determines a cached classifier's weights: the config of the
    train_teacher run that makes it."""
    return strip_runtime_keys(
        {
            "task": {"name": "train_teacher"},
            "data": OmegaConf.to_container(cfg.data, resolve=True),
            "teacher": OmegaConf.to_container(cfg[net_key], resolve=True),
            "trainer": OmegaConf.to_container(cfg[trainer_key], resolve=True),
            "seed": cfg[seed_key],
        }
    )


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
    """Load `cfg[ckpt_key]`, or train (once) and cache a classifier for `cfg[net_key]` on `data`."""
    path = cfg.get(ckpt_key)
    if path is None:
        path = _train_cached(cfg, data, net_key, trainer_key, seed_key, cache)
    elif Path(path).is_dir():  # a run folder stands for its last checkpoint
        last = Path(path) / "checkpoints" / "last.pt"
        if not last.is_file():
            raise ConfigError(
                f"{ckpt_key}={str(path)!r} is a folder without checkpoints/last.pt: pass a "
                "checkpoint file or a run folder"
            )
        path = last
    model, ckpt = load_classifier(path)
    check_fits_data(ckpt["classifier"], data, net_key, path)
    return model, ckpt, Path(path)


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
            train_classifier(folder, spec, train, settings, seed=cfg[seed_key], validation=validation)
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
