"""The class-conditional generative model of penultimate activations defined by a final
fully-connected layer (docs/method.md#1-the-generative-model), in pure torch.

For logits z = W h + b write r = |h|, a = h / r, mu_k = w_k / |w_k|. Then
    p(a | y=k, r) = vMF(a; mu_k, kappa_k = r |w_k|),   pi_k(r) ~ exp(b_k) / C_d(r |w_k|),
and the Bayes posterior of this generative classifier is softmax(W h + b) for every h.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from penrun.core.bessel import fit_kappa, log_vmf_normalizer
from penrun.core.checks import check_generator, check_kappa, check_option, check_positive, where
from penrun.core.vmf import sample_vmf

RADIUS_OPTIONS = ("fixed", "empirical")
DIRECTION_OPTIONS = ("weights", "class_mean")
KAPPA_OPTIONS = ("weights", "fitted", "matched")
SPACE_OPTIONS = ("direction", "input")
HEAD_KINDS = ("cosine", "linear")


class EmpiricalRadius:
    """Per-class radius |h| drawn from recorded norm quantiles (K, Q), taken at probabilities
    linspace(0, 1, Q), by inverse-CDF linear interpolation."""

    def __init__(self, quantiles: Tensor):
        q = torch.as_tensor(quantiles)
        if q.dim() != 2 or q.shape[1] < 2 or not q.dtype.is_floating_point:
            raise ValueError(
                "quantiles must be a float tensor of shape (K, Q) with Q >= 2, "
                f"got shape {tuple(q.shape)} and dtype {q.dtype}"
            )
        check_kappa(q, "quantiles")
        decreasing = q[:, 1:] < q[:, :-1]
        if decreasing.any():
            raise ValueError(
                f"quantiles must be nondecreasing along each row, got a decrease{where(decreasing)}"
            )
        self.quantiles = q

    def sample(self, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One radius per label in y (n,)."""
        q = self.quantiles
        pos = torch.rand(y.shape, dtype=q.dtype, device=q.device, generator=generator)
        pos = pos * (q.shape[1] - 1)
        lo = pos.long().clamp(max=q.shape[1] - 2)
        left, right = q[y, lo], q[y, lo + 1]
        return left + (pos - lo) * (right - left)

    def mean(self) -> Tensor:
        """Per-class mean of the interpolated distribution (K,) (trapezoid rule, exact)."""
        return (self.quantiles[:, 1:] + self.quantiles[:, :-1]).mean(dim=1) / 2

    def to(self, *args: Any, **kwargs: Any) -> EmpiricalRadius:
        return EmpiricalRadius(self.quantiles.to(*args, **kwargs))


