"""Every config composes, the run folder names are deterministic, presets do what they say."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from penrun.cli import config_dir
from penrun.sweeps import run_key

from conftest import compose_config

GROUPS = (
    "task",
    "data",
    "teacher",
    "student",
    "trainer",
    "transfer",
    "method",
    "pair",
    "experiment",
)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


GROUP_OPTIONS = [(g, o) for g in GROUPS for o in options(g)]


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS)
def test_every_option_composes_and_resolves(group: str, option: str) -> None:
    overrides = [f"+{group}={option}" if group == "pair" else f"{group}={option}"]
    if option == "npz":
        overrides.append(f"{group}.path=/tmp/x.npz")
    if (group, option) == ("task", "report"):
        overrides.append("sweep_dir=/tmp")
    resolved = OmegaConf.to_container(compose_config(overrides), resolve=True)
    assert resolved["task"]["name"]
    if group in ("teacher", "student"):
        assert resolved[group]["arch"] and resolved[group]["penultimate_dim"] >= 2


def test_teacher_and_student_share_one_catalogue() -> None:
    cfg = compose_config(["teacher=lenet5", "student=lenet5"])
    assert cfg.teacher == cfg.student
    assert set(options("teacher")) == set(options("student")) == set(options("net"))


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
    cfg = compose_config(["+pair=usps_mnist"])
    assert (cfg.data.name, cfg.transfer.name, cfg.data.image_size) == ("usps", "mnist", 28)
    assert cfg.teacher.arch == "lenet5" and cfg.student.penultimate_dim == cfg.teacher.penultimate_dim


def test_run_key_is_safe_and_deterministic() -> None:
    assert run_key("") == "default"
    assert run_key("data=mnist,seed=1") == "data=mnist,seed=1"
    assert "/" not in run_key("data.path=/a/b.npz")
    long = run_key("x=" + "a" * 300)
    assert len(long) <= 120 and long == run_key("x=" + "a" * 300) != run_key("x=" + "b" * 300)
