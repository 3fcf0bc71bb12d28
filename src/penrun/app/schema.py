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
    name: str = choices("digits", Names("penrun.data", "DATASETS", after=("folder", "npz")))
    path: str | None = None  # the .npz file of name=npz
    # name=folder: the image folder (root/train/<class>/ + root/test/<class>/, root/<class>/, or a
    # flat folder of unlabeled images), the test share of a folder without train/ and test/,
    # whether a split is held in memory (auto: when its decoded size is under memory_mb MiB) or
    # streamed by `workers` DataLoader processes (the same numbers either way: runtime), and
    # whether unreadable images are skipped (with a logged count) rather than refused.
    root: str | None = None
    test_fraction: float = above(0.2, 0.0, high=0.9)
    in_memory: Any = field(default="auto", metadata={"choices": ("auto", True, False), "runtime": True})
    memory_mb: float = at_least(2048.0, 0.0, high=1e9, runtime=True)
    workers: int = at_least(0, 0, high=256, runtime=True)
    skip_corrupt: bool = False
    download: bool = True  # torchvision download when no npz is in the data folder
    image_size: int | None = at_least(None, 4, high=1024)  # null: native; set it so two datasets meet
    channels: int | None = choices(None, (None, 1, 3))  # null: native; 1 (grey) or 3 (RGB)
    # a fixed random subset of the training split (quick runs)
    limit_train: int | None = at_least(None, 1)
    limit_test: int | None = at_least(None, 1)
    # Training examples held out to validate on (best epoch, choices); null: a tenth of them.
    val_size: int | None = at_least(None, 0)


@dataclass
class TransferConfig(DataConfig):
    shift: str = choices(
        "none", Names("penrun.data.transforms", "SHIFTS", before=("none",), after=("corruption",))
    )
    shift_strength: float = above(1.0, 0.0, high=360.0)
    # shift=corruption (penrun[corruptions]): one of the 15 common corruptions, at severity 1..5.
    # null unless set, so that the runs of other shifts keep their configs.
    corruption: str | None = choices(None, Names("penrun.data.corruptions", "CORRUPTIONS"))
    severity: int | None = at_least(None, 1, high=5)


@dataclass
class NetConfig:
    # Where the network comes from (models/networks.py); `arch` names one of that source's
    # classifiers (checked against the source's list when the network is built).
    source: str = choices("penrun", Names("penrun.models.networks", "SOURCES"))
    arch: str = "mlp"
    # torchvision and timm: the library's pretrained weights, and the name of the final
    # nn.Linear (null: the last nn.Linear whose outputs are the logits).
    pretrained: bool = False
    head_layer: str | None = None
    # torchvision and timm: what the weights expect of [0, 1] images. auto: the pretrained
    # weights' own with pretrained=true, else none (penrun's images in [-1, 1]); imagenet: the
    # usual torchvision recipe's mean and std, for a state_dict trained with it elsewhere.
    normalization: str = choices(
        "auto", Names("penrun.models.networks", "NORMALIZATIONS", before=("auto", "none"))
    )
    width: float = above(1.0, 0.0, high=64.0)
    penultimate_dim: int = at_least(64, 2, high=8192)
    # cosine (kappa = scale for every class) | linear (kappa = |h| |w_k|)
    head: str = choices("cosine", Names("penrun.models.classifiers", "HEADS"))
    scale: float = above(16.0, 0.0, high=1e4)  # cosine head: logits = scale * cos(w_k, h)
    bias: bool = False
    # true keeps a ReLU on the penultimate layer (the vMF model then fits worse)
    feature_relu: bool = False


