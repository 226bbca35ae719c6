"""Low-rank parameter components of one decomposed weight: P_c = A_c @ B_c."""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor, nn

from apd_lens._compat import HookPoint
from apd_lens.methods.apd.sparse_masked import sparse_masked_matmul

FLAT_MAX_WIDTH = 16
"""Per-component products narrower than this many columns run as one wide matmul (see
:func:`per_component_matmul`)."""


def per_component_matmul(x: Float[Tensor, "n d"], mats: Float[Tensor, "C d k"]) -> Float[Tensor, "n C k"]:
    """``x @ mats[c]`` for every c.

    Narrow products (k < FLAT_MAX_WIDTH, e.g. TMS's rank 11) run as one ``[n, d] @ [d, C*k]``
    matmul on the side-by-side matrices: a batch of C matmuls only k wide runs ~5-7x slower on
    CPU. Wide ones run as one batched matmul with ``x`` broadcast (no copy of ``mats``), which is
    the faster of the two there (e.g. the residual MLP's rank 50).
    """
    n_mats, d, k = mats.shape
    if k < FLAT_MAX_WIDTH:
        return (x @ mats.permute(1, 0, 2).reshape(d, n_mats * k)).view(x.shape[0], n_mats, k)
    return torch.matmul(x, mats).transpose(0, 1)


class ComponentWeight(nn.Module):
    """C rank-m components of a ``[d_in, d_out]`` weight matrix.

    ``A`` is ``[C, d_in, m]``, ``B`` is ``[C, m, d_out]``. Hooks (names relative to this module):
    ``hook_component_acts`` ([*batch, C, m], the masked inner activations of the first use;
    ``hook_component_acts_use<i>`` for a tied weight's further uses) and ``hook_component_out``
    ([*batch, d_out], the summed output of the first use).
    """

    def __init__(
        self,
        n_components: int,
        d_in: int,
        d_out: int,
        rank: int,
        n_uses: int = 1,
        init_scale: float = 1.0,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.n_components, self.d_in, self.d_out, self.rank = n_components, d_in, d_out, rank
        a = torch.randn(n_components, d_in, rank, generator=generator) * (init_scale / math.sqrt(d_in))
        b = torch.randn(n_components, rank, d_out, generator=generator) * (init_scale / math.sqrt(rank * n_components))
        self.A = nn.Parameter(a)
        self.B = nn.Parameter(b)
        self.hook_component_acts = HookPoint()
        for i in range(1, n_uses):
            self.add_module(f"hook_component_acts_use{i}", HookPoint())
        self.hook_component_out = HookPoint()

    def acts_hook(self, use_index: int) -> HookPoint:
        """The HookPoint that sees the inner activations of use ``use_index``."""
        return self.hook_component_acts if use_index == 0 else getattr(self, f"hook_component_acts_use{use_index}")

    def component_matrices(self) -> Float[Tensor, "C d_in d_out"]:
        return self.A @ self.B

    def summed_matrix(self) -> Float[Tensor, "d_in d_out"]:
        return torch.einsum("cim,cmo->io", self.A, self.B)

    def inner_acts(
        self, x: Float[Tensor, "n d_enter"], transposed: bool, detach: bool = False
    ) -> Float[Tensor, "n C m"]:
        """``x @ A_c`` (or ``x @ B_c^T`` for a transposed use) for every component."""
        a, b = (self.A.detach(), self.B.detach()) if detach else (self.A, self.B)
        return per_component_matmul(x, b.transpose(1, 2) if transposed else a)

    def outer(
        self, inner: Float[Tensor, "n C m"], transposed: bool, detach: bool = False
    ) -> Float[Tensor, "n C d_leave"]:
        """Per-component outputs from inner activations."""
        a, b = (self.A.detach(), self.B.detach()) if detach else (self.A, self.B)
        return torch.einsum("ncm,cim->nci", inner, a) if transposed else torch.einsum("ncm,cmo->nco", inner, b)

    def project_onto_inner(
        self, grad: Float[Tensor, "k d_leave"], transposed: bool, detach: bool = True
    ) -> Float[Tensor, "C m k"]:
        """``outer_c @ grad^T`` for every component: gradients on the output side taken back to
        the rank-m inner activations (``B_c`` is the outer map, or ``A_c^T`` when transposed),
        probes last (one ``[C*m, d] @ [d, k]`` matmul when not transposed)."""
        a, b = (self.A.detach(), self.B.detach()) if detach else (self.A, self.B)
        if transposed:
            return torch.matmul(a.transpose(1, 2), grad.T)
        return (b.reshape(-1, b.shape[2]) @ grad.T).view(self.n_components, self.rank, grad.shape[0])

    def summed_outer(
        self, inner: Float[Tensor, "n C m"], transposed: bool, detach: bool = False
    ) -> Float[Tensor, "n d_leave"]:
        """Sum over components of their outputs: one matmul over the flattened (C, m) axis."""
        a, b = (self.A.detach(), self.B.detach()) if detach else (self.A, self.B)
        flat = inner.reshape(inner.shape[0], -1)
        if transposed:
            return flat @ a.permute(0, 2, 1).reshape(-1, self.d_in)
        return flat @ b.reshape(-1, self.d_out)

    def component_outputs(
        self, x: Float[Tensor, "n d_enter"], transposed: bool, detach: bool = False
    ) -> Float[Tensor, "n C d_leave"]:
        return self.outer(self.inner_acts(x, transposed, detach), transposed, detach)

    def outputs_by_component(self, x: Float[Tensor, "n d_enter"], transposed: bool) -> Float[Tensor, "n C d_leave"]:
        """``x @ P_c`` for every component, detached, through the rank-m factors or through the
        full matrices, whichever needs fewer multiply-adds."""
        a, b = self.A.detach(), self.B.detach()
        if self.d_in * self.d_out <= self.rank * (self.d_in + self.d_out):
            full = a @ b  # [C, d_in, d_out]
            return per_component_matmul(x, full.transpose(1, 2) if transposed else full)
        return self.outer(self.inner_acts(x, transposed, detach=True), transposed, detach=True)

    def sparse_masked_output(
        self, x: Float[Tensor, "n d_enter"], mask: Float[Tensor, "n C"], transposed: bool, detach: bool = False
    ) -> Float[Tensor, "n d_leave"]:
        """``sum_c mask[n, c] * (x[n] @ P_c)`` computing only the (n, c) pairs the mask keeps.

        Equal to the dense computation; cheaper when the mask is sparse (top-k keeps few
        components per data point): one small matmul pair per active component.
        """
        a, b = (self.A.detach(), self.B.detach()) if detach else (self.A, self.B)
        return sparse_masked_matmul(x, a, b, mask, transposed)

    @torch.no_grad()
    def normalize_A(self) -> None:
        """Rescale each column of every A_c to unit norm over d_in (the paper's resid-MLP option)."""
        # square-sum-sqrt: torch's vector_norm over a middle dim is ~4x slower on CPU (11 vs 2.7 ms for [130, 1000, 50])
        self.A.div_(self.A.square().sum(1, keepdim=True).sqrt_().clamp_min_(1e-12))

    @torch.no_grad()
    def set_from_matrices(self, A: Float[Tensor, "C d_in m"], B: Float[Tensor, "C m d_out"]) -> None:
        if A.shape != self.A.shape or B.shape != self.B.shape:
            raise ValueError(
                f"expected A {tuple(self.A.shape)} and B {tuple(self.B.shape)}, "
                f"got {tuple(A.shape)} and {tuple(B.shape)}"
            )
        self.A.copy_(A)
        self.B.copy_(B)
