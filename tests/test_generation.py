"""task=vae and task=gan: metrics against closed forms, smoke runs of every table row, bad input,
and (slow) a VAE conditioned on an MNIST teacher's activations that generates the asked class."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from penrun.engine import CHECKPOINT_FORMAT, save_torch
from penrun.errors import ConfigError
from penrun.generation import (
    frechet_distance,
    frechet_distance_of,
    mean_pairwise_distance,
    sample_grid,
    to_uint8,
)
from penrun.models import build_classifier
from penrun.models.generative import ConditionalVAE, Generator, ProjectionDiscriminator

from conftest import compose_config, run_task

# Tiny runs on digits: a 200-image subset, one epoch of everything, small networks.
TINY = [
    "data.limit_train=200",
    "trainer.max_epochs=1",
    "trainer.batch_size=32",
    "teacher_trainer.max_epochs=1",
    "evaluator_trainer.max_epochs=1",
    "net@evaluator=mlp_small",
    "gen.width=8",
    "gen.eval_per_class=10",
    "gen.grid_per_class=4",
]


# ---------------------------------------------------------------- Frechet distance
def random_spd(d: int, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def test_frechet_matches_the_closed_form_for_diagonal_covariances() -> None:
    # Commuting covariances: FD = |m1 - m2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    gen = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(6, generator=gen).double(), torch.randn(6, generator=gen).double()
    a, b = torch.rand(6, generator=gen).double() + 0.1, torch.rand(6, generator=gen).double() * 5
    expected = (m1 - m2).square().sum() + (a.sqrt() - b.sqrt()).square().sum()
    got = frechet_distance(m1, torch.diag(a), m2, torch.diag(b))
    assert got == pytest.approx(expected.item(), rel=1e-10)


def test_frechet_matches_scipy_sqrtm_for_general_covariances() -> None:
    linalg = pytest.importorskip("scipy.linalg")
    gen = torch.Generator().manual_seed(1)
    for d in (2, 16, 64):
        s1, s2 = random_spd(d, gen), random_spd(d, gen)
        m1, m2 = torch.randn(d, generator=gen).double(), torch.randn(d, generator=gen).double()
        cross = linalg.sqrtm(s1.numpy() @ s2.numpy()).real.trace()
        expected = ((m1 - m2).square().sum() + s1.trace() + s2.trace()).item() - 2 * cross
        assert frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-8, abs=1e-9)


def test_frechet_of_samples_approaches_the_gaussians_distance() -> None:
    gen = torch.Generator().manual_seed(2)
    d, n = 4, 200_000
    s1, s2 = random_spd(d, gen), random_spd(d, gen)
    m1, m2 = torch.zeros(d, dtype=torch.float64), torch.full((d,), 0.5, dtype=torch.float64)
    x1 = m1 + torch.randn(n, d, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(s1).T
    x2 = m2 + torch.randn(n, d, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(s2).T
    exact = frechet_distance(m1, s1, m2, s2)
    # Moments of 200k samples: relative error ~1e-2 at most; a wrong formula is off by O(1).
    assert frechet_distance_of(x1, x2) == pytest.approx(exact, rel=0.03)
    assert frechet_distance_of(x1, x1) == pytest.approx(0.0, abs=1e-8)


def test_mean_pairwise_distance_and_uint8_images() -> None:
    points = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]])
    assert mean_pairwise_distance(points) == pytest.approx(10 / 3)
    assert math.isnan(mean_pairwise_distance(points[:1]))
    assert to_uint8(torch.tensor([-1.0, 0.0, 1.0, 2.0])).tolist() == [0, 128, 255, 255]
    grid = sample_grid(torch.zeros(20, 1, 8, 8, dtype=torch.uint8), per_row=4)
    assert grid.shape[0] == 3 and grid.shape[1] > 5 * 8  # rows of 8x8 images enlarged


@pytest.mark.parametrize("size", [8, 16, 28, 30])
def test_networks_take_and_give_images_of_the_data_size(size: int) -> None:
    x, c = torch.rand(3, 1, size, size) * 2 - 1, torch.rand(3, 5)
    vae = ConditionalVAE(1, size, cond_dim=5, z_dim=4, width=4)
    loss, logs = vae.loss(x, c)
    assert loss.isfinite() and logs["kl"] >= 0
    assert vae.eval()(torch.randn(3, 4), c).shape == (3, 1, size, size)
    gen = Generator(1, size, cond_dim=5, z_dim=4, width=4).eval()
    fake = gen(torch.randn(3, 4), c)
    assert fake.shape == (3, 1, size, size) and fake.abs().max() <= 1
    assert ProjectionDiscriminator(1, size, cond_dim=5, width=4)(fake, c).shape == (3,)


# ---------------------------------------------------------------- smoke runs
@pytest.fixture(scope="module")
def shared_outputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One output folder, so the cached teacher and evaluator are trained once."""
    return tmp_path_factory.mktemp("generation-outputs")


ROWS = [
    ("vae", "onehot", []),
    ("vae", "penultimate", ["vae.kl_warmup_epochs=2"]),
    ("gan", "onehot", []),
    ("gan", "penultimate", ["gan.consistency=0.5"]),
]


