"""Tests that kill mutants of penrun.core.vmf that the other tests let survive (MUTATION.md)."""

from __future__ import annotations

import pytest
import torch

from penrun.core.vmf import VonMisesFisher, sample_vmf

F64 = torch.float64


def e1(d: int, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.eye(d, dtype=dtype)[0]


def test_an_integer_mu_is_refused_naming_its_dtype() -> None:
    with pytest.raises(ValueError, match=r"^mu must be a floating-point tensor, got dtype torch\.int64$"):
        VonMisesFisher(torch.tensor([1, 0]), 1.0)


def test_samples_are_unit_vectors_in_two_dimensions_with_one_mu_per_row() -> None:
    """d = 2: the tangent noise is one Gaussian coordinate, often shorter than 1; the sample
    must still be rescaled onto the circle."""
    mu = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=F64)
    index = torch.arange(200) % 2
    x = sample_vmf(mu, torch.full((200,), 0.5, dtype=F64), index, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(torch.linalg.vector_norm(x, dim=1), torch.ones(200, dtype=F64))


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


def test_the_sampler_computes_in_float64_whatever_the_dtype_of_kappa() -> None:
    """A float32 kappa of exactly representable values gives the very samples of the same
    kappa in float64 (the cosine is drawn in float64 either way)."""
    mu = e1(6)
    kappa32 = torch.tensor([0.5, 3.0, 50.0, 1000.0, 1e5] * 20, dtype=torch.float32)

    def draw(kappa: torch.Tensor) -> torch.Tensor:
        return sample_vmf(mu, kappa, generator=torch.Generator().manual_seed(3))

    assert torch.equal(draw(kappa32), draw(kappa32.double()))


def test_mu_is_renormalized_within_the_tolerance() -> None:
    mu = e1(3, torch.float32) * (1 + 5e-5)  # accepted: float32 tolerance 1e-4
    dist = VonMisesFisher(mu, 1.0)
    assert abs(torch.linalg.vector_norm(dist.mode).item() - 1) < 1e-6


def test_log_prob_checks_the_support_with_the_float64_tolerance() -> None:
    dist = VonMisesFisher(e1(3), 1.0)
    dist.log_prob(e1(3) * (1 + 1e-7))  # within 1e-6
    with pytest.raises(ValueError):
        dist.log_prob(e1(3) * (1 + 1e-5))


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


def test_expand_fills_the_instance_of_a_subclass() -> None:
    expanded = Tilted(e1(3), 2.0, "t").expand((4,))
    assert type(expanded) is Tilted and expanded.tag == "t" and expanded.batch_shape == (4,)
