"""The APD loss terms, with the spec's normalizations (the output distance and activation
reconstruction, shared with every method, live in :mod:`apd_lens.engine.losses`)."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from apd_lens.methods.apd.components import ComponentWeight

SCHATTEN_EPS = 1e-16
"""Added to ``|A_m|^2 |B_m|^2`` before the power p/2 < 1 (whose slope is infinite at 0)."""


def faithfulness_loss(targets: dict[str, Tensor], components: dict[str, ComponentWeight]) -> Tensor:
    """sum_l ||W_l - sum_c P_{c,l}||^2 divided by the number of decomposed parameters.

    ``targets`` maps each weight name to its ``[d_in, d_out]`` target matrix.
    """
    n_params = sum(w.numel() for w in targets.values())
    total = sum(_ParameterLosses.apply(targets[n], components[n].A, components[n].B, None, 1.0)[0] for n in targets)
    return total / n_params


def parameter_losses(
    targets: dict[str, Tensor], components: dict[str, ComponentWeight], mask: Float[Tensor, "*batch C"], p: float
) -> tuple[Tensor, Tensor]:
    """``(faithfulness_loss(...), simplicity_loss(...))`` from one autograd node per weight, whose
    backward writes each of ``grad_A`` and ``grad_B`` once (instead of two gradients of the size of
    the parameters and their sum: on the residual MLP these elementwise passes over [C, d_in, m]
    cost about as much as the small matmuls around them)."""
    n_params = sum(w.numel() for w in targets.values())
    flat = mask.reshape(-1, mask.shape[-1])
    counts = flat.sum(0)
    faith, simp = None, None
    for name, target in targets.items():
        pair = _ParameterLosses.apply(target, components[name].A, components[name].B, counts, p)
        faith = pair[0] if faith is None else faith + pair[0]
        simp = pair[1] if simp is None else simp + pair[1]
    return faith / n_params, simp / (n_params * flat.shape[0])


class _ParameterLosses(torch.autograd.Function):
    """``[||W - sum_c A_c B_c||^2, sum_c counts_c sum_m (|A_c[:, m]|^2 |B_c[m, :]|^2 + eps)^(p/2)]``.

    The sum over components is one ``addbmm``; the gradients are batched matmuls against the
    broadcast residual (no permuted copy of A or B) into which the Schatten term's gradient
    (``A * u`` with ``u [C, m]``) is added in place. ``counts=None``: the first entry only.
    """

    @staticmethod
    def forward(ctx, target: Tensor, a: Tensor, b: Tensor, counts: Tensor | None, p: float) -> Tensor:
        residual = torch.addbmm(target, a, b, alpha=-1)
        faith = residual.square().sum()
        if counts is None:
            ctx.save_for_backward(residual, a, b)
            ctx.schatten = False
            return torch.stack([faith, torch.zeros_like(faith)])
        a_sq = a.square().sum(1)  # [C, m] (vector_norm over a middle dim is ~4x slower on CPU)
        b_sq = torch.linalg.vector_norm(b, dim=2).square()  # over the last dim: no [C, m, d_out] temporary
        base = a_sq * b_sq + SCHATTEN_EPS
        per_rank = base.pow(p / 2)  # [C, m]
        simp = (counts.to(a.dtype) * per_rank.sum(-1)).sum()
        ctx.save_for_backward(residual, a, b, counts, a_sq, b_sq, base, per_rank)
        ctx.schatten, ctx.p = True, p
        return torch.stack([faith, simp])

    @staticmethod
    def backward(ctx, grad: Tensor):
        residual, a, b, *rest = ctx.saved_tensors
        broadcast = ((-2 * grad[0]) * residual).expand(a.shape[0], *residual.shape)
        need_a, need_b = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_a = torch.bmm(broadcast, b.transpose(1, 2)) if need_a else None
        grad_b = torch.bmm(a.transpose(1, 2), broadcast) if need_b else None
        grad_counts = None
        if ctx.schatten:
            counts, a_sq, b_sq, base, per_rank = rest
            # d/d|A_m|^2 of counts (|A_m|^2 |B_m|^2 + eps)^(p/2) = counts p/2 (...)^(p/2 - 1) |B_m|^2
            slope = grad[1] * counts.to(a.dtype)[:, None] * ctx.p * per_rank / base  # [C, m]; 2 * p/2 = p
            if need_a:
                grad_a.addcmul_(a, (slope * b_sq)[:, None, :])
            if need_b:
                grad_b.addcmul_(b, (slope * a_sq)[:, :, None])
            if ctx.needs_input_grad[3]:
                grad_counts = grad[1] * per_rank.sum(-1)
        return None, grad_a, grad_b, grad_counts, None
