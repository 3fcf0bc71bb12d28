"""Tests that kill mutants of penrun.core.bessel that the other tests let survive (MUTATION.md)."""

from __future__ import annotations

import math
from fractions import Fraction

import mpmath
import numpy as np
import pytest
import torch
from scipy import special

from penrun.core.bessel import _debye_polynomials, fit_kappa, log_bessel_iv, log_vmf_normalizer, mean_cosine

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


def test_debye_polynomials_are_dlmf_10_41_10() -> None:
    """The coefficient table is computed once, at import, so only a direct call can check the
    recursion: u_k has degree 3k and the coefficients of DLMF 10.41.10."""
    polys = _debye_polynomials(4)
    assert len(polys) == 5
    for k, (coeffs, expected) in enumerate(zip(polys, DLMF, strict=True)):
        assert len(coeffs) == 3 * k + 1, k
        want = [float(expected.get(i, 0)) for i in range(3 * k + 1)]
        assert coeffs == pytest.approx(want, rel=1e-15, abs=0), k


@pytest.mark.parametrize("kappa", [0.05, 0.3, 0.9, 5.0, 50.0])
def test_fit_kappa_inverts_the_d3_mean_cosine(kappa: float) -> None:
    """d = 3: A_3(kappa) = coth(kappa) - 1/kappa (mpmath); the fit must return kappa, also below
    kappa = 1 where the Newton slope is smallest relative to its value at 0."""
    mpmath.mp.dps = 30
    r = float(mpmath.coth(kappa) - 1 / mpmath.mpf(kappa))
    fitted = fit_kappa(torch.tensor(r, dtype=torch.float64), 3)
    assert fitted.item() == pytest.approx(kappa, rel=1e-10)


def test_fit_kappa_of_an_integer_length_is_a_float() -> None:
    """R = 0 (the only integer in [0, 1)) gives kappa 0 in the default float dtype."""
    fitted = fit_kappa(0, 5)
    assert fitted.dtype == torch.get_default_dtype() and fitted.item() == 0.0


def mp_log_iv(v: float, x: float) -> float:
    mpmath.mp.dps = 40
    return float(mpmath.log(mpmath.besseli(v, x)))


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


def test_gradient_for_order_one_and_at_zero() -> None:
    """d/dx log I_v(x) = I_{v+1}(x)/I_v(x) + v/x (scipy's ive) for v = 1, and 0 for v = 0 at x = 0."""
    x = torch.tensor([0.3, 4.0, 25.0], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(log_bessel_iv(1.0, x).sum(), x)
    xs = x.detach().numpy()
    np.testing.assert_allclose(grad.numpy(), special.ive(2, xs) / special.ive(1, xs) + 1 / xs, rtol=1e-10)
    zero = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    (grad0,) = torch.autograd.grad(log_bessel_iv(0.0, zero).sum(), zero)
    assert grad0.item() == 0.0


@pytest.mark.parametrize("kind", ["int", "float32"])
def test_normalizer_and_mean_cosine_keep_the_dtype(kind: str) -> None:
    """A float kappa keeps its dtype, an integer one gives the default float dtype."""
    kappa = torch.tensor([0, 2, 30]) if kind == "int" else torch.tensor([0.0, 2.0, 30.0])
    want = torch.get_default_dtype() if kind == "int" else torch.float32
    assert log_vmf_normalizer(kappa, 5).dtype == want
    assert mean_cosine(kappa, 5).dtype == want


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


def test_negative_orders_or_arguments_are_nan() -> None:
    """Orders v >= 0 and arguments x >= 0 only: a negative v is NaN even where the formulas
    would give a number (non-integer v, either branch), and so is a negative x."""
    v = torch.tensor([-0.5, -2.5, -0.3, -1.5, 1.0, 30.0], dtype=torch.float64)
    x = torch.tensor([2.0, 20.0, 5.0, 12.0, -1.0, -40.0], dtype=torch.float64)
    assert log_bessel_iv(v, x).isnan().all()
    assert mean_cosine(torch.tensor([-1.0, -50.0], dtype=torch.float64), 3).isnan().all()