@dataclass
class TrainerConfig:
    max_epochs: int = at_least(20, 1, high=10**6)
    batch_size: int = at_least(64, 2, high=10**6)  # batch norm cannot train on a batch of one
    eval_batch_size: int = at_least(1024, 1, high=10**6)
    lr: float = above(1e-3, 0.0, high=10.0)
    optimizer: str = choices("adam", Names("penrun.train.optim", "OPTIMIZERS"))  # adam | adamw | sgd
    weight_decay: float = at_least(5e-4, 0.0, high=1.0)
    # cosine | constant; set every optimizer step from the position in training alone (resuming
    # needs no scheduler state)
    schedule: str = choices("cosine", Names("penrun.train.optim", "SCHEDULES"))
    device: str = runtime("auto")  # auto | cpu | cuda | cuda:N
    num_threads: int | None = at_least(None, 1, high=1024, runtime=True)  # null: torch's default
    progress: bool = runtime(True)  # tqdm bars (quiet anyway when stderr is not a terminal)
    # Classifier training replays each optimizer step from a CUDA graph (CUDA, adam/adamw).
    # Runtime like `device`: the same computation, launched differently (same numbers to
    # float rounding; tests/test_cuda_graphs.py).
    cuda_graphs: bool = runtime(False)
    # 32 | bf16 (Lightning's names): bf16 runs training's forward passes under bfloat16
    # autocast (every number changes; evaluation stays float32). channels_last: conv weights
    # and activations in NHWC (same numbers to float rounding: runtime). BENCHMARKS.md#precision.
    precision: str = choices("32", Names("penrun.train.loop", "PRECISIONS"))
    channels_last: bool = runtime(False)


@dataclass
class VmfConfig:
    """The class-conditional vMF model p(a | y) of a teacher's final layer, shared by distill,
    fit, vae and gan (docs/method.md#33-the-kappa-options). class_mean, fitted and matched read
    the activation statistics recorded with the teacher at training time (no source data needed)."""

    # weights (the paper's: mu_k = w_k / |w_k|) | class_mean (mean direction of the class's
    # training activations)
    direction: str = choices("weights", Names("penrun.core.penultimate", "DIRECTION_OPTIONS"))
    # weights (the paper's: kappa_k = r |w_k|) | fitted (ML fit around the class's own mean) |
    # matched (ML fit with the mean held at `direction`)
    kappa: str = choices("weights", Names("penrun.core.penultimate", "KAPPA_OPTIONS"))
    kappa_scale: float = at_least(1.0, 0.0, high=1e4)  # multiplies kappa
    # linear heads: fixed (the class's mean norm) | empirical (draws from recorded norms)
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


def protocol_held_out(labels: Any) -> str:
    """distill.held_out's default: class-balanced with transfer labels, drawn without them in
    the unlabeled protocol (which must never read a transfer label)."""
    return "seeded" if labels in (None, "none") else "balanced"


OmegaConf.register_new_resolver("penrun_held_out", protocol_held_out, replace=True)


@dataclass
class DistillConfig:
    labels: Any = "none"  # none (unlabeled transfer set) | all | N labelled examples per class
    # temperature of kd / synthetic_targets / synthetic_head / dirichlet / smooth
    tau: float = above(4.0, 0.0, high=1e3)
    # Every term with its weight (0 = off); method presets set these, single weights override.
    losses: LossWeights = field(default_factory=LossWeights)
    # Dirichlet concentration = beta * class similarity of the teacher's weights
    dirichlet_beta: float = above(1.0, 0.0, high=1e6)
    val_per_class: int = at_least(10, 1, high=10**6)
    # The protocol's test split is scored every N epochs and at the last one, and at the epoch
    # chosen on validation (from best.pt, after training): on a CPU, scoring 10k CIFAR images
    # every epoch costs more than training on 10 labels per class.
    test_every: int = at_least(1, 1, high=10**6)
    # The held-out transfer images that choose the epoch (the same for every seed): balanced =
    # val_per_class of each class, by their labels; seeded = val_per_class x the teacher's
    # classes, drawn without reading a label. Runs stored before the key held out balanced sets
    # in both protocols (IDENTITY_DEFAULTS): an unlabeled one of them is another config.
    held_out: str = choices("${penrun_held_out:${distill.labels}}", ("balanced", "seeded"))


