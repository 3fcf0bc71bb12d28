"""The vMF distribution: sampler (against exact distributions and SciPy), density, fit_kappa,
parameter validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, special, stats

from penrun.core.bessel import fit_kappa, log_vmf_normalizer, mean_cosine
from penrun.core.vmf import VonMisesFisher, sample_vmf

DIMS = (2, 3, 5, 64, 512)
KAPPAS = (0.0, 0.5, 10.0, 300.0, 1e4)
N = 20_000
# Fixed seeds, so a KS p-value is a fixed number: P_MIN is small enough never to reject a
# correct sampler by chance at these seeds, and the wrong-kappa runs show the same test
# rejects a concentration 1.5 kappa + 2.
P_MIN = 1e-3
F64 = torch.float64


def e1(d: int, dtype: torch.dtype = F64) -> torch.Tensor:
    mu = torch.zeros(d, dtype=dtype)
    mu[0] = 1
    return mu


def draw(d: int, kappa: float, n: int, seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    dist = VonMisesFisher(e1(d, dtype), torch.tensor(kappa, dtype=dtype))
    return dist.sample((n,), generator=gen)


def angle(x: torch.Tensor) -> np.ndarray:
    """Angle to e1, accurate near 0 (unlike arccos of the cosine)."""
    return torch.atan2(torch.linalg.vector_norm(x[:, 1:], dim=1), x[:, 0]).double().numpy()


def angle_cdf(d: int, kappa: float):
    """Exact CDF of the angle theta to mu, density ~ exp(kappa cos) sin^(d-2), by quadrature."""
    theta = np.linspace(0, np.pi, 400_001)
    log_f = kappa * np.cos(theta) + special.xlogy(d - 2, np.sin(theta))
    cdf = integrate.cumulative_trapezoid(np.exp(log_f - log_f.max()), theta, initial=0)
    return lambda x: np.interp(x, theta, cdf / cdf[-1])


def seed_of(d: int, kappa: float) -> int:
    return d * 1009 + round(kappa * 10)


def size_for(d: int) -> int:
    return N if d < 512 else N // 4  # keeps d = 512 quick; the KS tests keep their power


@pytest.mark.parametrize("kappa", KAPPAS)
@pytest.mark.parametrize("d", DIMS)
def test_angle_matches_exact_distribution(d, kappa):
    n = size_for(d)
    x = draw(d, kappa, n, seed_of(d, kappa))
    cdf = angle_cdf(d, kappa)
    assert stats.kstest(angle(x), cdf).pvalue > P_MIN
    wrong = draw(d, 1.5 * kappa + 2, n, seed_of(d, kappa) + 1)
    assert stats.kstest(angle(wrong), cdf).pvalue < P_MIN
    # Mean cosine within 4 standard errors of A_d(kappa).
    t = x[:, 0]
    se = t.std().item() / math.sqrt(n)
    assert abs(t.mean().item() - mean_cosine(torch.tensor(kappa, dtype=F64), d).item()) < 4 * se


@pytest.mark.parametrize("kappa", KAPPAS[1:])
@pytest.mark.parametrize("d", DIMS)
def test_cosine_matches_scipy(d, kappa):
    n = N if d < 512 else 1500  # scipy's sampler is slow at d = 512
    seed = seed_of(d, kappa)
    ref = stats.vonmises_fisher(e1(d).numpy(), kappa).rvs(n, random_state=seed)[:, 0]
    ours = draw(d, kappa, n, seed)[:, 0].numpy()
    assert stats.ks_2samp(ours, ref).pvalue > P_MIN
    if d < 512 or kappa > 1:  # too few samples to tell kappa = 0.5 from 2.75 at d = 512
        wrong = draw(d, 1.5 * kappa + 2, n, seed + 1)[:, 0].numpy()
        assert stats.ks_2samp(wrong, ref).pvalue < P_MIN


@pytest.mark.parametrize("kappa", [0.5, 10.0, 1e4, 1e5])
def test_d3_closed_form(kappa):
    # d = 3: t = 1 + log(u + (1-u) e^(-2 kappa)) / kappa for u uniform, i.e. the CDF of t is
    # P(T <= t) = (e^(kappa (t-1)) - e^(-2 kappa)) / (1 - e^(-2 kappa)); test it on 1 - t.
    x = draw(3, kappa, N, seed=7)
    one_minus_t = (1 - x[:, 0]).numpy()

    def survival_cdf(s):  # P(1 - T <= s)
        return -np.expm1(-kappa * s) / -np.expm1(-2 * kappa)

    assert stats.kstest(one_minus_t, survival_cdf).pvalue > P_MIN


@pytest.mark.parametrize(("d", "kappa"), [(4096, 1e5), (4096, 0.0), (2, 1e5), (4096, 30.0)])
def test_extreme_parameters(d, kappa):
    x = draw(d, kappa, 2000, seed=3)
    assert x.isfinite().all()
    torch.testing.assert_close(torch.linalg.vector_norm(x, dim=1), torch.ones(2000, dtype=F64))
    t = x[:, 0]
    a = mean_cosine(torch.tensor(kappa, dtype=F64), d).item()
    assert abs(t.mean().item() - a) < 4 * t.std().item() / math.sqrt(2000) + 1e-12
    assert stats.kstest(angle(x), angle_cdf(d, kappa)).pvalue > P_MIN


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unit_norm_dtype_and_isotropy(dtype):
    d = 5
    mu = torch.tensor([1.0, 2.0, -2.0, 0.0, 4.0], dtype=dtype) / 5
    x = VonMisesFisher(mu, torch.tensor(3.0, dtype=dtype)).sample(
        (N,), generator=torch.Generator().manual_seed(0)
    )
    assert x.dtype == dtype and x.shape == (N, d)
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    assert (torch.linalg.vector_norm(x, dim=1) - 1).abs().max() < tol
    # The part orthogonal to mu has mean 0 and the same variance in every direction of mu's
    # orthogonal complement.
    basis = torch.linalg.qr(torch.cat([mu[:, None], torch.eye(d, dtype=dtype)], 1))[0][:, 1:]
    perp = (x @ basis).double()
    assert perp.mean(0).abs().max() < 4 * perp.std(0).max() / math.sqrt(N)
    cov = perp.T @ perp / N
    expected = (1 - (x @ mu).double().square().mean()) / (d - 1)
    torch.testing.assert_close(cov, expected * torch.eye(d - 1, dtype=F64), atol=0.01, rtol=0)


def test_reproducible_from_generator():
    mu = torch.nn.functional.normalize(torch.randn(3, 8, dtype=F64), dim=1)
    dist = VonMisesFisher(mu, torch.tensor([0.0, 5.0, 500.0], dtype=F64))

    def sample(seed: int) -> torch.Tensor:
        return dist.sample((100,), generator=torch.Generator().manual_seed(seed))

    assert torch.equal(sample(1), sample(1))
    assert not torch.equal(sample(1), sample(2))


def test_batched_distribution():
    mu = torch.nn.functional.normalize(torch.randn(2, 3, 16, dtype=F64), dim=-1)
    kappa = torch.tensor([1.0, 20.0, 300.0], dtype=F64)  # broadcasts to batch (2, 3)
    dist = VonMisesFisher(mu, kappa)
    assert dist.batch_shape == (2, 3) and dist.event_shape == (16,)
    x = dist.sample((4000,), generator=torch.Generator().manual_seed(0))
    assert x.shape == (4000, 2, 3, 16)
    t = (x * mu).sum(-1)
    se = t.std(0) / math.sqrt(4000)
    assert ((t.mean(0) - mean_cosine(kappa, 16)).abs() < 4 * se).all()
    torch.testing.assert_close(dist.mean, mean_cosine(kappa, 16)[:, None] * mu)
    assert dist.log_prob(x).shape == (4000, 2, 3)
    assert dist.expand((5, 2, 3)).sample().shape == (5, 2, 3, 16)


def test_sample_vmf_with_class_index():
    mu = torch.nn.functional.normalize(torch.randn(4, 32), dim=1)
    kappa_by_class = torch.tensor([0.0, 10.0, 100.0, 1e4])
    y = torch.arange(40_000) % 4
    x = sample_vmf(mu, kappa_by_class[y], y, generator=torch.Generator().manual_seed(0))
    assert x.shape == (40_000, 32) and x.dtype == torch.float32
    t = (x * mu[y]).sum(1)
    for k in range(4):
        tk = t[y == k].double()
        a = mean_cosine(kappa_by_class[k].double(), 32)
        assert abs(tk.mean() - a) < 4 * tk.std() / math.sqrt(len(tk)) + 1e-6
    # Per-sample directions (mu of shape (n, d)) give the same draw as the class index.
    same = sample_vmf(mu[y], kappa_by_class[y], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(same, x)


def test_log_prob_matches_scipy():
    rng = np.random.default_rng(0)
    for d in (2, 3, 5, 64, 512):
        for kappa in (0.5, 10.0, 300.0, 1e4, 1e5):
            mu = rng.normal(size=d)
            mu /= np.linalg.norm(mu)
            x = rng.normal(size=(6, d))
            x[0] = mu
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            with np.errstate(all="ignore"):
                ref = stats.vonmises_fisher(mu, kappa).logpdf(x)
            if not np.isfinite(ref).all():  # scipy's normalizer underflows (d = 512, small kappa)
                continue
            got = VonMisesFisher(torch.tensor(mu), torch.tensor(kappa)).log_prob(torch.tensor(x))
            np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10, atol=1e-9)
            dist = VonMisesFisher(torch.tensor(mu), torch.tensor(kappa))
            ent = stats.vonmises_fisher(mu, kappa).entropy()
            assert abs(dist.entropy().item() - ent) <= 1e-9 * max(1, abs(ent))


@pytest.mark.parametrize("kappa", [0.0, 1.0, 50.0])
def test_density_integrates_to_one(kappa):
    theta = torch.linspace(-math.pi, math.pi, 200_001, dtype=F64)
    circle = torch.stack([theta.cos(), theta.sin()], 1)
    density = VonMisesFisher(e1(2), torch.tensor(kappa, dtype=F64)).log_prob(circle).exp()
    assert abs(torch.trapezoid(density, theta).item() - 1) < 1e-9
    # d = 3: integrate the density of t = mu^T x, 2 pi C_3(kappa) exp(kappa t), over [-1, 1].
    t = torch.linspace(-1, 1, 200_001, dtype=F64)
    log_c = log_vmf_normalizer(torch.tensor(kappa, dtype=F64), 3)
    integral = torch.trapezoid(2 * math.pi * torch.exp(log_c + kappa * t), t).item()
    assert abs(integral - 1) < 1e-7  # trapezoid error ~ (kappa h)^2 / 12


@pytest.mark.parametrize("kappa", [5.0, 50.0, 500.0])
def test_fit_kappa_recovers_synthetic_kappa(kappa):
    x = draw(64, kappa, N, seed=11)
    length = torch.linalg.vector_norm(x.mean(0))
    assert abs(fit_kappa(length, 64).item() / kappa - 1) < 0.03


def test_fit_kappa_inverts_mean_cosine():
    for d in (2, 3, 64, 4096):
        kappa = torch.tensor([0.0, 1e-4, 0.3, 5.0, 80.0, 3e3, 1e5], dtype=F64)
        torch.testing.assert_close(fit_kappa(mean_cosine(kappa, d), d), kappa, rtol=1e-9, atol=0)
    assert fit_kappa(torch.tensor([0.5], dtype=torch.float32), 3).dtype == torch.float32


@pytest.mark.parametrize("bad", [1.0, -0.1, math.nan])
def test_fit_kappa_rejects_bad_length(bad):
    with pytest.raises(ValueError, match=r"mean_resultant_length must be in \[0, 1\), got"):
        fit_kappa(torch.tensor([0.2, bad]), 8)
    with pytest.raises(ValueError, match="d must be an integer >= 2"):
        fit_kappa(0.5, 1)


@pytest.mark.parametrize(
    ("mu", "kappa", "message"),
    [
        (e1(4).expand(5, 4), torch.tensor([1.0, 2, 3, -1, 0]), r"kappa must be >= 0 and finite, got -1\.0 at index 3"),
        (e1(4), torch.tensor(math.nan), r"kappa must be >= 0 and finite, got nan$"),
        (e1(4), torch.tensor(math.inf), r"kappa must be >= 0 and finite, got inf"),
        (torch.zeros(2, 3), 1.0, r"mu must be a unit vector \(norm 1\), got norm 0 at index 0"),
        (2 * e1(3), 1.0, r"mu must be a unit vector \(norm 1 within 1e-06\).*got norm 2\.0"),
        (torch.ones(1), 1.0, r"mu must have shape \(\.\.\., d\) with d >= 2.*got shape \(1,\)"),
        (e1(3).expand(4, 3), torch.ones(3), r"kappa of shape \(3,\) does not broadcast to the batch shape \(4,\)"),
    ],
)  # fmt: skip
def test_parameter_validation(mu, kappa, message):
    with pytest.raises(ValueError, match=message):
        VonMisesFisher(mu, kappa)


def test_float32_unit_tolerance_and_opt_out():
    mu = e1(3, torch.float32) * (1 + 5e-5)
    VonMisesFisher(mu, 1.0)  # within float32 tolerance
    with pytest.raises(ValueError, match=r"norm 1 within 0\.0001"):
        VonMisesFisher(e1(3, torch.float32) * 1.01, 1.0)
    VonMisesFisher(e1(3) * 2, -1.0, validate_args=False)  # no checks when asked


def test_sample_vmf_validation():
    mu = torch.eye(3)
    with pytest.raises(ValueError, match=r"index must lie in \[0, 3\)"):
        sample_vmf(mu, torch.ones(2), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"without index, mu must have 1 or n=2 rows"):
        sample_vmf(mu, torch.ones(2))
    with pytest.raises(ValueError, match=r"kappa must have shape \(n,\)"):
        sample_vmf(mu, torch.ones(2, 1), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"kappa must be >= 0 and finite, got -2\.0 at index 1"):
        sample_vmf(mu, torch.tensor([1.0, -2.0]), torch.tensor([0, 1]))
    assert sample_vmf(mu, torch.ones(0), torch.zeros(0, dtype=torch.long)).shape == (0, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sampling():
    mu = torch.nn.functional.normalize(torch.randn(10, 64, device="cuda"), dim=1)
    dist = VonMisesFisher(mu, torch.linspace(0, 1e4, 10, device="cuda"))

    def sample() -> torch.Tensor:
        return dist.sample((5000,), generator=torch.Generator("cuda").manual_seed(0))

    x = sample()
    assert x.device.type == "cuda" and torch.equal(x, sample())
    t = (x * mu).sum(-1).double()
    a = mean_cosine(dist.kappa.double(), 64)
    assert ((t.mean(0) - a).abs() < 4 * t.std(0) / math.sqrt(5000) + 1e-6).all()
    with pytest.raises(ValueError, match="generator must be on the samples' device"):
        dist.sample((2,), generator=torch.Generator().manual_seed(0))


def test_tangent_direction_is_isotropic_with_one_mu_per_row():
    """On the one-direction-per-row path (mu (K, d), kappa (K,), index), the samples of one
    class have a component orthogonal to mu_k with mean ~0 and equal variance along two
    orthonormal vectors orthogonal to mu_k (one of them along another class's direction).
    n = 4000, d = 5: each coordinate's mean is within 5 standard errors of 0 and the variance
    ratio within 1 +- 0.15 (its sd is ~0.03). Fails if the tangent noise is drawn from
    uniform(0, 1) instead of a Gaussian, or the Gram-Schmidt step removes the first row's
    direction instead of each row's own."""
    g = torch.Generator().manual_seed(0)
    mu = torch.nn.functional.normalize(torch.randn(3, 5, generator=g, dtype=torch.float64), dim=1)
    kappa = torch.tensor([2.0, 5.0, 1.0], dtype=torch.float64)
    index = torch.tensor([0, 1, 2] * 4000)
    x = sample_vmf(mu, kappa[index], index, generator=g)
    m = mu[1].numpy()
    xs = x[index == 1].numpy()
    tangent = xs - np.outer(xs @ m, m)
    n = len(tangent)
    assert np.all(np.abs(tangent.mean(0)) < 5 * tangent.std(0) / np.sqrt(n))
    u1 = mu[0].numpy() - (mu[0].numpy() @ m) * m
    u1 /= np.linalg.norm(u1)
    u2 = np.random.default_rng(0).normal(size=5)
    u2 -= (u2 @ m) * m + (u2 @ u1) * u1
    u2 /= np.linalg.norm(u2)
    ratio = (tangent @ u1).var() / (tangent @ u2).var()
    assert abs(ratio - 1) < 0.15


# ---------------- tests written to kill mutants the tests above let survive (MUTATION.md)
@pytest.mark.mutation
def test_an_integer_mu_is_refused_naming_its_dtype() -> None:
    with pytest.raises(ValueError, match=r"^mu must be a floating-point tensor, got dtype torch\.int64$"):
        VonMisesFisher(torch.tensor([1, 0]), 1.0)


@pytest.mark.mutation
def test_samples_are_unit_vectors_in_two_dimensions_with_one_mu_per_row() -> None:
    """d = 2: the tangent noise is one Gaussian coordinate, often shorter than 1; the sample
    must still be rescaled onto the circle."""
    mu = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=F64)
    index = torch.arange(200) % 2
    x = sample_vmf(mu, torch.full((200,), 0.5, dtype=F64), index, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(torch.linalg.vector_norm(x, dim=1), torch.ones(200, dtype=F64))


@pytest.mark.mutation
@pytest.mark.parametrize("rows", [1, 3])
def test_samples_come_from_the_generator_only(rows: int) -> None:
    """The same seed gives the same samples, and the global random state is not drawn from
    (both the shared-mu and the one-mu-per-row paths)."""
    mu = torch.eye(4, dtype=F64)[:rows]
    kappa = torch.full((30,), 3.0, dtype=F64)
    index = None if rows == 1 else torch.arange(30) % rows
    before = torch.get_rng_state()
    first = sample_vmf(mu, kappa, index, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(sample_vmf(mu, kappa, index, generator=torch.Generator().manual_seed(7)), first)


@pytest.mark.mutation
def test_the_sampler_computes_in_float64_whatever_the_dtype_of_kappa() -> None:
    """A float32 kappa of exactly representable values gives the very samples of the same
    kappa in float64 (the cosine is drawn in float64 either way)."""
    mu = e1(6)
    kappa32 = torch.tensor([0.5, 3.0, 50.0, 1000.0, 1e5] * 20, dtype=torch.float32)

    def draw(kappa: torch.Tensor) -> torch.Tensor:
        return sample_vmf(mu, kappa, generator=torch.Generator().manual_seed(3))

    assert torch.equal(draw(kappa32), draw(kappa32.double()))


@pytest.mark.mutation
def test_mu_is_renormalized_within_the_tolerance() -> None:
    mu = e1(3, torch.float32) * (1 + 5e-5)  # accepted: float32 tolerance 1e-4
    dist = VonMisesFisher(mu, 1.0)
    assert abs(torch.linalg.vector_norm(dist.mode).item() - 1) < 1e-6


@pytest.mark.mutation
def test_log_prob_checks_the_support_with_the_float64_tolerance() -> None:
    dist = VonMisesFisher(e1(3), 1.0)
    dist.log_prob(e1(3) * (1 + 1e-7))  # within 1e-6
    with pytest.raises(ValueError):
        dist.log_prob(e1(3) * (1 + 1e-5))


@pytest.mark.mutation
def test_expand_keeps_the_validation_setting() -> None:
    """An expanded distribution validates its samples when the original does, and an
    unvalidated one (parameters outside the constraints) expands without a check."""
    checked = VonMisesFisher(e1(3), 1.0).expand((2,))
    with pytest.raises(ValueError):
        checked.log_prob(2 * e1(3))
    unchecked = VonMisesFisher(2 * e1(3), -1.0, validate_args=False).expand((2,))
    assert unchecked.batch_shape == (2,)
    assert unchecked.log_prob(2 * e1(3)).shape == (2,)


class Tilted(VonMisesFisher):
    """A subclass with its own __init__ must pass its instance to expand (torch's protocol)."""

    def __init__(self, mu: torch.Tensor, kappa: float, tag: str):
        super().__init__(mu, kappa)
        self.tag = tag

    def expand(self, batch_shape: torch.Size, _instance=None) -> Tilted:
        new = self._get_checked_instance(Tilted, _instance)
        new.tag = self.tag
        return super().expand(batch_shape, _instance=new)


@pytest.mark.mutation
def test_expand_fills_the_instance_of_a_subclass() -> None:
    expanded = Tilted(e1(3), 2.0, "t").expand((4,))
    assert type(expanded) is Tilted and expanded.tag == "t" and expanded.batch_shape == (4,)
