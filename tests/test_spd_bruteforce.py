"""SPD against slow, obvious references: per-example forwards with the masked weight
``W'(x) = Σ_c m_c V[:, c] ⊗ U[c, :] (+ r_Δ (W - V U))`` substituted via torch.func.functional_call,
explicit loops for every loss term and for the causal-importance MLPs, and the sigmoids'
piecewise definitions."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.func import functional_call

import apd_lens.methods.spd.decomposition as spd_module
import apd_lens.methods.spd.losses as spd_losses
from apd_lens import SPDConfig, SPDDecomposition
from apd_lens.engine.spec import get_parameter
from apd_lens.methods.spd.sigmoids import lower_leaky_hard_sigmoid, upper_leaky_hard_sigmoid
from tests.toy_models import TwoLayerMLP, tms_with_bias, two_layer_specs
from tests.transformer_checks import masked_weight, randomize_


@pytest.fixture(autouse=True)
def _float64(float64):
    """Brute-force comparisons run in float64 so that 1e-5 relative is far above rounding."""


def make(kind: str, n_sub: int = 4, delta: bool = True, **cfg):
    torch.manual_seed(0)
    if kind == "tms":
        model, specs, x = tms_with_bias()
    elif kind == "mlp":
        model = TwoLayerMLP().double()
        specs = two_layer_specs()
        x = torch.randn(6, 4)
    else:
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        from apd_lens.adapters import specs_for_model

        cfg_t = dict(n_layers=2, d_model=8, d_head=4, n_heads=2, d_mlp=12, d_vocab=11, n_ctx=5, act_fn="gelu")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = HookedTransformer(
                HookedTransformerConfig(**cfg_t, normalization_type="LNPre", seed=0, dtype=torch.float64)
            )
        randomize_(model, seed=3)
        model.eval()
        specs = specs_for_model(model)
        x = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(2))
    config = SPDConfig(n_subcomponents=n_sub, use_delta_component=delta, **cfg)
    dec = SPDDecomposition(model, specs, config)
    with torch.no_grad():  # move V, U away from their init so that the delta term is not small
        for sub in dec.subcomponents.values():
            sub.U.mul_(1.7)
    return dec, x


def random_masks(dec: SPDDecomposition, batch_shape, tied_equal: bool, seed: int = 5):
    gen = torch.Generator().manual_seed(seed)
    masks, deltas = {}, {}
    for site in dec.sites:
        weight = site.split(":")[0]
        if tied_equal and site != weight:
            masks[site], deltas[site] = masks[weight], deltas[weight]
            continue
        masks[site] = torch.rand(*batch_shape, dec.n_subcomponents(site), generator=gen)
        deltas[site] = torch.rand(*batch_shape, generator=gen)
    return masks, deltas


def per_example(dec: SPDDecomposition, x: torch.Tensor, masks, deltas, index) -> torch.Tensor:
    """The model on example ``index`` with every weight at its masked W'(x) (all uses the same)."""
    params = {k: v.detach() for k, v in dec.model.named_parameters()}
    for spec in dec.specs:
        m = None if masks is None else masks[spec.name][index]
        r = 1.0 if deltas is None else deltas[spec.name][index]
        params[spec.name] = masked_weight(dec, spec.name, m, r)
    return functional_call(dec.model, params, (x[index][None],))[0]


@pytest.mark.parametrize("kind", ["tms", "mlp", "transformer"])
@pytest.mark.parametrize("delta", [True, False])
def test_masked_forward_matches_functional_call(kind, delta):
    """Per data point (per sequence for the transformer: its masks are the same at every position)."""
    dec, x = make(kind, delta=delta)
    batch_shape = tuple(x.shape[: dec.n_batch_dims(x)])
    masks, deltas = random_masks(dec, batch_shape[:1], tied_equal=True)
    if kind == "transformer":  # one mask per sequence, repeated over positions
        full = {k: v[:, None].expand(*batch_shape, -1) for k, v in masks.items()}
        full_delta = {k: v[:, None].expand(*batch_shape) for k, v in deltas.items()}
    else:
        full, full_delta = masks, deltas
    got = dec.forward_with_masks(x, full, delta_masks=full_delta).output
    want = torch.stack([per_example(dec, x, masks, deltas, n) for n in range(x.shape[0])])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)
    # no masks: every subcomponent on, the delta fully on
    got = dec.forward_with_masks(x).output
    want = torch.stack([per_example(dec, x, None, None, n) for n in range(x.shape[0])])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)


