"""Residual MLP model, its analysis against slow explicit references, and a shortened recovery run."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

import apd_lens
from apd_lens.analysis.resid_mlp import (
    analyse_resid_mlp,
    assign_features,
    exact_attributions,
    layer_contributions,
    neuron_contributions,
    one_feature_batch,
    per_feature_mse,
    scrub_masks,
)
from apd_lens.analysis.resid_mlp_plots import plot_resid_mlp_report
from apd_lens.methods.apd.decomposition import Decomposition
from apd_lens.models.resid_mlp import ResidMLPData, ResidualMLP, resid_mlp_labels, train_resid_mlp


def small_model(n_layers: int = 1, bias: bool = False, seed: int = 0) -> ResidualMLP:
    model = ResidualMLP(n_features=6, d_resid=12, d_mlp=4, n_layers=n_layers, bias=bias, seed=seed).double()
    if bias:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".b_" in name:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    return model


def small_decomposition(n_layers: int = 1, bias: bool = False, rank: int | None = 2) -> Decomposition:
    model = small_model(n_layers, bias)
    config = model.apd_default_config().replace(n_components=5, rank=rank, topk=1.5, progress=False)
    torch.manual_seed(0)
    return Decomposition(model, model.apd_weight_specs(), config)


def explicit_forward(model: ResidualMLP, x: torch.Tensor) -> torch.Tensor:
    resid = x @ model.W_E
    for L in range(model.n_layers):
        mlp = model.blocks[L].mlp
        pre = resid @ mlp.W_in + (0 if mlp.b_in is None else mlp.b_in)
        resid = resid + torch.relu(pre) @ mlp.W_out + (0 if mlp.b_out is None else mlp.b_out)
    return resid @ model.W_E.T


def summed_params(dec: Decomposition, mask_row: torch.Tensor) -> dict[str, torch.Tensor]:
    params = {k: v.detach() for k, v in dec.model.named_parameters()}
    for name, comps in dec.component_weights().items():
        params[name] = sum(mask_row[c] * comps[c] for c in range(comps.shape[0]))
    return params


# ----------------------------------------------------------------------------- model and data
@pytest.mark.parametrize("n_layers,bias", [(1, False), (2, True)])
def test_forward_matches_explicit_formula(n_layers, bias):
    model = small_model(n_layers, bias)
    x = torch.randn(5, 6, dtype=torch.float64)
    torch.testing.assert_close(model(x), explicit_forward(model, x))
    torch.testing.assert_close(model.W_E.norm(dim=1), torch.ones(6, dtype=torch.float64))
    assert "W_E" not in dict(model.named_parameters())  # frozen buffer, never trained or decomposed


@pytest.mark.parametrize("n_layers,bias", [(1, False), (2, True)])
def test_specs_reproduce_target_when_components_sum_to_it(n_layers, bias):
    """One component holding each weight exactly (via its SVD), the others zero: the component
    model equals the target, so every spec's enter/leave hooks and biases are the right ones."""
    dec = small_decomposition(n_layers, bias, rank=None)
    for name, W in dec.target_matrices().items():
        comp = dec.components[name]
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        A, B = torch.zeros_like(comp.A), torch.zeros_like(comp.B)
        r = min(comp.rank, S.numel())
        assert r == S.numel(), "test needs full rank components"
        A[0], B[0] = U[:, :r] * S[:r], Vh[:r]
        comp.set_from_matrices(A, B)
    x = torch.randn(7, 6, dtype=torch.float64)
    torch.testing.assert_close(dec(x), dec.model(x))
    names = [s.name for s in dec.specs]
    assert names == [f"blocks.{L}.mlp.{w}" for L in range(n_layers) for w in ("W_in", "W_out")]
    assert f"blocks.{n_layers - 1}.mlp.W_in.hook_component_acts" in dec.hook_dict


def test_data_and_labels():
    data = ResidMLPData(100, batch_size=20_000, p=0.01, seed=0)
    x = data.sample()
    on = x != 0
    assert abs(on.float().mean().item() - 0.01) < 1e-3
    assert x.min() >= -1 and x.max() <= 1 and (x[on] < 0).float().mean().sub(0.5).abs() < 0.02
    y = resid_mlp_labels(x)
    for v, want in ((-0.5, -0.5), (0.0, 0.0), (0.25, 0.5)):
        assert resid_mlp_labels(torch.tensor([v])).item() == want
    torch.testing.assert_close(y[~on], torch.zeros_like(y[~on]))


