"""LM evaluation (apd_lens.analysis.lm_eval) against explicit loops on a tiny HookedTransformer."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformer_lens.HookedTransformer")


from apd_lens import SPDConfig, SPDDecomposition  # noqa: E402
from apd_lens.adapters import specs_for_model  # noqa: E402
from apd_lens.analysis.lm_eval import LMEvaluation, adversarial_kl, evaluate_lm  # noqa: E402
from tests.transformer_checks import spread_ci_, tiny_lm  # noqa: E402

VOCAB, CTX = 11, 6


@pytest.fixture(scope="module")
def setup():
    model = tiny_lm(VOCAB, CTX)
    dec = SPDDecomposition(model, specs_for_model(model), SPDConfig(n_subcomponents=3, output_loss="kl", seed=1))
    spread_ci_(dec)  # CI outputs over (-, 0, 1, +)
    tokens = torch.randint(0, VOCAB, (5, CTX), generator=torch.Generator().manual_seed(4))
    return dec, tokens


def ce_by_loop(logits: torch.Tensor, seq: torch.Tensor) -> float:
    """Summed next-token CE of one sequence, position by position."""
    total = 0.0
    for t in range(seq.shape[0] - 1):
        logp = logits[t] - torch.logsumexp(logits[t], dim=0)
        total -= float(logp[seq[t + 1]])
    return total


def kl_by_formula(masked: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(target, -1)
    return (p * (torch.log(p) - torch.log_softmax(masked, -1))).sum(-1).mean()


def test_evaluation_matches_loops_over_sequences(setup):
    dec, tokens = setup
    result = evaluate_lm(dec, tokens, batch_size=2, adversarial_steps=(), seed=7, progress=False)
    sums = dict.fromkeys(("target", "all_on", "stochastic", "ci", "above0", "above_half"), 0.0)
    generator = torch.Generator().manual_seed(7)
    all_ci = {s: [] for s in dec.sites}
    for start in range(0, 5, 2):  # the stochastic masks' draws follow the batches
        batch = tokens[start : start + 2]
        ci = dec.causal_importances(batch)
        stochastic = {s: g + (1 - g) * torch.rand(g.shape, generator=generator, dtype=g.dtype) for s, g in ci.items()}
        for i in range(batch.shape[0]):
            seq = batch[i]
            row = {s: g[i : i + 1] for s, g in ci.items()}
            outs = {
                "target": dec.model(seq[None]),
                "all_on": dec(seq[None]),
                "stochastic": dec(seq[None], {s: m[i : i + 1] for s, m in stochastic.items()}),
                "ci": dec(seq[None], row),
                "above0": dec(seq[None], {s: (g > 0).double() for s, g in row.items()}),
                "above_half": dec(seq[None], {s: (g > 0.5).double() for s, g in row.items()}),
            }
            for name, logits in outs.items():
                sums[name] += ce_by_loop(logits[0].detach(), seq)
        for s, g in ci.items():
            all_ci[s].append(g.reshape(-1, g.shape[-1]))
    n_pred = 5 * (CTX - 1)
    assert result.n_tokens == n_pred
    for name, attr in [
        ("target", "ce_target"),
        ("all_on", "ce_all_on"),
        ("stochastic", "ce_stochastic"),
        ("ci", "ce_ci"),
        ("above0", "ce_ci_above_0"),
        ("above_half", "ce_ci_above_half"),
    ]:
        assert getattr(result, attr) == pytest.approx(sums[name] / n_pred, rel=1e-9), name
    assert result.ce_all_on == pytest.approx(result.ce_target, rel=1e-9)  # all on + delta = the target
    assert result.ce_ci != pytest.approx(result.ce_target, rel=1e-3)  # the masks do something here
    for s, parts in all_ci.items():
        g = torch.cat(parts)
        alive = sum(1 for c in range(g.shape[1]) if float(g[:, c].mean()) > 1e-6)
        l0 = sum(int(v > 0) for v in g.flatten()) / g.shape[0]
        assert result.alive[s] == alive
        assert result.l0_per_token[s] == pytest.approx(l0)
    assert 0 < result.l0_total < result.subcomponents_total  # some on, some off


def test_adversarial_kl_follows_the_sign_of_finite_differences(setup):
    dec, tokens = setup
    batch = tokens[:2]
    ci = dec.causal_importances(batch)
    target = dec.model(batch).detach()
    steps = 2
    got = adversarial_kl(dec, batch, ci, target, steps, torch.Generator().manual_seed(5))

    generator = torch.Generator().manual_seed(5)  # the same starting draws, in the same order
    src = {s: torch.rand(g.shape[-1], generator=generator).double() for s, g in ci.items()}
    delta = {s: torch.rand((), generator=generator).double() for s in ci}

    def kl(src, delta) -> float:
        masks = {s: g + (1 - g) * src[s] for s, g in ci.items()}
        dmasks = {s: d.expand(batch.shape) for s, d in delta.items()}
        with torch.no_grad():
            return float(kl_by_formula(dec.forward_with_masks(batch, masks, delta_masks=dmasks).output, target))

    eps, step = 1e-6, 2.0 / steps
    for _ in range(steps):
        new_src = {s: v.clone() for s, v in src.items()}
        new_delta = dict(delta)
        for s in src:
            for c in range(src[s].shape[0]):
                up, down = src[s].clone(), src[s].clone()
                up[c] += eps
                down[c] -= eps
                diff = kl({**src, s: up}, delta) - kl({**src, s: down}, delta)
                new_src[s][c] = min(max(float(src[s][c]) + step * (1 if diff > 0 else -1), 0.0), 1.0)
            diff = kl(src, {**delta, s: delta[s] + eps}) - kl(src, {**delta, s: delta[s] - eps})
            new_delta[s] = torch.tensor(min(max(float(delta[s]) + step * (1 if diff > 0 else -1), 0.0), 1.0))
        src, delta = new_src, new_delta
    assert got == pytest.approx(kl(src, delta), rel=1e-9)
    start = torch.Generator().manual_seed(5)
    initial = kl(
        {s: torch.rand(g.shape[-1], generator=start).double() for s, g in ci.items()},
        {s: torch.rand((), generator=start).double() for s in ci},
    )
    assert got > initial  # the ascent raised the distance


def test_result_saves_prints_and_refuses_bad_input(setup, tmp_path):
    dec, tokens = setup
    result = evaluate_lm(dec, tokens, batch_size=4, adversarial_steps=(3,), adversarial_batches=1, progress=False)
    assert set(result.adversarial_kl) == {3} and result.adversarial_kl[3] > 0
    result.save(tmp_path)
    assert LMEvaluation.load(tmp_path) == result
    line = result.summary_line()
    assert line.startswith(f"CE_TARGET={result.ce_target:.4f} CE_CI={result.ce_ci:.4f}")
    assert f"ADV_KL3={result.adversarial_kl[3]:.4f}" in line
    assert line.endswith(f"ALIVE={result.alive_total}/{result.subcomponents_total}")
    table = result.table()
    assert "CI values as masks" in table and f"{result.ce_ci:.4f}" in table
    with pytest.raises(ValueError, match="integer token sequences"):
        evaluate_lm(dec, tokens.double(), progress=False)
    with pytest.raises(ValueError, match="integer token sequences"):
        evaluate_lm(dec, tokens[0], progress=False)
    with pytest.raises(FileNotFoundError, match="no lm_eval.json"):
        LMEvaluation.load(tmp_path / "nothing")


def test_bare_call_on_a_language_model_chooses_the_vpd_recipe(setup, caplog):
    from apd_lens.models.tms import TMS
    from apd_lens.training.loop import _resolve_config, default_config

    dec, tokens = setup
    model = dec.model
    with caplog.at_level("WARNING", logger="apd_lens.training.loop"):
        config = _resolve_config(model, None, None, None, None)
    assert isinstance(config, SPDConfig) and config.extra.get("preset") == "vpd"
    assert config.output_loss == "kl" and config.ci_fn == "global_mlp" and config.pgd_scope == "persistent"
    d_model, d_mlp, d_head_all = 8, 12, 8  # C follows each matrix's smaller dim: W_in 4 x 8, W_out 14/3 x 8
    assert config.n_subcomponents["blocks.0.mlp.W_in"] == round(4 * min(d_model, d_mlp))
    assert config.n_subcomponents["blocks.0.mlp.W_out"] == round(14 / 3 * min(d_mlp, d_model))
    assert config.n_subcomponents["blocks.0.attn.W_O"] == round(4 / 3 * min(d_head_all, d_model))
    assert any("language-model recipe" in r.getMessage() and "'vpd'" in r.getMessage() for r in caplog.records)
    assert default_config(model, "spd", "lm_toy").extra.get("preset") != "vpd"
    with pytest.raises(ValueError, match="presets are"):
        default_config(model, "spd", "paper")
    assert type(default_config(model, "apd")).__name__ == "APDConfig"  # asked for by name
    assert type(default_config(TMS(5, 2))).__name__ == "APDConfig"  # a toy model keeps APD
