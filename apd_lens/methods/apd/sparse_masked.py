"""The masked component output computed only for the (data point, component) pairs a mask keeps.

``sum_c mask[n, c] * (x[n] @ A_c @ B_c)`` (or ``x[n] @ B_c^T @ A_c^T`` for a transposed use) as one
autograd node: per component with kept pairs, one small matmul pair forward and three backward,
written straight into dense gradients of A and B. These matmuls are tiny (a few rows each), so they
run single-threaded: on a 2-core CPU a threaded GEMM of a few rows costs 2-3x a single-threaded one,
and a step makes hundreds of them.
"""

from __future__ import annotations

import contextlib

import torch
from jaxtyping import Float
from torch import Tensor


@contextlib.contextmanager
def single_threaded():
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _segments(counts: list[int]):
    start = 0
    for c, count in enumerate(counts):
        if count:
            yield c, slice(start, start + count)
            start += count


def _zeros_at(t: Tensor, index: list[int]) -> Tensor:
    if index:
        t[torch.tensor(index, device=t.device)] = 0
    return t


class _SparseMaskedMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a, b, rows, scale, counts, transposed):
        """x [n, d], a [C, d_in, m], b [C, m, d_out]; rows [p] (sorted by component), scale [p, 1]."""
        xs = x[rows]
        inner = x.new_empty(rows.shape[0], a.shape[2])
        d_out = a.shape[1] if transposed else b.shape[2]
        pieces = x.new_empty(rows.shape[0], d_out)
        with single_threaded():
            for c, seg in _segments(counts):
                if transposed:
                    torch.mm(xs[seg], b[c].T, out=inner[seg])
                    torch.mm(inner[seg], a[c].T, out=pieces[seg])
                else:
                    torch.mm(xs[seg], a[c], out=inner[seg])
                    torch.mm(inner[seg], b[c], out=pieces[seg])
        ctx.save_for_backward(xs, inner, a, b, rows, scale)
        ctx.counts, ctx.transposed, ctx.n = counts, transposed, x.shape[0]
        return x.new_zeros(x.shape[0], d_out).index_add_(0, rows, pieces * scale)

    @staticmethod
    def backward(ctx, grad_out):
        xs, inner, a, b, rows, scale = ctx.saved_tensors
        g = grad_out[rows] * scale  # [p, d_out]
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        # every component with kept pairs is written whole below: zero only the others
        unused = [c for c, count in enumerate(ctx.counts) if not count]
        grad_a = _zeros_at(torch.empty_like(a), unused) if need_a else None
        grad_b = _zeros_at(torch.empty_like(b), unused) if need_b else None
        grad_xs = torch.empty_like(xs) if need_x else None
        with single_threaded():
            for c, seg in _segments(ctx.counts):
                gs, zs = g[seg], inner[seg]
                if ctx.transposed:  # out = (x B_c^T) A_c^T
                    gz = gs @ a[c]
                    if need_a:
                        torch.mm(gs.T, zs, out=grad_a[c])
                    if need_b:
                        torch.mm(gz.T, xs[seg], out=grad_b[c])
                    if need_x:
                        torch.mm(gz, b[c], out=grad_xs[seg])
                else:  # out = (x A_c) B_c
                    gz = gs @ b[c].T
                    if need_b:
                        torch.mm(zs.T, gs, out=grad_b[c])
                    if need_a:
                        torch.mm(xs[seg].T, gz, out=grad_a[c])
                    if need_x:
                        torch.mm(gz, a[c].T, out=grad_xs[seg])
        grad_x = None
        if need_x:
            grad_x = grad_xs.new_zeros(ctx.n, xs.shape[1]).index_add_(0, rows, grad_xs)
        return grad_x, grad_a, grad_b, None, None, None, None


