"""Causal-importance (CI) functions: for every data point, a pre-sigmoid score per subcomponent.

Three kinds (``SPDConfig.ci_fn``), each one module per use of a decomposed weight:

- ``"mlp"`` (the paper's): subcomponent c has its own tiny MLP reading only its inner activation
  ``h_c = a . V[:, c]`` (scalar -> ``hidden`` GELU units -> scalar);
- ``"vector_mlp"``: subcomponent c has its own MLP reading the whole entering activation ``a``;
- ``"shared_mlp"``: one MLP per use maps ``a`` to all C scores;

and one for the whole decomposition (``GLOBAL_CI_FN_KINDS``):

- ``"global_mlp"`` (VPD's global CI function, its MLP form): :class:`GlobalMLPCI` reads every use's
  entering activation at a data point, each RMS-normed, concatenated, and gives every use's C scores.

Initialization: first-layer weights normal with std ``sqrt(2 / fan_in)``, last-layer weights normal
with std ``sqrt(1 / hidden)``, biases zero.

The per-subcomponent MLPs run over a ``[n, C, hidden]`` tensor (at C 200 and batch 4096, 13M
elements per weight use): they dominate an SPD step. :class:`_ScalarMLPFunction` computes them in
slices of data points small enough to stay in the CPU's cache, and recomputes the hidden layer in
the backward instead of keeping it (tested equal to the plain formula, values and gradients).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

GLOBAL_CI_FN_KINDS = ("global_mlp",)
CI_FN_KINDS = ("mlp", "vector_mlp", "shared_mlp", *GLOBAL_CI_FN_KINDS)
CHUNK_ELEMENTS = 2**20
"""The scalar MLPs run over slices of about this many (data point, subcomponent, hidden unit) elements."""


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
        return _ScalarMLPFunction.apply(inner, self.w_in, self.b_in, self.w_out, self.b_out)


def scalar_mlp_reference(inner: Tensor, w_in: Tensor, b_in: Tensor, w_out: Tensor, b_out: Tensor) -> Tensor:
    """The plain formula of the per-subcomponent MLPs (what :class:`_ScalarMLPFunction` computes)."""
    hidden = F.gelu(torch.addcmul(b_in, inner.unsqueeze(-1), w_in))  # [n, C, hidden]
    return torch.einsum("nch,ch->nc", hidden, w_out) + b_out


class _ScalarMLPFunction(torch.autograd.Function):
    """``out[n, c] = b_out[c] + Σ_j w_out[c, j] GELU(h[n, c] w_in[c, j] + b_in[c, j])`` and its gradients,
    laid out subcomponent-major (``[C, rows, hidden]``, so the sums over data points are batched matmuls)
    and computed over slices of rows; the backward recomputes the hidden layer."""

    @staticmethod
    def forward(ctx, h: Tensor, w_in: Tensor, b_in: Tensor, w_out: Tensor, b_out: Tensor) -> Tensor:
        n, c = h.shape
        rows = max(1, CHUNK_ELEMENTS // max(c * w_in.shape[1], 1))
        h_t = h.T.contiguous()  # [C, n]
        out_t = torch.empty_like(h_t)
        w_in3, b_in3, w_out3 = w_in.unsqueeze(1), b_in.unsqueeze(1), w_out.unsqueeze(-1)
        for s in range(0, n, rows):
            pre = torch.addcmul(b_in3, h_t[:, s : s + rows, None], w_in3)  # [C, rows, hidden]
            out_t[:, s : s + rows] = torch.bmm(F.gelu(pre), w_out3).squeeze(-1)
        ctx.save_for_backward(h_t, w_in, b_in, w_out)
        ctx.rows = rows
        return out_t.T + b_out

    @staticmethod
    def backward(ctx, grad: Tensor):
        h_t, w_in, b_in, w_out = ctx.saved_tensors
        rows = ctx.rows
        g_t = grad.T.contiguous()  # [C, n]
        w_in3, b_in3, w_out3 = w_in.unsqueeze(1), b_in.unsqueeze(1), w_out.unsqueeze(1)
        d_w_in, d_b_in, d_w_out = torch.zeros_like(w_in), torch.zeros_like(b_in), torch.zeros_like(w_out)
        d_h_t = torch.empty_like(h_t)
        for s in range(0, h_t.shape[1], rows):
            h_c, g_c = h_t[:, s : s + rows, None], g_t[:, s : s + rows, None]  # [C, rows, 1]
            pre = torch.addcmul(b_in3, h_c, w_in3)
            d_w_out.unsqueeze(1).baddbmm_(g_c.transpose(1, 2), F.gelu(pre))
            d_pre = torch.ops.aten.gelu_backward(g_c * w_out3, pre)  # [C, rows, hidden]
            d_b_in += d_pre.sum(1)
            d_w_in.unsqueeze(1).baddbmm_(h_c.transpose(1, 2), d_pre)
            d_h_t[:, s : s + rows] = torch.bmm(d_pre, w_in.unsqueeze(-1)).squeeze(-1)
        return d_h_t.T, d_w_in, d_b_in, d_w_out, grad.sum(0)


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


def rms_normed(x: Float[Tensor, "n d"]) -> Float[Tensor, "n d"]:
    """``x / sqrt(mean(x^2) + eps)`` over the last dim, no learned scale (eps: the dtype's machine
    epsilon, as ``torch.nn.functional.rms_norm``'s default)."""
    return F.rms_norm(x, (x.shape[-1],))


class GlobalMLPCI(nn.Module):
    """ONE MLP over all sites: ``concat_s(rms_norm(a_s)) -> [Linear -> GELU] x len(hidden) -> Linear``
    giving ``Σ_s C_s`` scores, split back per site (in the order of ``widths``).

    ``widths`` / ``n_subcomponents``: each site's entering width and C, in site order. Initialization
    as the per-site MLPs: hidden weights normal with std ``sqrt(2 / fan_in)``, the last layer's with
    std ``sqrt(1 / fan_in)``, biases zero."""

    reads = "all_inputs"

    def __init__(
        self,
        widths: list[int],
        n_subcomponents: list[int],
        hidden: tuple[int, ...],
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if len(widths) != len(n_subcomponents) or not widths:
            raise ValueError(f"GlobalMLPCI needs one width and one C per site, got {widths} and {n_subcomponents}")
        self.widths, self.splits = list(widths), list(n_subcomponents)
        sizes = [sum(widths), *hidden]
        self.weights = nn.ParameterList(
            [_normal((a, b), math.sqrt(2.0 / a), generator) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
        )
        self.biases = nn.ParameterList([nn.Parameter(torch.zeros(b)) for b in sizes[1:]])
        self.w_out = _normal((sizes[-1], sum(n_subcomponents)), math.sqrt(1.0 / sizes[-1]), generator)
        self.b_out = nn.Parameter(torch.zeros(sum(n_subcomponents)))

    def forward(self, enters: list[Float[Tensor, "n _d"]]) -> list[Float[Tensor, "n _C"]]:
        """Every site's pre-sigmoid scores from every site's entering activation (both in site order)."""
        got = [a.shape[-1] for a in enters]
        if got != self.widths:
            raise ValueError(f"GlobalMLPCI expects entering activations of widths {self.widths}, got {got}")
        h = torch.cat([rms_normed(a) for a in enters], dim=-1)
        for w, b in zip(self.weights, self.biases, strict=True):
            h = F.gelu(torch.addmm(b, h, w))
        return list(torch.addmm(self.b_out, h, self.w_out).split(self.splits, dim=-1))


def make_ci_fn(
    kind: str, n_subcomponents: int, d_in: int, hidden: int, generator: torch.Generator | None = None
) -> nn.Module:
    """A CI function of ``kind`` (one of CI_FN_KINDS, not a global one) for one use of a weight."""
    classes = {"mlp": ScalarMLPCI, "vector_mlp": VectorMLPCI, "shared_mlp": SharedMLPCI}
    if kind not in classes:
        raise ValueError(f"unknown ci_fn {kind!r}: use one of {CI_FN_KINDS}")
    return classes[kind](n_subcomponents, d_in, hidden, generator)
