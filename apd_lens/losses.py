"""The APD loss terms, with the spec's normalizations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from apd_lens.components import ComponentWeight


def faithfulness_loss(targets: dict[str, Tensor], components: dict[str, ComponentWeight]) -> Tensor:
    """sum_l ||W_l - sum_c P_{c,l}||^2 divided by the number of decomposed parameters.

    ``targets`` maps each weight name to its ``[d_in, d_out]`` target matrix.
    """
    n_params = sum(w.numel() for w in targets.values())
    total = sum(_SquaredResidual.apply(targets[n], components[n].A, components[n].B) for n in targets)
    return total / n_params


class _SquaredResidual(torch.autograd.Function):
    """``||W - sum_c A_c B_c||^2`` with the sum as one ``addbmm`` and the gradients as batched matmuls
    against the broadcast residual: no permuted copy of A or B (each as large as the parameters)."""

    @staticmethod
    def forward(ctx, target: Tensor, a: Tensor, b: Tensor) -> Tensor:
        residual = torch.addbmm(target, a, b, alpha=-1)
        ctx.save_for_backward(residual, a, b)
        return residual.square().sum()

    @staticmethod
    def backward(ctx, grad: Tensor):
        residual, a, b = ctx.saved_tensors
        grad_sum = (-2 * grad) * residual  # d loss / d (sum_c A_c B_c)
        broadcast = grad_sum.expand(a.shape[0], *grad_sum.shape)
        grad_a = torch.bmm(broadcast, b.transpose(1, 2)) if ctx.needs_input_grad[1] else None
        grad_b = torch.bmm(a.transpose(1, 2), broadcast) if ctx.needs_input_grad[2] else None
        return None, grad_a, grad_b


def output_loss(output: Tensor, target: Tensor, kind: str = "mse") -> Tensor:
    """Distance of the masked output to the target output: mean squared error, or the KL
    divergence KL(target || output) of the softmax over the last dim, averaged over positions."""
    if kind == "mse":
        return (output - target).square().mean()
    if kind == "kl":
        logp = F.log_softmax(output, dim=-1)
        logq = F.log_softmax(target, dim=-1)
        return (logq.exp() * (logq - logp)).sum(-1).mean()
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


def component_schatten_norms(
    components: dict[str, ComponentWeight], p: float, eps: float = 1e-16
) -> Float[Tensor, " C"]:
    """Per component, sum over weights and rank dims of (||A[:, m]||^2 ||B[m, :]||^2)^(p/2)."""
    total = None
    for comp in components.values():
        a_sq = comp.A.square().sum(1)  # [C, m]
        b_sq = comp.B.square().sum(2)  # [C, m]
        per = (a_sq * b_sq + eps).pow(p / 2).sum(-1)
        total = per if total is None else total + per
    return total


def simplicity_loss(
    mask: Float[Tensor, "n C"], components: dict[str, ComponentWeight], p: float, n_params: int
) -> Tensor:
    """Schatten-p quasi-norm of the active components, divided by n_params and n data points."""
    norms = component_schatten_norms(components, p)
    n_points = mask.reshape(-1, mask.shape[-1]).shape[0]
    active_counts = mask.reshape(-1, mask.shape[-1]).sum(0)
    return (active_counts * norms).sum() / (n_params * n_points)