def test_transformer_masks_that_vary_over_positions():
    """Only the last W_out masked, per token: the output at (b, p) is the model on sequence b with W_out
    at token (b, p)'s masked weight, read at position p."""
    dec, x = make("transformer")
    name = "blocks.1.mlp.W_out"
    gen = torch.Generator().manual_seed(9)
    mask = torch.rand(*x.shape, dec.n_subcomponents(name), generator=gen)
    delta = torch.rand(*x.shape, generator=gen)
    got = dec.forward_with_masks(x, {name: mask}, delta_masks={name: delta}).output
    params = {k: v.detach() for k, v in dec.model.named_parameters()}
    for b in range(x.shape[0]):
        for p in range(x.shape[1]):
            params[name] = masked_weight(dec, name, mask[b, p], delta[b, p])
            want = functional_call(dec.model, params, (x[b][None],))[0, p]
            torch.testing.assert_close(got[b, p], want, rtol=1e-5, atol=1e-9)


def test_tied_weight_uses_have_their_own_masks():
    """TMS with different masks for W and Wᵀ: ReLU((x W'_0) W'_1ᵀ + b), each W' by loops."""
    dec, x = make("tms")
    masks, deltas = random_masks(dec, (x.shape[0],), tied_equal=False)
    got = dec.forward_with_masks(x, masks, delta_masks=deltas).output
    for n in range(x.shape[0]):
        w0 = masked_weight(dec, "W", masks["W"][n], deltas["W"][n])
        w1 = masked_weight(dec, "W", masks["W:use1"][n], deltas["W:use1"][n])
        want = torch.relu((x[n] @ w0) @ w1.T + dec.model.b_final)
        torch.testing.assert_close(got[n], want, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("kind", ["tms", "mlp"])
def test_ones_masks_with_an_exact_rank_one_split_give_the_target(kind):
    """V, U from each weight's SVD (one singular triplet per subcomponent, the rest zero): all-ones masks
    give the target's output, with and without the delta component."""
    for delta in (False, True):
        dec, x = make(kind, n_sub=7, delta=delta)
        with torch.no_grad():
            for name, sub in dec.subcomponents.items():
                u, s, vh = torch.linalg.svd(dec.target_matrices()[name], full_matrices=False)
                sub.V.zero_()
                sub.U.zero_()
                sub.V[:, : s.shape[0]] = u * s
                sub.U[: s.shape[0]] = vh
        ones = {site: torch.ones(x.shape[0], dec.n_subcomponents(site)) for site in dec.sites}
        got = dec.forward_with_masks(x, ones).output
        torch.testing.assert_close(got, dec.model(x), rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- losses by loops
def ci_by_loops(dec: SPDDecomposition, x: torch.Tensor):
    """Per site, per data point, per subcomponent: the scalar MLP with GELU written out, and both sigmoids."""
    record = dec.hooked_pass(x)
    lower, upper = {}, {}
    for site in dec.sites:
        weight, _, use = site.partition(":use")
        i = int(use) if use else 0
        sub = dec.subcomponents[weight]
        fn = sub.ci_fns[i]
        enter = record.enters[(weight, i)]
        read = sub.U.T if dec.specs_by_name[weight].uses[i].transposed else sub.V
        lo = torch.zeros(enter.shape[0], sub.n_subcomponents)
        up = torch.zeros_like(lo)
        for n in range(enter.shape[0]):
            for c in range(sub.n_subcomponents):
                h = sum(enter[n, d] * read[d, c] for d in range(enter.shape[1]))
                z = fn.b_out[c].clone()
                for j in range(fn.w_in.shape[1]):
                    a = h * fn.w_in[c, j] + fn.b_in[c, j]
                    z = z + 0.5 * a * (1 + torch.erf(a / math.sqrt(2))) * fn.w_out[c, j]
                lo[n, c] = z.clamp(0, 1)
                up[n, c] = 0 if z <= 0 else (z if z <= 1 else 1 + 0.01 * (z - 1))
        lower[site], upper[site] = lo, up
    return lower, upper


@pytest.mark.parametrize("kind", ["tms", "mlp"])
def test_causal_importances_match_loops(kind):
    dec, x = make(kind)
    with torch.no_grad():  # push some CI values outside [0, 1]
        for sub in dec.subcomponents.values():
            for fn in sub.ci_fns:
                fn.b_out.copy_(torch.linspace(-0.8, 1.6, fn.b_out.shape[0]))
    got = dec.causal_importances(x)
    lower, _ = ci_by_loops(dec, x)
    for site in dec.sites:
        torch.testing.assert_close(got[site], lower[site], rtol=1e-6, atol=1e-9)


def masked_outputs(dec, x, kind, masks_by_site, deltas_by_site, is_masked) -> torch.Tensor:
    """Output of each example n, one at a time, with site s at its masked weight where
    ``is_masked(n, s)`` and at the target's own weight elsewhere."""
    outs = []
    for n in range(x.shape[0]):
        weights = {}
        for site in dec.sites:
            weight, _, use = site.partition(":use")
            if not is_masked(n, site):
                weights[site] = None  # the target's own weight
            else:
                weights[site] = masked_weight(dec, weight, masks_by_site[site][n], deltas_by_site[site][n])
        if kind == "tms":
            w0 = dec.model.W if weights["W"] is None else weights["W"]
            w1 = dec.model.W if weights["W:use1"] is None else weights["W:use1"]
            outs.append(torch.relu((x[n] @ w0) @ w1.T + dec.model.b_final))
        else:
            params = {k: v.detach() for k, v in dec.model.named_parameters()}
            params.update({k: v for k, v in weights.items() if v is not None})
            outs.append(functional_call(dec.model, params, (x[n][None],))[0])
    return torch.stack(outs)


COEFFS = {
    "faithfulness": 0.37,
    "stochastic_recon": 1.9,
    "stochastic_recon_layerwise": 0.61,
    "importance_minimality": 0.013,
}
"""Distinct coefficients, none 1, for the terms every step has: a swapped coefficient changes the total."""
COEFF_CONFIG = {f"{term}_coeff": c for term, c in COEFFS.items()}


class Recorder:
    """Wraps a mask-sampling function and keeps what it returned."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kwargs):
        out = self.fn(*args, **kwargs)
        self.calls.append(out)
        return out


@pytest.mark.parametrize(
    ("kind", "samples", "sampling"),
    [("tms", 1, "continuous"), ("mlp", 2, "continuous"), ("tms", 2, "binomial"), ("mlp", 1, "binomial")],
)
def test_every_loss_term_matches_loops(kind, samples, sampling, monkeypatch):
    """faithfulness, stochastic recon (every weight masked), stochastic recon layerwise (one explicit
    forward per site, the others at the target) and importance minimality, from the masks the step drew,
    and the total with each term's own (distinct) coefficient; the masks are g + (1 - g) r with r
    uniform in [0, 1) or, with binomial sampling, 0 or 1."""
    dec, x = make(kind, n_mask_samples=samples, importance_p=1.5, sampling=sampling, **COEFF_CONFIG)
    masks_rec = Recorder(spd_module.stochastic_masks)
    delta_rec = Recorder(spd_module.delta_masks)
    monkeypatch.setattr(spd_module, "stochastic_masks", masks_rec)
    monkeypatch.setattr(spd_module, "delta_masks", delta_rec)
    terms = dec.losses(x, torch.Generator().manual_seed(0))
    assert len(masks_rec.calls) == samples
    target_out = dec.model(x).detach()
    targets = dec.target_matrices()

    n_params = sum(get_parameter(dec.model, s.name).numel() for s in dec.specs)
    faith = 0.0
    for name, w in targets.items():
        sub = dec.subcomponents[name]
        for i in range(w.shape[0]):
            for j in range(w.shape[1]):
                faith += (w[i, j] - sum(sub.V[i, c] * sub.U[c, j] for c in range(sub.n_subcomponents))) ** 2
    torch.testing.assert_close(terms["faithfulness"], faith / n_params, rtol=1e-6, atol=0)

    def run(masks_by_site, deltas_by_site, only=None):
        return masked_outputs(dec, x, kind, masks_by_site, deltas_by_site, lambda n, site: only in (None, site))

    recon, layerwise = [], []
    for masks, deltas in zip(masks_rec.calls, delta_rec.calls, strict=True):
        by_site = {dec.sites[dec.site_keys.index(k)]: m for k, m in masks.items()}
        d_by_site = {dec.sites[dec.site_keys.index(k)]: m for k, m in deltas.items()}
        recon.append((run(by_site, d_by_site) - target_out).square().mean())
        for site in dec.sites:
            layerwise.append((run(by_site, d_by_site, only=site) - target_out).square().mean())
    torch.testing.assert_close(terms["stochastic_recon"], sum(recon) / len(recon), rtol=1e-6, atol=0)
    torch.testing.assert_close(terms["stochastic_recon_layerwise"], sum(layerwise) / len(layerwise), rtol=1e-6, atol=0)

    _, upper = ci_by_loops(dec, x)
    importance = 0.0
    for site in dec.sites:
        for c in range(upper[site].shape[1]):
            importance += sum((upper[site][n, c] + 1e-12) ** 1.5 for n in range(x.shape[0])) / x.shape[0]
    torch.testing.assert_close(terms["importance_minimality"], importance, rtol=1e-6, atol=0)
    want_total = (
        0.37 * faith / n_params
        + 1.9 * sum(recon) / len(recon)
        + 0.61 * sum(layerwise) / len(layerwise)
        + 0.013 * importance
    )
    torch.testing.assert_close(terms["total"], want_total, rtol=1e-6, atol=0)
    # the masks are g + (1 - g) r: never below the CI, never above 1; binomial: r is 0 or 1, each about half
    lower, _ = ci_by_loops(dec, x)
    sources = []
    for k, m in masks_rec.calls[0].items():
        g = lower[dec.sites[dec.site_keys.index(k)]].detach()
        assert bool((m >= g - 1e-12).all()) and bool((m <= 1).all())
        free = g < 1 - 1e-6
        sources.append(((m.detach() - g) / (1 - g))[free])
    r = torch.cat(sources)
    if sampling == "binomial":
        assert bool(((r.abs() < 1e-9) | ((r - 1).abs() < 1e-9)).all())
        assert 0.3 < float((r > 0.5).double().mean()) < 0.7
    else:
        assert float(((r > 1e-6) & (r < 1 - 1e-6)).double().mean()) > 0.95


def assert_total_with(terms: dict, **extra: float) -> None:
    """``total`` is the terms every step has, each times its COEFFS weight, plus each of ``extra``
    (term name -> its weight)."""
    want = sum(c * terms[term] for term, c in COEFFS.items())
    for name, weight in extra.items():
        want = want + weight * terms[name]
    torch.testing.assert_close(terms["total"], want)


@pytest.mark.parametrize("kind", ["tms", "mlp"])
def test_subset_recon_matches_loops(kind, monkeypatch):
    """stochastic_recon_subset: per example, the weights its route picked at their masked weight (a tied
    weight's uses together), the others at the target's; and the routes' subset sizes are 1..n_weights."""
    dec, x = make(kind, n_mask_samples=2, stochastic_recon_subset_coeff=0.5, **COEFF_CONFIG)
    masks_rec = Recorder(spd_module.stochastic_masks)
    delta_rec = Recorder(spd_module.delta_masks)
    route_rec = Recorder(spd_module.subset_routes)
    for name, rec in (("stochastic_masks", masks_rec), ("delta_masks", delta_rec), ("subset_routes", route_rec)):
        monkeypatch.setattr(spd_module, name, rec)
    terms = dec.losses(x, torch.Generator().manual_seed(3))
    target_out = dec.model(x).detach()
    losses = []
    for masks, deltas, route in zip(masks_rec.calls, delta_rec.calls, route_rec.calls, strict=True):
        by_site = {dec.sites[dec.site_keys.index(k)]: m for k, m in masks.items()}
        d_by_site = {dec.sites[dec.site_keys.index(k)]: m for k, m in deltas.items()}
        routed = lambda n, site, route=route: bool(route[site.partition(":use")[0]][n])  # noqa: E731
        losses.append((masked_outputs(dec, x, kind, by_site, d_by_site, routed) - target_out).square().mean())
        sizes = sum(r.long() for r in route.values())
        assert set(route) == {s.name for s in dec.specs}
        assert int(sizes.min()) >= 1 and int(sizes.max()) <= len(route)
    torch.testing.assert_close(terms["stochastic_recon_subset"], sum(losses) / len(losses), rtol=1e-6, atol=0)
    assert_total_with(terms, stochastic_recon_subset=0.5)


@pytest.mark.parametrize("kind", ["tms", "mlp"])
@pytest.mark.parametrize("scope", ["shared", "per_point"])
def test_pgd_recon_matches_loops(kind, scope, monkeypatch):
    """pgd_recon: from the step's initial sources, 3 signed-gradient ascent steps (clipped to [0, 1]) on
    the MSE of the per-example masked model (masks g + (1 - g) s, delta times its source), then its MSE."""
    steps, size = 3, 0.3
    dec, x = make(kind, pgd_recon_coeff=0.7, pgd_steps=steps, pgd_step_size=size, pgd_scope=scope, **COEFF_CONFIG)
    init_rec = Recorder(spd_module.pgd_sources)
    monkeypatch.setattr(spd_module, "pgd_sources", init_rec)
    terms = dec.losses(x, torch.Generator().manual_seed(4))
    (sources,) = init_rec.calls
    n = x.shape[0]
    rows = 1 if scope == "shared" else n
    src = {(part, dec.sites[dec.site_keys.index(k)]): s.clone() for (part, k), s in sources.items()}
    assert {s.shape[0] for s in src.values()} == {rows}
    assert all(bool(((s >= 0) & (s <= 1)).all()) for s in src.values())
    lower, _ = ci_by_loops(dec, x)
    target_out = dec.model(x).detach()

    def mse(src):
        masks = {site: lower[site] + (1 - lower[site]) * src[("ci", site)].expand(n, -1) for site in dec.sites}
        deltas = {site: src[("delta", site)].expand(n) for site in dec.sites}
        return (masked_outputs(dec, x, kind, masks, deltas, lambda n, site: True) - target_out).square().mean()

    start = mse(src)
    for _ in range(steps):
        leaves = {k: v.detach().requires_grad_(True) for k, v in src.items()}
        grads = torch.autograd.grad(mse(leaves), list(leaves.values()))
        src = {k: (leaves[k].detach() + size * g.sign()).clamp(0, 1) for k, g in zip(leaves, grads, strict=True)}
    want = mse(src)
    torch.testing.assert_close(terms["pgd_recon"], want, rtol=1e-6, atol=0)
    assert want > start  # the ascent found worse masks than its starting point
    assert_total_with(terms, pgd_recon=0.7)


def test_pgd_sources_at_ones_give_the_target_and_at_zeros_the_ci_masked_model():
    """No ascent steps: sources 1 mean every subcomponent and the delta fully on (the target's output
    exactly); sources 0 mean the CI as masks and no delta."""
    dec, x = make("mlp", pgd_recon_coeff=1.0, pgd_steps=0, pgd_init="ones")
    assert float(dec.losses(x)["pgd_recon"].detach()) < 1e-24
    dec, x = make("mlp", pgd_recon_coeff=1.0, pgd_steps=0, pgd_init="zeros")
    lower, _ = ci_by_loops(dec, x)
    zeros = {site: torch.zeros(x.shape[0]) for site in dec.sites}
    want = (masked_outputs(dec, x, "mlp", lower, zeros, lambda n, site: True) - dec.model(x)).square().mean()
    torch.testing.assert_close(dec.losses(x)["pgd_recon"], want, rtol=1e-6, atol=0)


def test_subset_routes_draw_uniform_subset_sizes():
    """k is uniform on 1..n and, given k, every weight is equally likely to be in the subset."""
    names = ["a", "b", "c", "d"]
    route = spd_losses.subset_routes(names, 40_000, torch.zeros(1), torch.Generator().manual_seed(0))
    sizes = sum(r.long() for r in route.values())
    counts = torch.bincount(sizes, minlength=5)[1:].double() / 40_000
    torch.testing.assert_close(counts, torch.full((4,), 0.25, dtype=torch.float64), atol=0.01, rtol=0)
    share = torch.stack([r.double().mean() for r in route.values()])  # E[k] / n = 2.5 / 4
    torch.testing.assert_close(share, torch.full((4,), 0.625, dtype=torch.float64), atol=0.01, rtol=0)


@pytest.mark.parametrize("kind", ["tms", "mlp"])
def test_importance_frequency_term_matches_loops(kind):
    """importance_beta: each subcomponent's mean (g + eps)^p times 1 + beta log2(1 + its batch sum)."""
    beta, p = 0.7, 1.5
    dec, x = make(kind, importance_p=p, importance_beta=beta)
    with torch.no_grad():  # CI away from 0 so that the term is not trivially small
        for sub in dec.subcomponents.values():
            for fn in sub.ci_fns:
                fn.b_out.copy_(torch.linspace(0.2, 1.2, fn.b_out.shape[0]))
    terms = dec.losses(x, torch.Generator().manual_seed(0))
    _, upper = ci_by_loops(dec, x)
    upper = {site: u.detach() for site, u in upper.items()}
    plain, with_beta = 0.0, 0.0
    for site in dec.sites:
        for c in range(upper[site].shape[1]):
            total = sum((upper[site][n, c] + 1e-12) ** p for n in range(x.shape[0]))
            plain += total / x.shape[0]
            with_beta += total / x.shape[0] * (1 + beta * math.log2(1 + float(total)))
    torch.testing.assert_close(terms["importance_minimality"], torch.as_tensor(with_beta), rtol=1e-6, atol=0)
    assert abs(float(terms["importance_minimality"].detach()) - float(plain)) > 0.1 * float(plain)


def test_gradients_reach_every_trainable_parameter():
    dec, x = make("mlp")
    dec.losses(x, torch.Generator().manual_seed(0))["total"].backward()
    missing = [n for n, p in dec.named_parameters() if not n.startswith("model.") and p.grad is None]
    assert not missing


# ----------------------------------------------------------------------------- sigmoids
def test_sigmoids_forward_and_gradients_match_their_piecewise_definitions():
    z = torch.tensor([-2.0, -0.3, 0.0, 0.2, 0.7, 1.0, 1.4, 3.0], requires_grad=True)
    for sign in (1.0, -1.0):
        g = sign * torch.linspace(0.5, 1.5, z.shape[0])
        (grad,) = torch.autograd.grad(lower_leaky_hard_sigmoid(z), z, g)
        for k, v in enumerate(z.tolist()):
            if v <= 0:
                want = 0.01 * g[k] if g[k] < 0 else 0.0  # leaks only where descent raises z
            elif v <= 1:
                want = g[k]
            else:
                want = 0.0
            assert float(grad[k]) == pytest.approx(float(want), abs=1e-12), (v, sign)
    with torch.no_grad():
        torch.testing.assert_close(lower_leaky_hard_sigmoid(z), torch.tensor([min(max(v, 0), 1) for v in z.tolist()]))
    up = upper_leaky_hard_sigmoid(z)
    want = torch.tensor([0 if v <= 0 else (v if v <= 1 else 1 + 0.01 * (v - 1)) for v in z.tolist()])
    torch.testing.assert_close(up.detach(), want)
    (grad,) = torch.autograd.grad(up.sum(), z)
    want = torch.tensor([0.0 if v <= 0 else (1.0 if v <= 1 else 0.01) for v in z.tolist()])
    torch.testing.assert_close(grad, want)


def test_both_sigmoids_in_one_node_give_the_sum_of_their_gradients():
    from apd_lens.methods.spd.sigmoids import leaky_hard_sigmoids

    z = torch.tensor([-2.0, -0.3, 0.0, 0.2, 0.7, 1.0, 1.4, 3.0], requires_grad=True)
    g_lo, g_up = torch.linspace(-1, 1, 8), torch.linspace(2, -1, 8)
    lower, upper = leaky_hard_sigmoids(z)
    (both,) = torch.autograd.grad((lower * g_lo).sum() + (upper * g_up).sum(), z)
    (one,) = torch.autograd.grad((lower_leaky_hard_sigmoid(z) * g_lo).sum(), z)
    (two,) = torch.autograd.grad((upper_leaky_hard_sigmoid(z) * g_up).sum(), z)
    torch.testing.assert_close(both, one + two)


# ----------------------------------------------------------------------------- p annealing
def test_importance_p_anneals_linearly_between_its_fractions():
    """p is importance_p until p_anneal_start_frac, p_anneal_final from p_anneal_end_frac, linear between
    (values worked out by hand); without p_anneal_final it never moves."""
    cfg = SPDConfig(importance_p=2.0, p_anneal_final=0.5, p_anneal_start_frac=0.25, p_anneal_end_frac=0.75)
    by_hand = {0.0: 2.0, 0.25: 2.0, 0.5: 1.25, 0.6: 0.95, 0.75: 0.5, 0.9: 0.5, 1.0: 0.5}
    for progress, p in by_hand.items():
        assert cfg.importance_p_at(progress) == pytest.approx(p, abs=1e-12), progress
    assert {SPDConfig(importance_p=0.9).importance_p_at(f) for f in (0.0, 0.5, 1.0)} == {0.9}


def test_losses_use_the_p_of_their_step_and_training_passes_each_step(monkeypatch):
    """losses(x, step=s): the importance term by loops with p at s / steps (None: the end of training);
    and a training run hands losses() its steps 0..steps-1 in order."""
    steps = 200
    anneal = dict(importance_p=2.0, p_anneal_final=0.5, p_anneal_start_frac=0.25, p_anneal_end_frac=0.75)
    dec, x = make("mlp", steps=steps, **anneal)
    _, upper = ci_by_loops(dec, x)
    upper = {site: u.detach() for site, u in upper.items()}

    def importance(p):
        total = 0.0
        for u in upper.values():
            for c in range(u.shape[1]):
                total += sum((u[n, c] + 1e-12) ** p for n in range(u.shape[0])) / u.shape[0]
        return total

    for step, p in ((20, 2.0), (100, 1.25), (120, 0.95), (190, 0.5), (None, 0.5)):
        terms = dec.losses(x, torch.Generator().manual_seed(0), step=step)
        torch.testing.assert_close(terms["importance_minimality"], torch.as_tensor(importance(p)), rtol=1e-6, atol=0)

    import apd_lens

    seen = []
    original = SPDDecomposition.losses

    def record(self, x, generator=None, step=None):
        seen.append(step)
        return original(self, x, generator, step)

    monkeypatch.setattr(SPDDecomposition, "losses", record)
    model, specs, data = tms_with_bias()
    config = SPDConfig(n_subcomponents=3, steps=5, batch_size=4, progress=False, faithfulness_warmup_steps=0, **anneal)
    apd_lens.decompose(model, data.repeat(4, 1), config, weights=specs)
    assert seen == [0, 1, 2, 3, 4]


# ----------------------------------------------------------------------------- lean path, tokens, activations
def _per_sequence(fn, seq_len: int):
    """Wrap a per-token draw ([n_tokens, ...] values) so every position of a sequence gets its first
    position's draw: the masked model of a sequence is then one set of weights (functional_call)."""

    def draw(*args, **kwargs):
        out = fn(*args, **kwargs)
        return {
            k: v.reshape(-1, seq_len, *v.shape[1:])[:, :1].expand(-1, seq_len, *v.shape[1:]).reshape(v.shape)
            for k, v in out.items()
        }

    return draw


def test_lean_step_on_tokens_matches_loops(monkeypatch):
    """Token-shaped input, the lean step (stochastic recon and layerwise off, subset on): the subset term
    is the MSE of each sequence run with its routed weights at their masked weights (functional_call),
    the two recons off are 0, and the total is 0.37 faithfulness + 0.8 subset + 0.013 importance, each
    term by loops or by hand."""
    coeffs = dict(faithfulness_coeff=0.37, importance_minimality_coeff=0.013, stochastic_recon_subset_coeff=0.8)
    dec, x = make("transformer", stochastic_recon_coeff=0, stochastic_recon_layerwise_coeff=0, **coeffs)
    seq = x.shape[1]
    recs = {
        name: Recorder(_per_sequence(getattr(spd_module, name), seq))
        for name in ("stochastic_masks", "delta_masks", "subset_routes")
    }
    for name, rec in recs.items():
        monkeypatch.setattr(spd_module, name, rec)
    terms = dec.losses(x, torch.Generator().manual_seed(1))
    (masks,), (deltas,), (route,) = (recs[n].calls for n in ("stochastic_masks", "delta_masks", "subset_routes"))
    assert float(terms["stochastic_recon"].detach()) == 0 and float(terms["stochastic_recon_layerwise"].detach()) == 0

    target_out = dec.model(x).detach()
    site_of = {k: dec.sites[dec.site_keys.index(k)] for k in masks}
    outs = []
    for b in range(x.shape[0]):
        params = {k: v.detach() for k, v in dec.model.named_parameters()}
        for spec in dec.specs:
            if bool(route[spec.name][b * seq]):
                (key,) = [k for k in masks if site_of[k] == spec.name]
                params[spec.name] = masked_weight(dec, spec.name, masks[key][b * seq], deltas[key][b * seq])
        outs.append(functional_call(dec.model, params, (x[b][None],))[0])
    subset = (torch.stack(outs) - target_out).square().mean()
    torch.testing.assert_close(terms["stochastic_recon_subset"], subset, rtol=1e-6, atol=0)

    targets, n_params, faith = dec.target_matrices(), 0, 0.0
    for spec in dec.specs:
        sub = dec.subcomponents[spec.name]
        faith += (targets[spec.name] - sub.V.detach() @ sub.U.detach()).square().sum()
        n_params += get_parameter(dec.model, spec.name).numel()
    _, upper = ci_by_loops(dec, x)
    importance = sum(((u.detach() + 1e-12) ** 2).sum(0).sum() / u.shape[0] for u in upper.values())
    torch.testing.assert_close(terms["faithfulness"], faith / n_params, rtol=1e-6, atol=0)
    torch.testing.assert_close(terms["importance_minimality"], importance, rtol=1e-6, atol=0)
    want = 0.37 * faith / n_params + 0.8 * subset + 0.013 * importance
    torch.testing.assert_close(terms["total"], want, rtol=1e-6, atol=0)


def test_activation_recon_matches_an_explicit_forward(monkeypatch):
    """act_recon at hook_pre and hook_post of the two-layer MLP: per example, the masked weights by loops
    and the MLP written out (pre = x W1' + b1, post = tanh(pre) pre, out = post W2' + b2); the term is the
    squared error over both hooks' 12 units / 12, averaged over examples and mask samples; the total
    weights it by act_recon_coeff."""
    dec, x = make(
        "mlp",
        n_mask_samples=2,
        act_recon_coeff=1.3,
        act_recon_hooks=("hook_pre", "hook_post"),
        **{**COEFF_CONFIG, "stochastic_recon_layerwise_coeff": 0},
    )
    masks_rec = Recorder(spd_module.stochastic_masks)
    delta_rec = Recorder(spd_module.delta_masks)
    monkeypatch.setattr(spd_module, "stochastic_masks", masks_rec)
    monkeypatch.setattr(spd_module, "delta_masks", delta_rec)
    terms = dec.losses(x, torch.Generator().manual_seed(2))
    m = dec.model

    def explicit(w1, w2, xn):
        pre = xn @ w1 + m.b1
        post = torch.tanh(pre) * pre
        return pre, post, post @ w2 + m.b2

    act, recon = [], []
    for masks, deltas in zip(masks_rec.calls, delta_rec.calls, strict=True):
        by_site = {dec.sites[dec.site_keys.index(k)]: v for k, v in masks.items()}
        d_by_site = {dec.sites[dec.site_keys.index(k)]: v for k, v in deltas.items()}
        err_act, err_out = 0.0, 0.0
        for n in range(x.shape[0]):
            w1 = masked_weight(dec, "W1", by_site["W1"][n], d_by_site["W1"][n])
            w2 = masked_weight(dec, "W2", by_site["W2"][n], d_by_site["W2"][n])
            pre, post, out = explicit(w1, w2, x[n])
            pre_t, post_t, out_t = explicit(m.W1, m.W2, x[n])
            err_act += ((pre - pre_t).square().sum() + (post - post_t).square().sum()) / 12
            err_out += (out - out_t).square().mean()
        act.append(err_act / x.shape[0])
        recon.append(err_out / x.shape[0])
    torch.testing.assert_close(terms["act_recon"], sum(act) / 2, rtol=1e-6, atol=0)
    torch.testing.assert_close(terms["stochastic_recon"], sum(recon) / 2, rtol=1e-6, atol=0)
    assert float(terms["act_recon"].detach()) > 1e-6
    want = 0.37 * terms["faithfulness"] + 1.9 * sum(recon) / 2 + 0.013 * terms["importance_minimality"]
    torch.testing.assert_close(terms["total"], want + 1.3 * sum(act) / 2, rtol=1e-6, atol=0)
