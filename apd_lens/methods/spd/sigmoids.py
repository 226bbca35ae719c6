"""The leaky hard sigmoids that turn a causal-importance function's output into a CI value.

Both are the hard sigmoid ``clamp(z, 0, 1)`` with a 0.01 slope on one side:

- lower-leaky (the CI that makes masks): forward ``clamp(z, 0, 1)``, backward the identity on
  ``(0, 1]``, 0 above 1, and below 0 the gradient ``0.01 * g`` only where it raises ``z`` (``g < 0``),
  so a CI function whose output went below 0 can come back, but is never pushed further down;
- upper-leaky (the CI that the importance penalty sees): ``0`` for ``z <= 0``, ``z`` on ``[0, 1]``,
  ``1 + 0.01 (z - 1)`` above 1, with its ordinary gradient.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

LEAK = 0.01


class _LowerLeakyHardSigmoid(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, leak: float) -> Tensor:
        ctx.save_for_backward(z)
        ctx.leak = leak
        return z.clamp(0.0, 1.0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (z,) = ctx.saved_tensors
        inside = (z > 0) & (z <= 1)
        below_rising = (z <= 0) & (grad < 0)
        return torch.where(inside, grad, torch.where(below_rising, ctx.leak * grad, torch.zeros_like(grad))), None


def lower_leaky_hard_sigmoid(z: Float[Tensor, "*shape"], leak: float = LEAK) -> Float[Tensor, "*shape"]:
    """``clamp(z, 0, 1)``; below 0 the gradient leaks (slope ``leak``) only where it raises ``z``."""
    return _LowerLeakyHardSigmoid.apply(z, leak)


def upper_leaky_hard_sigmoid(z: Float[Tensor, "*shape"], leak: float = LEAK) -> Float[Tensor, "*shape"]:
    """0 below 0, ``z`` on [0, 1], ``1 + leak (z - 1)`` above 1."""
    return torch.where(z > 1, 1 + leak * (z - 1), torch.where(z > 0, z, torch.zeros_like(z)))
