"""The engine against slow, obvious references: per-output autograd loops and per-example
forwards with the summed masked weights substituted via torch.func.functional_call."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call

from apd_lens import APDConfig
from apd_lens.methods.apd.decomposition import Decomposition
from apd_lens.methods.apd.masks import batch_topk_mask, per_example_topk_mask
from tests.toy_models import TwoLayerMLP, tms_with_bias, two_layer_specs


@pytest.fixture(autouse=True)
def _float64(float64):
    """Brute-force comparisons run in float64 so that 1e-5 relative is far above rounding."""


def make(kind: str, source: str = "target", **cfg):
    torch.manual_seed(0)
    if kind == "tms":
        model, specs, x = tms_with_bias()
    else:
        model = TwoLayerMLP().double()
        specs = two_layer_specs()
        x = torch.randn(7, 4)
    config = APDConfig(n_components=4, rank=2, topk=1.5, attribution_source=source, **cfg)
    dec = Decomposition(model, specs, config)
    return dec, x


def summed_masked_params(dec: Decomposition, mask_row: torch.Tensor) -> dict[str, torch.Tensor]:
    """{weight name: sum_c mask_row[c] P_c} in the parameter's own shape."""
    return {name: torch.einsum("c,c...->...", mask_row, comps) for name, comps in dec.component_weights().items()}


def brute_attributions(dec: Decomposition, x: torch.Tensor, source: str) -> torch.Tensor:
    """attr[n, c] = sum_o (sum_l <df_o(x_n)/dW_l, P_{c,l}>)^2, one backward per (example, output)."""
    model = dec.model
    comps = dec.component_weights()
    base = {name: p.detach() for name, p in model.named_parameters()}
    if source == "components":
        base.update({name: c.sum(0) for name, c in comps.items()})
    out = torch.zeros(x.shape[0], dec.n_components)
    for n in range(x.shape[0]):
        params = {k: v.clone().requires_grad_(k in comps) for k, v in base.items()}
        f = functional_call(model, params, (x[n : n + 1],))[0]
        for o in range(f.shape[0]):
            grads = torch.autograd.grad(f[o], [params[k] for k in comps], retain_graph=True)
            inner = sum((g[None] * comps[k]).flatten(1).sum(1) for g, k in zip(grads, comps, strict=True))
            out[n] += inner.square()
    return out


@pytest.mark.parametrize("kind", ["tms", "mlp"])
@pytest.mark.parametrize(
    "source,backend", [("target", "vmap"), ("target", "batched"), ("target", "jvp"), ("components", "auto")]
)
@pytest.mark.parametrize("zero_rows", [False, True])
def test_gradient_attributions_match_per_output_loop(kind, source, backend, zero_rows):
    dec, x = make(kind, source, attribution_backend=backend)
    if zero_rows:  # examples with no active feature: their inner activations are skipped (all zero)
        x[[0, 3, 4]] = 0
    got = dec.attributions(x)
    want = brute_attributions(dec, x, source)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize("width", [3, 20])  # one wide matmul below FLAT_MAX_WIDTH, a batched one above
def test_per_component_matmul_equals_a_loop_over_components(width):
    from apd_lens.methods.apd.components import FLAT_MAX_WIDTH, per_component_matmul

    assert (width < FLAT_MAX_WIDTH) == (width == 3)
    g = torch.Generator().manual_seed(0)
    x, mats = torch.randn(9, 7, generator=g), torch.randn(5, 7, width, generator=g)
    want = torch.stack([x @ mats[c] for c in range(5)], dim=1)
    torch.testing.assert_close(per_component_matmul(x, mats), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["tms", "mlp"])
def test_activation_attributions_match_direct_sum(kind):
    dec, x = make(kind, attribution="activation")
    got = dec.attributions(x)
    comps = dec.component_weights()
    # the entering activations of each use, computed by hand
    if kind == "tms":
        W = dec.model.W.detach()
        hidden = x @ W
        want = sum(
            ((x @ comps["W"][c]).square().sum(-1) + (hidden @ comps["W"][c].T).square().sum(-1))[:, None]
            * torch.eye(dec.n_components)[c]
            for c in range(dec.n_components)
        )
    else:
        m = dec.model
        post = torch.tanh(x @ m.W1 + m.b1) * (x @ m.W1 + m.b1)
        want = torch.stack(
            [
                (x @ comps["W1"][c]).square().sum(-1) + (post @ comps["W2"][c]).square().sum(-1)
                for c in range(dec.n_components)
            ],
            dim=-1,
        )
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-10)


def test_batch_topk_keeps_largest_over_whole_batch():
    scores = torch.rand(9, 5)
    mask = batch_topk_mask(scores, k=1.7)
    n_keep = int(1.7 * 9)
    threshold = scores.flatten().sort(descending=True).values[n_keep - 1]
    torch.testing.assert_close(mask, (scores >= threshold).double())
    assert mask.sum() == n_keep


def test_per_example_topk():
    scores = torch.rand(6, 5)
    mask = per_example_topk_mask(scores, 2)
    for n in range(6):
        order = scores[n].argsort(descending=True)
        assert set(mask[n].nonzero().flatten().tolist()) == set(order[:2].tolist())


@pytest.mark.parametrize("kind", ["tms", "mlp"])
def test_masked_forward_matches_functional_call(kind):
    dec, x = make(kind)
    mask = (torch.rand(x.shape[0], dec.n_components) < 0.5).double()
    got = dec.forward_with_mask(x, mask).output
    params = {k: v.detach() for k, v in dec.model.named_parameters()}
    for n in range(x.shape[0]):
        want = functional_call(dec.model, {**params, **summed_masked_params(dec, mask[n])}, (x[n : n + 1],))
        torch.testing.assert_close(got[n : n + 1], want, rtol=1e-5, atol=1e-10)


