"""The von Mises-Fisher distribution on the unit sphere S^{d-1}, in pure torch.

vMF(x; mu, kappa) = C_d(kappa) exp(kappa mu^T x),  C_d(k) = k^(d/2-1) / ((2 pi)^(d/2) I_{d/2-1}(k)).

log I_v(x) is computed from three pieces (all in float64, whatever the input dtype):
- x <= 10: the power series, summed as log1p of its tail so log I_0(x) ~ x^2/4 keeps its digits;
- v >= 25: Debye's uniform asymptotic expansion (9 terms, relative error ~1e-14);
- v < 25, x > 10: Debye at order v + 25, then 25 steps of the (stable) downward recurrence
  of the ratio I_{v+1}/I_v.
The ratio I_{v+1}/I_v (the vMF mean cosine) has its own formula of the same pieces, so that
1 - A_d(kappa) ~ (d-1)/(2 kappa) keeps its relative accuracy at large kappa.

Sampling follows Wood (1994), vectorized over samples, with rejection rounds that redraw only
the rejected entries; see `sample_vmf`.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import ClassVar

import torch
from torch import Tensor
from torch.distributions import Distribution, constraints

_SERIES_MAX_X = 10.0
_SERIES_TERMS = 26  # x^2/4 <= 25: term k <= 25^k / (k!)^2, below 1e-16 of the sum at k = 26
_DEBYE_MIN_ORDER = 25
_DEBYE_TERMS = 9  # error ~ max|u_10| / 25^10 ~ 1e-14
_LOG_2PI = math.log(2 * math.pi)
_CHUNK_ELEMENTS_CPU = 1 << 18  # rows per chunk so the direction passes stay in cache
_CHUNK_ELEMENTS_OTHER = 1 << 26


def _debye_polynomials(count: int) -> list[list[float]]:
    """Coefficients (in powers of p) of Debye's u_0..u_count, from the exact recursion
    u_{k+1} = p^2 (1 - p^2) u_k' / 2 + 1/8 int_0^p (1 - 5 t^2) u_k(t) dt."""
    polys = [[Fraction(1)]]
    for _ in range(count):
        u = polys[-1]
        nxt = [Fraction(0)] * (len(u) + 3)
        for i, c in enumerate(u):
            if i:  # derivative term: i c p^(i-1) * (p^2 - p^4) / 2
                nxt[i + 1] += i * c / 2
                nxt[i + 3] -= i * c / 2
            nxt[i + 1] += c / (8 * (i + 1))
            nxt[i + 3] -= 5 * c / (8 * (i + 3))
        polys.append(nxt)
    return [[float(c) for c in u] for u in polys]


_DEBYE_U = _debye_polynomials(_DEBYE_TERMS)


def _debye_tail(v: Tensor, p: Tensor) -> Tensor:
    """sum_{k>=1} u_k(p) / v^k (Horner in 1/v, each u_k by Horner in p)."""
    acc = torch.zeros_like(p)
    for coeffs in reversed(_DEBYE_U[1:]):
        u = torch.zeros_like(p)
        for c in reversed(coeffs):
            u = u * p + c
        acc = (acc + u) / v
    return acc


def _debye_log_iv(v: Tensor, x: Tensor) -> Tensor:
    """log I_v(x) for v >= _DEBYE_MIN_ORDER, x > 0: v eta = s - v asinh(v/x), s = sqrt(v^2+x^2)."""
    s = torch.hypot(v, x)
    return s - v * torch.asinh(v / x) - 0.5 * (_LOG_2PI + torch.log(s)) + torch.log1p(_debye_tail(v, v / s))


def _debye_log_ratio(v: Tensor, x: Tensor) -> Tensor:
    """log(I_{v+1}(x) / I_v(x)) for v >= _DEBYE_MIN_ORDER, with the large terms of the two
    expansions subtracted analytically (no cancellation at large x)."""
    s0, s1 = torch.hypot(v, x), torch.hypot(v + 1, x)
    w = 2 * v + 1
    d_asinh = torch.asinh(w / ((v + 1) * s0 + v * s1))  # asinh((v+1)/x) - asinh(v/x)
    tail = torch.log1p(_debye_tail(v + 1, (v + 1) / s1)) - torch.log1p(_debye_tail(v, v / s0))
    return w / (s0 + s1) - torch.asinh((v + 1) / x) - v * d_asinh - 0.25 * torch.log1p(w / s0**2) + tail


