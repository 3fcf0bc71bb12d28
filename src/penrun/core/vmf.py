"""The von Mises-Fisher distribution on the unit sphere S^{d-1}, in pure torch
(docs/method.md#3-sampling).

vMF(x; mu, kappa) = C_d(kappa) exp(kappa mu^T x), with C_d from `penrun.core.bessel`.

Sampling follows Wood (1994), vectorized over samples, with rejection rounds that redraw only
the rejected entries; see `sample_vmf`.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor
from torch.distributions import Distribution, constraints

from penrun.core.bessel import log_vmf_normalizer, mean_cosine
from penrun.core.checks import check_generator, check_kappa, first_bad, where

_CHUNK_ELEMENTS_CPU = 1 << 18  # rows per chunk so the direction passes stay in cache
_CHUNK_ELEMENTS_OTHER = 1 << 26


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
        raise ValueError(f"{name} must be a unit vector (norm 1), got norm 0{where(zero)}")
    tol = _unit_tolerance(mu.dtype)
    bad = ~((norm - 1).abs() <= tol)
    if bad.any():
        raise ValueError(
            f"{name} must be a unit vector (norm 1 within {tol:g}) along its last dimension, "
            f"got norm {first_bad(norm, bad)}"
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
        check_kappa(kappa)
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
    check_generator(generator, mu.device)

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
            check_kappa(kappa)
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
