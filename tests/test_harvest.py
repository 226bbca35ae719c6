"""The harvest (apd_lens.analysis.harvest) against explicit loops over sequences, positions and tokens."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

pytest.importorskip("transformer_lens.HookedTransformer")


from apd_lens import SPDConfig, SPDDecomposition  # noqa: E402
from apd_lens.adapters import specs_for_model  # noqa: E402
from apd_lens.analysis.harvest import (  # noqa: E402
    Harvest,
    NothingFiresError,
    harvest,
)
from apd_lens.analysis.token_purity import neuron_token_purity, token_purity
from apd_lens.models.tms import TMS  # noqa: E402
from tests.transformer_checks import spread_ci_, tiny_lm  # noqa: E402

VOCAB, CTX, N_SEQ, THRESHOLD = 11, 6, 5, 0.1


@pytest.fixture(scope="module")
def setup():
    model = tiny_lm(VOCAB, CTX)
    dec = spread_ci_(SPDDecomposition(model, specs_for_model(model), SPDConfig(n_subcomponents=3, seed=1)))
    tokens = torch.randint(0, VOCAB, (N_SEQ, CTX), generator=torch.Generator().manual_seed(4))
    result = harvest(dec, tokens, batch_size=2, n_top=3, n_samples=4, window=(2, 1), n_ablate=100, progress=False)
    return dec, tokens, result


def ci_by_sequence(dec, tokens) -> dict[str, torch.Tensor]:
    """CI [n_seq, pos, C] per site, one sequence at a time."""
    per = [dec.causal_importances(tokens[b : b + 1]) for b in range(tokens.shape[0])]
    return {s: torch.cat([p[s] for p in per]) for s in dec.sites}


def test_density_mean_ci_and_token_counts_match_a_loop(setup):
    dec, tokens, result = setup
    ci = ci_by_sequence(dec, tokens)
    n_points = N_SEQ * CTX
    assert result.n_points == n_points and result.kind == "tokens"
    n_alive = 0
    for site in dec.sites:
        for c in range(dec.n_subcomponents(site)):
            card = result.card(site, c)
            fires, cur, nxt, total = 0, Counter(), Counter(), 0.0
            for b in range(N_SEQ):
                for p in range(CTX):
                    g = float(ci[site][b, p, c])
                    total += g
                    if g > THRESHOLD:
                        fires += 1
                        cur[int(tokens[b, p])] += 1
                        if p + 1 < CTX:
                            nxt[int(tokens[b, p + 1])] += 1
            assert card.n_firing == fires
            assert card.density == pytest.approx(fires / n_points)
            assert card.mean_ci == pytest.approx(total / n_points)
            assert dict(card.current_tokens) == {t: n for t, n in cur.items() if (t, n) in card.current_tokens}
            assert [n for _, n in card.current_tokens] == sorted(cur.values(), reverse=True)[:10]
            assert [n for _, n in card.next_tokens] == sorted(nxt.values(), reverse=True)[:10]
            assert card.n_firing_with_next == sum(nxt.values())
            n_alive += fires > 0
    assert 0 < n_alive < sum(dec.n_subcomponents(s) for s in dec.sites)  # the fixture has dead and alive ones


def test_top_and_sample_contexts_are_windows_of_firing_positions(setup):
    dec, tokens, result = setup
    ci = ci_by_sequence(dec, tokens)
    for site in dec.sites:
        for c in range(dec.n_subcomponents(site)):
            card = result.card(site, c)
            firing = sorted((float(ci[site][b, p, c]) for b in range(N_SEQ) for p in range(CTX)), reverse=True)
            firing = [g for g in firing if g > THRESHOLD]
            shown = [ctx.ci[ctx.focus] for ctx in card.top_contexts]
            assert shown == pytest.approx(firing[:3])
            assert len(card.sample_contexts) == min(4, len(firing))
            for ctx in card.top_contexts + card.sample_contexts:
                b = ctx.sequence
                # find the window's place in its sequence: the focus token's position
                positions = [
                    p
                    for p in range(CTX)
                    if abs(float(ci[site][b, p, c]) - ctx.ci[ctx.focus]) < 1e-12
                    and tokens[b, max(0, p - 2) : p + 2].tolist() == ctx.tokens
                ]
                assert positions, (site, c, ctx)
                p = positions[0]
                assert ctx.focus == p - max(0, p - 2)
                assert ctx.ci == pytest.approx(ci[site][b, max(0, p - 2) : p + 2, c].tolist())
                assert ctx.ci[ctx.focus] == ctx.score > THRESHOLD
            starts = {(ctx.sequence, tuple(ctx.tokens), ctx.focus) for ctx in card.sample_contexts}
            assert len(starts) == len(card.sample_contexts)  # without replacement


def test_logit_effects_of_residual_writers_match_a_loop(setup):
    dec, _, result = setup
    for site in dec.sites:
        card = result.card(site, 0)
        if not site.endswith(("attn.W_O", "mlp.W_out")):
            assert card.promoted is None and card.suppressed is None
            continue
        U, W_U = dec.subcomponents[site].U, dec.model.W_U
        for c in range(U.shape[0]):
            logits = [sum(float(U[c, i].detach() * W_U[i, t]) for i in range(U.shape[1])) for t in range(VOCAB)]
            order = sorted(range(VOCAB), key=lambda t: -logits[t])
            card = result.card(site, c)
            assert [t for t, _ in card.promoted] == order[:10]
            assert [v for _, v in card.promoted] == pytest.approx([logits[t] for t in order[:10]])
            assert [t for t, _ in card.suppressed] == order[::-1][:10]


def test_ablation_kl_matches_a_loop_over_firing_tokens(setup):
    dec, tokens, result = setup
    ci = ci_by_sequence(dec, tokens)
    checked = 0
    for site in dec.sites:
        for c in range(dec.n_subcomponents(site)):
            card = result.card(site, c)
            kls = []
            for b in range(N_SEQ):
                seq = tokens[b : b + 1]
                masks = {s: torch.ones(1, CTX, dec.n_subcomponents(s), dtype=torch.float64) for s in dec.sites}
                masks[site][..., c] = 0
                target, ablated = dec.model(seq)[0].detach(), dec(seq, masks)[0].detach()
                for p in range(CTX):
                    if ci[site][b, p, c] > THRESHOLD:
                        prob = torch.softmax(target[p], -1)
                        kls.append(float((prob * (prob.log() - torch.log_softmax(ablated[p], -1))).sum()))
            if not kls:
                assert card.ablation is None
                continue
            assert card.ablation == pytest.approx(sum(kls) / len(kls), rel=1e-6)
            checked += 1
    assert checked > 5


def test_token_purity_matches_a_loop(setup):
    dec, tokens, result = setup
    ci = ci_by_sequence(dec, tokens)
    purity = token_purity(result)
    for unit, cur_purity, next_purity in zip(purity.units, purity.current, purity.next, strict=True):
        site, c = unit.rsplit(":", 1)
        cur, nxt = Counter(), Counter()
        for b in range(N_SEQ):
            for p in range(CTX):
                if ci[site][b, p, int(c)] > THRESHOLD:
                    cur[int(tokens[b, p])] += 1
                    if p + 1 < CTX:
                        nxt[int(tokens[b, p + 1])] += 1
        assert cur_purity == pytest.approx(max(cur.values()) / sum(cur.values()))
        if nxt:
            assert next_purity == pytest.approx(max(nxt.values()) / sum(nxt.values()))
        else:
            assert math.isnan(next_purity)
    assert len(purity.units) == len(result.alive_cards())


def test_neuron_token_purity_matches_a_loop(setup):
    dec, tokens, _ = setup
    purity = neuron_token_purity(dec.model, tokens, batch_size=2)
    _, cache = dec.model.run_with_cache(tokens)
    post = cache["blocks.0.mlp.hook_post"]
    expected = {}
    for n in range(post.shape[-1]):
        cur = Counter(int(tokens[b, p]) for b in range(N_SEQ) for p in range(CTX) if post[b, p, n] > 0)
        if cur:
            expected[f"blocks.0.mlp:{n}"] = max(cur.values()) / sum(cur.values())
    assert dict(zip(purity.units, purity.current, strict=True)) == pytest.approx(expected)


def test_save_and_load_round_trip_and_html(setup, tmp_path):
    _, _, result = setup
    folder = result.save(tmp_path)
    assert (folder / "index.json").is_file()
    again = Harvest.load(tmp_path)
    assert again == result
    card = again.alive_cards()[0]
    assert f"#{card.index}" in card._repr_html_() and "<table>" in again._repr_html_()


def test_toy_model_harvest_counts_active_features():
    model = TMS(5, 2, seed=0)
    dec = spread_ci_(SPDDecomposition(model, model.apd_weight_specs(), SPDConfig(n_subcomponents=4, seed=2)))
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(40, 5, generator=gen) * (torch.rand(40, 5, generator=gen) < 0.3)
    result = harvest(dec, x, batch_size=16, n_top=2, n_samples=3, n_ablate=100, progress=False)
    assert result.kind == "features" and result.n_points == 40
    ci = dec.causal_importances(x)
    for site in dec.sites:
        for c in range(4):
            card = result.card(site, c)
            firing = [n for n in range(40) if ci[site][n, c] > THRESHOLD]
            assert card.n_firing == len(firing)
            counts = Counter(int(f) for n in firing for f in range(5) if x[n, f] != 0)
            assert [n for _, n in card.current_tokens] == sorted(counts.values(), reverse=True)
            for ctx in card.top_contexts:
                assert ctx.tokens == [f for f in range(5) if x[ctx.sequence, f] != 0]
                assert ctx.values == pytest.approx(x[ctx.sequence, ctx.tokens].tolist())
                assert ctx.score == pytest.approx(float(ci[site][ctx.sequence, c]))
            top = sorted((float(ci[site][n, c]) for n in firing), reverse=True)[:2]
            assert [ctx.score for ctx in card.top_contexts] == pytest.approx(top)
            if firing:
                out = model(x[firing])
                masks = {s: torch.ones(len(firing), 4) for s in dec.sites}
                masks[site][:, c] = 0
                mse = (out - dec(x[firing], masks)).detach().square().mean(-1).mean()
                assert card.ablation == pytest.approx(float(mse), rel=1e-5)
    with pytest.raises(ValueError, match="language-model"):
        token_purity(result)


def test_nothing_firing_and_bad_inputs_are_clear_errors(setup):
    dec, tokens, _ = setup
    model = tiny_lm(VOCAB, CTX)
    silent = SPDDecomposition(model, specs_for_model(model), SPDConfig(n_subcomponents=3, seed=1))
    with torch.no_grad():
        for sub in silent.subcomponents.values():
            for fn in sub.ci_fns:
                fn.b_out.fill_(-50.0)
    with pytest.raises(NothingFiresError, match="no subcomponent fires"):
        harvest(silent, tokens, progress=False)
    with pytest.raises(ValueError, match="out of range"):
        harvest(dec, tokens + VOCAB, progress=False)
    with pytest.raises(ValueError, match="longer than"):
        harvest(dec, torch.zeros(2, CTX + 1, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="non-empty"):
        harvest(dec, tokens[:0], progress=False)
    with pytest.raises(FileNotFoundError, match="no harvest"):
        Harvest.load("/nonexistent_run_dir")