class PenultimateModel:
    """vMF class-conditional model of a final layer; build it with `from_head` or
    `from_classifier`.

    radius: a (K,) tensor of fixed per-class radii or an EmpiricalRadius; it sets r in the
    sampler's kappa_k = kappa_scale * r |w_k| ("weights") and the scale of `space="input"`
    samples. fitted_kappa (K,), if given, replaces r |w_k| (it is still times kappa_scale).
    directions (K, d) unit rows, if given, replace w_k / |w_k| as the sampler's mean
    directions (the class means of recorded activations); the prior, `log_prob` and
    `posterior` always come from the weights (the Generative-Discriminative pair).
    """

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor,
        radius: Tensor | EmpiricalRadius,
        kappa_scale: float,
        fitted_kappa: Tensor | None,
        directions: Tensor | None = None,
    ):
        self.weight, self.bias, self.radius = weight, bias, radius
        self.kappa_scale, self.fitted_kappa = kappa_scale, fitted_kappa
        self.weight_norm = torch.linalg.vector_norm(weight, dim=1)
        self.directions = directions

    @classmethod
    def from_head(
        cls,
        weight: Tensor,
        bias: Tensor | None = None,
        radius: float | Tensor | EmpiricalRadius | None = None,
        kappa_scale: float = 1.0,
        kappa: Tensor | None = None,
        direction: Tensor | None = None,
    ) -> PenultimateModel:
        """weight (K, d), bias (K,) or None (zeros). radius: None (1.0), a float shared by
        all classes, a (K,) tensor, or an EmpiricalRadius. kappa: None ("weights",
        kappa_k = r_k |w_k|) or an explicit (K,) tensor ("fitted", "matched"). direction:
        None (w_k / |w_k|) or (K, d) nonzero rows, normalized here, for the sampler's mean
        directions. For a cosine head pass weight = s W / |W| and radius 1.0, so kappa_k = s."""
        weight = _checked_weight(weight)
        num_classes = weight.shape[0]
        like = {"dtype": weight.dtype, "device": weight.device}
        bias = torch.zeros(num_classes, **like) if bias is None else torch.as_tensor(bias, **like)
        if bias.shape != (num_classes,) or not torch.isfinite(bias).all():
            raise ValueError(f"bias must be finite with shape (K,)=({num_classes},), got {tuple(bias.shape)}")
        if not (math.isfinite(kappa_scale) and kappa_scale >= 0):
            raise ValueError(f"kappa_scale must be >= 0 and finite, got {kappa_scale}")
        fitted = None
        if kappa is not None:
            fitted = torch.as_tensor(kappa, **like)
            if fitted.shape != (num_classes,):
                raise ValueError(f"kappa must have shape (K,)=({num_classes},), got {tuple(fitted.shape)}")
            check_kappa(fitted)
        directions = None
        if direction is not None:
            directions = _checked_weight(torch.as_tensor(direction, **like), "direction")
            if directions.shape != weight.shape:
                raise ValueError(
                    f"direction must have the weight's shape (K, d)={tuple(weight.shape)}, "
                    f"got {tuple(directions.shape)}"
                )
            directions = directions / torch.linalg.vector_norm(directions, dim=1, keepdim=True)
        radius = _checked_radius(radius, num_classes, like)
        return cls(weight, bias, radius, kappa_scale, fitted, directions)

    @classmethod
    def from_classifier(
        cls,
        model: torch.nn.Module,
        activation_stats: dict[str, Tensor] | None = None,
        radius: str = "fixed",
        kappa: str = "weights",
        kappa_scale: float = 1.0,
        direction: str = "weights",
    ) -> PenultimateModel:
        """From `model.head` (kind, effective_weight(), bias). A cosine head has radius 1 and
        weights-kappa s; a linear head takes its radius from activation_stats: "fixed" ->
        per-class norm_mean, "empirical" -> norm_quantiles. direction="class_mean" samples
        around activation_stats["mean_direction"] instead of w_k / |w_k|. kappa="fitted" uses
        activation_stats["fitted_kappa"] (the ML fit around each class's own mean direction);
        kappa="matched" solves A_d(kappa) = the mean cosine of the class's recorded
        activations to the chosen direction (docs/method.md#33-the-kappa-options)."""
        check_option("radius", radius, RADIUS_OPTIONS)
        check_option("kappa", kappa, KAPPA_OPTIONS)
        check_option("direction", direction, DIRECTION_OPTIONS)
        head = model.head
        check_option("head kind", head.kind, HEAD_KINDS)
        weight = head.effective_weight().detach()
        bias = None if head.bias is None else head.bias.detach()
        like = {"dtype": weight.dtype, "device": weight.device}

        def stat(key: str, why: str) -> Tensor:
            if activation_stats is None:
                raise ValueError(
                    f"{why} needs the per-class activation statistics recorded with the "
                    "teacher (activation_stats); got none"
                )
            if key not in activation_stats:
                raise ValueError(
                    f"{why} needs activation_stats[{key!r}]; the recorded statistics have "
                    f"only {sorted(activation_stats)}"
                )
            return torch.as_tensor(activation_stats[key], **like)

        directions = stat("mean_direction", "direction='class_mean'") if direction == "class_mean" else None
        fitted = None
        if kappa == "fitted":
            fitted = stat("fitted_kappa", "kappa='fitted'")
        elif kappa == "matched":
            toward = directions if directions is not None else weight
            fitted = matched_kappa(
                stat("mean_resultant_length", "kappa='matched'"),
                stat("mean_direction", "kappa='matched'"),
                toward,
            )
        if head.kind == "cosine":
            spec: float | Tensor | EmpiricalRadius = 1.0
        elif radius == "fixed":
            spec = stat("norm_mean", "a linear head (radius='fixed')")
        else:
            spec = EmpiricalRadius(stat("norm_quantiles", "a linear head (radius='empirical')"))
        return cls.from_head(weight, bias, spec, kappa_scale, fitted, directions)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    @property
    def dim(self) -> int:
        return self.weight.shape[1]

    @property
    def mu(self) -> Tensor:
        """The sampler's class directions (K, d): w_k / |w_k|, or the given directions."""
        if self.directions is not None:
            return self.directions
        return self.weight / self.weight_norm.unsqueeze(1)

    @property
    def mean_radius(self) -> Tensor:
        """Per-class mean radius (K,)."""
        return self.radius.mean() if isinstance(self.radius, EmpiricalRadius) else self.radius

    @property
    def kappa(self) -> Tensor:
        """The sampler's per-class concentration (K,); for an empirical radius this uses each
        class's mean radius (samples use their own drawn radius)."""
        base = self.mean_radius * self.weight_norm if self.fitted_kappa is None else self.fitted_kappa
        return self.kappa_scale * base

    def to(self, *args: Any, **kwargs: Any) -> PenultimateModel:
        """Move every tensor (torch.Tensor.to arguments)."""
        return PenultimateModel(
            self.weight.to(*args, **kwargs),
            self.bias.to(*args, **kwargs),
            self.radius.to(*args, **kwargs),
            self.kappa_scale,
            None if self.fitted_kappa is None else self.fitted_kappa.to(*args, **kwargs),
            None if self.directions is None else self.directions.to(*args, **kwargs),
        )

    def _log_prior(self, log_c: Tensor) -> Tensor:
        return torch.log_softmax(self.bias.to(torch.float64) - log_c, dim=-1)

    def prior(self, r: Tensor | float) -> Tensor:
        """Class prior pi_k(r) ~ exp(b_k) / C_d(r |w_k|): probabilities r.shape + (K,)."""
        r = torch.as_tensor(r, dtype=torch.float64, device=self.weight.device)
        kappa = r.unsqueeze(-1) * self._head64()[0]
        log_prior = self._log_prior(log_vmf_normalizer(kappa, self.dim))
        return torch.exp(log_prior).to(self.weight.dtype)

    def _head64(self) -> tuple[Tensor, Tensor]:
        """(|w_k|, mu_k) in float64, from the weights themselves (not a rounded mu)."""
        w = self.weight.to(torch.float64)
        norm = torch.linalg.vector_norm(w, dim=1)
        return norm, w / norm.unsqueeze(1)

    def log_prob(self, h: Tensor, y: Tensor) -> Tensor:
        """log p(a | y, r) for r = |h|, a = h / r: the vMF log-density on the sphere with
        kappa_y = r |w_y| (the weights parameterization of the Generative-Discriminative
        pair; kappa_scale and a fitted kappa do not enter). Shape h.shape[:-1]."""
        norm, mu = self._head64()
        h64 = h.to(torch.float64)
        r = torch.linalg.vector_norm(h64, dim=-1)
        kappa = r * norm[y]
        cosine = (h64 * mu[y]).sum(-1) / r.clamp_min(1e-300)
        return (log_vmf_normalizer(kappa, self.dim) + kappa * cosine).to(h.dtype)

    def posterior(self, h: Tensor) -> Tensor:
        """Bayes posterior p(y | h) (h.shape[:-1] + (K,)) through the generative route:
        log prior pi_k(r) + vMF log-likelihood of a, at r = |h|, normalized. In float64,
        because log C_d(kappa) ~ -kappa cancels between prior and likelihood; it equals
        softmax(W h + b) to rounding."""
        norm, mu = self._head64()
        h64 = h.to(torch.float64)
        r = torch.linalg.vector_norm(h64, dim=-1)
        a = h64 / r.clamp_min(1e-300).unsqueeze(-1)
        kappa = r.unsqueeze(-1) * norm
        log_c = log_vmf_normalizer(kappa, self.dim)
        log_likelihood = log_c + kappa * (a @ mu.T)
        return torch.softmax(self._log_prior(log_c) + log_likelihood, dim=-1).to(h.dtype)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        y: Tensor | None = None,
        generator: torch.Generator | None = None,
        balanced: bool = False,
        space: str = "direction",
    ) -> tuple[Tensor, Tensor]:
        """n synthetic activations (n, d) and their labels (n,).

        Labels: y if given; else class-balanced (arange(n) % K, shuffled) if balanced; else
        drawn from the prior pi(r) at the mean radius over classes (a per-class radius would
        make the prior depend on the class it is to choose). The prior comes from the weights
        and biases even when a fitted kappa is used for the samples. space="direction" gives
        unit vectors a, space="input" gives r a (the head's input space; r = 1 for a cosine
        head). Random draws, in order: labels, radii, vMF samples.
        """
        check_option("space", space, SPACE_OPTIONS)
        check_generator(generator, self.weight.device)
        y = self._labels(n, y, generator, balanced)
        r = self.radius.sample(y, generator) if isinstance(self.radius, EmpiricalRadius) else self.radius[y]
        base = r * self.weight_norm[y] if self.fitted_kappa is None else self.fitted_kappa[y]
        a = sample_vmf(self.mu, self.kappa_scale * base, y, generator=generator, validate=False)
        if space == "input":
            a.mul_(r.unsqueeze(1))
        return a, y

    def _labels(self, n: int, y: Tensor | None, generator: torch.Generator | None, balanced: bool) -> Tensor:
        device, k = self.weight.device, self.num_classes
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an integer >= 0, got {n!r}")
        if y is not None:
            if balanced:
                raise ValueError("give either labels y or balanced=True, not both")
            y = torch.as_tensor(y, device=device)
            if y.shape != (n,) or y.dtype not in (torch.int32, torch.int64):
                raise ValueError(
                    f"y must be an integer tensor of shape (n,)=({n},), "
                    f"got shape {tuple(y.shape)} and dtype {y.dtype}"
                )
            if n and (y.min() < 0 or y.max() >= k):
                raise ValueError(
                    f"labels y must lie in [0, {k}), got values from {y.min().item()} to {y.max().item()}"
                )
            return y.long()
        if balanced:
            return torch.randperm(n, device=device, generator=generator) % k
        if n == 0:  # multinomial refuses to draw nothing
            return torch.zeros(0, dtype=torch.long, device=device)
        probs = self.prior(self.mean_radius.mean())
        return torch.multinomial(probs, n, replacement=True, generator=generator)


