"""Gradient attributions on a transformer: exact mode against a brute-force JVP reference, and
random-probe estimates converging to the exact values as the number of probes k grows."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformer_lens.HookedTransformer")

from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402

from apd_lens import APDConfig, Decomposition  # noqa: E402
from apd_lens.adapters import specs_for_model  # noqa: E402
from tests.transformer_checks import _matrix_by_hand, randomize_  # noqa: E402

VOCAB = 11


@pytest.fixture(scope="module")
def setup():
    cfg = HookedTransformerConfig(
        n_layers=1, d_model=12, d_head=3, n_heads=4, d_mlp=16, d_vocab=VOCAB, n_ctx=6, act_fn="gelu",
        normalization_type="LNPre", device="cpu", seed=0,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = randomize_(HookedTransformer(cfg), scale=0.4).eval()
    specs = specs_for_model(model)
    decomp = Decomposition(model, specs, APDConfig(n_components=4, rank=2, progress=False, seed=3))
    x = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    return model, decomp, x


def brute_force_attributions(model, decomp, x) -> torch.Tensor:
    """attr[b, p, c] = || d logits[b] / dt ||^2 where every decomposed weight's output at token (b, p)
    is shifted by t * (its input at (b, p)) @ P_c — one JVP per (token, component)."""
    names = {s.uses[0].enter for s in decomp.specs}
    _, cache = model.run_with_cache(x, names_filter=lambda n: n in names)
    n_comp = decomp.n_components
    out = torch.zeros(*x.shape, n_comp)
    for b in range(x.shape[0]):
        for p in range(x.shape[1]):
            for c in range(n_comp):
                deltas = {}
                for spec in decomp.specs:
                    comp = decomp.components[spec.name]
                    matrix_c = (comp.A[c] @ comp.B[c]).detach()
                    assert _matrix_by_hand(model.get_parameter(spec.name), spec).shape == matrix_c.shape
                    deltas[spec.uses[0].leave] = cache[spec.uses[0].enter][b, p].reshape(-1) @ matrix_c

                def run(t, b=b, p=p, deltas=deltas):
                    def shift(act, hook):
                        act = act.clone()
                        act[b, p] = act[b, p] + t * deltas[hook.name].reshape(act.shape[2:])
                        return act

                    return model.run_with_hooks(x, fwd_hooks=[(n, shift) for n in deltas])[b]

                _, jv = torch.autograd.functional.jvp(run, torch.zeros(()), torch.ones(()))
                out[b, p, c] = jv.square().sum()
    return out


def test_exact_attributions_match_brute_force(setup):
    model, decomp, x = setup
    exact = decomp.attributions(x)
    reference = brute_force_attributions(model, decomp, x)
    assert exact.shape == reference.shape == (*x.shape, decomp.n_components)
    torch.testing.assert_close(exact, reference, rtol=1e-3, atol=1e-6)


def test_probe_attributions_converge_as_k_grows(setup):
    _, decomp, x = setup
    exact = decomp.attributions(x)
    ks = [2, 8, 32, 128, 512]
    errors = []
    for k in ks:
        decomp.config = decomp.config.replace(attribution_probes=k)
        errs = []
        for seed in range(4):
            estimate = decomp.attributions(x, generator=torch.Generator().manual_seed(seed))
            errs.append(((estimate - exact).norm() / exact.norm()).item())
        errors.append(sum(errs) / len(errs))
    decomp.config = decomp.config.replace(attribution_probes=None)
    # unbiased Monte-Carlo estimate: relative error ~ 1/sqrt(k)
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 0.35 * errors[1], errors  # k 8 -> 512: sqrt ratio 1/8
    assert errors[-1] < 0.1, errors
