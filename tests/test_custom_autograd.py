"""The hand-written backward passes (sparse masked matmul, faithfulness + simplicity) against finite
differences (torch.autograd.gradcheck, float64) and against plain autograd of the obvious formula."""

from __future__ import annotations

import pytest
import torch

import apd_lens.methods.apd.sparse_masked as sparse_masked
from apd_lens.methods.apd.losses import _ParameterLosses
from apd_lens.methods.apd.sparse_masked import sparse_masked_matmul


@pytest.fixture(params=["padded", "per-component"])
def layout(request, monkeypatch):
    """Run a test with the kept pairs padded into batched matmuls, then with one matmul pair per component."""
    padded = request.param == "padded"
    monkeypatch.setattr(sparse_masked, "PADDED_MAX_WASTE", float("inf") if padded else 0.0)
    monkeypatch.setattr(sparse_masked, "PADDED_FREE_WORK", float("inf") if padded else 0.0)
    return request.param


def _inputs(transposed: bool):
    g = torch.Generator().manual_seed(0)
    C, d_in, m, d_out, n = 4, 5, 2, 3, 6
    a = torch.randn(C, d_in, m, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(C, m, d_out, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(n, d_out if transposed else d_in, generator=g, dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(n, C, generator=g) < 0.4).double() * torch.rand(n, C, generator=g, dtype=torch.float64)
    mask[1] = 0  # a data point with no component
    mask[:, 2] = 0  # a component no data point keeps
    return x, a, b, mask


@pytest.mark.parametrize("transposed", [False, True])
def test_sparse_masked_matmul_gradcheck(transposed, layout):
    x, a, b, mask = _inputs(transposed)
    assert torch.autograd.gradcheck(lambda x, a, b: sparse_masked_matmul(x, a, b, mask, transposed), (x, a, b))


@pytest.mark.parametrize("transposed", [False, True])
def test_sparse_masked_matmul_equals_the_sum_over_components(transposed, layout):
    x, a, b, mask = _inputs(transposed)
    p = a @ b
    if transposed:
        p = p.transpose(1, 2)
    want = torch.einsum("nc,nd,cde->ne", mask, x, p)
    got = sparse_masked_matmul(x, a, b, mask, transposed)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    up = torch.randn_like(want)
    grads = torch.autograd.grad((got * up).sum(), (x, a, b))
    ref = torch.autograd.grad((want * up).sum(), (x, a, b))
    for g, r in zip(grads, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


def _plain_parameter_losses(w, a, b, counts, p):
    """The obvious formulas, by plain autograd: squared residual and the count-weighted Schatten proxy."""
    faith = (w - sum(a[c] @ b[c] for c in range(a.shape[0]))).square().sum()
    simp = sum(
        counts[c] * ((a[c, :, m].square().sum() * b[c, m, :].square().sum() + 1e-16) ** (p / 2))
        for c in range(a.shape[0])
        for m in range(a.shape[2])
    )
    return torch.stack([faith, simp])


@pytest.mark.parametrize("p", [0.9, 1.0])
def test_parameter_losses_gradcheck_and_equal_to_the_plain_formulas(p):
    _, a, b, mask = _inputs(False)
    w = torch.randn(a.shape[1], b.shape[2], dtype=torch.float64)
    counts = mask.sum(0).requires_grad_(True)  # includes a zero count (component 2)
    assert torch.autograd.gradcheck(lambda a, b, k: _ParameterLosses.apply(w, a, b, k, p), (a, b, counts))
    got = _ParameterLosses.apply(w, a, b, counts, p)
    want = _plain_parameter_losses(w, a, b, counts, p)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    up = torch.tensor([0.7, -1.3], dtype=torch.float64)
    grads = torch.autograd.grad((got * up).sum(), (a, b, counts))
    ref = torch.autograd.grad((want * up).sum(), (a, b, counts))
    for g, r in zip(grads, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    faith_only = _ParameterLosses.apply(w, a, b, None, p)
    torch.testing.assert_close(faith_only, torch.stack([want[0], torch.zeros_like(want[0])]))
    assert torch.autograd.gradcheck(lambda a, b: _ParameterLosses.apply(w, a, b, None, p)[0], (a, b))
