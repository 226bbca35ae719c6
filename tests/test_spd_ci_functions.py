"""The causal-importance functions against explicit loops: the fused per-subcomponent MLP (values and
gradients, over several slices), the vector and shared MLPs, inside a decomposition."""

from __future__ import annotations

import math

import pytest
import torch

import apd_lens.methods.spd.causal_importance as ci_module
from apd_lens import SPDConfig, SPDDecomposition
from apd_lens.methods.spd.causal_importance import ScalarMLPCI, make_ci_fn
from tests.toy_models import TwoLayerMLP, two_layer_specs


@pytest.fixture(autouse=True)
def _float64(float64):
    """float64 so that 1e-6 relative is far above rounding."""


def gelu(a):
    return 0.5 * a * (1 + math.erf(a / math.sqrt(2)))


@pytest.mark.parametrize("chunk", [2**20, 40])  # one slice, and slices of 40 // (5 * 4) = 2 rows
def test_scalar_mlp_values_and_gradients_match_a_loop(chunk, monkeypatch):
    monkeypatch.setattr(ci_module, "CHUNK_ELEMENTS", chunk)
    torch.manual_seed(0)
    fn = ScalarMLPCI(5, 3, 4)
    with torch.no_grad():
        fn.b_in.normal_()
        fn.b_out.normal_()
    h = torch.randn(7, 5, requires_grad=True)
    out = fn(h)
    w_in, b_in, w_out, b_out = (t.detach() for t in (fn.w_in, fn.b_in, fn.w_out, fn.b_out))
    for n in range(7):
        for c in range(5):
            want = b_out[c] + sum(
                w_out[c, j] * gelu(float(h.detach()[n, c] * w_in[c, j] + b_in[c, j])) for j in range(4)
            )
            assert float(out.detach()[n, c]) == pytest.approx(float(want), rel=1e-9, abs=1e-12)
    weights = torch.randn(7, 5)
    params = [h, fn.w_in, fn.b_in, fn.w_out, fn.b_out]
    got = torch.autograd.grad((out * weights).sum(), params)
    ref_out = ci_module.scalar_mlp_reference(h, fn.w_in, fn.b_in, fn.w_out, fn.b_out)
    want = torch.autograd.grad((ref_out * weights).sum(), params)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    inputs = tuple(p.detach().clone().requires_grad_() for p in params)
    assert torch.autograd.gradcheck(ci_module._ScalarMLPFunction.apply, inputs)


def vector_ci_by_loops(fn, kind: str, a: torch.Tensor) -> torch.Tensor:
    """The vector-input CI MLP (``vector_mlp``: one hidden layer per subcomponent; ``shared_mlp``: one hidden
    layer for all) on every row of ``a`` [n, d], by loops over rows, subcomponents and hidden units."""
    n_rows, d_in = a.shape
    n_sub, hidden = fn.b_out.shape[0], fn.w_out.shape[1] if kind == "vector_mlp" else fn.w_out.shape[0]
    out = torch.zeros(n_rows, n_sub)
    for n in range(n_rows):
        for c in range(n_sub):
            if kind == "vector_mlp":
                h = [
                    gelu(float(sum(a[n, d] * fn.w_in[d, c, j] for d in range(d_in)) + fn.b_in[c, j]))
                    for j in range(hidden)
                ]
                out[n, c] = fn.b_out[c] + sum(fn.w_out[c, j] * h[j] for j in range(hidden))
            else:
                h = [gelu(float(sum(a[n, d] * fn.w_in[d, j] for d in range(d_in)) + fn.b_in[j])) for j in range(hidden)]
                out[n, c] = fn.b_out[c] + sum(h[j] * fn.w_out[j, c] for j in range(hidden))
    return out


@pytest.mark.parametrize("kind", ["vector_mlp", "shared_mlp"])
def test_vector_input_ci_functions_match_a_loop(kind):
    torch.manual_seed(1)
    fn = make_ci_fn(kind, 3, 4, 5)
    with torch.no_grad():
        fn.b_in.normal_()
        fn.b_out.normal_()
    a = torch.randn(6, 4)
    out = fn(a).detach()
    with torch.no_grad():
        torch.testing.assert_close(out, vector_ci_by_loops(fn, kind, a), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["vector_mlp", "shared_mlp"])
def test_decompositions_with_vector_input_ci_functions_read_the_entering_activation(kind):
    """Each weight's CI is its function, by loops, of the activation entering it, written out here: x for
    W1, tanh(pre) pre with pre = x W1 + b1 for W2; clamped to [0, 1]."""
    model = TwoLayerMLP().double()
    dec = SPDDecomposition(model, two_layer_specs(), SPDConfig(n_subcomponents=3, ci_fn=kind, ci_hidden=5))
    with torch.no_grad():  # CI values on both sides of 0 and 1
        for sub in dec.subcomponents.values():
            sub.ci_fns[0].b_out.copy_(torch.tensor([-0.3, 0.5, 1.4]))
    x = torch.randn(6, 4)
    ci = dec.causal_importances(x)
    with torch.no_grad():
        pre = x @ model.W1 + model.b1
        enters = {"W1": x, "W2": torch.tanh(pre) * pre}
        for site in dec.sites:
            want = vector_ci_by_loops(dec.subcomponents[site].ci_fns[0], kind, enters[site]).clamp(0, 1)
            torch.testing.assert_close(ci[site], want, rtol=1e-9, atol=1e-12)
    dec.losses(x)["total"].backward()
    assert all(p.grad is not None for p in dec.subcomponents["W2"].ci_fns[0].parameters())
