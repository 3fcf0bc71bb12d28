"""What the launching process does before any job (app/launch.py): folder names, a sweep's
own folder, the plugins a command needs."""

from __future__ import annotations

import re
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from penrun.app import launch
from penrun.app.cli import config_dir
from penrun.app.errors import ConfigError
from penrun.app.launch import run_key


def test_run_key_is_safe_and_deterministic() -> None:
    assert run_key("") == "default"
    assert run_key("data=MNIST,seed=1,+row=a-b") == "data=MNIST,seed=1,+row=a-b"
    assert run_key("data.path=/a b/c.npz") == "data.path=_a_b_c.npz"
    assert run_key("x=" + "a" * 118) == "x=" + "a" * 118  # 120 characters: kept whole
    assert len(run_key("x=" + "a" * 119)) == 113  # 121: shortened
    long = run_key("x=" + "a" * 300)  # longer: 100 characters, a dash and 12 of a hash
    assert long.startswith("x=" + "a" * 98 + "-") and len(long) == 113
    assert long == run_key("x=" + "a" * 300) != run_key("x=" + "a" * 299)


def test_torchrun_rank_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    assert launch.torchrun_rank() == 0
    monkeypatch.setenv("RANK", "3")
    assert launch.torchrun_rank() == 3


@pytest.mark.parametrize(
    ("task_overrides", "hydra_overrides", "expected"),
    [
        # sorted as Hydra sorts a job's overrides; the launcher and runtime keys name nothing
        (["seed=0,1", "method=kd,ce", "launcher=joblib", "trainer.num_threads=1"], [],
         "outputs/multirun/distill/method=kd,ce,seed=0,1"),
        (["task=vae,gan", "seed=0,1"], [], "outputs/multirun/vae,gan/seed=0,1"),
        (["task=train_teacher", "data.path=/a b/c.npz"], [], "outputs/multirun/train_teacher/data.path=_a_b_c.npz"),
        (["launcher=joblib"], [], "outputs/multirun/distill"),
        (["experiment_name=mine", "seed=0,1"], [], None),  # a sweep that names its folder
        (["seed=0,1"], ["hydra.sweep.dir=/tmp/x"], None),
    ],
)  # fmt: skip
def test_a_sweep_without_a_name_is_named_by_its_own_overrides(
    task_overrides: list[str], hydra_overrides: list[str], expected: str | None
) -> None:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", return_hydra_config=True)
        cfg.hydra.overrides.task = task_overrides  # as Hydra records a multirun's command line
        cfg.hydra.overrides.hydra = hydra_overrides
        assert launch.own_sweep_dir(cfg) == expected
        if expected is not None:  # and every job of the sweep is composed into that folder
            launch.name_sweep_dir(cfg)
            job = GlobalHydra.instance().config_loader().load_sweep_config(cfg, ["seed=1"])
            assert job.hydra.sweep.dir == expected


def test_a_sweep_folder_with_quotes_and_backslashes_reaches_every_job() -> None:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", return_hydra_config=True)
        cfg.paths.output_dir = "it's\\here"
        cfg.hydra.overrides.task = ["seed=0,1"]
        cfg.hydra.overrides.hydra = []
        launch.name_sweep_dir(cfg)
        job = GlobalHydra.instance().config_loader().load_sweep_config(cfg, ["seed=1"])
    assert job.hydra.sweep.dir == cfg.hydra.sweep.dir == "it's\\here/multirun/distill/seed=0,1"


def test_an_experiment_names_its_own_sweep_folder() -> None:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=distill_labelled"], return_hydra_config=True)
        assert (
            launch.own_sweep_dir(cfg) is None and cfg.hydra.sweep.dir == "outputs/multirun/distill_labelled"
        )


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        (
            "hydra/launcher=joblib",
            "launcher plugin 'hydra-joblib-launcher'.*: pip install hydra-joblib-launcher$",
        ),
        ("hydra/launcher=submitit_local", "launcher plugin 'hydra-submitit-launcher'.*penrun\\[cluster\\]"),
        ("launcher=slurm", "launcher plugin 'hydra-submitit-launcher'.*penrun\\[cluster\\]"),
        ("hydra/sweeper=optuna", "sweeper plugin 'hydra-optuna-sweeper'.*penrun\\[search\\]"),
        ("hparams_search=distill_optuna", "sweeper plugin 'hydra-optuna-sweeper'.*penrun\\[search\\]"),
        ("+hparams_search=distill_optuna", "sweeper plugin 'hydra-optuna-sweeper'.*penrun\\[search\\]"),
    ],
)
def test_a_missing_plugin_names_its_package(
    arg: str, message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(launch.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=rf"{re.escape(arg)} needs the Hydra {message}"):
        launch.check_launcher_plugins(["-m", arg, "seed=0,1"])

    from penrun.app.cli import main

    monkeypatch.setattr(sys, "argv", ["penrun", "-m", arg])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_installed_launchers_pass_the_check() -> None:
    launch.check_launcher_plugins(["hydra/launcher=joblib", "launcher=slurm", "launcher=local"])
