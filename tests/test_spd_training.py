"""SPD through the shared training machinery: save/load, checkpoints with exact resume, bad input,
hooks, the warm-up; and a shortened TMS 5-2 recovery."""

from __future__ import annotations

import pytest
import torch

import apd_lens
from apd_lens import APDConfig, SPDConfig, SPDDecomposition
from apd_lens.models.tms import TMS, TMSData
from apd_lens.training.checkpoint import list_checkpoints
from apd_lens.training.loop import UntrainedWarning


def small_config(**kw) -> SPDConfig:
    base = dict(
        n_subcomponents=6,
        steps=12,
        batch_size=32,
        progress=False,
        log_every=4,
        faithfulness_warmup_steps=5,
        importance_minimality_coeff=1e-3,
    )
    return SPDConfig(**{**base, **kw})


def same_state(a, b) -> bool:
    sa, sb = a.state_tensors(), b.state_tensors()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_decompose_with_an_spd_config_returns_an_spd_decomposition():
    dec = apd_lens.decompose(TMS(5, 2), TMSData(5, 32, seed=1), small_config())
    assert isinstance(dec, SPDDecomposition) and isinstance(dec, apd_lens.engine.base.DecompositionBase)
    assert dec.sites == ["W", "W:use1"]
    assert [r["step"] for r in dec.loss_history] == [0, 4, 8, 11]
    row = dec.loss_history[-1]
    for key in ("faithfulness", "stochastic_recon", "stochastic_recon_layerwise", "importance_minimality", "total"):
        assert key in row
    assert "ci_l0/W" in row and "ci_l0/W:use1" in row
    weights = dec.subcomponent_weights()["W"]
    assert weights.shape == (6, 5, 2)
    sub = dec.subcomponents["W"]
    torch.testing.assert_close(weights[2], torch.outer(sub.V[:, 2], sub.U[2]).detach())


def test_method_keyword_uses_the_models_spd_defaults():
    model = TMS(5, 2)
    with pytest.raises(ValueError, match="method='apd' but the config is a SPDConfig"):
        apd_lens.decompose(model, TMSData(5, 32), small_config(), method="apd")
    assert apd_lens.training.loop.default_config(model, "spd") == model.spd_default_config()


def test_faithfulness_warmup_runs_before_training_only():
    model = TMS(5, 2)
    cfg = small_config(steps=0, faithfulness_warmup_steps=0)
    with pytest.warns(UntrainedWarning, match="steps=0: no training step runs"):
        cold = apd_lens.decompose(model, TMSData(5, 32), cfg)
    with pytest.warns(UntrainedWarning):
        warm = apd_lens.decompose(model, TMSData(5, 32), cfg.replace(faithfulness_warmup_steps=200))

    def faith(d):
        return sum((d.target_matrices()[n] - d.summed_matrices()[n]).square().sum() for n in d.target_matrices())

    assert faith(warm) < 0.05 * faith(cold)


def test_save_load_round_trip_and_method_checks(tmp_path):
    model = TMS(5, 2, identity=True)
    dec = apd_lens.decompose(model, TMSData(5, 32, seed=2), small_config(n_subcomponents={"W": 6, "I": 3}))
    dec.save(tmp_path / "spd")
    again = apd_lens.load(tmp_path / "spd", model)
    assert type(again) is SPDDecomposition and same_state(dec, again)
    assert again.n_subcomponents("I") == 3 and again.n_subcomponents("W:use1") == 6
    x = TMSData(5, 16, seed=3).sample()
    masks = dec.causal_importances(x)
    torch.testing.assert_close(again.forward_with_masks(x, masks).output, dec.forward_with_masks(x, masks).output)
    assert again.loss_history == dec.loss_history
    with pytest.raises(ValueError, match="holds an SPD decomposition, not APD"):
        apd_lens.Decomposition.load(tmp_path / "spd", model)
    apd = apd_lens.decompose(model, TMSData(5, 32), APDConfig(n_components=3, steps=2, batch_size=16, progress=False))
    apd.save(tmp_path / "apd")
    with pytest.raises(ValueError, match="holds an APD decomposition, not SPD"):
        SPDDecomposition.load(tmp_path / "apd", model)
    assert type(apd_lens.load(tmp_path / "apd", model)) is apd_lens.Decomposition


def test_resume_from_a_middle_checkpoint_equals_the_uninterrupted_run(tmp_path):
    cfg = small_config(steps=20, n_mask_samples=2)
    plain = apd_lens.decompose(TMS(5, 2), TMSData(5, 32, seed=4), cfg)
    full = apd_lens.decompose(
        TMS(5, 2), TMSData(5, 32, seed=4), cfg, run_dir=tmp_path / "a", checkpoint_every=6, keep_checkpoints=0
    )
    assert same_state(plain, full)
    middle = [p for p in list_checkpoints(tmp_path / "a") if p.stem.endswith("12")][0]
    resumed = apd_lens.decompose(TMS(5, 2), TMSData(5, 32, seed=4), None, run_dir=tmp_path / "b", resume=middle)
    assert same_state(plain, resumed)
    assert resumed.loss_history == plain.loss_history


