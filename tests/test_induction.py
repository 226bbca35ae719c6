"""The induction task and its analysis against explicit loops and torch.func.functional_call."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

pytest.importorskip("transformer_lens.HookedTransformer")

import apd_lens  # noqa: E402
from apd_lens.adapters import select_weights  # noqa: E402
from apd_lens.analysis.induction import analyse_induction, head_roles, head_shares  # noqa: E402
from apd_lens.models.induction import (  # noqa: E402
    InductionTask,
    half_losses,
    induction_apd_config,
    induction_spd_config,
    make_induction_model,
    next_token_losses,
    train_induction,
)


def test_sequences_repeat_their_first_copy_and_masks_mark_the_copies():
    task = InductionTask(d_vocab=20, max_len=5)
    tokens, copies = task.sequences(64, torch.Generator().manual_seed(0))
    assert tokens.shape == (64, task.n_ctx) and task.n_ctx == 16
    first, repeat = task.first_half_mask(copies), task.repeat_mask(copies)
    for i in range(64):
        start, n = copies[i].tolist()
        assert tokens[i, 0] == 0 and (tokens[i, 1:] > 0).all()
        assert 1 <= start <= 1 + 5 and 2 <= n <= 5
        for j in range(n):
            assert tokens[i, start + n + j] == tokens[i, start + j]
        for p in range(task.n_ctx - 1):
            assert first[i, p] == (start <= p + 1 < start + n)  # the next token is in the first copy
            assert repeat[i, p] == (start + n <= p and p + 1 < start + 2 * n)  # both in the second copy
    assert len({tuple(c) for c in copies.tolist()}) > 10  # where and how long vary
    with pytest.raises(ValueError, match="min_len"):
        InductionTask(max_len=4, min_len=5)


def test_half_losses_match_loops():
    task = InductionTask(d_vocab=7, max_len=3)
    gen = torch.Generator().manual_seed(1)
    tokens, copies = task.sequences(5, gen)
    logits = torch.randn(5, task.n_ctx, 7, generator=gen)
    first, repeat = [], []
    for i in range(5):
        for p in range(task.n_ctx - 1):
            loss = -torch.log_softmax(logits[i, p], -1)[tokens[i, p + 1]].item()
            if task.first_half_mask(copies)[i, p]:
                first.append(loss)
            if task.repeat_mask(copies)[i, p]:
                repeat.append(loss)
    got = half_losses(logits, tokens, copies, task)
    assert got == pytest.approx((sum(first) / len(first), sum(repeat) / len(repeat)), rel=1e-5)
    assert next_token_losses(logits, tokens).shape == (5, task.n_ctx - 1)


def test_head_roles_match_loops():
    task = InductionTask(d_vocab=9, max_len=4)
    gen = torch.Generator().manual_seed(2)
    tokens, copies = task.sequences(6, gen)
    patterns = {L: torch.rand(6, 2, task.n_ctx, task.n_ctx, generator=gen) for L in range(2)}
    roles = head_roles(patterns, copies, task)
    for L in range(2):
        for h in range(2):
            prev, ind = [], []
            for i in range(6):
                start, n = copies[i].tolist()
                for q in range(task.n_ctx - 1):
                    if start + n <= q < start + 2 * n - 1:
                        prev.append(patterns[L][i, h, q, q - 1].item())
                        ind.append(patterns[L][i, h, q, q - n + 1].item())
            assert roles[f"L{L}H{h}"]["prev_token"] == pytest.approx(sum(prev) / len(prev), rel=1e-5)
            assert roles[f"L{L}H{h}"]["induction"] == pytest.approx(sum(ind) / len(ind), rel=1e-5)


@pytest.fixture(scope="module")
def small_target():
    task = InductionTask(d_vocab=16, max_len=4)
    model = make_induction_model(task, d_model=8, n_heads=2, seed=0)
    train_induction(model, task, steps=100, batch_size=32, progress=False)
    return task, model


def native(name: str, matrix: torch.Tensor, n_heads: int) -> torch.Tensor:
    """A [d_in, d_out] matrix of an attention weight in TransformerLens's per-head layout."""
    if name.endswith("W_O"):  # [(h e), d] -> [h, e, d]
        return matrix.reshape(n_heads, -1, matrix.shape[-1])
    return matrix.reshape(matrix.shape[0], n_heads, -1).permute(1, 0, 2)  # [d, (h e)] -> [h, d, e]


