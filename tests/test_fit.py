"""task=fit: the diagnostics of a teacher's vMF model against its real activations."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from penrun.app.errors import ConfigError

from conftest import Teachers, run_task

# The shared digits teachers (conftest.digits_teachers: mlp, 4 epochs).
SAMPLES = ["fit.samples_per_class=200"]


# test_ks_distance_matches_scipy and test_linear_probe_separates_separable_data moved to
# test_diagnostics.py.


def test_fit_on_digits(tmp_path: Path, digits_teachers: Teachers) -> None:
    metrics = run_task(
        ["task=fit", *SAMPLES, f"teacher_ckpt={digits_teachers['cosine']}", f"paths.output_dir={tmp_path}"],
        tmp_path / "run",
    )
    # The identity: the generative classifier's posterior is the softmax.
    assert metrics["generative_acc"] == metrics["softmax_acc"] > 0.9
    assert metrics["posterior_max_abs_diff"] < 1e-5
    assert metrics["synthetic_to_real_acc"] > 0.5  # far above chance (0.1)
    per_class = metrics["per_class"]
    assert len(per_class) == 10 and all(c["kappa_weights"] == pytest.approx(16.0) for c in per_class)
    assert all(c["kappa_fitted_test"] > 0 for c in per_class)  # a fit for every class (no NaN)
    with Image.open(tmp_path / "run" / "cosine_hist.png", formats=["PNG"]) as picture:
        assert picture.size == (1500, 480)  # 10 panels in 2 rows of 5, each 3 x 2.4 inches at 100 dpi
    assert list((tmp_path / "run" / "tensorboard").glob("events.*"))


def test_fit_draws_the_circle_for_d2_and_uses_a_given_checkpoint(tmp_path: Path) -> None:
    teacher = run_task(
        ["task=train_teacher", "teacher.penultimate_dim=2", "trainer.max_epochs=3"],
        tmp_path / "teacher",
    )
    metrics = run_task(
        ["task=fit", f"teacher_ckpt={teacher['checkpoint']}", "fit.samples_per_class=100"],
        tmp_path / "fit",
    )
    assert metrics["dim"] == 2 and metrics["teacher_ckpt"] == teacher["checkpoint"]
    assert (tmp_path / "fit" / "circle.png").exists()


def test_linear_head_without_statistics_is_refused(tmp_path: Path, digits_teachers: Teachers) -> None:
    ckpt_path = tmp_path / "teacher.pt"
    shutil.copy(digits_teachers["linear"], ckpt_path)
    ckpt = torch.load(ckpt_path, weights_only=True)
    del ckpt["activation_stats"]
    torch.save(ckpt, ckpt_path)
    with pytest.raises(
        ConfigError,
        match=r"a linear head \(radius='fixed'\) needs the per-class activation statistics",
    ):
        run_task(["task=fit", f"teacher_ckpt={ckpt_path}"], tmp_path / "fit")


def test_fit_rejects_a_teacher_for_other_data(
    tmp_path: Path, data_dir: Path, digits_teachers: Teachers
) -> None:
    with pytest.raises(
        ConfigError,
        match=r"teacher checkpoint .* does not fit the data: image_size 8 \(data usps: 16\)",
    ):
        run_task(
            ["task=fit", "data=usps", f"teacher_ckpt={digits_teachers['cosine']}"],
            tmp_path / "fit",
            data_dir,
        )


def test_penultimate_model_from_a_checkpoint_file(digits_teachers: Teachers) -> None:
    """PenultimateModel.from_checkpoint is gone: load_classifier, then from_classifier with the
    recorded statistics."""
    from penrun import PenultimateModel
    from penrun.train.checkpoint import load_classifier

    net, ckpt = load_classifier(digits_teachers["linear"])
    assert net.head.kind == "linear"
    assert not hasattr(PenultimateModel, "from_checkpoint")
    fixed = PenultimateModel.from_classifier(net, ckpt.get("activation_stats"))
    empirical = PenultimateModel.from_classifier(net, ckpt.get("activation_stats"), radius="empirical")
    a, y = empirical.sample(500, balanced=True, generator=torch.Generator().manual_seed(0), space="input")
    stats = torch.load(digits_teachers["linear"], weights_only=True)["activation_stats"]
    norms = a.norm(dim=1).double()
    # A linear head: radii drawn from the recorded per-class norms, inside their range.
    assert (norms >= stats["norm_quantiles"][y, 0] - 1e-4).all() and (
        norms <= stats["norm_quantiles"][y, -1] + 1e-4
    ).all()
    assert torch.allclose(fixed.kappa.double(), stats["norm_mean"] * fixed.weight_norm.double(), rtol=1e-5)
