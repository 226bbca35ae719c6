"""Top-k masks over attributions: batch top-k and per-example top-k."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from apd_lens.training.distributed import gather_batches, local_part, world_size


def batch_topk_mask(attributions: Float[Tensor, "*batch C"], k: int | float) -> Float[Tensor, "*batch C"]:
    """Keep the ``int(k * n_points)`` largest (data point, component) scores of the whole batch.

    ``n_points`` is the number of data points (all leading dims); ``k`` is the mean number of
    components kept per data point and may be fractional.
    """
    n_components = attributions.shape[-1]
    if not 0 < k <= n_components:
        raise ValueError(f"top-k must be in (0, C={n_components}], got {k}")
    flat = attributions.reshape(-1)
    n_points = flat.numel() // n_components
    n_keep = int(k * n_points)
    mask = torch.zeros_like(flat)
    if n_keep > 0:
        mask[flat.topk(n_keep, sorted=False).indices] = 1.0
    return mask.reshape(attributions.shape)


def per_example_topk_mask(attributions: Float[Tensor, "*batch C"], k: int | float) -> Float[Tensor, "*batch C"]:
    """Keep the ``k`` largest components of every data point (``k`` must be a whole number)."""
    n_components = attributions.shape[-1]
    if float(k) != int(k) or not 0 < k <= n_components:
        raise ValueError(f"per-example top-k must be a whole number in [1, C={n_components}], got {k}")
    idx = attributions.topk(int(k), dim=-1, sorted=False).indices
    return torch.zeros_like(attributions).scatter_(-1, idx, 1.0)


def global_batch_topk_mask(attributions: Float[Tensor, "*batch C"], k: int | float) -> Float[Tensor, "*batch C"]:
    """Batch top-k over the attributions of all ranks of a distributed run together; returns this
    rank's part of the mask (plain batch top-k when not distributed)."""
    if world_size() == 1:
        return batch_topk_mask(attributions, k)
    return local_part(batch_topk_mask(gather_batches(attributions), k), attributions.shape[0])