class _PaddedMaskedMatmul(torch.autograd.Function):
    """The same product with each component's kept pairs padded to a common count: one batched
    matmul pair forward and three backward instead of a loop over components (see
    :func:`sparse_masked_matmul` for when)."""

    @staticmethod
    def forward(ctx, x, a, b, rows, scale, slots, n_slots, transposed):
        """slots [p]: the pair's row in the padded ``[C * n_slots]`` layout."""
        n_comp = a.shape[0]
        left, right = (b.transpose(1, 2), a.transpose(1, 2)) if transposed else (a, b)
        xp = x.new_zeros(n_comp * n_slots, x.shape[1])
        xp[slots] = x[rows]
        xp = xp.view(n_comp, n_slots, -1)
        inner = torch.bmm(xp, left)  # [C, slots, m]
        pieces = torch.bmm(inner, right).view(n_comp * n_slots, -1)[slots]
        ctx.save_for_backward(xp, inner, a, b, rows, scale, slots)
        ctx.n, ctx.transposed = x.shape[0], transposed
        return x.new_zeros(x.shape[0], pieces.shape[1]).index_add_(0, rows, pieces * scale)

    @staticmethod
    def backward(ctx, grad_out):
        xp, inner, a, b, rows, scale, slots = ctx.saved_tensors
        n_comp, n_slots = inner.shape[:2]
        gp = grad_out.new_zeros(n_comp * n_slots, grad_out.shape[1])
        gp[slots] = grad_out[rows] * scale
        gp = gp.view(n_comp, n_slots, -1)  # padded slots stay zero: they add nothing below
        left, right = (b.transpose(1, 2), a.transpose(1, 2)) if ctx.transposed else (a, b)
        g_inner = torch.bmm(gp, right.transpose(1, 2))  # [C, slots, m]
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        grad_left = torch.bmm(xp.transpose(1, 2), g_inner) if (need_b if ctx.transposed else need_a) else None
        grad_right = torch.bmm(inner.transpose(1, 2), gp) if (need_a if ctx.transposed else need_b) else None
        if ctx.transposed:
            grad_a = None if grad_right is None else grad_right.transpose(1, 2)
            grad_b = None if grad_left is None else grad_left.transpose(1, 2)
        else:
            grad_a, grad_b = grad_left, grad_right
        grad_x = None
        if need_x:
            per_pair = torch.bmm(g_inner, left.transpose(1, 2)).view(n_comp * n_slots, -1)[slots]
            grad_x = per_pair.new_zeros(ctx.n, per_pair.shape[1]).index_add_(0, rows, per_pair)
        return grad_x, grad_a, grad_b, None, None, None, None, None


PADDED_MAX_WASTE = 4.0
"""The padded layout is used when it computes at most this many times the kept pairs' work..."""
PADDED_FREE_WORK = 2**24
"""...or when its whole work is below this many multiply-adds anyway."""


def sparse_masked_matmul(
    x: Float[Tensor, "n d"],
    a: Float[Tensor, "C d_in m"],
    b: Float[Tensor, "C m d_out"],
    mask: Float[Tensor, "n C"],
    transposed: bool,
) -> Float[Tensor, "n d_o"]:
    """``sum_c mask[n, c] * (x[n] @ a[c] @ b[c])`` (transposed: ``x[n] @ b[c]^T @ a[c]^T``) over kept pairs only.

    The kept pairs are grouped by component. When the groups are about equally large, or small
    altogether, they are padded to the largest and run as batched matmuls; otherwise as one
    small matmul pair per component.
    """
    rows, comps = mask.nonzero(as_tuple=True)
    order = comps.argsort(stable=True)
    rows, comps = rows[order], comps[order]
    scale = mask[rows, comps].to(x.dtype)[:, None]
    counts = torch.bincount(comps, minlength=a.shape[0])
    n_slots = int(counts.max()) if rows.numel() else 0
    n_comp, d_in, m = a.shape
    row_work = m * (d_in + b.shape[2])
    padded = n_comp * n_slots
    if rows.numel() and (padded <= PADDED_MAX_WASTE * rows.numel() or padded * row_work <= PADDED_FREE_WORK):
        starts = torch.cumsum(counts, 0) - counts
        slots = comps * n_slots + torch.arange(rows.numel(), device=rows.device) - starts[comps]
        return _PaddedMaskedMatmul.apply(x, a, b, rows, scale, slots, n_slots, transposed)
    return _SparseMaskedMatmul.apply(x, a, b, rows, scale, counts.tolist(), transposed)
