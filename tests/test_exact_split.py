"""With all components on and sum_c P_c = W exactly (an SVD split), the component model is the target."""

from __future__ import annotations

import pytest
import torch

from apd_lens import APDConfig
from apd_lens.methods.apd.decomposition import Decomposition
from apd_lens.models.tms import TMS
from tests.toy_models import TwoLayerMLP, two_layer_specs


def row_split(dec: Decomposition) -> None:
    """Component c of every weight is row c of its matrix (rank 1, exact in any precision)."""
    for name, matrix in dec.target_matrices().items():
        comp = dec.components[name]
        A = torch.zeros_like(comp.A)
        B = torch.zeros_like(comp.B)
        r = min(matrix.shape[0], comp.n_components)
        A[torch.arange(r), torch.arange(r), 0] = 1.0
        B[:r, 0, :] = matrix[:r]
        comp.set_from_matrices(A, B)


def svd_split(dec: Decomposition) -> None:
    """Set component c of every weight to the c-th singular triple (rank 1), zero beyond the rank."""
    for name, matrix in dec.target_matrices().items():
        comp = dec.components[name]
        U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
        A = torch.zeros_like(comp.A)
        B = torch.zeros_like(comp.B)
        r = min(S.shape[0], comp.n_components)
        A[:r, :, 0] = (U[:, :r] * S[:r]).T
        B[:r, 0, :] = Vh[:r]
        comp.set_from_matrices(A, B)


@pytest.mark.parametrize("split,dtype", [(row_split, torch.float32), (svd_split, torch.float64)])
@pytest.mark.parametrize("kind", ["tms", "mlp"])
def test_all_on_exact_split_equals_target(kind, split, dtype):
    if kind == "tms":
        model, specs = TMS(20, 5, seed=3), None
        with torch.no_grad():
            model.b_final.uniform_(-0.2, 0.1)
        x = torch.rand(64, 20)
    else:
        model, specs = TwoLayerMLP(d_in=8, d_hidden=12, d_out=5, seed=4), two_layer_specs()
        x = torch.randn(64, 8)
    model, x = model.to(dtype), x.to(dtype)
    dec = Decomposition(model, specs or model.apd_weight_specs(), APDConfig(n_components=20, rank=1))
    split(dec)
    with torch.no_grad():
        target = model(x)
        ones = torch.ones(64, 20, dtype=dtype)
        got_ones = dec.forward_with_mask(x, ones).output
        got_default = dec(x)
    assert (got_ones - target).abs().max() < 1e-6
    assert (got_default - target).abs().max() < 1e-6
    # and a mask that drops a non-zero component changes the output: the test can fail
    drop = ones.clone()
    drop[:, 0] = 0
    assert (dec.forward_with_mask(x, drop).output - target).abs().max() > 1e-3


def test_component_weights_sum_to_target_after_split():
    model = TMS(6, 3, seed=0)
    dec = Decomposition(model, model.apd_weight_specs(), APDConfig(n_components=3, rank=1))
    svd_split(dec)
    torch.testing.assert_close(dec.component_weights()["W"].sum(0), model.W.detach(), rtol=1e-5, atol=1e-6)
