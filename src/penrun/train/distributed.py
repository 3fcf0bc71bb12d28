"""One run on several processes (`torchrun --nproc_per_node=N -m penrun ...`).

torchrun sets WORLD_SIZE, RANK, LOCAL_RANK and LOCAL_WORLD_SIZE; penrun then joins a process
group (gloo on the CPU, nccl on CUDA), gives every rank its shard of each global batch,
synchronizes gradients with DistributedDataParallel, gathers evaluation across ranks and lets
rank 0 alone write files. Without torchrun every function here is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from penrun.errors import InputError

# Long enough for rank 0 to train a cached teacher while the others wait at a collective.
TIMEOUT = timedelta(hours=6)


def launched_world_size() -> int:
    """Processes torchrun started for this run (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def rank_seed(seed: int) -> int:
    """A seed of this rank's own: `seed` itself on rank 0 (which draws as one process would),
    a distinct one on every other rank (each draws its own synthetic activations)."""
    return seed + 1_000_003 * rank()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def process_device(device: torch.device, name: str) -> torch.device:
    """This process's device: under torchrun with CUDA, GPU LOCAL_RANK of its node."""
    if launched_world_size() == 1 or device.type != "cuda":
        return device
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", launched_world_size()))
    available = torch.cuda.device_count()
    if per_node > available:
        raise InputError(
            f"torchrun started {per_node} processes on this node but it has {available} CUDA "
            f"device(s) (device={name!r}): use --nproc_per_node={available} or fewer, "
            "or device=cpu"
        )
    if device.index is not None:
        raise InputError(
            f"device={name!r} pins one GPU, but torchrun started {launched_world_size()} "
            "processes that each take their own: use device=auto or cuda"
        )
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def check_batch_size(batch_size: int) -> None:
    world = launched_world_size()
    if batch_size % world:
        raise InputError(
            f"batch_size={batch_size} cannot be split evenly over the {world} torchrun "
            f"processes: the global batch must be a multiple of {world}"
        )


def init(device: torch.device) -> None:
    """Join torchrun's process group (once per process): nccl for CUDA, gloo for the CPU."""
    if launched_world_size() == 1 or is_distributed():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)


def shutdown() -> None:
    """Leave the process group. No barrier: after a failure on one rank the others may be
    waiting in a collective, and torchrun stops them when this process exits."""
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _comm_device() -> torch.device:
    """Where collectives need their tensors: nccl works on the GPU only."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    if not is_distributed():
        return [value]
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over ranks (the epoch's training losses of the whole batch)."""
    if not is_distributed():
        return values
    summed = values.detach().to(_comm_device(), torch.float64)
    dist.all_reduce(summed)
    return (summed / world_size()).to(values.device)


def shard(indices: torch.Tensor) -> torch.Tensor:
    """This rank's part of a global batch (strided, so shards differ in size by at most one)."""
    return indices[rank() :: world_size()]


def local_chunk(x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """This rank's contiguous chunk of `x` to evaluate, and the sizes of every rank's chunk."""
    parts = x.tensor_split(world_size())
    return parts[rank()], [len(part) for part in parts]


def gather_chunks(local: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Concatenate every rank's chunk (rank order) on every rank; inverse of chunking."""
    if not is_distributed():
        return local
    device = _comm_device()
    padded = torch.zeros((max(sizes), *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)]).to(local.device)


class _Forward(nn.Module):
    """A module whose forward is `fn`, owning `owner`'s parameters: lets DDP synchronize a
    step that calls several methods of a network (features, head, loss) in one pass."""

    def __init__(self, owner: nn.Module, fn: Callable[..., Any]):
        super().__init__()
        self.owner = owner
        self._fn = fn

    def forward(self, *args: Any) -> Any:
        return self._fn(*args)


def data_parallel(
    owner: nn.Module, fn: Callable[..., Any] | None = None, *, some_unused: bool = False
) -> Callable[..., Any]:
    """`fn` (default: `owner` itself) run through DistributedDataParallel over `owner`'s
    parameters when distributed, so that its backward averages gradients over ranks;
    otherwise `fn` unchanged. `some_unused`: a step may leave parameters without gradient
    (e.g. a loss on the head alone), which DDP must then look for every step."""
    fn = fn or owner.__call__  # a bound method: not registered as a second submodule
    if not is_distributed():
        return fn
    device = next(owner.parameters()).device
    return DistributedDataParallel(
        _Forward(owner, fn),
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=some_unused,
    )
