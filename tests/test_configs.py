"""Every config composes, the run folder names are deterministic, configs are packaged."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from conftest import compose_config
from penrun.cli import config_dir, run_key


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


GROUP_OPTIONS = [
    (g, o) for g in ("task", "data", "teacher", "student", "trainer") for o in options(g)
]


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS)
def test_every_option_composes_and_resolves(group: str, option: str) -> None:
    overrides = [f"{group}={option}"]
    if (group, option) == ("data", "npz"):
        overrides.append("data.path=/tmp/x.npz")
    cfg = compose_config(overrides)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["task"]["name"]
    if group in ("teacher", "student"):
        assert resolved[group]["arch"] and resolved[group]["penultimate_dim"] >= 2


def test_teacher_and_student_share_one_catalogue() -> None:
    cfg = compose_config(["teacher=lenet5", "student=lenet5"])
    assert cfg.teacher == cfg.student
    assert set(options("teacher")) == set(options("student")) == set(options("net"))


def test_default_is_train_teacher_on_digits_with_cosine_head() -> None:
    cfg = compose_config([])
    assert (cfg.task.name, cfg.data.name, cfg.teacher.arch, cfg.teacher.head) == (
        "train_teacher",
        "digits",
        "mlp",
        "cosine",
    )
    assert cfg.teacher.feature_relu is False


def test_run_key_is_safe_and_deterministic() -> None:
    assert run_key("") == "default"
    assert run_key("data=mnist,seed=1") == "data=mnist,seed=1"
    assert "/" not in run_key("data.path=/a/b.npz")
    long = run_key("x=" + "a" * 300)
    assert len(long) <= 120 and long == run_key("x=" + "a" * 300) != run_key("x=" + "b" * 300)