def _checked_weight(weight: Tensor, name: str = "weight") -> Tensor:
    w = torch.as_tensor(weight)
    if w.dim() != 2 or w.shape[1] < 2 or not w.dtype.is_floating_point:
        raise ValueError(
            f"{name} must be a float tensor of shape (K, d) with d >= 2, "
            f"got shape {tuple(w.shape)} and dtype {w.dtype}"
        )
    if not torch.isfinite(w).all():
        raise ValueError(f"{name} must be finite, got a non-finite entry{where(~w.isfinite())}")
    zero = torch.linalg.vector_norm(w, dim=1) == 0
    if zero.any():
        raise ValueError(f"{name} rows must be nonzero (a class direction), got a zero row{where(zero)}")
    return w


def _checked_radius(
    radius: float | Tensor | EmpiricalRadius | None, num_classes: int, like: dict[str, Any]
) -> Tensor | EmpiricalRadius:
    """The radius spec as a (K,) tensor or an EmpiricalRadius on the weight's device/dtype."""
    if isinstance(radius, EmpiricalRadius):
        if radius.quantiles.shape[0] != num_classes:
            raise ValueError(
                f"EmpiricalRadius needs one row of quantiles per class ({num_classes}), "
                f"got {radius.quantiles.shape[0]}"
            )
        return radius.to(**like)
    if radius is None:
        radius = 1.0
    if isinstance(radius, int | float) and not isinstance(radius, bool):
        radius = torch.full((num_classes,), float(radius), **like)
    if not isinstance(radius, Tensor) or radius.shape != (num_classes,):
        raise ValueError(
            f"radius must be None, a float, a tensor of shape (K,)=({num_classes},) or an "
            f"EmpiricalRadius, got {radius!r}"
        )
    radius = radius.to(**like)
    check_positive(radius, "radius")
    return radius


