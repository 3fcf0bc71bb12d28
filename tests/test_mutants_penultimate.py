"""Tests that kill mutants of penrun.core.penultimate that the other tests let survive (MUTATION.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import optimize, special

from penrun.core.penultimate import (
    EmpiricalRadius,
    PenultimateModel,
    fit_kappa_from_activations,
    matched_kappa,
)

F64 = torch.float64


def full_model(radius: float | EmpiricalRadius) -> PenultimateModel:
    """Every optional part set: bias, a fitted kappa, mean directions, kappa_scale 2."""
    weight = torch.tensor([[3.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    return PenultimateModel.from_head(
        weight,
        bias=torch.tensor([0.5, -0.5]),
        radius=radius,
        kappa_scale=2.0,
        kappa=torch.tensor([4.0, 9.0]),
        direction=torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 2.0]]),
    )


@pytest.mark.parametrize("keyword", [False, True])
@pytest.mark.parametrize("empirical", [False, True])
def test_to_moves_every_part_and_keeps_the_values(empirical: bool, keyword: bool) -> None:
    """model.to(torch.float64) or .to(dtype=torch.float64) (torch's own .to takes both)
    converts the weights, bias, radius, fitted kappa and directions, and keeps kappa_scale."""
    radius = EmpiricalRadius(torch.tensor([[1.0, 2.0], [3.0, 5.0]])) if empirical else 1.5
    model = full_model(radius)
    moved = model.to(dtype=F64) if keyword else model.to(F64)
    quantiles = moved.radius.quantiles if empirical else moved.radius
    parts = [moved.weight, moved.bias, quantiles, moved.fitted_kappa, moved.directions]
    assert [p.dtype for p in parts] == [F64] * 5
    assert moved.kappa_scale == 2.0
    torch.testing.assert_close(moved.kappa, model.kappa.double())  # kappa_scale * fitted kappa: 8, 18
    torch.testing.assert_close(moved.kappa, torch.tensor([8.0, 18.0], dtype=F64))
    torch.testing.assert_close(moved.bias, torch.tensor([0.5, -0.5], dtype=F64))
    torch.testing.assert_close(moved.directions, model.directions.double())
    torch.testing.assert_close(moved.prior(2.0), model.prior(2.0).double(), rtol=1e-6, atol=0)


def test_to_keeps_absent_parts_absent() -> None:
    moved = PenultimateModel.from_head(torch.eye(2)).to(F64)
    assert moved.fitted_kappa is None and moved.directions is None
    assert moved.bias.dtype == F64 and moved.bias.tolist() == [0.0, 0.0]


def test_empirical_radius_draws_from_the_generator_only() -> None:
    radius = EmpiricalRadius(torch.tensor([[1.0, 2.0, 4.0], [3.0, 3.5, 5.0]], dtype=F64))
    y = torch.tensor([0, 1, 1, 0, 1])
    before = torch.get_rng_state()
    first = radius.sample(y, torch.Generator().manual_seed(4))
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(radius.sample(y, torch.Generator().manual_seed(4)), first)


def np_log_normalizer(kappa: np.ndarray, d: int) -> np.ndarray:
    """log C_d(kappa) from scipy's exponentially scaled ive."""
    v = d / 2 - 1
    return v * np.log(kappa) - d / 2 * np.log(2 * np.pi) - (np.log(special.ive(v, kappa)) + kappa)


def test_prior_at_a_radius_that_float32_cannot_hold() -> None:
    """pi_k(r) ~ exp(b_k) / C_d(r |w_k|) (scipy) at r = 0.1 with float64 weights: r is taken in
    float64 (float32's 0.1 is off by 1.5e-8)."""
    weight = torch.tensor([[30.0, 0.0, 0.0, 0.0], [0.0, 60.0, 0.0, 0.0], [0.0, 0.0, 5.0, 5.0]], dtype=F64)
    bias = np.array([0.2, -0.1, 0.0])
    model = PenultimateModel.from_head(weight, torch.tensor(bias))
    logits = bias - np_log_normalizer(0.1 * np.linalg.norm(weight.numpy(), axis=1), 4)
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    np.testing.assert_allclose(model.prior(0.1).numpy(), expected, rtol=1e-11)
    assert PenultimateModel.from_head(weight.float()).prior(0.1).dtype == torch.float32


def test_log_prob_batches_and_float32() -> None:
    """log p(a | y, r) = log C_d(kappa) + kappa mu_y.a with kappa = r |w_y| (scipy), for h of
    shape (2, 3, d); a float32 h gives the float64 value rounded to float32."""
    weight = torch.tensor([[30.0, 0.0, 0.0], [0.0, 20.0, 20.0]], dtype=F64)
    model = PenultimateModel.from_head(weight)
    h = torch.randn(2, 3, 3, generator=torch.Generator().manual_seed(0), dtype=F64) * 20
    y = torch.tensor([[0, 1, 1], [1, 0, 0]])
    hn, w = h.numpy(), weight.numpy()
    r = np.linalg.norm(hn, axis=-1)
    kappa = r * np.linalg.norm(w, axis=1)[y.numpy()]
    mu = w / np.linalg.norm(w, axis=1, keepdims=True)
    expected = np_log_normalizer(kappa, 3) + kappa * (hn * mu[y.numpy()]).sum(-1) / r
    got = model.log_prob(h, y)
    assert got.shape == (2, 3)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)
    got32 = PenultimateModel.from_head(weight.float()).log_prob(h.float(), y)
    assert got32.dtype == torch.float32
    exact = PenultimateModel.from_head(weight.float().double()).log_prob(h.float().double(), y).numpy()
    assert (np.abs(got32.numpy() - exact) <= np.spacing(np.abs(exact).astype(np.float32))).all()