def test_spd_analysis_matches_loops_and_functional_call(small_target):
    task, model = small_target
    config = induction_spd_config(n_subcomponents=4, steps=20, batch_size=8, progress=False)
    data, _ = task.sequences(64, torch.Generator().manual_seed(3))
    dec = apd_lens.decompose(model, data, config, weights=select_weights(model, list(config.weights)))
    base = analyse_induction(dec, task, n_sequences=32, seed=4)
    ratios = sorted(base.activity_repeat[u] / f for u, f in base.activity_first.items() if f > 0)
    contrast = (ratios[len(ratios) // 2 - 1] + ratios[len(ratios) // 2]) / 2  # halfway between two units
    report = analyse_induction(dec, task, n_sequences=32, high=0.0, contrast=contrast, seed=4)
    assert report.total == 8 * 4

    tokens, copies = task.sequences(32, torch.Generator().manual_seed(4))
    ci = dec.causal_importances(tokens)
    first, repeat = task.first_half_mask(copies), task.repeat_mask(copies)
    found = []
    for site in dec.sites:
        for c in range(4):
            on_first = [ci[site][i, p, c].item() for i in range(32) for p in range(task.n_ctx - 1) if first[i, p]]
            on_repeat = [ci[site][i, p, c].item() for i in range(32) for p in range(task.n_ctx - 1) if repeat[i, p]]
            assert report.activity_first[(site, c)] == pytest.approx(sum(on_first) / len(on_first), abs=1e-5)
            assert report.activity_repeat[(site, c)] == pytest.approx(sum(on_repeat) / len(on_repeat), abs=1e-5)
            if sum(on_repeat) / len(on_repeat) >= contrast * sum(on_first) / len(on_first):
                found.append((site, c))
    assert report.found == found and 0 < len(found) < 32

    def weights_with(units: set, keep_only: bool) -> dict[str, torch.Tensor]:
        weights = {}
        for site, sub in dec.subcomponents.items():
            V, U = sub.V.detach(), sub.U.detach()
            W = native(site, V @ U, 2)
            delta = model.get_parameter(site).detach() - W
            on = [c for c in range(4) if ((site, c) in units) == keep_only]
            weights[site] = delta + native(site, sum((torch.outer(V[:, c], U[c]) for c in on), torch.zeros(8, 8)), 2)
        return weights

    ablated = functional_call(model, weights_with(set(found), keep_only=False), (tokens,))
    assert report.losses["ablated"] == pytest.approx(half_losses(ablated, tokens, copies, task), rel=1e-4)
    kept = functional_call(model, weights_with(set(report.kept), keep_only=True), (tokens,))
    assert report.losses["kept only"] == pytest.approx(half_losses(kept, tokens, copies, task), rel=1e-4)
    no_attention = {
        f"blocks.{L}.attn.{p}": torch.zeros_like(model.get_parameter(f"blocks.{L}.attn.{p}"))
        for L in (0, 1)
        for p in ("W_O", "b_O")
    }
    removed = functional_call(model, no_attention, (tokens,))
    assert report.losses["attention removed"] == pytest.approx(half_losses(removed, tokens, copies, task), rel=1e-5)
    _, cache = model.run_with_cache(tokens)
    at_mean = {f"blocks.{L}.attn.W_O": no_attention[f"blocks.{L}.attn.W_O"] for L in (0, 1)}
    at_mean |= {f"blocks.{L}.attn.b_O": cache[f"blocks.{L}.hook_attn_out"].mean((0, 1)) for L in (0, 1)}
    mean_ablated = functional_call(model, at_mean, (tokens,))
    got = report.losses["attention mean-ablated"]
    assert got == pytest.approx(half_losses(mean_ablated, tokens, copies, task), rel=1e-5)
    assert report.losses["decomposition"] == pytest.approx(report.losses["target"], abs=1e-3)

    # where a subcomponent's weight sits, head by head
    site, c = found[0]
    sub = dec.subcomponents[site]
    per_head = native(site, torch.outer(sub.V[:, c], sub.U[c]).detach(), 2).pow(2).sum(dim=(1, 2))
    shares = head_shares(dec, (site, c), 2)
    short = site.replace("attn.", "")
    assert [shares[f"{short} H{h}"] for h in (0, 1)] == pytest.approx((per_head / per_head.sum()).tolist(), rel=1e-5)
    line = report.last_line()
    assert line.startswith(f"IH_SUBCOMPONENTS={len(found)}/32 REPEAT_LOSS_ABLATED=")


@pytest.mark.parametrize("bad", [{"contrast": -1.0}, {"high": -0.5}, {"low": -0.1}])
def test_analysis_refuses_meaningless_thresholds(small_target, bad):
    task, model = small_target
    config = induction_spd_config(n_subcomponents=2, steps=1, batch_size=4, progress=False)
    data, _ = task.sequences(8, torch.Generator().manual_seed(3))
    dec = apd_lens.decompose(model, data, config, weights=select_weights(model, list(config.weights)))
    with pytest.raises(ValueError, match="contrast, high and low >= 0"):
        analyse_induction(dec, task, n_sequences=4, **bad)


def test_apd_analysis_ablates_global_components(small_target):
    task, model = small_target
    config = induction_apd_config(n_components=5, rank=2, attribution_probes=4, steps=5, batch_size=8, progress=False)
    data, _ = task.sequences(64, torch.Generator().manual_seed(3))
    dec = apd_lens.decompose(model, data, config, weights=select_weights(model, list(config.weights)))
    report = analyse_induction(dec, task, n_sequences=16, high=0.0, low=2.0, contrast=0.0, seed=4)
    assert report.total == 5 and [u for u in report.found] == [("", c) for c in range(5)]  # every component
    tokens, copies = task.sequences(16, torch.Generator().manual_seed(4))
    off = {name: torch.zeros_like(model.get_parameter(name)) for name in dec.component_weights()}
    logits = functional_call(model, off, (tokens,))  # every component ablated: the weights are zero
    assert report.losses["ablated"] == pytest.approx(half_losses(logits, tokens, copies, task), rel=1e-4)


def test_example_reanalyses_a_saved_run_and_refuses_other_settings(tmp_path, capsys):
    from examples_runner import run_example

    argv = ["--method", "spd", "--target-steps", "20", "--steps", "3", "--vocab", "16", "--max-len", "4"]
    argv += ["--d-model", "8", "--n-eval", "16", "--no-progress", "--threads", "1", "--out", str(tmp_path)]
    first = run_example("induction.py", argv)
    assert capsys.readouterr().out.strip().splitlines()[-1] == first.last_line()
    again = run_example("induction.py", argv)
    assert "loaded the decomposition saved" in capsys.readouterr().out
    assert again.last_line() == first.last_line()
    with pytest.raises(SystemExit, match="other settings.*config.n_subcomponents"):
        run_example("induction.py", [*argv, "--set", "n_subcomponents=5"])
    with pytest.raises(SystemExit, match="target.target_steps"):
        run_example("induction.py", [*argv, "--target-steps", "21"])


@pytest.fixture(scope="module")
def shortened_target():
    """The example's target (vocabulary 64, d_model 32, seed 0) after 1,500 of its 6,000 steps (~50 s)."""
    task = InductionTask(d_vocab=64, max_len=8)
    model = make_induction_model(task, d_model=32, seed=0)
    train_induction(model, task, steps=1500, seed=0, progress=False)
    model.requires_grad_(False)
    return task, model


def test_shortened_training_grows_induction_heads(shortened_target):
    """Measured: second-copy loss 0.349 (first copy 4.214, chance 4.143), layer 0 head 0 previous-token 0.53,
    layer-1 heads induction 0.90 / 0.88. Seed 1 copies with heads that look a fixed number of positions back
    instead (docs/results.md), so the check names its seed."""
    task, model = shortened_target
    tokens, copies = task.sequences(256, torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    first, repeat = half_losses(logits, tokens, copies, task)
    assert repeat < 0.6 and first > 0.98 * task.chance_loss(), (first, repeat)
    roles = head_roles({L: cache[f"blocks.{L}.attn.hook_pattern"] for L in (0, 1)}, copies, task)
    assert max(roles[f"L0H{h}"]["prev_token"] for h in (0, 1)) > 0.4, roles
    assert min(roles[f"L1H{h}"]["induction"] for h in (0, 1)) > 0.7, roles


def test_shortened_spd_finds_the_copying_subcomponents(shortened_target):
    """SPD with the example's config for 500 of its 4,000 steps (~60-150 s). Measured (1 thread, 4 other jobs):
    20 of 256 subcomponents copy, all in layer 1's W_O; ablating them: second-copy loss 0.382 -> 2.873, first
    copy 4.217 -> 4.166; keeping only them and the first copy's units: second copy 0.412 (1,000 steps: 22 units,
    0.382 -> 3.633; with the paper's per-subcomponent CI MLP at 500 steps: 21 units, 0.382 -> 2.756)."""
    task, model = shortened_target
    config = induction_spd_config(steps=500, seed=0, progress=False)
    data, _ = task.sequences(8192, torch.Generator().manual_seed(1000))
    dec = apd_lens.decompose(model, data, config, weights=select_weights(model, list(config.weights)))
    report = analyse_induction(dec, task, n_sequences=256, seed=2000)
    assert 0.04 * 256 <= len(report.found) <= 0.1 * 256, report.describe()
    assert {site for site, _ in report.found} == {"blocks.1.attn.W_O"}, report.describe()
    (first, repeat), (first_ablated, repeat_ablated) = report.losses["decomposition"], report.losses["ablated"]
    assert repeat < 0.6 and repeat_ablated > 2.0, report.describe()
    assert abs(first_ablated - first) < 0.05 * first, report.describe()
    assert report.losses["kept only"][1] < 1.0, report.describe()
