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
        grad_a = torch.zeros_like(a) if need_a else None
        grad_b = torch.zeros_like(b) if need_b else None
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


def sparse_masked_matmul(
    x: Float[Tensor, "n d"],
    a: Float[Tensor, "C d_in m"],
    b: Float[Tensor, "C m d_out"],
    mask: Float[Tensor, "n C"],
    transposed: bool,
) -> Float[Tensor, "n d_o"]:
    """``sum_c mask[n, c] * (x[n] @ a[c] @ b[c])`` (transposed: ``x[n] @ b[c]^T @ a[c]^T``) over kept pairs only."""
    rows, comps = mask.nonzero(as_tuple=True)
    order = comps.argsort(stable=True)
    rows, comps = rows[order], comps[order]
    scale = mask[rows, comps].to(x.dtype)[:, None]
    counts = torch.bincount(comps, minlength=a.shape[0]).tolist()
    return _SparseMaskedMatmul.apply(x, a, b, rows, scale, counts, transposed)
