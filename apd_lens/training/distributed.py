"""Data-parallel decomposition on torch.distributed (torchrun): shards, gathers, DDP.

Under ``torchrun --nproc_per_node N``, every rank draws the same global batch and keeps its
shard of it; gradients are averaged by DistributedDataParallel. What a method decides over the
whole batch is decided over the global batch (APD's batch top-k threshold over all-gathered
attributions; SPD's random mask sources drawn for the global batch, each rank using its rows), so
the decomposition means the same as one process on the global batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0 (or a single process): the one that writes checkpoints, logs and results."""
    return rank() == 0


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1), with gloo on CPU and nccl on
    CUDA. Returns whether this run is distributed. A no-op outside torchrun."""
    if is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    dist.init_process_group(backend=backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def resolve_device(device: str) -> torch.device:
    """'cuda' under torchrun means this rank's own GPU (LOCAL_RANK)."""
    if device == "cuda" and is_distributed():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(device)


@torch.no_grad()
def broadcast_module(module: nn.Module) -> nn.Module:
    """Make every rank hold rank 0's parameters and buffers (e.g. a target trained on each rank,
    which can differ in the last bits on GPU). A no-op outside a distributed run."""
    if is_distributed():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)
    return module


def shard(batch: Tensor) -> Tensor:
    """This rank's contiguous slice of a global batch; the batch must split evenly."""
    n = world_size()
    if n == 1:
        return batch
    if batch.shape[0] % n:
        raise ValueError(f"global batch of {batch.shape[0]} examples does not split evenly over {n} ranks")
    size = batch.shape[0] // n
    return batch[rank() * size : (rank() + 1) * size]


def gather_batches(t: Tensor) -> Tensor:
    """Every rank's ``t`` concatenated along dim 0, in rank order (``t`` itself when not distributed)."""
    n = world_size()
    if n == 1:
        return t
    gathered = [torch.empty_like(t) for _ in range(n)]
    dist.all_gather(gathered, t.contiguous())
    return torch.cat(gathered, dim=0)


def local_part(t: Tensor, size: int) -> Tensor:
    """This rank's ``size`` rows of a tensor over the global batch (rows in rank order)."""
    return t[rank() * size : (rank() + 1) * size]


class _LossStep(nn.Module):
    """``forward(x, generator, step)`` = the decomposition's loss terms: the module DDP wraps."""

    def __init__(self, decomposition: nn.Module):
        super().__init__()
        self.decomposition = decomposition

    def forward(
        self, x: Tensor, generator: torch.Generator | None = None, step: int | None = None
    ) -> dict[str, Tensor]:
        return self.decomposition.losses(x, generator=generator, step=step)


def data_parallel_step(decomposition: nn.Module) -> Callable[[Tensor, torch.Generator | None], dict[str, Tensor]]:
    """The loss function of one step: ``decomposition.losses``, wrapped in DistributedDataParallel
    when running distributed (gradients of the component parameters are averaged over ranks)."""
    if not is_distributed():
        return lambda x, generator=None, step=None: decomposition.losses(x, generator=generator, step=step)
    device = decomposition.trainable_parameters()[0].device
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(_LossStep(decomposition), device_ids=ids)


def mean_over_ranks(values: dict[str, Tensor]) -> dict[str, float]:
    """Scalars averaged over all ranks (for logging), as Python floats."""
    names = sorted(values)
    stacked = torch.stack([values[k].detach().float() for k in names])
    if is_distributed():
        dist.all_reduce(stacked)
        stacked /= world_size()
    return dict(zip(names, stacked.tolist(), strict=True))


def sum_over_ranks(values: Tensor) -> Tensor:
    """``values`` (on the process group's device) summed over all ranks; itself when not distributed."""
    if not is_distributed():
        return values
    summed = values.clone()
    dist.all_reduce(summed)
    return summed
