"""VPD's pieces against explicit computations: persistent adversarial sources (Adam ascent by hand,
the masked forward per data point by ``functional_call``, subset routing), the global CI MLP (a loop
over sites: RMS norm, concatenation, MLP), its saving, the V/U gradient clip and the ``vpd`` preset."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import apd_lens
import apd_lens.methods.spd.decomposition as spd_module
from apd_lens import SPDConfig, SPDDecomposition
from apd_lens.methods.spd.presets import lm_toy_recipe, vpd_config
from tests.toy_models import TwoLayerMLP, two_layer_specs


@pytest.fixture(autouse=True)
def _float64(float64):
    """float64 so that tight tolerances are far above rounding."""


def tiny_transformer(d_model=8, n_heads=2, d_head=4, d_mlp=12):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = dict(n_layers=2, d_model=d_model, d_head=d_head, n_heads=n_heads, d_mlp=d_mlp, d_vocab=11, n_ctx=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(
            HookedTransformerConfig(**cfg, act_fn="gelu", normalization_type="LNPre", seed=0, dtype=torch.float64)
        )
    return model.eval()


# ------------------------------------------------------------------ persistent adversarial sources
LR, BETAS, EPS, COEFF = 0.05, (0.5, 0.99), 1e-8, 0.7
ROUTE = {
    "W1": torch.tensor([True, False, True, True, False, True]),
    "W2": torch.tensor([False, True, True, True, True, False]),
}


def explicit_distance(dec, x, ci, sources, V, U) -> torch.Tensor:
    """MSE of the model, each of the 6 rows (2 sequences x 3 positions) with every routed weight at
    ``Σ_c (g + (1 - g) s)_c V[:, c] ⊗ U[c, :] + s_Δ (W - V U)`` (the source's last column is s_Δ), the
    others at the target's, against the target's output: one ``functional_call`` per row."""
    rows = x.reshape(6, 4)
    params = {k: v.detach() for k, v in dec.model.named_parameters()}
    target = dec.model(rows).detach()
    outs = []
    for n in range(6):
        row_params = dict(params)
        for name in ("W1", "W2"):
            if not ROUTE[name][n]:
                continue
            c = V[name].shape[1]
            mask = ci[name][n] + (1 - ci[name][n]) * sources[name][n, :c]
            weight = sum(mask[j] * torch.outer(V[name][:, j], U[name][j]) for j in range(c))
            full = V[name] @ U[name]
            row_params[name] = weight + sources[name][n, c] * (params[name] - full)
        outs.append(functional_call(dec.model, row_params, (rows[n][None],))[0])
    return (torch.stack(outs) - target).square().mean()


def hand_adam(sources, grads, m, v, t):
    """One Adam ascent update by hand, clamped to [0, 1]."""
    out = {}
    for k in sources:
        m[k] = BETAS[0] * m[k] + (1 - BETAS[0]) * grads[k]
        v[k] = BETAS[1] * v[k] + (1 - BETAS[1]) * grads[k] ** 2
        m_hat, v_hat = m[k] / (1 - BETAS[0] ** t), v[k] / (1 - BETAS[1] ** t)
        out[k] = (sources[k] + LR * m_hat / (v_hat.sqrt() + EPS)).clamp(0, 1)
    return out


def test_persistent_sources_adam_updates_loss_and_gradients_match_explicit_loops(monkeypatch):
    """From known sources: 2 warm-up Adam ascent updates on the subset-routed output distance (CI, V, U
    held fixed), the loss with the updated sources, then the update from the loss's own gradient after
    the backward; the loss's gradients to V and U are those of the explicit masked forward."""
    monkeypatch.setattr(spd_module, "subset_routes", lambda names, n, like, gen=None: dict(ROUTE))
    torch.manual_seed(0)
    cfg = SPDConfig(
        n_subcomponents=3,
        ci_fn="shared_mlp",  # reads the input, not V: the CI holds no path to V
        n_batch_dims=2,
        stochastic_recon_coeff=0.0,
        stochastic_recon_layerwise_coeff=0.0,
        importance_minimality_coeff=0.0,
        faithfulness_coeff=0.0,
        pgd_recon_coeff=COEFF,
        pgd_scope="persistent",
        pgd_warmup_updates=2,
        pgd_adam_lr=LR,
        pgd_adam_betas=BETAS,
        pgd_subset_routing=True,
    )
    dec = SPDDecomposition(TwoLayerMLP().double(), two_layer_specs(), cfg)
    x = torch.randn(2, 3, 4)
    start = {k: torch.rand(6, 4) for k in ("W1", "W2")}
    m0 = {k: torch.randn(6, 4) * 1e-3 for k in start}
    v0 = {k: torch.rand(6, 4) * 1e-6 for k in start}
    state = dict(sources=start, exp_avg=m0, exp_avg_sq=v0, updates=3)  # a run 3 updates in
    dec.persistent_sources.load_state_dict(state)
    optimizer = torch.optim.SGD(dec.trainable_parameters(), lr=0.0)
    callback = dec.training_callbacks(optimizer)["persistent_pgd"]

    terms = dec.losses(x, torch.Generator().manual_seed(1))
    terms["total"].backward()
    callback.after_step(0, x)

    ci = {k: g.reshape(6, -1) for k, g in dec.causal_importances(x).items()}
    V = {k: dec.subcomponents[k].V.detach().clone().requires_grad_(True) for k in ("W1", "W2")}
    U = {k: dec.subcomponents[k].U.detach().clone().requires_grad_(True) for k in ("W1", "W2")}
    src, m, v = dict(start), dict(m0), dict(v0)
    for t in (4, 5):  # the warm-up updates
        leaves = {k: s.clone().requires_grad_(True) for k, s in src.items()}
        grads = torch.autograd.grad(explicit_distance(dec, x, ci, leaves, V, U), list(leaves.values()))
        src = hand_adam(src, dict(zip(leaves, grads, strict=True)), m, v, t)
    leaves = {k: s.clone().requires_grad_(True) for k, s in src.items()}
    want = explicit_distance(dec, x, ci, leaves, V, U)
    torch.testing.assert_close(terms["pgd_recon"], want, rtol=1e-10, atol=1e-14)
    want_grads = torch.autograd.grad(want, [*leaves.values(), V["W1"], U["W2"]])
    for k in ("W1", "W2"):  # the loss's gradients to V, U: coefficient times the explicit ones
        got = {"W1": dec.subcomponents["W1"].V.grad, "W2": dec.subcomponents["W2"].U.grad}[k]
        torch.testing.assert_close(got, COEFF * want_grads[2 if k == "W1" else 3], rtol=1e-9, atol=1e-14)
    final = hand_adam(src, dict(zip(leaves, want_grads[:2], strict=True)), m, v, 6)
    after = dec.persistent_sources.state_dict()
    assert after["updates"] == 6
    for k in final:
        torch.testing.assert_close(after["sources"][k], final[k], rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(after["exp_avg"][k], m[k], rtol=1e-10, atol=1e-18)
        torch.testing.assert_close(after["exp_avg_sq"][k], v[k], rtol=1e-10, atol=1e-22)
        assert not torch.equal(final[k], start[k])
    assert all(((s >= 0) & (s <= 1)).all() for s in final.values())


def test_persistent_sources_are_drawn_once_and_refuse_another_batch_shape():
    cfg = SPDConfig(n_subcomponents=3, pgd_recon_coeff=1.0, pgd_scope="persistent", pgd_warmup_updates=1)
    dec = SPDDecomposition(TwoLayerMLP().double(), two_layer_specs(), cfg)
    dec.losses(torch.randn(5, 4), torch.Generator().manual_seed(0))
    first = dec.persistent_sources.state_dict()
    assert {k: tuple(s.shape) for k, s in first["sources"].items()} == {"W1": (5, 4), "W2": (5, 4)}
    dec.losses(torch.randn(5, 4), torch.Generator().manual_seed(0))  # kept (one more warm-up update), not redrawn
    assert dec.persistent_sources.updates == 2
    with pytest.raises(ValueError, match="same shape"):
        dec.losses(torch.randn(4, 4))


# ------------------------------------------------------------------ the global CI function
def test_global_ci_mlp_matches_an_explicit_loop_over_sites():
    model = tiny_transformer()
    from apd_lens.adapters import specs_for_model

    specs = specs_for_model(model)
    cfg = SPDConfig(n_subcomponents={"*W_in": 5, "*": 3}, ci_fn="global_mlp", ci_global_hidden=(7, 6))
    dec = SPDDecomposition(model, specs, cfg)
    with torch.no_grad():
        for p in dec.global_ci.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # biases away from zero
    tokens = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(2))
    got = dec.causal_importances(tokens)

    _, cache = model.run_with_cache(tokens)
    normed = []
    for spec in specs:  # the sites in order; each reads its use's entering activation
        a = cache[spec.uses[0].enter].reshape(15, -1)
        normed.append(a / torch.sqrt(a.pow(2).mean(-1, keepdim=True) + torch.finfo(a.dtype).eps))
    h = torch.cat(normed, -1)
    assert h.shape[1] == 2 * (3 * 8 + 8 + 8 + 12) + 8  # W_Q, W_K, W_V, W_O (2 x 4), W_in, W_out per layer; W_U
    ws, bs = list(dec.global_ci.weights), list(dec.global_ci.biases)
    for w, b in zip(ws, bs, strict=True):
        h = torch.stack([F.gelu(h[n] @ w + b) for n in range(15)])
    scores = h @ dec.global_ci.w_out + dec.global_ci.b_out
    start = 0
    for spec in specs:
        c = 5 if spec.name.endswith("W_in") else 3
        want = scores[:, start : start + c].clamp(0, 1)  # the lower leaky hard sigmoid's forward
        torch.testing.assert_close(got[spec.name].reshape(15, c), want, rtol=1e-10, atol=1e-12)
        start += c
    assert start == scores.shape[1]
    assert not any(len(sub.ci_fns) for sub in dec.subcomponents.values())


def test_global_ci_is_saved_and_loaded_with_the_run(tmp_path):
    model = tiny_transformer()
    x = torch.randint(0, 11, (16, 5), generator=torch.Generator().manual_seed(3))
    cfg = vpd_config(model, steps=2, batch_size=4, progress=False, faithfulness_warmup_steps=1, c_scale=0.5)
    dec = apd_lens.decompose(model, x, cfg, run_dir=tmp_path / "run")
    loaded = apd_lens.load(tmp_path / "run", model)
    names = [n for n, _ in dec.global_ci.named_parameters()]
    assert names and all(
        torch.equal(dict(loaded.global_ci.named_parameters())[n], p) for n, p in dec.global_ci.named_parameters()
    )
    for site, g in dec.causal_importances(x[:3]).items():
        torch.testing.assert_close(loaded.causal_importances(x[:3])[site], g, rtol=0, atol=0)


# ------------------------------------------------------------------ V/U gradient clip
def test_subcomponent_gradients_are_clipped_to_a_global_norm_before_the_step():
    cfg = SPDConfig(n_subcomponents=3, ci_fn="shared_mlp", grad_clip_subcomponents=0.01)
    dec = SPDDecomposition(TwoLayerMLP().double(), two_layer_specs(), cfg)
    optimizer = torch.optim.SGD(dec.trainable_parameters(), lr=1.0)
    callbacks = dec.training_callbacks(optimizer)
    before = {n: p.detach().clone() for n, p in dec.named_parameters() if not n.startswith("model.")}
    dec.losses(torch.randn(6, 4), torch.Generator().manual_seed(0))["total"].backward()
    grads = {n: p.grad.clone() for n, p in dec.named_parameters() if p.grad is not None}
    vu = [n for n in grads if n.endswith((".V", ".U"))]
    norm = math.sqrt(sum(float(grads[n].pow(2).sum()) for n in vu))
    assert norm > 0.01
    optimizer.step()
    for n, p in dec.named_parameters():
        if n in grads:
            scale = 0.01 / (norm + 1e-6) if n in vu else 1.0  # the CI functions' gradients are not clipped
            torch.testing.assert_close(p.detach(), before[n] - scale * grads[n], rtol=1e-12, atol=1e-15)
    callbacks["grad_clip_subcomponents"].close()


# ------------------------------------------------------------------ the preset and the config
def test_vpd_preset_sizes_c_per_matrix_and_sets_the_recipe():
    model = tiny_transformer(d_model=16, n_heads=4, d_head=4, d_mlp=64)
    cfg = vpd_config(model, steps=7)
    per_layer = {"attn.W_Q": 11, "attn.W_K": 11, "attn.W_V": 21, "attn.W_O": 21, "mlp.W_in": 64, "mlp.W_out": 75}
    want = {
        f"blocks.{i}.{k}": c for i in range(2) for k, c in per_layer.items()
    }  # round(16 × 2/3) ... round(16 × 14/3)
    assert cfg.n_subcomponents == want and set(cfg.weights) == set(want)
    n_params = 2 * (4 * 16 * 16 + 2 * 16 * 64)
    assert cfg.faithfulness_coeff == pytest.approx(1e7 * n_params / (4 * (4 * 768**2 + 2 * 768 * 3072)))
    assert (cfg.output_loss, cfg.ci_fn, cfg.pgd_scope, cfg.steps) == ("kl", "global_mlp", "persistent", 7)
    assert (cfg.stochastic_recon_coeff, cfg.stochastic_recon_layerwise_coeff, cfg.stochastic_recon_subset_coeff) == (
        0,
        0,
        1,
    )
    assert (cfg.importance_p, cfg.p_anneal_final, cfg.pgd_subset_routing) == (2.0, 0.4, True)
    assert SPDConfig.from_dict(cfg.to_dict()) == cfg
    toy = lm_toy_recipe(model, steps=7)  # the same matrices and C, the toy models' losses
    assert (toy.n_subcomponents, toy.weights, toy.steps, toy.output_loss) == (want, cfg.weights, 7, "kl")
    assert (toy.ci_fn, toy.pgd_recon_coeff, toy.stochastic_recon_layerwise_coeff, toy.importance_beta) == (
        "mlp",
        0,
        1,
        0,
    )
    with pytest.raises(TypeError, match="which weights of TwoLayerMLP"):  # not a transformer
        vpd_config(TwoLayerMLP())


@pytest.mark.parametrize(
    "field, value",
    [
        ("pgd_adam_betas", (0.5, 1.0)),
        ("pgd_adam_lr", 0.0),
        ("pgd_warmup_updates", -1),
        ("ci_global_hidden", (0,)),
        ("grad_clip_subcomponents", 0.0),
        ("pgd_scope", "forever"),
    ],
)
def test_bad_vpd_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        SPDConfig(**{field: value})
