"""The leaky hard sigmoids that turn a causal-importance function's output into a CI value.

Both are the hard sigmoid ``clamp(z, 0, 1)`` with a 0.01 slope on one side:

- lower-leaky (the CI that makes masks): forward ``clamp(z, 0, 1)``, backward the identity on
  ``(0, 1]``, 0 above 1, and below 0 the gradient ``0.01 * g`` only where it raises ``z`` (``g < 0``),
  so a CI function whose output went below 0 can come back, but is never pushed further down;
- upper-leaky (the CI that the importance penalty sees): ``0`` for ``z <= 0``, ``z`` on ``(0, 1]``,
  ``1 + 0.01 (z - 1)`` above 1, with its ordinary gradient (0, 1 and 0.01 on those pieces).

:func:`leaky_hard_sigmoids` computes both from one ``z`` in one autograd node (an SPD step needs both
for every CI value); the two single functions are the same pieces on their own.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

LEAK = 0.01


class _LeakyHardSigmoids(torch.autograd.Function):
    """``(lower, upper)`` of ``z``; the backward uses the pieces' masks kept from the forward."""

    @staticmethod
    def forward(ctx, z: Tensor, leak: float) -> tuple[Tensor, Tensor]:
        inside = ((z > 0) & (z <= 1)).to(z.dtype)
        below = (z <= 0).to(z.dtype)
        above = z > 1
        lower = z.clamp(0.0, 1.0)
        upper = torch.where(above, 1 + leak * (z - 1), lower)
        ctx.save_for_backward(inside, below, above.to(z.dtype))
        ctx.leak = leak
        return lower, upper

    @staticmethod
    def backward(ctx, grad_lower: Tensor | None, grad_upper: Tensor | None):
        inside, below, above = ctx.saved_tensors
        grad = torch.zeros_like(inside)
        if grad_lower is not None:
            grad = grad_lower * inside + (ctx.leak * grad_lower.clamp_max(0.0)) * below
        if grad_upper is not None:
            grad = grad + grad_upper * (inside + ctx.leak * above)
        return grad, None


def leaky_hard_sigmoids(
    z: Float[Tensor, "*shape"], leak: float = LEAK
) -> tuple[Float[Tensor, "*shape"], Float[Tensor, "*shape"]]:
    """``(lower_leaky_hard_sigmoid(z), upper_leaky_hard_sigmoid(z))`` in one autograd node."""
    return _LeakyHardSigmoids.apply(z, leak)


def lower_leaky_hard_sigmoid(z: Float[Tensor, "*shape"], leak: float = LEAK) -> Float[Tensor, "*shape"]:
    """``clamp(z, 0, 1)``; below 0 the gradient leaks (slope ``leak``) only where it raises ``z``."""
    return leaky_hard_sigmoids(z, leak)[0]


def upper_leaky_hard_sigmoid(z: Float[Tensor, "*shape"], leak: float = LEAK) -> Float[Tensor, "*shape"]:
    """0 below 0, ``z`` on (0, 1], ``1 + leak (z - 1)`` above 1."""
    return leaky_hard_sigmoids(z, leak)[1]