def test_paper_config():
    # lr: the paper's 1e-3 for 1 layer; 5e-4 for 2 (1e-3 diverged there, see apd_default_config)
    for n_layers, C, coeffs, lr in ((1, 130, (1, 1, 10, 1), 1e-3), (2, 200, (1, 2, 7, 1), 5e-4)):
        model = ResidualMLP(n_layers=n_layers)
        cfg = model.apd_default_config(preset="paper")
        assert cfg.split_every is None  # the paper does not split; the default preset does (and, for 2 layers,
        # lowers the lr to 3e-4: 5e-4 diverged on seed 1)
        default_lr = 1e-3 if n_layers == 1 else 3e-4
        assert cfg.replace(split_every=500, lr=default_lr) == model.apd_default_config()
        assert model.d_mlp * n_layers == 50
        assert cfg.n_components == C and cfg.topk == 1.28 and cfg.schatten_p == 0.9 and cfg.unit_norm_A
        got = (cfg.faithfulness_coeff, cfg.minimality_coeff, cfg.simplicity_coeff, cfg.act_recon_coeff)
        assert got == coeffs
        assert cfg.act_recon_hooks == tuple(f"blocks.{L}.mlp.hook_post" for L in range(n_layers))
        assert (cfg.lr, cfg.lr_schedule, cfg.lr_warmup_frac, cfg.steps, cfg.batch_size) == (
            lr,
            "cosine",
            0.01,
            10_000,
            256,
        )
        # splitting options (used by the default preset): see apd_default_config
        want_split = ("live", "active", "all") if n_layers == 1 else ("carrying", "top", "first")
        assert (cfg.split_reference, cfg.split_points, cfg.split_group_by) == want_split


