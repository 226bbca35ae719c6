"""Causal-importance (CI) functions: for every data point, a pre-sigmoid score per subcomponent.

Three kinds (``SPDConfig.ci_fn``), each one module per use of a decomposed weight:

- ``"mlp"`` (the paper's): subcomponent c has its own tiny MLP reading only its inner activation
  ``h_c = a . V[:, c]`` (scalar -> ``hidden`` GELU units -> scalar);
- ``"vector_mlp"``: subcomponent c has its own MLP reading the whole entering activation ``a``;
- ``"shared_mlp"``: one MLP per use maps ``a`` to all C scores.

Initialization: first-layer weights normal with std ``sqrt(2 / fan_in)``, last-layer weights normal
with std ``sqrt(1 / hidden)``, biases zero.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

CI_FN_KINDS = ("mlp", "vector_mlp", "shared_mlp")


def _normal(shape: tuple[int, ...], std: float, generator: torch.Generator | None) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape, generator=generator) * std)


class ScalarMLPCI(nn.Module):
    """C independent MLPs ``h_c -> GELU(h_c w_in[c] + b_in[c]) . w_out[c] + b_out[c]``."""

    reads = "inner"

    def __init__(self, n_subcomponents: int, d_in: int, hidden: int, generator: torch.Generator | None = None):
        super().__init__()
        self.w_in = _normal((n_subcomponents, hidden), math.sqrt(2.0), generator)
        self.b_in = nn.Parameter(torch.zeros(n_subcomponents, hidden))
        self.w_out = _normal((n_subcomponents, hidden), math.sqrt(1.0 / hidden), generator)
        self.b_out = nn.Parameter(torch.zeros(n_subcomponents))

    def forward(self, inner: Float[Tensor, "n C"]) -> Float[Tensor, "n C"]:
        hidden = F.gelu(torch.addcmul(self.b_in, inner.unsqueeze(-1), self.w_in))  # [n, C, hidden]
        return torch.einsum("nch,ch->nc", hidden, self.w_out) + self.b_out


class VectorMLPCI(nn.Module):
    """C independent MLPs ``a -> GELU(a W_in[c] + b_in[c]) . w_out[c] + b_out[c]`` over the whole input."""

    reads = "input"

    def __init__(self, n_subcomponents: int, d_in: int, hidden: int, generator: torch.Generator | None = None):
        super().__init__()
        self.w_in = _normal((d_in, n_subcomponents, hidden), math.sqrt(2.0 / d_in), generator)
        self.b_in = nn.Parameter(torch.zeros(n_subcomponents, hidden))
        self.w_out = _normal((n_subcomponents, hidden), math.sqrt(1.0 / hidden), generator)
        self.b_out = nn.Parameter(torch.zeros(n_subcomponents))

    def forward(self, enter: Float[Tensor, "n d_in"]) -> Float[Tensor, "n C"]:
        d_in, n_sub, hidden = self.w_in.shape
        pre = (enter @ self.w_in.reshape(d_in, n_sub * hidden)).view(-1, n_sub, hidden) + self.b_in
        return torch.einsum("nch,ch->nc", F.gelu(pre), self.w_out) + self.b_out


class SharedMLPCI(nn.Module):
    """One MLP per use: ``a -> GELU(a W_in + b_in) W_out + b_out``, all C scores at once."""

    reads = "input"

    def __init__(self, n_subcomponents: int, d_in: int, hidden: int, generator: torch.Generator | None = None):
        super().__init__()
        self.w_in = _normal((d_in, hidden), math.sqrt(2.0 / d_in), generator)
        self.b_in = nn.Parameter(torch.zeros(hidden))
        self.w_out = _normal((hidden, n_subcomponents), math.sqrt(1.0 / hidden), generator)
        self.b_out = nn.Parameter(torch.zeros(n_subcomponents))

    def forward(self, enter: Float[Tensor, "n d_in"]) -> Float[Tensor, "n C"]:
        return torch.addmm(self.b_out, F.gelu(torch.addmm(self.b_in, enter, self.w_in)), self.w_out)


def make_ci_fn(
    kind: str, n_subcomponents: int, d_in: int, hidden: int, generator: torch.Generator | None = None
) -> nn.Module:
    """A CI function of ``kind`` (one of CI_FN_KINDS) for one use of a weight."""
    classes = {"mlp": ScalarMLPCI, "vector_mlp": VectorMLPCI, "shared_mlp": SharedMLPCI}
    if kind not in classes:
        raise ValueError(f"unknown ci_fn {kind!r}: use one of {CI_FN_KINDS}")
    return classes[kind](n_subcomponents, d_in, hidden, generator)
