"""Typed schemas of penrun's config, registered in Hydra's ConfigStore; configs/ extends them.

Hydra checks every key and type when it composes the config (an unknown key or `lr=abc` is
refused there). What a type cannot say is written beside each field, once: its allowed
values (`choices`, from the library's own registries) or its bounds (`at_least`, `above`),
and whether it is a runtime option that changes no number (`runtime`). `check_values` reads
those marks; the few rules that tie several fields together stay in the tasks.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import typing
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from penrun.app.errors import ConfigError
from penrun.app.tasks import TASKS


@dataclass(frozen=True)
class Names:
    """The names of a library registry (a dict or tuple), with options of the config's own
    before or after them. Read when a value is checked, not when the schema is built: Hydra
    composes a config (and answers tab completion) without importing torch."""

    module: str
    registry: str
    before: tuple = ()
    after: tuple = ()

    def __iter__(self) -> typing.Iterator[Any]:
        names = getattr(importlib.import_module(self.module), self.registry)
        return iter((*self.before, *names, *self.after))


def choices(default: Any, valid: tuple | Names) -> Any:
    return field(default=default, metadata={"choices": valid})


def at_least(default: Any, low: float, high: float = math.inf, runtime: bool = False) -> Any:
    return field(default=default, metadata={"low": low, "high": high, "runtime": runtime})


def above(default: Any, low: float, high: float = math.inf) -> Any:
    return field(default=default, metadata={"low": low, "high": high, "strict": True})


SEED_MAX = 2**32 - 1


def runtime(default: Any) -> Any:
    """An option that changes no number: left out of run folder names and of the config
    a finished run is compared with."""
    return field(default=default, metadata={"runtime": True})


@dataclass
class DataConfig:
    name: str = choices("digits", Names("penrun.data", "DATASETS", after=("npz",)))
    path: str | None = None  # the .npz file of name=npz
    download: bool = True
    image_size: int | None = at_least(None, 4, high=1024)
    channels: int | None = choices(None, (None, 1, 3))
    limit_train: int | None = at_least(None, 1)
    limit_test: int | None = at_least(None, 1)
    # Training examples held out to validate on (best epoch, choices); null: a tenth of them.
    val_size: int | None = at_least(None, 0)


@dataclass
class TransferConfig(DataConfig):
    shift: str = choices("none", Names("penrun.data.transforms", "SHIFTS", before=("none",)))
    shift_strength: float = above(1.0, 0.0, high=360.0)


@dataclass
class NetConfig:
    arch: str = choices("mlp", Names("penrun.models.classifiers", "ARCHITECTURES"))
    width: float = above(1.0, 0.0, high=64.0)
    penultimate_dim: int = at_least(64, 2, high=8192)
    head: str = choices("cosine", Names("penrun.models.classifiers", "HEADS"))
    scale: float = above(16.0, 0.0, high=1e4)
    bias: bool = False
    feature_relu: bool = False


@dataclass
class TrainerConfig:
    max_epochs: int = at_least(20, 1, high=10**6)
    batch_size: int = at_least(64, 2, high=10**6)  # batch norm cannot train on a batch of one
    eval_batch_size: int = at_least(1024, 1, high=10**6)
    lr: float = above(1e-3, 0.0, high=10.0)
    optimizer: str = choices("adam", Names("penrun.train.optim", "OPTIMIZERS"))
    weight_decay: float = at_least(5e-4, 0.0, high=1.0)
    schedule: str = choices("cosine", Names("penrun.train.optim", "SCHEDULES"))
    device: str = runtime("auto")
    num_threads: int | None = at_least(None, 1, high=1024, runtime=True)
    progress: bool = runtime(True)
    # Classifier training replays each optimizer step from a CUDA graph (CUDA, adam/adamw).
    # Runtime like `device`: the same computation, launched differently (same numbers to
    # float rounding; tests/test_cuda_graphs.py).
    cuda_graphs: bool = runtime(False)


@dataclass
class VmfConfig:
    direction: str = choices("weights", Names("penrun.core.penultimate", "DIRECTION_OPTIONS"))
    kappa: str = choices("weights", Names("penrun.core.penultimate", "KAPPA_OPTIONS"))
    kappa_scale: float = at_least(1.0, 0.0, high=1e4)
    radius: str = choices("fixed", Names("penrun.core.penultimate", "RADIUS_OPTIONS"))


def weight() -> Any:
    return at_least(0.0, 0.0, high=1e3)


@dataclass
class LossWeights:
    """Every loss term's weight (0: off), by its name in penrun.core.losses.LOSSES (a test
    checks the two agree; the schema is built without importing torch)."""

    ce: float = weight()
    kd: float = weight()
    synthetic_targets: float = weight()
    synthetic_head: float = weight()
    feature: float = weight()
    dirichlet: float = weight()
    smooth: float = weight()


@dataclass
class DistillConfig:
    labels: Any = "none"  # none | all | N labelled examples per class
    tau: float = above(4.0, 0.0, high=1e3)
    losses: LossWeights = field(default_factory=LossWeights)  # every term's weight (0: off)
    dirichlet_beta: float = above(1.0, 0.0, high=1e6)
    val_per_class: int = at_least(10, 1, high=10**6)


@dataclass
class FitConfig:
    samples_per_class: int = at_least(1000, 2, high=10**6)


@dataclass
class GenConfig:
    cond: str = choices("penultimate", Names("penrun.core.conditions", "CONDITIONS"))
    z_dim: int = at_least(32, 1, high=4096)
    width: int = at_least(32, 1, high=1024)
    eval_per_class: int = at_least(100, 2, high=10**5)
    grid_per_class: int = at_least(10, 1, high=100)


@dataclass
class VaeConfig:
    kl_warmup_epochs: int = at_least(0, 0, high=10**6)


@dataclass
class GanConfig:
    consistency: float = at_least(0.0, 0.0, high=1e3)
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])


@dataclass
class ReportConfig:
    rows: list[str] | None = None
    columns: list[str] | None = None
    values: list[str] | None = None
    curve: str | None = None
    baseline: str | None = None
    choose: list[str] | None = None


@dataclass
class PathsConfig:
    data_dir: str | None = runtime(None)
    cache_dir: str = runtime("~/.cache/penrun")
    output_dir: str = runtime("outputs")


@dataclass
class TaskConfig:
    name: str = choices("distill", tuple(TASKS))


@dataclass
class PenrunConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    seed: int = at_least(0, 0, high=SEED_MAX)
    experiment_name: str = "${task.name}"
    data: DataConfig = field(default_factory=DataConfig)
    teacher: NetConfig = field(default_factory=NetConfig)
    student: NetConfig = field(default_factory=NetConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    teacher_trainer: TrainerConfig = field(default_factory=TrainerConfig)
    teacher_seed: int = at_least(0, 0, high=SEED_MAX)
    teacher_ckpt: str | None = None
    # A classifier trained elsewhere (task=fit): a torchvision model name, with teacher_ckpt its
    # state_dict and teacher_head_layer its final nn.Linear (models/hooked.py).
    teacher_torchvision: str | None = None
    teacher_head_layer: str = "fc"
    # Start afresh where a run (finished, interrupted or of another config) already is: the old
    # folder is renamed to <folder>.old-<time>, never deleted.
    rerun: bool = runtime(False)
    # The metrics.json field a job returns to a sweeper that optimizes; null: the task's
    # validation score (app/job.py: OBJECTIVES).
    objective: str | None = runtime(None)
    vmf: VmfConfig = field(default_factory=VmfConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    # Nodes of one task or experiment (null elsewhere).
    transfer: TransferConfig | None = None
    distill: DistillConfig | None = None
    fit: FitConfig | None = None
    gen: GenConfig | None = None
    vae: VaeConfig | None = None
    gan: GanConfig | None = None
    evaluator: NetConfig | None = None
    evaluator_trainer: TrainerConfig | None = None
    evaluator_ckpt: str | None = None
    evaluator_seed: int | None = at_least(None, 0, high=SEED_MAX)
    report: ReportConfig | None = None
    sweep_dir: str | None = None
    epochs_by_data: dict[str, int] | None = None


ConfigStore.instance().store(name="penrun_schema", node=PenrunConfig)


def _nested_schemas(schema: type) -> dict[str, type]:
    """The fields of a schema that are nodes of their own (optional ones too), with their schema."""
    nested = {}
    for name, hint in typing.get_type_hints(schema).items():
        kinds = [hint, *typing.get_args(hint)]
        found = [k for k in kinds if isinstance(k, type) and dataclasses.is_dataclass(k)]
        if found:
            nested[name] = found[0]
    return nested


def _marked_fields(schema: type, prefix: str = "") -> dict[str, dict[str, Any]]:
    """Every marked field of a schema and of its nested nodes, by its dotted key."""
    nested = _nested_schemas(schema)
    marks: dict[str, dict[str, Any]] = {}
    for f in dataclasses.fields(schema):
        if f.name in nested:
            marks |= _marked_fields(nested[f.name], f"{prefix}{f.name}.")
        elif f.metadata:
            marks[f"{prefix}{f.name}"] = dict(f.metadata)
    return marks


FIELD_MARKS: dict[str, dict[str, Any]] = _marked_fields(PenrunConfig)

RUNTIME_KEYS: tuple[str, ...] = tuple(key for key, mark in FIELD_MARKS.items() if mark.get("runtime"))


def check_keys(node: DictConfig, schema: type, prefix: str = "") -> None:
    """Refuse a key that the schema does not have (Hydra lets `+trainer.max_epoch=3` add
    one), naming the nearest real key."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    nested = _nested_schemas(schema)
    for key in node:
        if key not in fields:
            near = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {prefix}{near[0]}?" if near else f"; valid: {', '.join(fields)}"
            raise ConfigError(f"{prefix}{key} is not a key of penrun's config{hint}")
        if key in nested and isinstance(node[key], DictConfig):
            check_keys(node[key], nested[key], f"{prefix}{key}.")


def check_values(cfg: DictConfig) -> None:
    """Refuse a key the schema lacks, a value outside its field's choices or bounds, and any
    non-finite number, naming the key, the value and what is valid."""
    check_keys(cfg, PenrunConfig)
    for key, mark in FIELD_MARKS.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        valid_values = tuple(mark.get("choices", ()))
        if valid_values and value not in valid_values:
            valid = ", ".join("null" if c is None else str(c) for c in valid_values)
            raise ConfigError(f"{key}={value!r} is invalid; valid: {valid}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}={value!r} is invalid: use a finite number")
        if "low" in mark:
            low, high, strict = mark["low"], mark["high"], mark.get("strict", False)
            if value < low or (strict and value == low) or value > high:
                bound = f"> {low:g}" if strict else f">= {low:g}"
                bound += f" and <= {high:g}" if math.isfinite(high) else ""
                kind = "an integer" if isinstance(value, int) else "a number"
                raise ConfigError(f"{key}={value!r} is invalid: use {kind} {bound}")