def test_resuming_with_the_other_methods_config_is_refused(tmp_path):
    apd_lens.decompose(TMS(5, 2), TMSData(5, 32), small_config(), run_dir=tmp_path / "spd", checkpoint_every=6)
    apd_cfg = APDConfig(n_components=3, steps=12, batch_size=32, progress=False)
    with pytest.raises(ValueError, match="it is an SPD run, and this call asks for APDConfig"):
        apd_lens.decompose(TMS(5, 2), TMSData(5, 32), apd_cfg, run_dir=tmp_path / "spd", resume=True)
    apd_lens.decompose(TMS(5, 2), TMSData(5, 32), apd_cfg, run_dir=tmp_path / "apd", checkpoint_every=6)
    with pytest.raises(ValueError, match="it is an APD run, and this call asks for SPDConfig"):
        apd_lens.decompose(TMS(5, 2), TMSData(5, 32), small_config(), run_dir=tmp_path / "apd", resume=True)
    with pytest.raises(ValueError, match="it is an APD run, and this call asks for method='spd'"):
        apd_lens.decompose(TMS(5, 2), TMSData(5, 32), None, method="spd", run_dir=tmp_path / "apd", resume=True)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"n_subcomponents": 0}, "n_subcomponents (C) must be integers >= 1"),
        ({"n_subcomponents": {"W": 4, "I": -1}}, "n_subcomponents (C) must be integers >= 1"),
        ({"n_subcomponents": {}}, "empty dict"),
        ({"importance_p": 0.0}, "importance_p must be > 0"),
        ({"importance_p": -1.0}, "importance_p must be > 0"),
        ({"importance_beta": -0.1}, "importance_beta must be >= 0"),
        ({"pgd_recon_coeff": -1.0}, "pgd_recon_coeff must be >= 0"),
        ({"pgd_steps": -1}, "pgd_steps must be an integer >= 0"),
        ({"pgd_step_size": 0.0}, "pgd_step_size must be > 0"),
        ({"pgd_init": "normal"}, "pgd_init must be one of"),
        ({"pgd_scope": "batch"}, "pgd_scope must be one of"),
        ({"importance_minimality_coeff": -1e-3}, "importance_minimality_coeff must be >= 0"),
        ({"stochastic_recon_coeff": -1.0}, "stochastic_recon_coeff must be >= 0"),
        ({"faithfulness_coeff": -1.0}, "faithfulness_coeff must be >= 0"),
        ({"n_mask_samples": 0}, "n_mask_samples (S) must be an integer >= 1"),
        ({"ci_fn": "attention"}, "ci_fn must be one of"),
        ({"sampling": "gaussian"}, "sampling must be one of"),
        ({"ci_hidden": 0}, "ci_hidden must be an integer >= 1"),
        ({"p_anneal_start_frac": 0.8, "p_anneal_end_frac": 0.5}, "p annealing needs"),
        ({"act_recon_coeff": 1.0}, "needs act_recon_hooks"),
        ({"lr": 0.0}, "lr must be > 0"),
    ],
)
def test_impossible_spd_config_values(kwargs, needle):
    with pytest.raises(ValueError, match="Invalid SPDConfig") as err:
        SPDConfig(**kwargs)
    assert needle in str(err.value)


def test_a_weight_without_a_c_is_named():
    with pytest.raises(KeyError, match="no C for weight 'I'"):
        SPDDecomposition(
            TMS(5, 2, identity=True),
            TMS(5, 2, identity=True).apd_weight_specs(),
            small_config(n_subcomponents={"W": 4}),
        )


def test_bad_masks_are_refused_clearly():
    model = TMS(5, 2)
    dec = SPDDecomposition(model, model.apd_weight_specs(), small_config())
    x = TMSData(5, 8).sample()
    with pytest.raises(ValueError, match=r"mask of 'W' must have shape \(8, 6\) \(\[\*batch, C\]\), got \(8, 5\)"):
        dec.forward_with_masks(x, {"W": torch.ones(8, 5)})
    with pytest.raises(KeyError, match="'b_final', which is not a decomposed weight use; the sites are"):
        dec.forward_with_masks(x, {"b_final": torch.ones(8, 6)})
    with pytest.raises(TypeError, match="masks must be a dict"):
        dec.forward_with_masks(x, torch.ones(8, 6))
    with pytest.raises(ValueError, match='masks must be a dict, None, "ci" or "stochastic"'):
        dec(x, "topk")


def test_unnamed_sites_stay_at_their_unmasked_sum():
    """Masking only W's first use: per data point, ReLU((x W'_n) (V U)ᵀ + b) with W'_n = Σ_c m[n, c] V_c ⊗ U_c
    written out by loops and the unnamed second use at the full sum V U (not the target's W)."""
    model = TMS(5, 2)
    dec = SPDDecomposition(model, model.apd_weight_specs(), small_config(use_delta_component=False))
    x = TMSData(5, 8, p=0.5).sample()
    m = torch.rand(8, 6)
    got = dec.forward_with_masks(x, {"W": m}).output
    V, U = dec.subcomponents["W"].V.detach(), dec.subcomponents["W"].U.detach()
    full = sum(torch.outer(V[:, c], U[c]) for c in range(6))
    assert (full - model.W).abs().max() > 1e-3  # the sum is not the target, so the two readings differ
    for n in range(8):
        masked = sum(m[n, c] * torch.outer(V[:, c], U[c]) for c in range(6))
        want = torch.relu((x[n] @ masked) @ full.T + model.b_final)
        torch.testing.assert_close(got[n], want.detach(), rtol=1e-5, atol=1e-6)