@dataclass
class FitConfig:
    # synthetic activations per class to train the linear probe
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
    # linear warm-up of the KL weight over these epochs (0: none)
    kl_warmup_epochs: int = at_least(0, 0, high=10**6)


@dataclass
class GanConfig:
    # weight of 1 - cos(teacher activation of G(z, c), c); needs gen.cond=penultimate
    consistency: float = at_least(0.0, 0.0, high=1e3)
    # Adam betas of generator and discriminator
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])


@dataclass
class ReportConfig:
    # keys (metrics.json fields or dotted config keys) that name a row; null: what varies
    rows: list[str] | None = None
    columns: list[str] | None = None  # keys that name a column group, e.g. [transfer]
    # metrics to show, e.g. [source_acc, best_source_acc]; null: the numeric ones
    values: list[str] | None = None
    curve: str | None = None  # a per-epoch metric to plot per row (curves.png), e.g. source_acc
    # a row (its keys' values joined by spaces, e.g. ce): each other row's paired difference to it
    baseline: str | None = None
    # searched keys, e.g. [distill.tau]: per row, their setting with the best mean of the first
    # value (chosen.csv)
    choose: list[str] | None = None


@dataclass
class PathsConfig:
    # Folder of <dataset>.npz files that win over torchvision downloads (read-only is fine).
    data_dir: str | None = runtime("${oc.env:PENRUN_DATA_DIR,null}")
    cache_dir: str = runtime('${oc.env:PENRUN_CACHE_DIR,"~/.cache/penrun"}')  # where torchvision downloads go
    output_dir: str = runtime("outputs")  # root of all run folders (relative to where penrun is started)


@dataclass
class TaskConfig:
    name: str = choices("distill", tuple(TASKS))


@dataclass
class PenrunConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    seed: int = at_least(0, 0, high=SEED_MAX)
    # Names the sweep folder, outputs/multirun/<experiment_name>. Experiments set their own; a sweep
    # given none is named by its task and its own overrides (app/launch.py: own_sweep_dir).
    experiment_name: str = "${task.name}"
    data: DataConfig = field(default_factory=DataConfig)
    teacher: NetConfig = field(default_factory=NetConfig)
    student: NetConfig = field(default_factory=NetConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    teacher_trainer: TrainerConfig = field(default_factory=TrainerConfig)
    # Seed of a teacher trained (and cached) for tasks that need one; kept apart from `seed` so
    # that a sweep over seeds reuses one teacher.
    teacher_seed: int = at_least(0, 0, high=SEED_MAX)
    # A teacher checkpoint (checkpoints/last.pt of a train_teacher run, or with net@teacher=torchvision
    # or timm a state_dict of that network); null: train and cache one.
    teacher_ckpt: str | None = None
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
    # differs from teacher_seed (vae, gan): the evaluator is independent of the teacher
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

# Keys that finished runs stored and the schema no longer has, at the value every run before
# their removal behaved as (a run that set another value stays a run of another config).
RETIRED_KEYS: dict[str, Any] = {"teacher_head_layer": "fc"}


def _field_defaults(schema: type, prefix: str = "") -> dict[str, Any]:
    """Every leaf field's default by its dotted key, inside optional nodes too."""
    nested = _nested_schemas(schema)
    defaults: dict[str, Any] = {}
    for f in dataclasses.fields(schema):
        if f.name in nested:
            defaults |= _field_defaults(nested[f.name], f"{prefix}{f.name}.")
        else:
            has_factory = f.default_factory is not dataclasses.MISSING
            defaults[f"{prefix}{f.name}"] = f.default_factory() if has_factory else f.default
    return defaults


# What a stored run config that lacks a key meant by it (train/run_folder.py: config_difference):
# a key added to the schema after the run holds its default, a retired key its last value.
# distill.held_out: how every run stored before the key held out its validation images.
IDENTITY_DEFAULTS: dict[str, Any] = (
    _field_defaults(PenrunConfig) | RETIRED_KEYS | {"distill.held_out": "balanced"}
)


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