def matched_kappa(mean_resultant_length: Tensor, mean_direction: Tensor, toward: Tensor) -> Tensor:
    """Per-class ML kappa of recorded unit activations with the mean direction held at
    `toward` (K, d), from their mean resultant length R (K,) and mean direction m (K, d):
    the mean cosine to u = toward / |toward| is R m.u, and kappa solves A_d(kappa) = R m.u
    (0 when the activations do not lean towards u). Around the class's own mean (u = m)
    this is the ordinary ML fit."""
    u = toward / torch.linalg.vector_norm(toward, dim=1, keepdim=True)
    cosine = mean_resultant_length * (mean_direction * u).sum(1)
    valid = torch.isfinite(cosine) & (cosine < 1)
    kappa = fit_kappa(torch.where(valid, cosine.clamp_min(0), 0.0), toward.shape[1])
    return torch.where(valid, kappa.to(cosine.dtype), math.nan)


def fit_kappa_from_activations(h: Tensor, y: Tensor, num_classes: int) -> dict[str, Tensor]:
    """Per-class vMF fit of the directions a = h / |h| (rows with h = 0 have no direction and
    are skipped): "count" (K,), "mean_resultant_length" |mean a| (K,), "fitted_kappa" (K,)
    (NaN for classes with fewer than 2 activations or all of them equal), "mean_direction"
    (K, d) (zero for empty classes). Statistics in float64, returned in h's float dtype."""
    if h.dim() != 2 or h.shape[1] < 2 or y.shape != h.shape[:1]:
        raise ValueError(
            "h must have shape (n, d) with d >= 2 and y shape (n,), "
            f"got {tuple(h.shape)} and {tuple(y.shape)}"
        )
    if y.numel() and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels y must lie in [0, {num_classes}), got {y.min()}..{y.max()}")
    dtype = h.dtype if h.dtype.is_floating_point else torch.get_default_dtype()
    h64 = h.to(torch.float64)
    norm = torch.linalg.vector_norm(h64, dim=1)
    keep = norm > 0
    a, y = h64[keep] / norm[keep].unsqueeze(1), y[keep].long()
    count = torch.bincount(y, minlength=num_classes)
    mean = torch.zeros(num_classes, h.shape[1], dtype=torch.float64, device=h.device)
    mean.index_add_(0, y, a).div_(count.clamp_min(1).unsqueeze(1))
    length = torch.linalg.vector_norm(mean, dim=1)
    # Identical directions give R = 1 only up to rounding (two copies of (1, 1, 0): 1 - 1.1e-16).
    valid = (count >= 2) & (length < 1 - 1e-12)
    kappa = fit_kappa(torch.where(valid, length, 0.0), h.shape[1])
    return {
        "count": count,
        "mean_resultant_length": length.to(dtype),
        "fitted_kappa": torch.where(valid, kappa, math.nan).to(dtype),
        "mean_direction": (mean / length.clamp_min(1e-300).unsqueeze(1)).to(dtype),
    }