def test_matched_kappa_solves_the_mean_cosine_and_marks_what_it_cannot() -> None:
    """d = 3: A_3(k) = coth k - 1/k = R m.u (scipy brentq); activations leaning away from u
    give 0; a class of identical activations (R = 1, u = m) has no finite kappa: NaN."""
    m = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=F64)
    toward = torch.tensor([[2.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 5.0]], dtype=F64)
    r = torch.tensor([0.5, 0.7, 1.0], dtype=F64)
    kappa = matched_kappa(r, m, toward)
    solved = optimize.brentq(lambda k: 1 / np.tanh(k) - 1 / k - 0.5, 1e-6, 100, xtol=1e-14)
    assert kappa[0].item() == pytest.approx(solved, rel=1e-9)
    assert kappa[1].item() == 0.0 and kappa[2].isnan()
    assert matched_kappa(r.float(), m.float(), toward.float()).dtype == torch.float32


def a3_inverse(r: float) -> float:
    """kappa with A_3(kappa) = coth(kappa) - 1/kappa = r (scipy brentq)."""
    return optimize.brentq(lambda k: 1 / np.tanh(k) - 1 / k - r, 1e-9, 1e6, xtol=1e-13)


def test_fit_from_activations_small_classes_by_hand() -> None:
    """d = 3, float64: two unit vectors 90 degrees apart give R = cos 45 and the kappa of
    A_3 = R; one activation gives R = 1 and its own direction but no kappa; identical
    activations (R = 1) no kappa either; an empty class R = 0 and no kappa."""
    s = 2**-0.5
    h = torch.tensor(
        [[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 5.0], [0.0, 0.0, 2.0]], dtype=F64
    )
    y = torch.tensor([0, 0, 1, 2, 2])  # class 2: two activations along e3 (R = 1 exactly)
    fit = fit_kappa_from_activations(h, y, 4)
    assert fit["count"].tolist() == [2, 1, 2, 0]
    np.testing.assert_allclose(fit["mean_resultant_length"].numpy(), [s, 1.0, 1.0, 0.0], rtol=1e-12)
    torch.testing.assert_close(
        fit["mean_direction"][:3], torch.tensor([[s, s, 0], [s, s, 0], [0, 0, 1]], dtype=F64)
    )
    assert fit["fitted_kappa"][0].item() == pytest.approx(a3_inverse(s), rel=1e-9)
    assert fit["fitted_kappa"][1:].isnan().all()
    assert fit["fitted_kappa"].dtype == F64
    assert fit_kappa_from_activations(h.int(), y, 4)["fitted_kappa"].dtype == torch.get_default_dtype()
    assert fit_kappa_from_activations(h[:, :2], y, 4)["count"].tolist() == [
        2,
        1,
        0,
        0,
    ]  # d = 2 is allowed; h = 0 is skipped


