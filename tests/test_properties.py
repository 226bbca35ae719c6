"""Property tests (hypothesis) on masks and attributions."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call

from apd_lens import APDConfig
from apd_lens.methods.apd.decomposition import Decomposition
from apd_lens.methods.apd.masks import batch_topk_mask
from apd_lens.models.tms import TMS
from tests.toy_models import TwoLayerMLP, two_layer_specs


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 12), c=st.integers(1, 9), k_frac=st.floats(0.01, 1.0), seed=st.integers(0, 10_000))
def test_batch_topk_keeps_exactly_the_largest(n, c, k_frac, seed):
    scores = torch.rand(n, c, generator=torch.Generator().manual_seed(seed))
    k = k_frac * c
    mask = batch_topk_mask(scores, k)
    n_keep = int(k * n)
    assert int(mask.sum()) == n_keep
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    if 0 < n_keep < n * c:
        assert scores[mask.bool()].min() > scores[~mask.bool()].max()


def _dec(kind: str, seed: int, source: str = "target") -> tuple[Decomposition, torch.Tensor]:
    torch.manual_seed(seed)
    if kind == "tms":
        model = TMS(6, 3, seed=seed)
        specs = model.apd_weight_specs()
        x = torch.rand(5, 6)
    else:
        model, specs, x = TwoLayerMLP(seed=seed), two_layer_specs(), torch.randn(5, 4)
    return Decomposition(model, specs, APDConfig(n_components=5, rank=2, seed=seed, attribution_source=source)), x


@settings(max_examples=15, deadline=None)
@given(
    kind=st.sampled_from(["tms", "mlp"]), seed=st.integers(0, 1000), source=st.sampled_from(["target", "components"])
)
def test_attributions_permute_with_components(kind, seed, source):
    dec, x = _dec(kind, seed, source)
    before = dec.attributions(x)
    perm = torch.randperm(dec.n_components, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for comp in dec.components.values():
            comp.set_from_matrices(comp.A[perm].clone(), comp.B[perm].clone())
    after = dec.attributions(x)
    torch.testing.assert_close(after, before[:, perm], rtol=1e-4, atol=1e-7)


@settings(max_examples=15, deadline=None)
@given(kind=st.sampled_from(["tms", "mlp"]), seed=st.integers(0, 1000))
def test_all_zero_mask_is_the_bias_only_model(kind, seed):
    dec, x = _dec(kind, seed)
    with torch.no_grad():
        if kind == "tms":
            dec.model.b_final.uniform_(-0.5, 0.5)
        got = dec.forward_with_mask(x, torch.zeros(x.shape[0], dec.n_components)).output
        params = {k: v.detach() for k, v in dec.model.named_parameters()}
        zeroed = {**params, **{s.name: torch.zeros_like(params[s.name]) for s in dec.specs}}
        want = functional_call(dec.model, zeroed, (x,))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