def test_hooks_show_ci_and_subcomponent_acts_in_run_with_cache():
    model = TMS(5, 2)
    dec = SPDDecomposition(model, model.apd_weight_specs(), small_config())
    x = TMSData(5, 8, p=0.5).sample()
    out, cache = dec.run_with_cache(x, masks="ci")
    ci = dec.causal_importances(x)
    torch.testing.assert_close(cache["W.hook_ci"], ci["W"])
    torch.testing.assert_close(cache["W.hook_ci_use1"], ci["W:use1"])
    sub = dec.subcomponents["W"]
    torch.testing.assert_close(cache["W.hook_subcomponent_acts"], (x @ sub.V) * ci["W"])
    assert cache["W.hook_subcomponent_acts_use1"].shape == (8, 6)

    # ablation with a hook equals a zero mask
    def ablate(t, hook):
        t[:, 3] = 0
        return t

    ones = {s: torch.ones(8, 6) for s in dec.sites}
    hooked = dec.run_with_hooks(x, ones, fwd_hooks=[("W.hook_subcomponent_acts", ablate)])
    zero = dict(ones, W=ones["W"].clone())
    zero["W"][:, 3] = 0
    torch.testing.assert_close(hooked, dec(x, zero))


def test_shortened_tms_5_2_recovery():
    """A short SPD run on TMS 5-2 (seed 1; 3000 steps at lr 3e-3) finds every feature in one subcomponent,
    at full length: the issue's bar for full runs. Measured with this config (C 40), seeds 1-5: MMCS
    0.99985-0.999998, ML2R 0.9963-0.9975 over parts with norm >= 1% of the largest (as examples/tms.py's last
    line). Over all parts seed 3 gives ML2R 0.7975: a leftover of norm < 1% has the best cosine for one
    feature (docs/results.md, "SPD")."""
    from apd_lens.analysis.metrics import mmcs_ml2r
    from apd_lens.models.tms import train_tms

    torch.manual_seed(1)
    model = TMS(5, 2, seed=1)
    train_tms(model, steps=2000, seed=1, progress=False)
    cfg = model.spd_default_config().replace(steps=3000, lr=3e-3, progress=False, seed=1)
    dec = apd_lens.decompose(model, TMSData(5, cfg.batch_size, seed=1001), cfg)
    mmcs, ml2r = mmcs_ml2r(dec.subcomponent_weights()["W"], model.W.detach(), min_norm_frac=0.01)
    assert mmcs >= 0.999 and abs(ml2r - 1) <= 0.02, (mmcs, ml2r)


def test_a_users_own_model_with_weight_specs_and_a_run_dir(tmp_path):
    """decompose(..., weights=[WeightSpec...]) on a user's HookedRootModule, with metrics.jsonl written."""
    import json

    from tests.toy_models import TwoLayerMLP, two_layer_specs

    model = TwoLayerMLP()
    data = torch.randn(64, 4)
    cfg = small_config(n_subcomponents={"W1": 5, "W2": 3}, ci_fn="shared_mlp", use_delta_component=False)
    dec = apd_lens.decompose(model, data, cfg, weights=two_layer_specs(), run_dir=tmp_path / "run")
    assert dec.sites == ["W1", "W2"] and dec.n_subcomponents("W2") == 3
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows == dec.loss_history and rows[-1]["step"] == 11
    assert json.loads((tmp_path / "run" / "cfg.json").read_text())["method"] == "spd"
    again = apd_lens.load(tmp_path / "run", model)
    x = torch.randn(5, 4)
    torch.testing.assert_close(again(x, "ci"), dec(x, "ci"))


def test_mmcs_ml2r_can_leave_out_negligible_parts():
    """A leftover part of norm 1e-4 pointing exactly along feature 1 wins its max cosine in the papers'
    metric; with min_norm_frac it takes no part (checked against the loop written here)."""
    from apd_lens.analysis.metrics import mmcs_ml2r

    target = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    parts = torch.zeros(3, 2, 2)
    parts[0, 0] = torch.tensor([1.0, 0.0])
    parts[1, 1] = torch.tensor([0.01, 2.0])  # cos 0.99999
    parts[2, 1] = torch.tensor([0.0, 1e-4])  # cos 1, negligible
    assert mmcs_ml2r(parts, target) == pytest.approx((1.0, (1.0 + 5e-5) / 2))
    cos = 2.0 / (0.01**2 + 4.0) ** 0.5
    ratio = (0.01**2 + 4.0) ** 0.5 / 2.0
    assert mmcs_ml2r(parts, target, min_norm_frac=0.01) == pytest.approx(((1.0 + cos) / 2, (1.0 + ratio) / 2))