def _series_log_tail(v: Tensor, x: Tensor) -> Tensor:
    """log(sum_k (x^2/4)^k / (k! (v+1)_k)) for x <= _SERIES_MAX_X (all terms positive)."""
    q = x * x / 4
    term = torch.ones_like(x)
    acc = torch.zeros_like(x)
    for k in range(1, _SERIES_TERMS + 1):
        term = term * q / (k * (v + k))
        acc = acc + term
    return torch.log1p(acc)


def _recurrence_log_iv(v: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """(log I_v(x), log I_{v+1}(x)/I_v(x)) for small v, x > _SERIES_MAX_X: start at order
    v + _DEBYE_MIN_ORDER and run the ratio recurrence rho_{o-1} = 1 / (2 o / x + rho_o) down."""
    top = v + _DEBYE_MIN_ORDER
    log_i = _debye_log_iv(top, x)
    rho = torch.exp(_debye_log_ratio(top, x))
    prod = torch.ones_like(x)
    for step in range(_DEBYE_MIN_ORDER):
        rho = 1 / (2 * (top - step) / x + rho)
        prod = prod * rho
    return log_i - torch.log(prod), torch.log(rho)


def _as_float64_pair(v: Tensor | float, x: Tensor | float) -> tuple[Tensor, Tensor, torch.dtype]:
    """Broadcast v, x to float64 tensors; also return the dtype of the result."""
    device = next((a.device for a in (x, v) if isinstance(a, Tensor)), None)
    dtype = torch.get_default_dtype() if device is None else torch.result_type(v, x)
    if not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    vt = torch.as_tensor(v, dtype=torch.float64, device=device)
    xt = torch.as_tensor(x, dtype=torch.float64, device=device)
    vt, xt = torch.broadcast_tensors(vt, xt)
    return vt, xt, dtype


def _log_iv_and_ratio(v: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """(log I_v(x), log(I_{v+1}(x)/I_v(x))) elementwise, float64, v >= 0, x >= 0."""
    small_x = x <= _SERIES_MAX_X
    big_v = v >= _DEBYE_MIN_ORDER
    # Each branch sees safe inputs; torch.where picks the right one.
    xs = torch.where(small_x, x, 1.0)
    series_tail = _series_log_tail(v, xs)
    series = torch.xlogy(v, xs / 2) - torch.lgamma(v + 1) + series_tail
    series_ratio = torch.log(xs / (2 * (v + 1))) + _series_log_tail(v + 1, xs) - series_tail

    xl = torch.where(small_x, _SERIES_MAX_X, x)
    vd = torch.where(big_v, v, float(_DEBYE_MIN_ORDER))
    vr = torch.where(big_v, 0.0, v)
    rec, rec_ratio = _recurrence_log_iv(vr, xl)
    large = torch.where(big_v, _debye_log_iv(vd, xl), rec)
    large_ratio = torch.where(big_v, _debye_log_ratio(vd, xl), rec_ratio)

    valid = (v >= 0) & (x >= 0)
    log_i = torch.where(small_x, series, large).masked_fill(~valid, math.nan)
    ratio = torch.where(small_x, series_ratio, large_ratio).masked_fill(~valid, math.nan)
    return log_i, ratio


class _LogBesselIv(torch.autograd.Function):
    """log I_v(x) with d/dx log I_v(x) = I_{v+1}(x)/I_v(x) + v/x (no gradient for v)."""

    @staticmethod
    def forward(ctx, v: Tensor, x: Tensor) -> Tensor:
        log_i, log_ratio = _log_iv_and_ratio(v, x)
        ctx.save_for_backward(v, x, log_ratio)
        return log_i

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor]:
        v, x, log_ratio = ctx.saved_tensors
        v_over_x = torch.where(v == 0, 0.0, v / x)
        return None, grad * (torch.exp(log_ratio) + v_over_x)


def log_bessel_iv(v: Tensor | float, x: Tensor | float) -> Tensor:
    """log I_v(x), the modified Bessel function of the first kind, elementwise (broadcast).

    Orders v >= 0, arguments x >= 0 (NaN elsewhere); computed in float64 and returned in the
    promoted floating dtype of the inputs. Accuracy against mpmath for v in [0, 2100] and
    x in [1e-6, 1e5]: |error| <= 1e-6 |log I_v(x)| + 1e-12 (the absolute part matters only
    where I_v(x) ~ 1). Differentiable with respect to x.
    """
    vt, xt, dtype = _as_float64_pair(v, x)
    return _LogBesselIv.apply(vt, xt).to(dtype)


def _check_dim(d: int) -> None:
    if isinstance(d, bool) or not isinstance(d, int) or d < 2:
        raise ValueError(f"d must be an integer >= 2 (the sphere S^(d-1) in R^d), got {d!r}")


def log_vmf_normalizer(kappa: Tensor | float, d: int) -> Tensor:
    """log C_d(kappa); at kappa = 0 the uniform density, -log |S^(d-1)|."""
    _check_dim(d)
    v = d / 2 - 1
    k = torch.as_tensor(kappa)
    k64 = k.to(torch.float64)
    at_zero = v * math.log(2) + math.lgamma(v + 1) - d / 2 * _LOG_2PI
    value = torch.xlogy(torch.full_like(k64, v), k64) - d / 2 * _LOG_2PI - log_bessel_iv(v, k64)
    value = torch.where(k64 == 0, at_zero, value)
    return value.to(k.dtype if k.dtype.is_floating_point else torch.get_default_dtype())


def _log_mean_cosine(kappa: Tensor, d: int) -> Tensor:
    """log A_d(kappa) in float64 (-inf at kappa = 0)."""
    v = torch.full_like(kappa, d / 2 - 1, dtype=torch.float64)
    return _log_iv_and_ratio(v, kappa.to(torch.float64))[1]


def mean_cosine(kappa: Tensor | float, d: int) -> Tensor:
    """A_d(kappa) = I_{d/2}(kappa) / I_{d/2-1}(kappa) = E[mu^T x]: 0 at kappa = 0,
    ~kappa/d for small kappa, ~1 - (d-1)/(2 kappa) for large kappa."""
    _check_dim(d)
    k = torch.as_tensor(kappa)
    dtype = k.dtype if k.dtype.is_floating_point else torch.get_default_dtype()
    return torch.exp(_log_mean_cosine(k, d)).to(dtype)


def _where(mask: Tensor) -> str:
    """' at index 3' or ' at index (1, 2)' for the first True of mask; '' for a scalar."""
    if mask.dim() == 0:
        return ""
    idx = tuple(int(i) for i in mask.nonzero()[0])
    return f" at index {idx[0]}" if len(idx) == 1 else f" at index {idx}"


def _first_bad(values: Tensor, bad: Tensor) -> str:
    return f"{values[bad].flatten()[0].item()}{_where(bad)}"


def fit_kappa(mean_resultant_length: Tensor | float, d: int, newton_steps: int = 4) -> Tensor:
    """Maximum-likelihood kappa from the mean resultant length R of n unit vectors: solve
    A_d(kappa) = R, starting from Banerjee et al. (2005), kappa ~ R (d - R^2) / (1 - R^2),
    with Newton steps (A is increasing and concave, so the iterates approach from below)."""
    _check_dim(d)
    r_in = torch.as_tensor(mean_resultant_length)
    r = r_in.to(torch.float64)
    bad = ~((r >= 0) & (r < 1))
    if bad.any():
        raise ValueError(f"mean_resultant_length must be in [0, 1), got {_first_bad(r, bad)}")
    kappa = r * (d - r * r) / (1 - r * r)
    for _ in range(newton_steps):
        log_a = _log_mean_cosine(kappa, d)
        a, one_minus_a = torch.exp(log_a), -torch.expm1(log_a)
        # A'(k) = 1 - A^2 - (d-1) A / k, which is 1/d at k = 0.
        slope = one_minus_a * (1 + a) - (d - 1) * a / kappa
        slope = torch.where(kappa > 0, slope, 1 / d)
        kappa = (kappa - (a - r) / slope).clamp_min(0)
    return kappa.to(r_in.dtype if r_in.dtype.is_floating_point else torch.get_default_dtype())


def _unit_tolerance(dtype: torch.dtype) -> float:
    return 1e-6 if dtype == torch.float64 else 1e-4


def _check_mu(mu: Tensor, name: str = "mu") -> None:
    if not mu.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {mu.dtype}")
    if mu.dim() < 1 or mu.shape[-1] < 2:
        raise ValueError(
            f"{name} must have shape (..., d) with d >= 2 (a direction in R^d), got shape {tuple(mu.shape)}"
        )
    norm = torch.linalg.vector_norm(mu, dim=-1)
    zero = norm == 0
    if zero.any():
        raise ValueError(f"{name} must be a unit vector (norm 1), got norm 0{_where(zero)}")
    tol = _unit_tolerance(mu.dtype)
    bad = ~((norm - 1).abs() <= tol)
    if bad.any():
        raise ValueError(
            f"{name} must be a unit vector (norm 1 within {tol:g}) along its last dimension, "
            f"got norm {_first_bad(norm, bad)}"
        )


def _check_kappa(kappa: Tensor, name: str = "kappa") -> None:
    bad = ~(torch.isfinite(kappa) & (kappa >= 0))
    if bad.any():
        raise ValueError(f"{name} must be >= 0 and finite, got {_first_bad(kappa, bad)}")


def _check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    if generator is not None and generator.device.type != device.type:
        raise ValueError(
            f"generator must be on the samples' device ({device.type}), "
            f"got a generator on {generator.device.type}"
        )


def _sample_cosine(kappa: Tensor, d: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Wood (1994): t = mu^T x and sqrt(1 - t^2) for per-sample kappa (n,), in float64.

    With z = g1 / (g1 + g2) ~ Beta((d-1)/2, (d-1)/2) drawn as two gammas, Wood's proposal
    w = (1 - (1+b) z) / (1 - (1-b) z) is (g2 - b g1) / (g2 + b g1), and 1 - w, 1 + w and the
    log acceptance ratio have cancellation-free forms, so kappa = 1e5 or d = 4096 are exact
    to rounding. Each round redraws only the entries still rejected.
    """
    k = kappa.to(torch.float64)
    n, m = k.numel(), d - 1
    b = m / (2 * k + torch.sqrt(4 * k * k + m * m))
    t, sin = torch.empty_like(k), torch.empty_like(k)
    alpha = torch.full((2, n), m / 2, dtype=k.dtype, device=k.device)
    pending = torch.arange(n, device=k.device)
    while pending.numel():
        kp, bp = k[pending], b[pending]
        g1, g2 = torch._standard_gamma(alpha[:, : pending.numel()], generator=generator)
        u = torch.rand(pending.numel(), dtype=k.dtype, device=k.device, generator=generator)
        den = g2 + bp * g1
        log_ratio = 2 * kp * bp * (g2 - g1) / ((1 + bp) * den) + m * (
            torch.log1p(bp) - math.log(2) - torch.log(den / (g1 + g2))
        )
        ok = log_ratio >= torch.log(u)
        done = pending[ok]
        t[done] = ((g2 - bp * g1) / den)[ok]
        sin[done] = (2 * torch.sqrt(bp * g1 * g2) / den)[ok]  # sqrt((1-w)(1+w))
        pending = pending[~ok]
    return t, sin


@torch.no_grad()
def sample_vmf(
    mu: Tensor,
    kappa: Tensor,
    index: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    validate: bool = True,
) -> Tensor:
    """Draw n samples x_i ~ vMF(mu[index_i], kappa_i) as an (n, d) tensor.

    mu: (M, d) unit directions (or (d,) for one direction); kappa: (n,) per-sample
    concentrations, which fix n; index: (n,) rows of mu, or None when M is 1 or n.
    Samples are on mu's device and dtype; generator (on that device) makes them reproducible.

    The direction is built in the output buffer, chunk by chunk (cache-sized on CPU): normal
    noise, minus its component along mu, rescaled to sqrt(1 - t^2), plus t mu. The only
    (n, d) tensor is the output; class directions are gathered per chunk.
    """
    if mu.dim() == 1:
        mu = mu.unsqueeze(0)
    if mu.dim() != 2:
        raise ValueError(f"mu must have shape (M, d) or (d,), got {tuple(mu.shape)}")
    if validate:
        _check_mu(mu)
    kappa = torch.as_tensor(kappa, device=mu.device)
    if kappa.dim() != 1:
        raise ValueError(f"kappa must have shape (n,) (one per sample), got {tuple(kappa.shape)}")
    if validate:
        _check_kappa(kappa)
    n, (rows, d) = kappa.numel(), mu.shape
    if index is None and rows not in (1, n):
        raise ValueError(f"without index, mu must have 1 or n={n} rows (one per kappa), got {rows} rows")
    if index is not None:
        if index.shape != (n,):
            raise ValueError(f"index must have shape (n,)=({n},) like kappa, got {tuple(index.shape)}")
        if validate and n and (index.min() < 0 or index.max() >= rows):
            raise ValueError(
                f"index must lie in [0, {rows}) (rows of mu), "
                f"got values from {index.min().item()} to {index.max().item()}"
            )
    _check_generator(generator, mu.device)

    t, sin = _sample_cosine(kappa, d, generator)
    t, sin = t.to(mu.dtype), sin.to(mu.dtype)
    out = torch.empty(n, d, dtype=mu.dtype, device=mu.device)
    limit = _CHUNK_ELEMENTS_CPU if mu.device.type == "cpu" else _CHUNK_ELEMENTS_OTHER
    chunk = max(1, limit // d)
    for start in range(0, n, chunk):
        part = slice(start, start + chunk)
        if index is None and rows == 1:
            _fill_single(out[part], mu[0], t[part], sin[part], generator)
        else:
            mu_rows = mu[part] if index is None else mu[index[part]]
            _fill_rows(out[part], mu_rows, t[part], sin[part], generator)
    return out


def _fill_rows(out: Tensor, mu: Tensor, t: Tensor, sin: Tensor, generator: torch.Generator | None) -> None:
    """out <- t mu + sin v, v uniform on the sphere orthogonal to mu (one mu per row)."""
    out.normal_(generator=generator)
    out.addcmul_(torch.linalg.vecdot(out, mu).unsqueeze(1), mu, value=-1)
    scale = sin / torch.linalg.vector_norm(out, dim=1).clamp_min(1e-30)
    out.mul_(scale.unsqueeze(1)).addcmul_(t.unsqueeze(1), mu)


def _fill_single(out: Tensor, mu: Tensor, t: Tensor, sin: Tensor, generator: torch.Generator | None) -> None:
    """As _fill_rows for one shared mu (d,), with BLAS mv and rank-1 updates."""
    out.normal_(generator=generator)
    out.addr_(out @ mu, mu, alpha=-1)
    scale = sin / torch.linalg.vector_norm(out, dim=1).clamp_min(1e-30)
    out.mul_(scale.unsqueeze(1)).addr_(t, mu)


class _UnitVector(constraints.Constraint):
    """Points on the unit sphere along the last dimension (dtype-dependent tolerance)."""

    event_dim = 1

    def check(self, value: Tensor) -> Tensor:
        norm = torch.linalg.vector_norm(value, dim=-1)
        return (norm - 1).abs() <= _unit_tolerance(value.dtype)


unit_vector = _UnitVector()


class VonMisesFisher(Distribution):
    """vMF(mu, kappa) on S^{d-1}; parameters named as in scipy.stats.vonmises_fisher.

    mu: (..., d) unit directions (renormalized after validation), kappa: broadcastable to
    mu.shape[:-1], >= 0. batch_shape = mu.shape[:-1], event_shape = (d,). Parameters are
    validated (ValueError naming the bad value) unless validate_args=False.
    """

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {
        "mu": unit_vector,
        "kappa": constraints.nonnegative,
    }
    support = unit_vector
    has_rsample = False

    def __init__(self, mu: Tensor, kappa: Tensor | float, validate_args: bool | None = None):
        mu = torch.as_tensor(mu)
        kappa = torch.as_tensor(kappa, device=mu.device)
        if validate_args is not False:
            _check_mu(mu)
            _check_kappa(kappa)
        batch_shape = mu.shape[:-1]
        try:
            kappa = kappa.to(mu.dtype).expand(batch_shape)
        except RuntimeError:
            raise ValueError(
                f"kappa of shape {tuple(kappa.shape)} does not broadcast to the batch shape "
                f"{tuple(batch_shape)} of mu (shape {tuple(mu.shape)})"
            ) from None
        self.mu = mu / torch.linalg.vector_norm(mu, dim=-1, keepdim=True)
        self.kappa = kappa
        super().__init__(batch_shape, mu.shape[-1:], validate_args=validate_args)

    @property
    def dim(self) -> int:
        return self.event_shape[0]

    @property
    def mean(self) -> Tensor:
        return mean_cosine(self.kappa, self.dim).unsqueeze(-1) * self.mu

    @property
    def mode(self) -> Tensor:
        return self.mu

    def expand(self, batch_shape: torch.Size, _instance=None) -> VonMisesFisher:
        new = self._get_checked_instance(VonMisesFisher, _instance)
        batch_shape = torch.Size(batch_shape)
        new.mu = self.mu.expand(*batch_shape, self.dim)
        new.kappa = self.kappa.expand(batch_shape)
        super(VonMisesFisher, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @torch.no_grad()
    def sample(self, sample_shape: tuple[int, ...] = (), generator: torch.Generator | None = None) -> Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))
        mu = self.mu.reshape(-1, self.dim)
        reps = math.prod(sample_shape)
        kappa = self.kappa.reshape(-1).repeat(reps)
        index = None if mu.shape[0] == 1 else torch.arange(mu.shape[0], device=mu.device)
        if index is not None:
            index = index.repeat(reps)
        return sample_vmf(mu, kappa, index, generator=generator, validate=False).reshape(shape)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return log_vmf_normalizer(self.kappa, self.dim) + self.kappa * (value * self.mu).sum(-1)

    def entropy(self) -> Tensor:
        return -log_vmf_normalizer(self.kappa, self.dim) - self.kappa * mean_cosine(self.kappa, self.dim)
