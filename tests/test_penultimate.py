"""The generative model of a final layer: the posterior identity, sampling, radius and kappa
options, statistics fitting, and every error message."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import optimize, special, stats

from penrun.core.bessel import mean_cosine
from penrun.core.penultimate import (
    EmpiricalRadius,
    PenultimateModel,
    fit_kappa_from_activations,
    matched_kappa,
)
from penrun.core.vmf import VonMisesFisher, sample_vmf

F64 = torch.float64


def random_head(seed: int, dtype: torch.dtype):
    """A random head (K in 2..20, d in 2..600, row norms 1e-3..1e2, bias or none) and
    activations h with norms 1e-4..1e3."""
    gen = torch.Generator().manual_seed(seed)
    k = int(torch.randint(2, 21, (1,), generator=gen))
    d = int(torch.randint(2, 601, (1,), generator=gen))
    log_norms = torch.empty(k, 1, dtype=F64).uniform_(-3, 2, generator=gen)
    weight = F.normalize(torch.randn(k, d, dtype=F64, generator=gen), dim=1) * 10**log_norms
    bias = 3 * torch.randn(k, dtype=F64, generator=gen) if seed % 2 else None
    h_norms = 10 ** torch.empty(64, 1, dtype=F64).uniform_(-4, 3, generator=gen)
    h = F.normalize(torch.randn(64, d, dtype=F64, generator=gen), dim=1) * h_norms
    bias = None if bias is None else bias.to(dtype)
    return weight.to(dtype), bias, h.to(dtype)


def exact_softmax(weight, bias, h):
    """softmax(W h + b) in float64 from the given (possibly float32) numbers."""
    logits = h.double() @ weight.double().T
    return torch.softmax(logits if bias is None else logits + bias.double(), dim=-1)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_posterior_identity_linear_heads(dtype):
    tol = 1e-9 if dtype == F64 else 1e-5
    for seed in range(60):
        weight, bias, h = random_head(seed, dtype)
        post = PenultimateModel.from_head(weight, bias).posterior(h)
        assert post.dtype == dtype and post.shape == (64, weight.shape[0])
        assert (post.double() - exact_softmax(weight, bias, h)).abs().max() <= tol, seed
        # Against torch's softmax in the same dtype: float32 logits carry errors ~ |z| 6e-8,
        # so compare where they are small enough to be a reference at this tolerance.
        logits = h @ weight.T + (0 if bias is None else bias)
        ok = logits.abs().amax(1) < 100
        ref = torch.softmax(logits, -1)
        assert ((post - ref).abs().amax(1) <= tol)[ok].all(), seed


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_posterior_identity_cosine_heads(dtype):
    tol = 1e-9 if dtype == F64 else 1e-5
    for seed in range(30):
        w, bias, h = random_head(seed, dtype)
        s = 1 + seed  # scale of the cosine head
        weight = s * F.normalize(w, dim=1)
        a = F.normalize(h, dim=1)
        model = PenultimateModel.from_head(weight, bias, radius=1.0)
        torch.testing.assert_close(model.kappa, torch.full_like(model.kappa, s))
        post = model.posterior(a)
        assert (post.double() - exact_softmax(weight, bias, a)).abs().max() <= tol
        ref = torch.softmax(a @ weight.T + (0 if bias is None else bias), -1)
        assert (post - ref).abs().max() <= tol


def test_posterior_gradient_matches_softmax():
    weight, bias, h = random_head(5, F64)
    model = PenultimateModel.from_head(weight, bias)
    h = (h[:4] / h[:4].norm(dim=1, keepdim=True) * 3).requires_grad_()
    (grad,) = torch.autograd.grad(model.posterior(h)[:, 0].sum(), h)
    (ref,) = torch.autograd.grad(torch.softmax(h @ weight.T + bias, -1)[:, 0].sum(), h)
    torch.testing.assert_close(grad, ref, rtol=1e-7, atol=1e-10)


def test_posterior_of_zero_and_single_h():
    model = PenultimateModel.from_head(torch.tensor([[1.0, 0.0], [0.0, 3.0]]), torch.tensor([0.5, -1]))
    torch.testing.assert_close(model.posterior(torch.zeros(2)), torch.softmax(model.bias, 0))
    h = torch.tensor([2.0, -1.0])
    torch.testing.assert_close(model.posterior(h), torch.softmax(model.weight @ h + model.bias, 0))


def test_prior_and_log_prob():
    weight, bias, h = random_head(3, F64)
    model = PenultimateModel.from_head(weight, bias)
    r = torch.tensor([[0.0, 0.5], [2.0, 50.0]], dtype=F64)
    prior = model.prior(r)
    assert prior.shape == (2, 2, model.num_classes)
    torch.testing.assert_close(prior.sum(-1), torch.ones(2, 2, dtype=F64))
    torch.testing.assert_close(prior[0, 0], torch.softmax(bias, 0))  # r = 0: C_d(0) for all k
    # log p(a | y, r) is the vMF density of a = h/|h| with kappa = |h| |w_y|.
    y = torch.arange(64) % model.num_classes
    r = h.norm(dim=1)
    dist = VonMisesFisher(model.mu[y], r * weight.norm(dim=1)[y])
    torch.testing.assert_close(model.log_prob(h, y), dist.log_prob(h / r[:, None]))


def test_equal_norms_and_no_bias_give_uniform_prior():
    weight = 4 * F.normalize(torch.randn(7, 30, dtype=F64), dim=1)
    prior = PenultimateModel.from_head(weight).prior(torch.tensor([0.1, 3.0, 300.0]))
    torch.testing.assert_close(prior, torch.full((3, 7), 1 / 7, dtype=F64))


def test_sample_shapes_labels_and_concentration():
    k, d, n = 5, 16, 20_000
    weight = F.normalize(torch.randn(k, d), dim=1) * torch.tensor([[1.0], [2.0], [4.0], [8.0], [16.0]])
    model = PenultimateModel.from_head(weight, radius=2.0)
    torch.testing.assert_close(model.kappa, 2 * weight.norm(dim=1))
    a, y = model.sample(n, generator=torch.Generator().manual_seed(0))
    assert a.shape == (n, d) and y.shape == (n,) and a.dtype == torch.float32
    assert y.dtype == torch.long and y.min() >= 0 and y.max() < k
    # Prior draw: class frequencies match the prior at the mean radius (2).
    freq = torch.bincount(y, minlength=k).double() / n
    prior = model.prior(2.0).double()
    assert ((freq - prior).abs() < 4 * (prior * (1 - prior) / n).sqrt() + 1e-9).all()
    # Same generator seed, same draw.
    again = model.sample(n, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, again[0]) and torch.equal(y, again[1])
    # Class-balanced draw: unit vectors with each class's mean cosine A_d(kappa_k).
    a, y = model.sample(n, balanced=True, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a.norm(dim=1), torch.ones(n))
    t = torch.stack([(a * model.mu[y]).sum(1)[y == c].double() for c in range(k)], 1)
    se = t.std(0) / math.sqrt(n / k)
    assert ((t.mean(0) - mean_cosine(model.kappa.double(), d)).abs() < 4 * se).all()


def test_sample_given_and_balanced_labels():
    model = PenultimateModel.from_head(torch.randn(4, 8, dtype=F64), radius=torch.tensor([1.0, 2, 3, 4]))
    y = torch.tensor([3, 0, 0, 2, 1])
    a, y_out = model.sample(5, y=y, space="input")
    assert torch.equal(y_out, y)
    torch.testing.assert_close(a.norm(dim=1), model.radius[y])
    a, y = model.sample(400, balanced=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.bincount(y), torch.full((4,), 100))
    assert not torch.equal(y, torch.arange(400) % 4)  # shuffled


def test_kappa_scale_and_explicit_kappa():
    weight = torch.randn(3, 10, dtype=F64)
    fitted = torch.tensor([5.0, 50.0, 500.0], dtype=F64)
    model = PenultimateModel.from_head(weight, kappa=fitted, kappa_scale=2.0, radius=7.0)
    torch.testing.assert_close(model.kappa, 2 * fitted)
    y = torch.arange(3).repeat(5000)
    a, _ = model.sample(len(y), y=y, generator=torch.Generator().manual_seed(2))
    t = (a * model.mu[y]).sum(1).view(5000, 3)
    se = t.std(0) / math.sqrt(5000)
    assert ((t.mean(0) - mean_cosine(2 * fitted, 10)).abs() < 4 * se).all()
    scaled = PenultimateModel.from_head(weight, kappa_scale=0.5, radius=3.0)
    torch.testing.assert_close(scaled.kappa, 1.5 * weight.norm(dim=1))


def test_empirical_radius_draws_within_quantiles():
    q = torch.tensor([[1.0, 2.0, 2.5, 4.0], [10.0, 10.0, 11.0, 20.0]])
    radius = EmpiricalRadius(q)
    torch.testing.assert_close(radius.mean(), torch.tensor([7 / 3, 12.0]))
    model = PenultimateModel.from_head(torch.randn(2, 6), radius=radius)
    gen = torch.Generator().manual_seed(3)
    a, y = model.sample(10_000, balanced=True, space="input", generator=gen)
    r = a.norm(dim=1)
    for c in range(2):
        rc = r[y == c]
        assert q[c, 0] - 1e-4 <= rc.min() and rc.max() <= q[c, -1] + 1e-4
        assert abs(rc.mean() - radius.mean()[c]) < 0.05 * radius.mean()[c]
    # Inverse CDF: the median of class 0 is the interpolated quantile at p = 0.5.
    assert abs(r[y == 0].median() - 2.25) < 0.05


class _Head(SimpleNamespace):
    def effective_weight(self) -> torch.Tensor:
        return self.weight


def classifier(kind: str, weight: torch.Tensor, bias=None):
    head = _Head(kind=kind, weight=weight, bias=bias, normalizes_input=kind == "cosine")
    return SimpleNamespace(head=head)


def stats_for(k: int, q: int = 5) -> dict[str, torch.Tensor]:
    return {
        "count": torch.full((k,), 100),
        "norm_mean": torch.linspace(2, 3, k),
        "norm_std": torch.ones(k),
        "norm_quantiles": torch.linspace(1, 4, q).repeat(k, 1),
        "mean_resultant_length": torch.full((k,), 0.5),
        "fitted_kappa": torch.linspace(10, 20, k),
    }


def test_from_classifier_cosine_and_linear():
    w = 16 * F.normalize(torch.randn(4, 8), dim=1)
    cosine = PenultimateModel.from_classifier(classifier("cosine", w))
    torch.testing.assert_close(cosine.kappa, torch.full((4,), 16.0))
    fitted = PenultimateModel.from_classifier(classifier("cosine", w), stats_for(4), kappa="fitted")
    torch.testing.assert_close(fitted.kappa, stats_for(4)["fitted_kappa"])

    w, b = torch.randn(4, 8), torch.randn(4)
    linear = PenultimateModel.from_classifier(classifier("linear", w, b), stats_for(4), kappa_scale=2.0)
    torch.testing.assert_close(linear.kappa, 2 * stats_for(4)["norm_mean"] * w.norm(dim=1))
    torch.testing.assert_close(linear.bias, b)
    emp = PenultimateModel.from_classifier(classifier("linear", w), stats_for(4), radius="empirical")
    assert isinstance(emp.radius, EmpiricalRadius)
    as64 = emp.to(dtype=F64)
    assert as64.weight.dtype == F64 and as64.radius.quantiles.dtype == F64


@pytest.mark.parametrize(
    ("kind", "stats", "options", "message"),
    [
        ("linear", None, {}, r"a linear head \(radius='fixed'\) needs the per-class activation statistics recorded with the teacher \(activation_stats\); got none"),
        ("linear", {"count": torch.ones(3)}, {"radius": "empirical"}, r"needs activation_stats\['norm_quantiles'\]; the recorded statistics have only \['count'\]"),
        ("cosine", None, {"kappa": "fitted"}, r"kappa='fitted' needs the per-class activation statistics"),
        ("linear", stats_for(3), {"radius": "median"}, r"radius must be one of 'fixed', 'empirical', got 'median'"),
        ("linear", stats_for(3), {"kappa": "learned"}, r"kappa must be one of 'weights', 'fitted', 'matched', got 'learned'"),
        ("softmax", None, {}, r"head kind must be one of 'cosine', 'linear', got 'softmax'"),
    ],
)  # fmt: skip
def test_from_classifier_errors(kind, stats, options, message):
    with pytest.raises(ValueError, match=message):
        PenultimateModel.from_classifier(classifier(kind, torch.randn(3, 4)), stats, **options)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"kappa": torch.tensor([1.0, -1.0, 2.0])}, r"kappa must be >= 0 and finite, got -1\.0 at index 1"),
        ({"kappa": torch.tensor([1.0, 2.0, math.nan])}, r"kappa must be >= 0 and finite, got nan at index 2"),
        ({"kappa": torch.ones(2)}, r"kappa must have shape \(K,\)=\(3,\), got \(2,\)"),
        ({"weight": torch.tensor([[1.0, 0], [0, 0], [0, 1]])}, r"weight rows must be nonzero .* got a zero row at index 1"),
        ({"weight": torch.ones(3, 1)}, r"weight must be a float tensor of shape \(K, d\) with d >= 2, got shape \(3, 1\)"),
        ({"bias": torch.ones(4)}, r"bias must be finite with shape \(K,\)=\(3,\), got \(4,\)"),
        ({"radius": -1.0}, r"radius must be > 0 and finite, got -1\.0 at index 0"),
        ({"radius": torch.ones(2)}, r"radius must be None, a float, a tensor of shape \(K,\)=\(3,\)"),
        ({"radius": EmpiricalRadius(torch.ones(2, 3))}, r"EmpiricalRadius needs one row of quantiles per class \(3\), got 2"),
        ({"kappa_scale": -2.0}, r"kappa_scale must be >= 0 and finite, got -2\.0"),
    ],
)  # fmt: skip
def test_from_head_errors(args, message):
    with pytest.raises(ValueError, match=message):
        PenultimateModel.from_head(**{"weight": torch.randn(3, 4), **args})


def test_sample_and_quantile_errors():
    model = PenultimateModel.from_head(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"space must be one of 'direction', 'input', got 'logits'"):
        model.sample(2, space="logits")
    with pytest.raises(ValueError, match=r"labels y must lie in \[0, 3\), got values from 0 to 3"):
        model.sample(2, y=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"y must be an integer tensor of shape \(n,\)=\(3,\)"):
        model.sample(3, y=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="give either labels y or balanced=True, not both"):
        model.sample(2, y=torch.tensor([0, 1]), balanced=True)
    with pytest.raises(
        ValueError,
        match=r"quantiles must be nondecreasing along each row, got a decrease at index \(1, 0\)",
    ):
        EmpiricalRadius(torch.tensor([[1.0, 2.0], [3.0, 2.0]]))
    with pytest.raises(ValueError, match=r"quantiles must be a float tensor of shape \(K, Q\) with Q >= 2"):
        EmpiricalRadius(torch.ones(3, 1))


def test_fit_kappa_from_activations_recovers_kappa():
    d, kappas = 64, torch.tensor([5.0, 50.0, 500.0], dtype=F64)
    mu = F.normalize(torch.randn(3, d, dtype=F64, generator=torch.Generator().manual_seed(0)), dim=1)
    y = torch.arange(3).repeat(20_000)
    a = sample_vmf(mu, kappas[y], y, generator=torch.Generator().manual_seed(1))
    h = a * torch.empty(len(y), 1, dtype=F64).uniform_(0.5, 3)  # norms do not matter
    h = torch.cat([h, torch.zeros(5, d, dtype=F64)])  # zero rows are skipped
    y = torch.cat([y, torch.zeros(5, dtype=torch.long)])
    fit = fit_kappa_from_activations(h.float(), y, num_classes=4)
    assert torch.equal(fit["count"], torch.tensor([20_000, 20_000, 20_000, 0]))
    assert ((fit["fitted_kappa"][:3].double() / kappas - 1).abs() < 0.03).all()
    assert fit["fitted_kappa"][3].isnan() and fit["fitted_kappa"].dtype == torch.float32
    cos = (fit["mean_direction"][:3].double() * mu).sum(1)
    assert (cos > 0.99).all()
    torch.testing.assert_close(
        fit["mean_resultant_length"][:3].double(), mean_cosine(kappas, d), rtol=0.01, atol=0
    )


def _scipy_log_c(d: int, kappa):
    """log C_d(kappa) from scipy's exponentially scaled Bessel function (independent oracle)."""
    kappa = np.asarray(kappa, dtype=np.float64)
    v = d / 2 - 1
    return v * np.log(kappa) - (d / 2) * np.log(2 * np.pi) - np.log(special.ive(v, kappa)) - kappa


