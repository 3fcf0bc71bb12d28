"""The calibrated vMF options (docs/method.md#33-the-kappa-options): `direction: class_mean`,
`kappa: matched`, the statistics they read, and the task that records those statistics into
a checkpoint made without them."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from scipy.special import ive
from scipy.stats import vonmises_fisher

from penrun.core.penultimate import PenultimateModel
from penrun.core.statistics import activation_statistics
from penrun.train.checkpoint import load_checkpoint
from penrun.train.files import save_torch

from conftest import Teachers, run_main, run_task

D, KAPPAS, PER_CLASS = 12, (4.0, 15.0, 60.0), 3000


def mean_cosine(kappa: float, d: int) -> float:
    """A_d(kappa) = I_{d/2}(kappa) / I_{d/2-1}(kappa), by scipy."""
    return ive(d / 2, kappa) / ive(d / 2 - 1, kappa)


def kappa_of_mean_cosine(c: float, d: int) -> float:
    return brentq(lambda k: mean_cosine(k, d) - c, 1e-9, 1e6, xtol=1e-12)


@pytest.fixture(scope="module")
def recorded() -> SimpleNamespace:
    """Activations of 3 classes drawn by scipy around known directions, at radius 3, and
    weights that point 0, 20 and 40 degrees away from those directions."""
    rng = np.random.default_rng(0)
    means = np.linalg.qr(rng.normal(size=(D, D)))[0][:3]  # orthonormal rows
    others = np.linalg.qr(rng.normal(size=(D, D)))[0][3:6]
    h, y = [], []
    for k, kappa in enumerate(KAPPAS):
        h.append(3.0 * vonmises_fisher(means[k], kappa).rvs(PER_CLASS, random_state=rng))
        y += [k] * PER_CLASS
    h, y = torch.tensor(np.concatenate(h)), torch.tensor(y)
    angles = np.radians([0.0, 20.0, 40.0])
    # Each weight turned in the plane of its mean and a direction orthogonal to it.
    ortho = others - (others * means).sum(1, keepdims=True) * means
    ortho /= np.linalg.norm(ortho, axis=1, keepdims=True)
    weight = 2.0 * (np.cos(angles)[:, None] * means + np.sin(angles)[:, None] * ortho)
    head = SimpleNamespace(kind="linear", effective_weight=lambda: torch.tensor(weight), bias=None)
    return SimpleNamespace(
        h=h, y=y, means=torch.tensor(means), weight=torch.tensor(weight),
        classifier=SimpleNamespace(head=head), stats=activation_statistics(h, y, 3),
    )  # fmt: skip


def model_of(recorded: SimpleNamespace, **options: str) -> PenultimateModel:
    return PenultimateModel.from_classifier(recorded.classifier, recorded.stats, **options)


def test_matched_kappa_solves_the_mean_cosine_to_the_weights_direction(recorded: SimpleNamespace) -> None:
    a = recorded.h / recorded.h.norm(dim=1, keepdim=True)
    u = recorded.weight / recorded.weight.norm(dim=1, keepdim=True)
    for k in range(3):
        cosine = (a[recorded.y == k] @ u[k]).mean().item()  # the real activations, directly
        expected = kappa_of_mean_cosine(cosine, D)
        assert model_of(recorded, kappa="matched").kappa[k].item() == pytest.approx(expected, rel=1e-6)
    # At 0 degrees the weights point at the true mean (the sample mean is a little off): matched
    # is close to the ML fit around the sample mean, which it never exceeds, and to the truth.
    matched, fitted = model_of(recorded, kappa="matched").kappa, model_of(recorded, kappa="fitted").kappa
    assert (matched <= fitted).all()
    assert matched[0].item() == pytest.approx(fitted[0].item(), rel=0.01)
    assert matched[0].item() == pytest.approx(KAPPAS[0], rel=0.1)
    # Away from the class mean the matched kappa is smaller than the fit around the mean.
    assert (matched[1:] < 0.9 * fitted[1:]).all()


def test_matched_samples_agree_with_the_real_activations_in_mean_cosine(recorded: SimpleNamespace) -> None:
    rng = torch.Generator().manual_seed(0)
    u = recorded.weight / recorded.weight.norm(dim=1, keepdim=True)
    a = recorded.h / recorded.h.norm(dim=1, keepdim=True)
    y = torch.arange(3).repeat_interleave(4000)
    for kappa, agrees in (("matched", True), ("fitted", False)):
        synthetic, _ = model_of(recorded, kappa=kappa).sample(len(y), y=y, generator=rng)
        for k in (1, 2):
            real = (a[recorded.y == k] @ u[k]).mean().item()
            fake = (synthetic[y == k] @ u[k]).mean().item()
            assert (abs(fake - real) < 0.01) == agrees, (kappa, k, real, fake)


def test_class_mean_direction_samples_around_the_recorded_means(recorded: SimpleNamespace) -> None:
    model = model_of(recorded, direction="class_mean", kappa="fitted")
    rng = torch.Generator().manual_seed(1)
    y = torch.arange(3).repeat_interleave(4000)
    synthetic, _ = model.sample(len(y), y=y, generator=rng)
    for k, kappa in enumerate(KAPPAS):
        mean = synthetic[y == k].mean(0)
        assert torch.nn.functional.cosine_similarity(mean, recorded.means[k], dim=0) > 0.98
        # Its mean cosine to the recorded mean is A_d of its kappa (scipy), near the truth's.
        assert (synthetic[y == k] @ recorded.means[k]).mean().item() == pytest.approx(
            mean_cosine(kappa, D), abs=0.03
        )
    # The Generative-Discriminative pair stays the weights': the posterior is their softmax.
    logits = recorded.h @ recorded.weight.T
    assert torch.allclose(model.posterior(recorded.h), logits.softmax(1), atol=1e-9)


def test_calibrated_options_without_statistics_say_what_is_missing(recorded: SimpleNamespace) -> None:
    without = {k: v for k, v in recorded.stats.items() if k != "mean_direction"}
    for options in ({"direction": "class_mean"}, {"kappa": "matched"}):
        with pytest.raises(ValueError, match=r"needs activation_stats\['mean_direction'\]"):
            PenultimateModel.from_classifier(recorded.classifier, without, **options)
    with pytest.raises(ValueError, match="direction must be one of"):
        model_of(recorded, direction="weight")


def test_a_checkpoint_without_statistics_is_refused_then_completed_by_record_statistics(
    tmp_path: Path, digits_teachers: Teachers
) -> None:
    ckpt_path = tmp_path / "teacher.pt"
    shutil.copy(digits_teachers["linear"], ckpt_path)
    ckpt = load_checkpoint(ckpt_path)
    recorded_stats = ckpt.pop("activation_stats")
    save_torch(ckpt_path, ckpt)
    fit = ["task=fit", "fit.samples_per_class=50", f"teacher_ckpt={ckpt_path}", "vmf.kappa=matched"]
    refused = run_main([*fit, f"paths.output_dir={tmp_path / 'out'}"], tmp_path)
    assert refused.returncode == 2
    assert "record them with: penrun task=record_statistics teacher_ckpt=" in refused.stderr
    done = run_main(["task=record_statistics", f"teacher_ckpt={ckpt_path}"], tmp_path)
    assert done.returncode == 0, done.stderr
    again = load_checkpoint(ckpt_path)["activation_stats"]
    for key in ("norm_mean", "fitted_kappa", "mean_direction"):
        assert torch.allclose(again[key], recorded_stats[key], rtol=1e-5), key
    metrics = run_task([*fit, f"paths.output_dir={tmp_path / 'out'}"], tmp_path / "run")
    options = {(o["direction"], o["kappa"]): o for o in metrics["options"]}
    assert set(options) == {
        ("weights", "weights"),
        ("weights", "matched"),
        ("weights", "fitted"),
        ("class_mean", "fitted"),
    }
    # matched agrees with the real test activations' mean cosine far better than the weights' kappa.
    gap = {key: abs(o["mean_cos_synthetic"] - o["mean_cos_real"]) for key, o in options.items()}
    assert gap["weights", "matched"] < 0.05 < gap["weights", "weights"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["task=train_teacher", "data.val_size=1437"],
            "data.val_size=1437 must be at least 0 and smaller than the training split of digits (1437 examples)",
        ),
        (
            ["task=distill", "distill.val_per_class=200"],
            "distill.val_per_class=200 holds out 2000 images (200 x 10 classes), more than the 1437 training images",
        ),
    ],
)
def test_a_validation_split_larger_than_the_training_split_is_refused(
    args: list[str], message: str, tmp_path: Path
) -> None:
    proc = run_main([*args, f"paths.output_dir={tmp_path}"], tmp_path)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not list(tmp_path.rglob("last.pt"))  # refused before any training
