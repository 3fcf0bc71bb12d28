"""log I_v(x), the vMF normalizer and the mean cosine against mpmath (high precision)."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch

from penrun.core.bessel import log_bessel_iv, log_vmf_normalizer, mean_cosine

ORDERS = (0, 0.5, 1, 2.5, 10, 31, 63.5, 255, 1023, 2047)
# Log-spaced 1e-6..1e5 plus both sides of the series/asymptotic switch at x = 10.
XS = (*np.logspace(-6, 5, 34).tolist(), 9.999, 10.0, 10.001)
# |error| <= REL |log I| + ABS: the absolute part only matters where I_v(x) ~ 1 (log ~ 0).
REL, ABS = 1e-6, 1e-12


def mp_log_iv(v: float, x: float) -> float:
    with mpmath.workdps(40):
        return float(mpmath.log(mpmath.besseli(v, x, maxterms=10**6)))


def mp_ratio(v: float, x: float) -> tuple[float, float]:
    """(I_{v+1}/I_v, 1 - I_{v+1}/I_v)."""
    with mpmath.workdps(40):
        r = mpmath.besseli(v + 1, x, maxterms=10**6) / mpmath.besseli(v, x, maxterms=10**6)
        return float(r), float(1 - r)


@pytest.fixture(scope="module")
def grid() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    v, x = (a.ravel() for a in np.meshgrid(ORDERS, XS, indexing="ij"))
    return v, x, np.array([mp_log_iv(a, b) for a, b in zip(v, x, strict=True)])


def test_float64_matches_mpmath(grid):
    v, x, ref = grid
    got = log_bessel_iv(torch.tensor(v), torch.tensor(x)).numpy()
    err = np.abs(got - ref)
    bad = err > REL * np.abs(ref) + ABS
    assert not bad.any(), list(zip(v[bad], x[bad], ref[bad], got[bad], strict=True))[:5]
    # Away from log I ~ 0 the relative error is far below the requirement.
    away = np.abs(ref) > 1e-3
    assert (err[away] / np.abs(ref[away])).max() < 1e-10


def test_float32_matches_mpmath(grid):
    v, _, _ = grid
    x32 = torch.tensor(np.meshgrid(ORDERS, XS, indexing="ij")[1].ravel(), dtype=torch.float32)
    got = log_bessel_iv(torch.tensor(v, dtype=torch.float32), x32)
    assert got.dtype == torch.float32
    ref = np.array([mp_log_iv(a, b) for a, b in zip(v, x32.double().numpy(), strict=True)])
    assert np.all(np.abs(got.double().numpy() - ref) <= 1e-6 * np.abs(ref) + 1e-7)


def test_half_order_closed_form():
    # I_{1/2}(x) = sqrt(2 / (pi x)) sinh(x), log sinh(x) = x - log 2 + log(1 - exp(-2x)).
    x = torch.logspace(-6, 5, 200, dtype=torch.float64)
    log_sinh = x - math.log(2) + torch.log(-torch.expm1(-2 * x))
    ref = 0.5 * torch.log(2 / (math.pi * x)) + log_sinh
    torch.testing.assert_close(log_bessel_iv(0.5, x), ref, rtol=1e-12, atol=1e-13)


def test_special_values_and_broadcasting():
    x = torch.tensor([0.0, 0.0, -1.0, 1.0])
    v = torch.tensor([0.0, 2.0, 1.0, -1.0])
    got = log_bessel_iv(v, x)
    assert got[0] == 0 and got[1] == -math.inf and got[2:].isnan().all()
    out = log_bessel_iv(torch.tensor([[0.5], [3.0]]), torch.tensor([1.0, 20.0, 300.0]))
    assert out.shape == (2, 3) and out.dtype == torch.float32


def test_gradient_is_the_bessel_ratio():
    x = torch.tensor([1e-3, 0.7, 9.0, 11.0, 80.0, 3e4], dtype=torch.float64, requires_grad=True)
    for v in (0.0, 1.5, 40.0):
        assert torch.autograd.gradcheck(lambda t, v=v: log_bessel_iv(v, t), (x,))
    # d/dx log C_d(x) = -A_d(x): the normalizer inherits a correct gradient.
    k = torch.tensor([0.3, 5.0, 500.0], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(log_vmf_normalizer(k, 64).sum(), k)
    torch.testing.assert_close(grad, -mean_cosine(k.detach(), 64), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("d", [2, 3, 64, 4096])
def test_normalizer_limit_at_zero(d):
    log_area = math.log(2) + d / 2 * math.log(math.pi) - math.lgamma(d / 2)
    k = torch.tensor([0.0, 1e-9], dtype=torch.float64)
    torch.testing.assert_close(log_vmf_normalizer(k, d), torch.full((2,), -log_area, dtype=torch.float64))


def test_normalizer_matches_mpmath():
    for d, k in [(2, 0.5), (3, 1e5), (64, 16.0), (512, 3.0), (4096, 1e5), (4096, 1e-6)]:
        v = d / 2 - 1
        ref = v * math.log(k) - d / 2 * math.log(2 * math.pi) - mp_log_iv(v, k)
        got = log_vmf_normalizer(torch.tensor(k, dtype=torch.float64), d).item()
        assert abs(got - ref) <= 1e-10 * abs(ref), (d, k, got, ref)


def test_mean_cosine_matches_mpmath():
    for d in (2, 3, 5, 64, 513, 4096):
        for k in (1e-6, 0.5, 9.9, 10.1, 300.0, 1e5):
            ratio, one_minus = mp_ratio(d / 2 - 1, k)
            got = mean_cosine(torch.tensor(k, dtype=torch.float64), d).item()
            assert abs(got - ratio) <= 1e-12 * ratio, (d, k)
            # 1 - A keeps its relative accuracy at large kappa (used by fit_kappa's Newton).
            assert abs((1 - got) - one_minus) <= 1e-9 * one_minus + 1e-15, (d, k)


def test_mean_cosine_limits():
    k = torch.tensor([0.0, 1e-8, 1e-4], dtype=torch.float64)
    a = mean_cosine(k, 64)
    assert a[0] == 0
    torch.testing.assert_close(a[1:], k[1:] / 64, rtol=1e-6, atol=0)
    # Large kappa: 1 - A_d(k) = (d-1)/(2k) - (d-1)(d-3)/(8k^2) + O(d^3/k^3).
    d, k = 512, 1e5
    big = mean_cosine(torch.tensor(k, dtype=torch.float64), d).item()
    expected = (d - 1) / (2 * k) - (d - 1) * (d - 3) / (8 * k**2)
    assert abs((1 - big) - expected) < 1e-4 * expected