def _unequal_head(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    directions = F.normalize(torch.randn(4, 6, generator=g, dtype=torch.float64), dim=1)
    norms = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64)
    bias = torch.tensor([0.3, -0.2, 0.5, 0.0], dtype=torch.float64)
    return directions * norms[:, None], bias


def test_prior_with_unequal_row_norms_matches_scipy():
    """pi_k(r) ~ exp(b_k) / C_d(r |w_k|) against scipy.special.ive, for r > 0, unequal |w_k|
    and nonzero biases. Fails if the prior uses the mean weight norm for every class, drops
    the biases, or uses +log C_d."""
    weight, bias = _unequal_head()
    model = PenultimateModel.from_head(weight, bias)
    radii = [0.7, 2.5]
    got = model.prior(torch.tensor(radii, dtype=torch.float64)).numpy()
    norms = np.linalg.norm(weight.numpy(), axis=1)
    for i, r in enumerate(radii):
        logits = bias.numpy() - _scipy_log_c(6, r * norms)
        want = np.exp(logits - logits.max())
        want /= want.sum()
        np.testing.assert_allclose(got[i], want, rtol=1e-9, atol=1e-12)
    # the prior is far from softmax(b) here, so a per-class-norm bug cannot pass by luck
    plain = np.exp(bias.numpy()) / np.exp(bias.numpy()).sum()
    assert np.abs(got[1] - plain).max() > 0.1


