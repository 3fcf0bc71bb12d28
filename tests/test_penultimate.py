"""The generative model of a final layer: the posterior identity, sampling, radius and kappa
options, statistics fitting, and every error message."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import special, stats

from penrun.core.bessel import mean_cosine
from penrun.core.penultimate import EmpiricalRadius, PenultimateModel, fit_kappa_from_activations
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