@pytest.mark.parametrize(
    ("h", "y", "message"),
    [
        (torch.zeros(4, 3, 1), torch.zeros(4, dtype=torch.long), r"h must have shape \(n, d\) with d >= 2 and y shape \(n,\), got \(4, 3, 1\) and \(4,\)"),
        (torch.zeros(4, 1), torch.zeros(4, dtype=torch.long), r"got \(4, 1\) and \(4,\)$"),
        (torch.ones(4, 3), torch.zeros(3, dtype=torch.long), r"got \(4, 3\) and \(3,\)$"),
        (torch.ones(4, 3), torch.tensor([0, 1, 3, 2]), r"^labels y must lie in \[0, 3\), got 0\.\.3$"),
        (torch.ones(4, 3), torch.tensor([0, -1, 2, 2]), r"^labels y must lie in \[0, 3\), got -1\.\.2$"),
    ],
)  # fmt: skip
def test_fit_from_activations_refuses_bad_input(h: torch.Tensor, y: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fit_kappa_from_activations(h, y, 3)


def cosine_model() -> PenultimateModel:
    return PenultimateModel.from_head(
        torch.tensor([[4.0, 0.0], [0.0, 4.0], [-4.0, 0.0]]), torch.tensor([0.0, 1.0, -1.0])
    )


@pytest.mark.parametrize("balanced", [False, True])
def test_sampled_labels_come_from_the_generator_only(balanced: bool) -> None:
    model = cosine_model()
    before = torch.get_rng_state()
    a, y = model.sample(12, generator=torch.Generator().manual_seed(3), balanced=balanced)
    assert torch.equal(torch.get_rng_state(), before)
    b, z = model.sample(12, generator=torch.Generator().manual_seed(3), balanced=balanced)
    assert torch.equal(y, z) and torch.equal(a, b)


def test_label_counts_and_their_refusals() -> None:
    model = cosine_model()
    g = torch.Generator().manual_seed(0)
    for n in (0, 1, 2):
        a, y = model.sample(n, generator=g)
        assert a.shape == (n, 2) and y.shape == (n,) and y.dtype == torch.long
    for bad in (-1, True, 2.0):
        with pytest.raises(ValueError) as refused:
            model.sample(bad, generator=g)  # type: ignore[arg-type]
        assert str(refused.value) == f"n must be an integer >= 0, got {bad!r}"
    with pytest.raises(ValueError) as refused:
        model.sample(2, y=torch.tensor([0, 1]), balanced=True)
    assert str(refused.value) == "give either labels y or balanced=True, not both"


class LinearHead:
    kind = "linear"
    bias = None

    def __init__(self, weight: torch.Tensor):
        self.weight = weight

    def effective_weight(self) -> torch.Tensor:
        return self.weight


class Classifier:
    def __init__(self, weight: torch.Tensor):
        self.head = LinearHead(weight)


def test_missing_statistics_are_named_for_each_option() -> None:
    net = Classifier(torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=F64))
    have = {"norm_mean": torch.ones(2, dtype=F64)}
    cases = [
        ({"kappa": "matched"}, "kappa='matched' needs activation_stats['mean_resultant_length']"),
        ({"direction": "class_mean"}, "direction='class_mean' needs activation_stats['mean_direction']"),
        (
            {"radius": "empirical"},
            "a linear head (radius='empirical') needs activation_stats['norm_quantiles']",
        ),
    ]
    for options, start in cases:
        with pytest.raises(ValueError) as refused:
            PenultimateModel.from_classifier(net, have, **options)
        assert str(refused.value) == f"{start}; the recorded statistics have only ['norm_mean']"
    with pytest.raises(ValueError, match=r"^direction must be one of 'weights', 'class_mean', got 'mean'$"):
        PenultimateModel.from_classifier(net, have, direction="mean")


def test_matched_kappa_toward_the_class_means_is_the_ml_fit() -> None:
    """direction="class_mean", kappa="matched": the mean direction is each class's own, so
    kappa solves A_3(kappa) = R (scipy), whatever the weights' directions."""
    net = Classifier(torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 3.0]], dtype=F64))
    r = [0.5, 0.8]
    stats = {
        "norm_mean": torch.ones(2, dtype=F64),
        "mean_resultant_length": torch.tensor(r, dtype=F64),
        "mean_direction": torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=F64),
    }
    model = PenultimateModel.from_classifier(net, stats, kappa="matched", direction="class_mean")
    np.testing.assert_allclose(model.kappa.numpy(), [a3_inverse(x) for x in r], rtol=1e-9)


def test_from_head_defaults_and_limits() -> None:
    """radius None is 1 (kappa_k = |w_k|); kappa_scale 0 is allowed (uniform samples); given
    directions are normalized; quantiles that decrease anywhere are refused."""
    weight = torch.tensor([[3.0, 0.0], [0.0, 5.0]], dtype=F64)
    assert PenultimateModel.from_head(weight).kappa.tolist() == [3.0, 5.0]
    assert PenultimateModel.from_head(weight, kappa_scale=0.0).kappa.tolist() == [0.0, 0.0]
    model = PenultimateModel.from_head(weight, direction=torch.tensor([[2.0, 0.0], [3.0, 4.0]], dtype=F64))
    torch.testing.assert_close(model.directions, torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=F64))
    with pytest.raises(ValueError, match="nondecreasing"):
        EmpiricalRadius(torch.tensor([[1.0, 3.0, 2.0]]))


def test_identical_directions_off_the_axes_have_no_fitted_kappa() -> None:
    """Two activations along (1, 1, 0) have R = 1 only up to rounding (1 - 1.1e-16 in float64):
    still no kappa, not 9e15."""
    h = torch.tensor([[1.0, 1.0, 0.0], [2.0, 2.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=F64)
    fit = fit_kappa_from_activations(h, torch.tensor([0, 0, 1, 1]), 2)
    assert fit["fitted_kappa"][0].isnan() and fit["fitted_kappa"][1].isfinite()