def test_sampled_labels_follow_prior_at_mean_radius():
    """Labels of sample(n) without y follow pi(r) at the mean radius over classes, checked
    with a chi-square test against the scipy prior (fixed seed; p > 1e-3). Fails if the
    prior uses the mean weight norm for every class, drops the biases, or is taken at r = 1
    instead of the mean radius."""
    weight, bias = _unequal_head()
    radius = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    model = PenultimateModel.from_head(weight, bias, radius=radius)
    n = 20000
    _, y = model.sample(n, generator=torch.Generator().manual_seed(0))
    counts = np.bincount(y.numpy(), minlength=4)
    norms = np.linalg.norm(weight.numpy(), axis=1)
    logits = bias.numpy() - _scipy_log_c(6, 2.5 * norms)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    assert stats.chisquare(counts, n * probs).pvalue > 1e-3


# ---------------- tests written to kill mutants the tests above let survive (MUTATION.md)
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


@pytest.mark.mutation
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


@pytest.mark.mutation
def test_to_keeps_absent_parts_absent() -> None:
    moved = PenultimateModel.from_head(torch.eye(2)).to(F64)
    assert moved.fitted_kappa is None and moved.directions is None
    assert moved.bias.dtype == F64 and moved.bias.tolist() == [0.0, 0.0]


