"""penrun.core.bessel: log I_v(x), the vMF normalizer and the mean cosine against mpmath (high
precision); Debye's polynomials against DLMF; fit_kappa and the dtypes."""

from __future__ import annotations

import math
from fractions import Fraction

import mpmath
import numpy as np
import pytest
import torch
from scipy import special

from penrun.core.bessel import _debye_polynomials, fit_kappa, log_bessel_iv, log_vmf_normalizer, mean_cosine

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


# ---------------- tests written to kill mutants the tests above let survive (MUTATION.md)
# Debye's polynomials u_1..u_4 (DLMF 10.41.10), as {power of p: coefficient}.
DLMF = [
    {0: Fraction(1)},
    {1: Fraction(3, 24), 3: Fraction(-5, 24)},
    {2: Fraction(81, 1152), 4: Fraction(-462, 1152), 6: Fraction(385, 1152)},
    {3: Fraction(30375, 414720), 5: Fraction(-369603, 414720), 7: Fraction(765765, 414720), 9: Fraction(-425425, 414720)},
    {
        4: Fraction(4465125, 39813120),
        6: Fraction(-94121676, 39813120),
        8: Fraction(349922430, 39813120),
        10: Fraction(-446185740, 39813120),
        12: Fraction(185910725, 39813120),
    },
]  # fmt: skip


@pytest.mark.mutation
def test_debye_polynomials_are_dlmf_10_41_10() -> None:
    """The coefficient table is computed once, at import, so only a direct call can check the
    recursion: u_k has degree 3k and the coefficients of DLMF 10.41.10."""
    polys = _debye_polynomials(4)
    assert len(polys) == 5
    for k, (coeffs, expected) in enumerate(zip(polys, DLMF, strict=True)):
        assert len(coeffs) == 3 * k + 1, k
        want = [float(expected.get(i, 0)) for i in range(3 * k + 1)]
        assert coeffs == pytest.approx(want, rel=1e-15, abs=0), k


@pytest.mark.mutation
@pytest.mark.parametrize("kappa", [0.05, 0.3, 0.9, 5.0, 50.0])
def test_fit_kappa_inverts_the_d3_mean_cosine(kappa: float) -> None:
    """d = 3: A_3(kappa) = coth(kappa) - 1/kappa (mpmath); the fit must return kappa, also below
    kappa = 1 where the Newton slope is smallest relative to its value at 0."""
    mpmath.mp.dps = 30
    r = float(mpmath.coth(kappa) - 1 / mpmath.mpf(kappa))
    fitted = fit_kappa(torch.tensor(r, dtype=torch.float64), 3)
    assert fitted.item() == pytest.approx(kappa, rel=1e-10)


@pytest.mark.mutation
def test_fit_kappa_of_an_integer_length_is_a_float() -> None:
    """R = 0 (the only integer in [0, 1)) gives kappa 0 in the default float dtype."""
    fitted = fit_kappa(0, 5)
    assert fitted.dtype == torch.get_default_dtype() and fitted.item() == 0.0


@pytest.mark.mutation
def test_python_numbers_give_the_default_dtype_and_float64_digits() -> None:
    """Python numbers give a result in the default dtype; a Python x next to a float64 v is
    taken in float64 (0.1 is not a float32 number: float32 would cost ~1e-8 here)."""
    assert log_bessel_iv(2.0, 0.1).dtype == torch.get_default_dtype()
    assert log_bessel_iv(torch.tensor(2), torch.tensor(3)).dtype == torch.get_default_dtype()  # integers
    got = log_bessel_iv(torch.tensor(2.0, dtype=torch.float64), 0.1)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(mp_log_iv(2.0, 0.1), rel=1e-13)
    got = log_bessel_iv(2.0, torch.tensor(0.1, dtype=torch.float64))
    assert got.item() == pytest.approx(mp_log_iv(2.0, 0.1), rel=1e-13)


@pytest.mark.mutation
def test_gradient_for_order_one_and_at_zero() -> None:
    """d/dx log I_v(x) = I_{v+1}(x)/I_v(x) + v/x (scipy's ive) for v = 1, and 0 for v = 0 at x = 0."""
    x = torch.tensor([0.3, 4.0, 25.0], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(log_bessel_iv(1.0, x).sum(), x)
    xs = x.detach().numpy()
    np.testing.assert_allclose(grad.numpy(), special.ive(2, xs) / special.ive(1, xs) + 1 / xs, rtol=1e-10)
    zero = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    (grad0,) = torch.autograd.grad(log_bessel_iv(0.0, zero).sum(), zero)
    assert grad0.item() == 0.0


@pytest.mark.mutation
@pytest.mark.parametrize("kind", ["int", "float32"])
def test_normalizer_and_mean_cosine_keep_the_dtype(kind: str) -> None:
    """A float kappa keeps its dtype, an integer one gives the default float dtype."""
    kappa = torch.tensor([0, 2, 30]) if kind == "int" else torch.tensor([0.0, 2.0, 30.0])
    want = torch.get_default_dtype() if kind == "int" else torch.float32
    assert log_vmf_normalizer(kappa, 5).dtype == want
    assert mean_cosine(kappa, 5).dtype == want


@pytest.mark.mutation
def test_float32_normalizer_is_computed_in_float64() -> None:
    """d = 4096: v log kappa and log I_v(kappa) are ~1e4 each and cancel; computed in float32
    they would be off by ~1.5 float32 spacings. The float32 result must be the exact value
    (mpmath) rounded: within half a spacing (plus float64's error)."""
    v = 2047.0
    for kappa in (0.5, 3.0):
        ref = v * math.log(kappa) - 2048 * math.log(2 * math.pi) - mp_log_iv(v, kappa)
        got = log_vmf_normalizer(torch.tensor(kappa), 4096)
        assert got.dtype == torch.float32
        assert abs(got.item() - ref) <= np.spacing(np.float32(ref)) / 2 + 1e-6, kappa


@pytest.mark.mutation
def test_negative_orders_or_arguments_are_nan() -> None:
    """Orders v >= 0 and arguments x >= 0 only: a negative v is NaN even where the formulas
    would give a number (non-integer v, either branch), and so is a negative x."""
    v = torch.tensor([-0.5, -2.5, -0.3, -1.5, 1.0, 30.0], dtype=torch.float64)
    x = torch.tensor([2.0, 20.0, 5.0, 12.0, -1.0, -40.0], dtype=torch.float64)
    assert log_bessel_iv(v, x).isnan().all()
    assert mean_cosine(torch.tensor([-1.0, -50.0], dtype=torch.float64), 3).isnan().all()