@pytest.mark.parametrize(("task", "cond", "extra"), ROWS)
def test_each_row_runs_on_digits(
    task: str, cond: str, extra: list[str], shared_outputs: Path, tmp_path: Path, data_dir: Path
) -> None:
    overrides = [
        f"task={task}",
        f"gen.cond={cond}",
        f"paths.output_dir={shared_outputs}",
        *TINY,
        *extra,
    ]
    metrics = run_task(overrides, tmp_path, data_dir)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["status"] == "complete" and saved["task"] == task and saved["cond"] == cond
    for key in ("cond_acc", "frechet", "diversity"):
        assert isinstance(saved[key], float) and saved[key] >= 0
    assert 0 <= saved["cond_acc"] <= 1 and len(saved["cond_acc_per_class"]) == 10
    assert saved["samples_per_class"] == 10 and saved["frechet_count"] == 100
    assert [row["epoch"] for row in saved["history"]] == [1]
    assert ("teacher_ckpt" in saved) == (cond == "penultimate")
    assert (tmp_path / "samples.png").stat().st_size > 0
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert metrics["cond_acc"] == saved["cond_acc"]
    again = run_task(overrides, tmp_path, data_dir)  # a finished run is reused
    assert again["history"] == saved["history"]


def test_generation_experiment_composes() -> None:
    cfg = compose_config(["experiment=generation"])
    assert cfg.task.name in ("vae", "gan") and cfg.gen.cond in ("onehot", "penultimate")
    assert cfg.evaluator.arch != cfg.teacher.arch


# ---------------------------------------------------------------- bad input
def write_classifier(path: Path, **changes: object) -> Path:
    """A penrun classifier checkpoint (untrained) for digits, with `changes` to its spec."""
    spec = dict(
        arch="mlp",
        channels=1,
        image_size=8,
        num_classes=10,
        penultimate_dim=8,
        head="cosine",
        scale=16.0,
        bias=False,
        feature_relu=False,
        width=0.1,
    )
    spec.update(changes)
    model = build_classifier(**spec)
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "classifier": spec,
        "modules": {"model": model.state_dict()},
    }
    save_torch(path, ckpt)
    return path


BAD_INPUT = [
    (["gen.cond=labels"], r"gen.cond='labels' is invalid; valid: \['onehot', 'penultimate'\]"),
    (["gen.z_dim=0"], r"gen.z_dim=0 is invalid: use an integer >= 1"),
    (
        ["net@evaluator=mlp", "evaluator_seed=0"],
        "the evaluator must be independent of the teacher",
    ),
    (["task=gan", "gen.cond=onehot", "gan.consistency=1"], "needs gen.cond=penultimate"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_INPUT)
def test_bad_options_are_refused_before_training(overrides: list[str], message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        run_task(["task=vae", f"paths.output_dir={tmp_path}", *overrides], tmp_path / "run")
    assert not (tmp_path / "teachers").exists() and not (tmp_path / "evaluators").exists()


def test_teacher_for_other_image_sizes_is_refused(tmp_path: Path) -> None:
    teacher = write_classifier(tmp_path / "t.pt", image_size=28)
    with pytest.raises(ConfigError, match=r"does not fit the data: image_size 28 \(data digits: 8\)"):
        run_task(["task=vae", f"teacher_ckpt={teacher}"], tmp_path / "run")


def test_teacher_for_other_channels_is_refused(tmp_path: Path) -> None:
    teacher = write_classifier(tmp_path / "t.pt", channels=3)
    with pytest.raises(ConfigError, match=r"does not fit the data: channels 3 \(data digits: 1\)"):
        run_task(["task=gan", f"teacher_ckpt={teacher}"], tmp_path / "run")


def test_linear_head_teacher_without_statistics_is_refused(tmp_path: Path) -> None:
    teacher = write_classifier(tmp_path / "t.pt", head="linear")
    with pytest.raises(ConfigError, match=r"cannot define p\(a \| y\).*activation statistics"):
        run_task(["task=vae", f"teacher_ckpt={teacher}"], tmp_path / "run")


def test_evaluator_for_other_classes_is_refused(tmp_path: Path) -> None:
    evaluator = write_classifier(tmp_path / "e.pt", num_classes=5)
    with pytest.raises(ConfigError, match=r"evaluator checkpoint .* num_classes 5 \(data digits: 10\)"):
        run_task(["task=vae", "gen.cond=onehot", f"evaluator_ckpt={evaluator}"], tmp_path / "run")


# ---------------------------------------------------------------- slow: MNIST
# Chance is 0.1. Measured on 2026-11-25 with these settings: cond_acc 0.23 with the paper's
# kappa from the weights (its samples are far less concentrated than the real activations the
# VAE was trained on, METHOD.md section 2) and 0.70 with the fitted kappa (used here). The
# threshold is far above chance and below the measurement: only a decoder that maps draws of
# p(a | y) to images of class y gets there, and it never saw a label.
THRESHOLD = 0.5


@pytest.mark.slow
def test_vae_on_mnist_teacher_activations_generates_the_asked_class(tmp_path: Path, data_dir: Path) -> None:
    overrides = [
        "task=vae",
        "data=mnist",
        "data.limit_train=20000",
        "teacher=lenet5",
        "teacher_trainer.max_epochs=2",
        "net@evaluator=mlp",
        "evaluator_trainer.max_epochs=2",
        "trainer.max_epochs=3",
        "trainer.batch_size=128",
        "gen.kappa=fitted",
        f"paths.output_dir={tmp_path}",
    ]
    metrics = run_task(overrides, tmp_path / "run", data_dir)
    assert metrics["evaluator_real_acc"] > 0.9  # measured 0.926: the evaluator can judge
    assert metrics["cond_acc"] > THRESHOLD
