"""Every config composes, the run folder names are deterministic, presets do what they say."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from penrun.app.cli import config_dir

from conftest import compose_config, finish, start_cli

# Config groups as a command line chooses them: `group=option`, or `group@node=option` for a
# catalogue used at several nodes (net/ for teacher, student and evaluator; data/ for the
# source data and the transfer set). The evaluator exists in task=vae/gan only.
GROUPS = (
    ("task", "task", []),
    ("data", "data", []),
    ("data", "transfer", []),
    ("net", "teacher", []),
    ("net", "student", []),
    ("net", "evaluator", ["task=vae"]),
    ("trainer", "trainer", []),
    ("trainer", "teacher_trainer", []),
    ("vmf", "vmf", []),
    ("method", "method", []),
    ("pair", "pair", []),
    ("experiment", "experiment", []),
)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def choice(group: str, node: str) -> str:
    return group if group == node or group in ("method", "pair", "experiment", "task") else f"{group}@{node}"


GROUP_OPTIONS = [
    pytest.param(group, node, option, extra, id=f"{choice(group, node)}={option}")
    for group, node, extra in GROUPS
    for option in options(group)
]


@pytest.mark.parametrize(("group", "node", "option", "extra"), GROUP_OPTIONS)
def test_every_option_composes_and_resolves(group: str, node: str, option: str, extra: list[str]) -> None:
    overrides = [*extra, f"{choice(group, node)}={option}"]
    if option == "npz":
        overrides.append(f"{node}.path=/tmp/x.npz")
    if (group, option) == ("task", "report"):
        overrides.append("sweep_dir=/tmp")
    resolved = OmegaConf.to_container(compose_config(overrides), resolve=True)
    assert resolved["task"]["name"]
    if group == "net":
        assert resolved[node]["arch"] and resolved[node]["penultimate_dim"] >= 2
        net = OmegaConf.to_container(compose_config([f"net@teacher={option}"]).teacher)
        assert resolved[node] == net  # one catalogue: the same entry at every node
    if group == "data":
        assert resolved[node]["name"] == option


def test_teacher_student_and_evaluator_share_one_catalogue() -> None:
    cfg = compose_config(["task=vae", "net@teacher=lenet5", "net@student=lenet5", "net@evaluator=lenet5"])
    assert cfg.teacher == cfg.student == cfg.evaluator
    assert cfg.teacher.arch == "lenet5" and cfg.teacher.penultimate_dim == 64
    # The per-node catalogues are gone: net/ is the only one.
    for old in ("teacher", "student", "transfer", "generation"):
        assert not (config_dir() / old).exists(), old
    assert options("net") == ["lenet5", "lenet5_half", "mlp", "mlp_small", "resnet20", "resnet8"]


def test_the_transfer_set_comes_from_the_data_catalogue() -> None:
    cfg = compose_config(["data@transfer=usps", "transfer.shift=blur", "transfer.shift_strength=0.5"])
    assert (cfg.data.name, cfg.transfer.name) == ("digits", "usps")
    assert (cfg.transfer.shift, cfg.transfer.shift_strength) == ("blur", 0.5)
    usps = OmegaConf.to_container(compose_config(["data=usps"]).data)
    assert {k: v for k, v in OmegaConf.to_container(cfg.transfer).items() if k in usps} == usps


def test_default_is_distill_on_digits_with_cosine_heads() -> None:
    cfg = compose_config([])
    assert (cfg.task.name, cfg.data.name, cfg.transfer.name) == ("distill", "digits", "digits")
    assert cfg.transfer.shift != "none" and cfg.teacher.head == cfg.student.head == "cosine"
    assert cfg.teacher.feature_relu is False


def test_method_presets_and_single_weights() -> None:
    cfg = compose_config(["method=ce_kd", "distill.losses.kd=0.5"])
    active = {k: v for k, v in cfg.distill.losses.items() if v}
    assert active == {"ce": 1.0, "kd": 0.5} and len(cfg.distill.losses) == 7


def test_pairs_set_both_domains() -> None:
    cfg = compose_config(["pair=usps_mnist"])
    assert (cfg.data.name, cfg.transfer.name, cfg.data.image_size) == ("usps", "mnist", 28)
    assert cfg.teacher.arch == "lenet5" and cfg.student.penultimate_dim == cfg.teacher.penultimate_dim


# The groups a sweep appends (`+group=option`): table rows, the kappa study's arms and options.
APPENDED = [
    pytest.param(group, option, id=f"+{group}={option}")
    for group in ("row_labelled", "row_unlabeled", "kappa_arm", "study")
    for option in options(group)
]
VMF_SUFFIXES = {"matched": ("weights", "matched"), "class_mean_fitted": ("class_mean", "fitted")}


@pytest.mark.parametrize(("group", "option"), APPENDED)
def test_appended_options_compose_with_their_method_and_vmf(group: str, option: str) -> None:
    """A row is its method preset (every term its name lists is on), with its vMF option; the
    calibrated rows' kappa_scale is their search's."""
    resolved = OmegaConf.to_container(compose_config([f"+{group}={option}"]), resolve=True)
    if group.startswith("row_"):
        losses = {k for k, v in resolved["distill"]["losses"].items() if v > 0}
        suffix = next((s for s in (*VMF_SUFFIXES, "weights_x2") if option.endswith(s)), None)
        method = option.removesuffix(f"_{suffix}") if suffix else option
        assert losses == set(resolved_method_terms(method))
        vmf = resolved["vmf"]
        assert (vmf["direction"], vmf["kappa"]) == VMF_SUFFIXES.get(suffix, ("weights", "weights"))
        if suffix is None:  # the uncalibrated rows keep the paper's kappa
            assert vmf["kappa_scale"] == 1.0
        if suffix == "weights_x2":
            assert vmf["kappa_scale"] == 2.0


def resolved_method_terms(method: str) -> list[str]:
    weights = OmegaConf.to_container(compose_config([f"method={method}"]).distill.losses)
    return [k for k, v in weights.items() if v > 0]


def test_help_names_the_tasks_and_the_groups(tmp_path: Path) -> None:
    done = finish(start_cli(["--help"], tmp_path))  # a process of its own: --help leaves Hydra's state set
    assert "Tasks: distill (default), train_teacher" in done.stdout
    assert "row_labelled: ce, ce_dirichlet" in done.stdout and "penrun --cfg job" in done.stdout


@pytest.mark.parametrize("option", options("hparams_search"))
def test_each_search_config_sweeps_real_keys_with_optuna(option: str) -> None:
    """Every searched key exists in the config of the task it is meant for (a typo would only
    fail after the first trial)."""
    task = {"distill_optuna": "distill", "train_teacher_optuna": "train_teacher"}.get(option, "vae")
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(
            "config", overrides=[f"hparams_search={option}", f"task={task}"], return_hydra_config=True
        )
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.sweeper.direction == "maximize"
    for key in cfg.hydra.sweeper.params:
        assert OmegaConf.select(cfg, key) is not None, key


def test_the_schema_names_every_loss_term_and_registry_option() -> None:
    """The schema is built without torch: its loss weights and its registries' names must be
    the library's own (a loss added to LOSSES without a weight would be unreachable)."""
    import dataclasses

    from penrun.app import schema
    from penrun.core.losses import LOSSES
    from penrun.train.optim import OPTIMIZERS

    assert [f.name for f in dataclasses.fields(schema.LossWeights)] == list(LOSSES)
    for key, mark in schema.FIELD_MARKS.items():
        if "choices" in mark:  # every registry resolves and holds the field's default
            default = OmegaConf.select(OmegaConf.structured(schema.PenrunConfig), key, default=None)
            assert len(tuple(mark["choices"])) >= 2, key
            assert default is None or default in tuple(mark["choices"]), key
    assert tuple(schema.FIELD_MARKS["trainer.optimizer"]["choices"]) == OPTIMIZERS
    assert tuple(schema.FIELD_MARKS["data.name"]["choices"])[-1] == "npz"