def brute_losses(dec: Decomposition, x: torch.Tensor, act_hook: str | None):
    cfg = dec.config
    model = dec.model
    params = {k: v.detach() for k, v in model.named_parameters()}
    comps = dec.component_weights()
    attr = brute_attributions(dec, x, cfg.attribution_source)
    flat = attr.flatten()
    n_keep = int(cfg.topk * x.shape[0])
    mask = torch.zeros_like(flat)
    mask[flat.argsort(descending=True)[:n_keep]] = 1
    mask = mask.reshape(attr.shape)
    target_out, masked_out, target_act, masked_act = [], [], [], []
    for n in range(x.shape[0]):
        xn = x[n : n + 1]
        _, cache = model.run_with_cache(xn)
        target_out.append(model(xn))
        masked_params = {**params, **summed_masked_params(dec, mask[n])}
        masked_out.append(functional_call(model, masked_params, (xn,)))
        if act_hook:
            target_act.append(cache[act_hook])
            store = []
            model.hook_dict[act_hook].add_hook(lambda t, hook, store=store: store.append(t.detach()))
            functional_call(model, masked_params, (xn,))
            model.reset_hooks()
            masked_act.append(store[-1])
    target_out, masked_out = torch.cat(target_out), torch.cat(masked_out)
    n_params = sum(params[k].numel() for k in comps)
    faith = sum((params[k] - comps[k].sum(0)).square().sum() for k in comps) / n_params
    minimality = (masked_out - target_out).square().mean()
    simp = 0.0
    for n in range(x.shape[0]):
        for c in range(dec.n_components):
            if mask[n, c]:
                for comp in dec.components.values():
                    for m in range(comp.rank):
                        a = comp.A[c, :, m].detach().square().sum()
                        b = comp.B[c, m, :].detach().square().sum()
                        simp += (a * b) ** (cfg.schatten_p / 2)
    simp = simp / (n_params * x.shape[0])
    out = {"faithfulness": faith, "minimality": minimality, "simplicity": simp}
    if act_hook:
        ta, ma = torch.cat(target_act), torch.cat(masked_act)
        out["act_recon"] = (ta - ma).square().sum(-1).mean() / ta.shape[-1]
    return out


@pytest.mark.parametrize("kind,act_hook", [("tms", None), ("mlp", "hook_post"), ("tms", "hook_hidden")])
def test_losses_match_bruteforce(kind, act_hook):
    extra = {"act_recon_coeff": 0.5, "act_recon_hooks": (act_hook,)} if act_hook else {}
    dec, x = make(kind, schatten_p=0.9, simplicity_coeff=0.3, minimality_coeff=2.0, **extra)
    got = dec.losses(x)
    want = brute_losses(dec, x, act_hook)
    for term, value in want.items():
        torch.testing.assert_close(
            got[term].detach(), torch.as_tensor(value).detach(), rtol=1e-5, atol=1e-12, msg=f"loss term {term}"
        )
    total = 1.0 * want["faithfulness"] + 2.0 * want["minimality"] + 0.3 * want["simplicity"]
    if act_hook:
        total = total + 0.5 * want["act_recon"]
    torch.testing.assert_close(got["total"].detach(), torch.as_tensor(total).detach(), rtol=1e-5, atol=1e-12)


def test_losses_backpropagate_to_components_only():
    dec, x = make("mlp")
    dec.losses(x)["total"].backward()
    for comp in dec.components.values():
        assert comp.A.grad is not None and comp.A.grad.abs().sum() > 0
        assert comp.B.grad is not None and comp.B.grad.abs().sum() > 0
    assert all(p.grad is None for p in dec.model.parameters())


@pytest.mark.parametrize("kind", ["tms", "mlp"])
@pytest.mark.parametrize("sparse", [True, False])
def test_sparse_and_dense_masked_forward_match_functional_call(kind, sparse):
    """Both the sparse (active pairs only) and the dense masked paths equal the brute force, values
    and gradients, on a mask with non-binary entries and empty rows."""
    dec, x = make(kind)
    mask = (torch.rand(x.shape[0], dec.n_components) < 0.3).double() * torch.rand(x.shape[0], dec.n_components)
    mask[0] = 0
    rec = dec.hooked_pass(x, replace=dec._replacement(mask, sparse=sparse))
    params = {k: v.detach() for k, v in dec.model.named_parameters()}
    want = torch.cat(
        [
            functional_call(dec.model, {**params, **summed_masked_params(dec, mask[n])}, (x[n : n + 1],))
            for n in range(x.shape[0])
        ]
    )
    torch.testing.assert_close(rec.output, want, rtol=1e-5, atol=1e-10)
    grads = torch.autograd.grad(rec.output.square().sum(), dec.component_parameters())
    dense = dec.hooked_pass(x, replace=dec._replacement(mask, sparse=not sparse))
    ref = torch.autograd.grad(dense.output.square().sum(), dec.component_parameters())
    for g, r in zip(grads, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-10)


def test_normalize_A_divides_every_column_by_its_norm_over_d_in():
    from apd_lens.methods.apd.components import ComponentWeight

    comp = ComponentWeight(3, 5, 4, 2, generator=torch.Generator().manual_seed(0)).double()
    with torch.no_grad():
        comp.A[1, :, 0] = 0.0  # a zero column stays zero (no division by zero)
    before = comp.A.detach().clone()
    comp.normalize_A()
    for c in range(3):
        for m in range(2):
            norm = math.sqrt(sum(float(before[c, i, m]) ** 2 for i in range(5)))
            want = before[c, :, m] / norm if norm > 0 else before[c, :, m]
            torch.testing.assert_close(comp.A[c, :, m], want)
