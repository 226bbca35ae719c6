"""Rank-one subcomponents of one decomposed weight, with a causal-importance function per use."""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor, nn

from apd_lens._compat import HookPoint
from apd_lens.methods.spd.causal_importance import GLOBAL_CI_FN_KINDS, make_ci_fn


class Subcomponents(nn.Module):
    """C rank-one subcomponents ``V[:, c] ⊗ U[c, :]`` of a ``[d_in, d_out]`` weight matrix.

    ``V`` is ``[d_in, C]`` (init std ``1/sqrt(d_in)``), ``U`` is ``[C, d_out]`` (std ``1/sqrt(C)``).
    A tied weight (several uses) shares its subcomponents across uses; each use has its own CI
    function (``ci_fns[i]``; none with a global CI function, which the decomposition owns) and its own
    masks. Hooks (names relative to this module; use i > 0
    adds ``_use<i>``): ``hook_ci`` ([*batch, C], the causal importances, lower-leaky) and
    ``hook_subcomponent_acts`` ([*batch, C], the masked inner activations of a masked pass).
    """

    def __init__(
        self,
        n_subcomponents: int,
        d_in: int,
        d_out: int,
        transposed: tuple[bool, ...],
        ci_fn: str,
        ci_hidden: int,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.n_subcomponents, self.d_in, self.d_out = n_subcomponents, d_in, d_out
        self.V = nn.Parameter(torch.randn(d_in, n_subcomponents, generator=generator) / math.sqrt(d_in))
        self.U = nn.Parameter(torch.randn(n_subcomponents, d_out, generator=generator) / math.sqrt(n_subcomponents))
        per_use = ci_fn not in GLOBAL_CI_FN_KINDS
        self.ci_fns = nn.ModuleList(
            [make_ci_fn(ci_fn, n_subcomponents, d_out if t else d_in, ci_hidden, generator) for t in transposed]
            if per_use
            else []
        )
        for i in range(len(transposed)):
            suffix = "" if i == 0 else f"_use{i}"
            self.add_module(f"hook_ci{suffix}", HookPoint())
            self.add_module(f"hook_subcomponent_acts{suffix}", HookPoint())

    def hook(self, kind: str, use_index: int) -> HookPoint:
        """``hook_ci`` / ``hook_subcomponent_acts`` of use ``use_index``."""
        return getattr(self, kind if use_index == 0 else f"{kind}_use{use_index}")

    def weight(self) -> Float[Tensor, "d_in d_out"]:
        """The sum of all subcomponents, ``V @ U``."""
        return self.V @ self.U

    def subcomponent_matrices(self) -> Float[Tensor, "C d_in d_out"]:
        """Every subcomponent as a full matrix, ``V[:, c] ⊗ U[c, :]``."""
        return self.V.T[:, :, None] * self.U[:, None, :]

    def inner_acts(self, x: Float[Tensor, "n d"], transposed: bool) -> Float[Tensor, "n C"]:
        """``x . V[:, c]`` for every c (``x . U[c, :]`` for a transposed use)."""
        return x @ (self.U.T if transposed else self.V)

    def outer(self, inner: Float[Tensor, "n C"], transposed: bool) -> Float[Tensor, "n d"]:
        """``sum_c inner[n, c] U[c, :]`` (``V[:, c]`` for a transposed use)."""
        return inner @ (self.V.T if transposed else self.U)