@pytest.mark.mutation
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


@pytest.mark.mutation
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


@pytest.mark.mutation
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


@pytest.mark.mutation
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


@pytest.mark.mutation
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


@pytest.mark.mutation
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


@pytest.mark.mutation
@pytest.mark.parametrize("balanced", [False, True])
def test_sampled_labels_come_from_the_generator_only(balanced: bool) -> None:
    model = cosine_model()
    before = torch.get_rng_state()
    a, y = model.sample(12, generator=torch.Generator().manual_seed(3), balanced=balanced)
    assert torch.equal(torch.get_rng_state(), before)
    b, z = model.sample(12, generator=torch.Generator().manual_seed(3), balanced=balanced)
    assert torch.equal(y, z) and torch.equal(a, b)


@pytest.mark.mutation
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


@pytest.mark.mutation
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


@pytest.mark.mutation
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


@pytest.mark.mutation
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


@pytest.mark.mutation
def test_identical_directions_off_the_axes_have_no_fitted_kappa() -> None:
    """Two activations along (1, 1, 0) have R = 1 only up to rounding (1 - 1.1e-16 in float64):
    still no kappa, not 9e15."""
    h = torch.tensor([[1.0, 1.0, 0.0], [2.0, 2.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=F64)
    fit = fit_kappa_from_activations(h, torch.tensor([0, 0, 1, 1]), 2)
    assert fit["fitted_kappa"][0].isnan() and fit["fitted_kappa"][1].isfinite()
