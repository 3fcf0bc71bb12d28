"""penrun.train.seeding: what one seed gives each generator, against the generators seeded
directly, and the CUDA states on a stand-in device (this machine has no GPU)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from penrun.train.seeding import rng_state, seed_everything, set_rng_state


@pytest.mark.mutation
@pytest.mark.parametrize("seed", [5, 2**32 + 5])
def test_one_seed_drives_python_numpy_and_torch(seed: int) -> None:
    """Each generator draws what it draws when seeded directly; NumPy, which takes seeds below
    2**32 only, gets the seed modulo 2**32 (a larger seed, e.g. a hash, must not fail)."""
    seed_everything(seed)
    drawn = (random.random(), np.random.random(), torch.rand(1).item())
    expected = (
        random.Random(seed).random(),
        np.random.RandomState(seed % 2**32).random_sample(),
        torch.rand(1, generator=torch.Generator().manual_seed(seed)).item(),
    )
    assert drawn == expected


class FakeCuda:
    """torch.cuda's random-state functions on a pretend device with two GPUs."""

    def __init__(self) -> None:
        self.states = [torch.tensor([1], dtype=torch.uint8), torch.tensor([2], dtype=torch.uint8)]
        self.restored: list = []

    def install(self, monkeypatch: pytest.MonkeyPatch, available: bool) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: self.states)
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", self.restored.append)


@pytest.mark.mutation
def test_cuda_states_are_kept_and_restored_where_there_is_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = FakeCuda()
    cuda.install(monkeypatch, available=True)
    state = rng_state()
    assert state["cuda"] is cuda.states
    set_rng_state(state)
    assert cuda.restored == [cuda.states]
    # a state saved without CUDA restores on a machine with CUDA, leaving the GPUs alone
    set_rng_state({k: v for k, v in state.items() if k != "cuda"})
    assert cuda.restored == [cuda.states]


@pytest.mark.mutation
def test_cuda_states_are_skipped_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = FakeCuda()
    cuda.install(monkeypatch, available=True)
    state = rng_state()
    cuda.install(monkeypatch, available=False)
    assert "cuda" not in rng_state()
    set_rng_state(state)  # a GPU checkpoint resumed on a CPU-only machine
    assert cuda.restored == []
