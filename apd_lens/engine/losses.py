"""Loss terms every method uses: the output distance and activation reconstruction."""

from __future__ import annotations

import math

import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor


def output_loss(output: Tensor, target: Tensor, kind: str = "mse") -> Tensor:
    """Distance of a masked output to the target output: mean squared error, or the KL
    divergence KL(target || output) of the softmax over the last dim, averaged over positions."""
    return _output_errors(output, target, kind).mean()


def output_loss_per_point(output: Tensor, target: Tensor, kind: str, n_batch_dims: int) -> Float[Tensor, " n_points"]:
    """:func:`output_loss` of each data point (the first ``n_batch_dims`` dims of ``output``, flattened):
    their mean is :func:`output_loss`."""
    errors = _output_errors(output, target, kind)
    return errors.reshape(math.prod(output.shape[:n_batch_dims]), -1).mean(-1)


def _output_errors(output: Tensor, target: Tensor, kind: str) -> Tensor:
    """Squared errors per element (``"mse"``), or KL(target || output) per position (``"kl"``, last dim kept)."""
    if kind == "mse":
        return (output - target).square()
    if kind == "kl":
        logp = F.log_softmax(output, dim=-1)
        logq = F.log_softmax(target, dim=-1)
        return (logq.exp() * (logq - logp)).sum(-1, keepdim=True)
    raise ValueError(f"unknown output loss {kind!r}: use 'mse' or 'kl'")


def activation_recon_loss(acts: dict[str, Tensor], targets: dict[str, Tensor], n_batch_dims: int) -> Tensor:
    """Squared error at the chosen hooks summed over hooks and widths, divided by the total
    width, averaged over data points."""
    if not acts:
        raise ValueError("activation reconstruction needs at least one hook")
    total_width = 0
    total = None
    for name, act in acts.items():
        width = act[(0,) * n_batch_dims].numel()
        total_width += width
        err = (act - targets[name]).square().reshape(*act.shape[:n_batch_dims], -1).sum(-1)
        total = err if total is None else total + err
    return total.mean() / total_width