def test_monosemantic_baseline_is_one_neuron_per_feature():
    model = small_model(n_layers=2)  # 2 x 4 neurons -> 8 >= 6 features: all features get a neuron
    mono = model.monosemantic_baseline()
    model3 = ResidualMLP(n_features=6, d_resid=12, d_mlp=3, n_layers=1).double()
    mono3 = model3.monosemantic_baseline()
    x = torch.randn(9, 6, dtype=torch.float64)
    for m, base, n_mono in ((mono, model, 6), (mono3, model3, 3)):
        W_E = base.W_E
        want = x @ W_E @ W_E.T
        for i in range(n_mono):  # neuron i reads and writes feature i's embedding
            want = want + torch.relu(x @ W_E @ W_E[i])[:, None] * (W_E[i] @ W_E.T)[None]
        torch.testing.assert_close(m(x), want)


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="n_features=6"):
        small_model()(torch.zeros(2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="n_layers"):
        ResidualMLP(n_layers=0)
    with pytest.raises(ValueError, match="probability"):
        ResidMLPData(10, p=0.0)


# ----------------------------------------------------------------------------- analysis vs references
def test_one_feature_batch_and_per_feature_mse():
    x, feature = one_feature_batch(4, 3, torch.Generator().manual_seed(0))
    assert x.shape == (12, 4) and ((x != 0).sum(1) == 1).all()
    assert (x.abs().argmax(1) == feature).all() and x.abs().max() <= 1
    out, ref = torch.randn(12, 5), torch.randn(12, 5)
    want = torch.zeros(4)
    for i in range(4):
        rows = [n for n in range(12) if feature[n] == i]
        want[i] = sum(((out[n] - ref[n]) ** 2).sum() / 5 for n in rows) / len(rows)
    torch.testing.assert_close(per_feature_mse(out, ref, feature, 4), want)


def test_assign_features():
    attr = torch.tensor(
        [[5.0, 0.1, 0, 0, 0], [0.2, 4.0, 0, 0, 0], [0, 3.0, 0.5, 0, 0], [0, 0, 0, 2.0, 0.001]]
    )  # features 1 and 2 share component 1; component 4 is dead (0.001 < 1e-2 * 5), component 2 not
    a = assign_features(attr)
    assert a.component.tolist() == [0, 1, 1, 3]
    assert a.dedicated.tolist() == [True, False, False, True] and a.n_dedicated == 2
    assert a.mixing.tolist() == [1] and a.dead.tolist() == [4]


def test_scrub_masks():
    own = torch.tensor([0, 3, 3, 6, 1])
    scrubbed, anti = scrub_masks(own, 7, torch.Generator().manual_seed(0))
    for n in range(5):
        assert scrubbed[n, own[n]] == 1 and anti[n, own[n]] == 0
        assert (scrubbed[n] == 0).sum() == 3 and (anti[n] == 0).sum() == 3
        assert set(scrubbed[n].tolist()) <= {0.0, 1.0}


def brute_attributions(dec: Decomposition, x: torch.Tensor) -> torch.Tensor:
    """sum_o (sum_l <d f_o / d W_l, P_{c,l}>)^2 by one backward per (example, output)."""
    comps = dec.component_weights()
    out = torch.zeros(x.shape[0], dec.n_components, dtype=x.dtype)
    for n in range(x.shape[0]):
        params = {k: v.detach().clone().requires_grad_(k in comps) for k, v in dec.model.named_parameters()}
        buffers = dict(dec.model.named_buffers())
        f = functional_call(dec.model, {**params, **buffers}, (x[n : n + 1],))[0]
        for o in range(f.shape[0]):
            grads = torch.autograd.grad(f[o], [params[k] for k in comps], retain_graph=True)
            out[n] += sum((g[None] * comps[k]).flatten(1).sum(1) for g, k in zip(grads, comps, strict=True)) ** 2
    return out


@pytest.mark.parametrize("n_layers,bias", [(1, False), (2, True)])
def test_analysis_matches_explicit_loops(n_layers, bias):
    dec = small_decomposition(n_layers, bias)
    dec.config = dec.config.replace(attribution_probes=3)  # the analysis must still use exact attributions
    report = analyse_resid_mlp(dec, n_per_feature=4, seed=0)
    model, x, feature = dec.model, report.x, report.feature
    F = model.n_features

    # assignment: max exact attribution on the one-hot inputs
    onehot_attr = brute_attributions(dec, torch.eye(F, dtype=torch.float64))
    torch.testing.assert_close(report.assignment.attributions, onehot_attr)
    assert report.assignment.component.tolist() == onehot_attr.argmax(1).tolist()
    torch.testing.assert_close(exact_attributions(dec, x, chunk=5), brute_attributions(dec, x))

    # top-k mask: batch top-k over the evaluation batch of the exact attributions
    attr = brute_attributions(dec, x).flatten()
    want_topk = torch.zeros_like(attr)
    want_topk[attr.argsort(descending=True)[: int(dec.config.topk * x.shape[0])]] = 1
    torch.testing.assert_close(report.masks["topk"], want_topk.reshape(x.shape[0], -1))

    # scrubbed / anti-scrubbed: own component spared / ablated; MSE of explicit masked forwards
    own = report.assignment.component[feature]
    assert (report.masks["scrubbed"][torch.arange(x.shape[0]), own] == 1).all()
    assert (report.masks["antiscrubbed"][torch.arange(x.shape[0]), own] == 0).all()
    results = {"topk": report.mse_topk, "scrubbed": report.mse_scrubbed, "antiscrubbed": report.mse_antiscrubbed}
    for name, got in results.items():
        sums, counts = torch.zeros(F, dtype=torch.float64), torch.zeros(F, dtype=torch.float64)
        for n in range(x.shape[0]):
            params = summed_params(dec, report.masks[name][n])
            out = functional_call(model, {**params, **dict(model.named_buffers())}, (x[n : n + 1],))
            sums[feature[n]] += (out - explicit_forward(model, x[n : n + 1])).square().mean()
            counts[feature[n]] += 1
        torch.testing.assert_close(got, sums / counts, msg=name)

    # target and monosemantic baseline against the labels
    labels = x + torch.relu(x)
    want_target = torch.stack(
        [(explicit_forward(model, x[feature == i]) - labels[feature == i]).square().mean() for i in range(F)]
    )
    torch.testing.assert_close(report.mse_target_vs_labels, want_target)
    n_mono = min(F, n_layers * model.d_mlp)
    want_ideal = torch.stack([((i >= n_mono) * torch.relu(x[feature == i, i]) ** 2).sum() / F for i in range(F)])
    torch.testing.assert_close(report.mse_ideal_mono_vs_labels, want_ideal / torch.bincount(feature).double())


def test_neuron_contributions_match_explicit_sums():
    model = small_model(n_layers=2)
    dec = small_decomposition(n_layers=2)
    W_E = model.W_E
    W_in, W_out = model.mlp_weights(1)
    got = neuron_contributions(W_E, W_in, W_out)
    for i in range(model.n_features):
        for n in range(model.d_mlp):
            read = sum(W_E[i, d] * W_in[d, n] for d in range(model.d_resid))
            write = sum(W_out[n, d] * W_E[i, d] for d in range(model.d_resid))
            torch.testing.assert_close(got[i, n], read * write)
    component = torch.tensor([0, 1, 2, 3, 4, 0])
    target_c, comp_c = layer_contributions(dec, component)
    comps = dec.component_weights()
    for L in range(2):
        torch.testing.assert_close(target_c[L], neuron_contributions(W_E, *dec.model.mlp_weights(L)))
        for i in range(model.n_features):
            P_in, P_out = comps[f"blocks.{L}.mlp.W_in"][component[i]], comps[f"blocks.{L}.mlp.W_out"][component[i]]
            torch.testing.assert_close(comp_c[L, i], (W_E[i] @ P_in) * (P_out @ W_E[i]))


def test_spanning_counts_features_with_a_tenth_of_their_contribution_in_every_layer():
    dec = small_decomposition(n_layers=2)
    report = analyse_resid_mlp(dec, n_per_feature=2, seed=0)
    for of, contributions in (("component", report.component_contributions), ("target", report.target_contributions)):
        want = 0
        for i in range(dec.model.n_features):
            per_layer = [contributions[L, i].abs().sum() for L in range(2)]
            want += all(v >= 0.1 * sum(per_layer) for v in per_layer)
        assert report.spanning(of=of) == want
        assert report.spanning(min_share=0.0, of=of) == dec.model.n_features


def test_plots_are_written(tmp_path):
    dec = small_decomposition(n_layers=2)
    report = analyse_resid_mlp(dec, n_per_feature=3)
    paths = plot_resid_mlp_report(dec, report, tmp_path, prefix="t")
    assert len(paths) == 3 and all(p.exists() and p.stat().st_size > 1000 for p in paths)
    assert report.last_line().startswith("DEDICATED=") and "MONO=" in report.last_line()


# ----------------------------------------------------------------------------- shortened recovery
def test_shortened_recovery():
    """The paper's structure at a fifth of its size, 1000 steps: most features get a component of
    their own, the top-k pass is close to the target, and ablating a feature's own component costs
    far more than ablating unrelated ones."""
    report = recovery_run()
    s = report.summary()
    assert s["dedicated"] >= 16, report.describe()  # measured 18/20
    assert s["antiscrubbed_mse"] >= 2 * s["scrubbed_mse"], report.describe()  # measured 2.5x
    assert s["topk_mse"] <= 0.2 * s["antiscrubbed_mse"], report.describe()  # measured 0.12x
    assert s["target_vs_labels_mse"] < 0.5 * s["mono_vs_labels_mse"], report.describe()  # compressed computation


def recovery_run(
    n_layers: int = 1, d_mlp: int = 10, n_components: int = 26, steps: int = 1000, lr: float = 5e-3, **cfg
):
    """20 features, d_resid 200, 10 neurons (the paper's 100:1000:50 divided by 5; each feature on
    with probability 0.05, so one active feature per sample on average as in the paper), C = 26
    (1.3 per feature as the paper's 130), the paper's coefficients and top-k; lr 5e-3 instead of
    1e-3 because of the 10x shorter run. One thread: small matrices, and the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = ResidualMLP(n_features=20, d_resid=200, d_mlp=d_mlp, n_layers=n_layers, seed=0)
        train_resid_mlp(model, steps=500, p=0.05, seed=0, progress=False)
        config = model.apd_default_config().replace(
            n_components=n_components, steps=steps, lr=lr, progress=False, **cfg
        )
        dec = apd_lens.decompose(model, ResidMLPData(20, config.batch_size, p=0.05, seed=1), config)
        return analyse_resid_mlp(dec, n_per_feature=50, seed=0)
    finally:
        torch.set_num_threads(threads)


def test_shortened_recovery_two_layers():
    """The 2-layer recipe (its coefficients, top-k and splitting options) at a fifth of the paper's
    size: 2 x 5 neurons, C 40 (2 per feature as the paper's 200), 2000 steps with component splitting
    every 100. Measured 12/20 dedicated (10/20 without splitting; seed 1: 16/20): at this size the
    recipe is less clean than at full size, so this guards the pipeline, not the full-size result."""
    report = recovery_run(n_layers=2, d_mlp=5, n_components=40, steps=2000, lr=1e-3, split_every=100)
    s = report.summary()
    assert s["dedicated"] >= 10, report.describe()  # measured 12/20
    assert s["antiscrubbed_mse"] >= 2 * s["scrubbed_mse"], report.describe()  # measured 2.7x
    assert s["topk_mse"] <= 0.2 * s["antiscrubbed_mse"], report.describe()  # measured 0.12x


def _without_feeds(specs):
    import dataclasses

    from apd_lens import WeightSpec

    return [WeightSpec(s.name, tuple(dataclasses.replace(u, feeds=()) for u in s.uses)) for s in specs]


@pytest.mark.parametrize("n_layers", [2, 3])
@pytest.mark.parametrize("backend", ["vmap", "batched"])
@pytest.mark.parametrize("chunk", [None, 2])  # 6 outputs: one probe chunk, or three
def test_declared_feeds_give_the_per_output_loop_attributions(n_layers, backend, chunk, monkeypatch):
    """W_out of layer L declares that it feeds every later W_in: attributions contract its gradient
    through them (checked once per probe chunk); equal to the brute-force loop and to the same specs
    without feeds."""
    import apd_lens.methods.apd.attributions as attributions

    checked = []
    check = attributions.check_fed_gradient
    monkeypatch.setattr(attributions, "check_fed_gradient", lambda key, *a: checked.append(key) or check(key, *a))
    model = small_model(n_layers, bias=True)
    specs = model.apd_weight_specs()
    assert specs[1].uses[0].feeds == tuple(f"blocks.{L}.mlp.W_in" for L in range(1, n_layers))
    config = model.apd_default_config().replace(
        n_components=5, rank=2, topk=1.5, attribution_backend=backend, attribution_chunk=chunk
    )
    n_chunks = 1 if chunk is None else 3
    dec = Decomposition(model, specs, config)
    plain = Decomposition(model, _without_feeds(specs), config)
    plain.load_state_dict(dec.state_dict())
    x = ResidMLPData(6, 9, p=0.4, seed=3).sample().double()
    want = brute_attributions(dec, x)
    for _ in range(2):  # the first call checks the declaration on every example, later ones on a few
        torch.testing.assert_close(dec.attributions(x), want)
    assert checked.count(("blocks.0.mlp.W_out", 0)) == 2 * n_chunks  # the contracted path ran
    torch.testing.assert_close(plain.attributions(x), want)
    assert checked.count(("blocks.0.mlp.W_out", 0)) == 2 * n_chunks


@pytest.mark.parametrize("backend", ["vmap", "batched"])
def test_a_wrong_feeds_declaration_raises(backend):
    """Layer 0's W_out also reaches layer 2's W_in: declaring only layer 1's leaves a per-example path
    outside the declared ones, which must raise (not fall back, not give other numbers)."""
    import dataclasses

    from apd_lens import WeightSpec
    from apd_lens.methods.apd.attributions import FeedsMismatch

    model = small_model(3, bias=True)
    specs = [
        WeightSpec(s.name, tuple(dataclasses.replace(u, feeds=u.feeds[:1]) for u in s.uses))
        for s in model.apd_weight_specs()
    ]
    config = model.apd_default_config().replace(n_components=5, rank=2, topk=1.5, attribution_backend=backend)
    dec = Decomposition(model, specs, config)
    with pytest.raises(FeedsMismatch, match="blocks.0.mlp.W_out"):
        dec.attributions(ResidMLPData(6, 9, p=0.4, seed=3).sample().double())
    assert dec.vmap_failure is None


def test_feeds_must_name_a_single_use_weight_of_matching_width():
    import dataclasses

    from apd_lens import WeightSpec

    model = small_model(2)
    specs = model.apd_weight_specs()
    config = model.apd_default_config().replace(n_components=5, rank=2, topk=1.5)
    wrong_name = [WeightSpec(specs[0].name, (dataclasses.replace(specs[0].uses[0], feeds=("W_nope",)),))] + specs[1:]
    with pytest.raises(ValueError, match="feeds names 'W_nope'"):
        Decomposition(model, wrong_name, config)
    # W_in of layer 0 leaves at the 4 MLP neurons; layer 1's W_in enters at the 12-dim residual stream
    wrong_width = [
        WeightSpec(specs[0].name, (dataclasses.replace(specs[0].uses[0], feeds=("blocks.1.mlp.W_in",)),))
    ] + specs[1:]
    with pytest.raises(ValueError, match="leaving width 4"):
        Decomposition(model, wrong_width, config)
