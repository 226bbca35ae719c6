"""The fact-lookup task and transformer: data layout, training to full accuracy, a short APD run."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

pytest.importorskip("transformer_lens.HookedTransformer")

import apd_lens  # noqa: E402
from apd_lens.adapters import select_weights  # noqa: E402
from apd_lens.models.fact_lookup import (  # noqa: E402
    FactLookupTask,
    dedicated_facts,
    fact_accuracy,
    fact_lookup_apd_config,
    fact_lookup_spd_config,
    facts_with_own_subcomponent,
    make_fact_lookup_model,
    mlp_dependence,
    stochastic_recon_kl,
    train_fact_lookup,
)
from apd_lens.models.fact_neurons import (  # noqa: E402
    fact_neuron_push,
    least_used_neurons,
    shared_fact_neurons,
    split_neuron,
)
from tests.transformer_checks import masked_weight  # noqa: E402


def test_task_layout():
    task = FactLookupTask(n_facts=6, seed=1)
    values = task.values()
    assert sorted(values.tolist()) == list(range(6, 12))  # a bijection onto the value tokens
    assert torch.equal(task.values(), values)  # fixed by the seed
    x, y = task.sequences(), task.targets()
    assert x.tolist() == [[k, 12] for k in range(6)]
    assert y.tolist() == [[12, values[k].item()] for k in range(6)]
    assert task.d_vocab == 13
    with pytest.raises(ValueError, match="n_facts"):
        FactLookupTask(n_facts=1)


@pytest.fixture(scope="module")
def trained():
    task = FactLookupTask(n_facts=8, seed=0)
    model = make_fact_lookup_model(task, d_model=4, d_mlp=32)
    assert fact_accuracy(model, task) < 0.5  # untrained: near chance
    train_fact_lookup(model, task, steps=400, lr=1e-2, progress=False)
    return task, model


def test_training_learns_every_fact_in_the_mlp(trained):
    task, model = trained
    assert fact_accuracy(model, task) == 1.0
    assert mlp_dependence(model, task) >= 0.5  # the narrow residual forces the lookup into the MLP


def test_short_decomposition_of_the_mlp(trained):
    task, model = trained
    config = fact_lookup_apd_config(task, steps=30, batch_size=32, progress=False)
    keys = task.sample_keys(256, torch.Generator().manual_seed(1))
    decomp = apd_lens.decompose(model, task.sequences(keys), config, weights=select_weights(model, config.weights))
    assert [s.name for s in decomp.specs] == ["blocks.0.mlp.W_in", "blocks.0.mlp.W_out"]
    result = dedicated_facts(decomp, task)
    assert len(result.own) == task.n_facts and result.n_dedicated == sum(result.dedicated)
    # a fact counts only if its own component is not another fact's, and not a shared one
    for fact, (comp, ok) in enumerate(zip(result.own, result.dedicated, strict=True)):
        if ok:
            assert result.own.count(comp) == 1 and comp not in result.shared, fact


def test_activation_l1_makes_the_mlp_sparse(trained):
    task, plain = trained  # act_l1 0: the fixture's model (this task, size, seed, 400 steps at lr 1e-2)
    sparse = make_fact_lookup_model(task, d_model=4, d_mlp=32)
    train_fact_lookup(sparse, task, steps=400, lr=1e-2, act_l1=0.1, progress=False)
    active = []
    for model in (plain, sparse):
        assert fact_accuracy(model, task) == 1.0
        _, cache = model.run_with_cache(task.sequences(), names_filter="blocks.0.mlp.hook_post")
        post = cache["blocks.0.mlp.hook_post"][:, -1]
        active.append((post > 0.05 * post.max()).sum(-1).float().mean().item())
    assert active[1] < 0.5 * active[0], active


def _penalized_model(task):
    return make_fact_lookup_model(task, d_model=8, d_mlp=24, seed=task.seed)


def _train_penalized(task, repair_steps):
    model = _penalized_model(task)
    train_fact_lookup(
        model,
        task,
        steps=1500,
        seed=task.seed,
        act_l1=0.01,
        ablated_coeff=1.0,
        overlap_coeff=1.0,
        ramp_frac=0.5,
        repair_steps=repair_steps,
        progress=False,
    )
    return model


def _push_by_loops(model, task) -> list[list[float]]:
    """Per fact and neuron: activation at SEP times (the neuron's direct logit for the value - its mean logit)."""
    _, cache = model.run_with_cache(task.sequences(), names_filter="blocks.0.mlp.hook_post")
    acts = cache["blocks.0.mlp.hook_post"][:, -1].tolist()
    W_out, W_U = model.blocks[0].mlp.W_out.tolist(), model.W_U.tolist()
    d_model, d_vocab = len(W_U), len(W_U[0])
    push = []
    for fact, value in enumerate(task.values().tolist()):
        row = []
        for n in range(len(W_out)):
            logits = [sum(W_out[n][d] * W_U[d][v] for d in range(d_model)) for v in range(d_vocab)]
            row.append(acts[fact][n] * (logits[value] - sum(logits) / d_vocab))
        push.append(row)
    return push


def _main_neurons_by_loops(model, task) -> list[int]:
    return [max(range(len(row)), key=row.__getitem__) for row in _push_by_loops(model, task)]


def test_penalties_and_repair_give_every_fact_its_own_sep_neuron(monkeypatch):
    # seed 1 of this small task ends with two facts on one neuron unless the shared neuron is split and trained apart
    import apd_lens.models.fact_lookup as fact_lookup

    task = FactLookupTask(n_facts=8, seed=1)
    before_repair = []
    split_neuron = fact_lookup.split_neuron

    def keep_the_unrepaired_model(model, *args, **kwargs):
        if not before_repair:  # the first split: the model as training without repair would leave it
            before_repair.append({k: v.clone() for k, v in model.state_dict().items()})
        return split_neuron(model, *args, **kwargs)

    monkeypatch.setattr(fact_lookup, "split_neuron", keep_the_unrepaired_model)
    model = _train_penalized(task, repair_steps=300)
    assert before_repair, "training left no neuron with two facts to split"
    unrepaired = _penalized_model(task)
    unrepaired.load_state_dict(before_repair[0])
    main = _main_neurons_by_loops(unrepaired, task)
    assert len(set(main)) < task.n_facts
    assert shared_fact_neurons(unrepaired, task) == {
        n: [f for f in range(task.n_facts) if main[f] == n] for n in set(main) if main.count(n) > 1
    }
    assert fact_accuracy(model, task) == 1.0
    assert len(set(_main_neurons_by_loops(model, task))) == task.n_facts  # no two facts share their main neuron
    assert shared_fact_neurons(model, task) == {}
    zeroed = model.run_with_hooks(
        task.sequences(), fwd_hooks=[("blocks.0.mlp.hook_post", lambda t, hook: torch.cat([t[:, :1], 0 * t[:, 1:]], 1))]
    )
    assert (zeroed[:, -1].argmax(-1) != task.values()).all()  # without the MLP at SEP no fact is right


def test_repair_refuses_bad_settings_and_says_when_it_cannot_finish():
    task = FactLookupTask(n_facts=8, seed=0)
    model = make_fact_lookup_model(task, d_model=4, d_mlp=8, seed=0)
    for bad in (dict(repair_steps=-1, overlap_coeff=1.0), dict(repair_steps=10, max_repairs=0, overlap_coeff=1.0)):
        with pytest.raises(ValueError, match="repair_steps must be >= 0"):
            train_fact_lookup(model, task, steps=5, progress=False, **bad)
    with pytest.raises(ValueError, match="needs overlap_coeff"):
        train_fact_lookup(model, task, steps=5, repair_steps=10, progress=False)
    # untrained (steps=0), facts pile onto few neurons; one round of one step cannot separate them
    assert shared_fact_neurons(model, task)
    with pytest.warns(UserWarning, match="1 repair rounds left neurons carrying several facts"):
        train_fact_lookup(model, task, steps=0, overlap_coeff=1.0, repair_steps=1, max_repairs=1, progress=False)
    tiny = make_fact_lookup_model(task, d_model=4, d_mlp=2, seed=0)  # 8 facts on 2 neurons: none to split into
    with pytest.raises(RuntimeError, match="only 0 other neurons"):
        train_fact_lookup(tiny, task, steps=0, overlap_coeff=1.0, repair_steps=1, progress=False)


def test_fact_neuron_push_matches_loops():
    task = FactLookupTask(n_facts=5, seed=2)
    model = make_fact_lookup_model(task, d_model=4, d_mlp=6, seed=3)  # untrained: random pushes of both signs
    expected = torch.tensor(_push_by_loops(model, task))
    torch.testing.assert_close(fact_neuron_push(model, task), expected, atol=1e-6, rtol=0)


def test_split_neuron_copies_and_halves():
    task = FactLookupTask(n_facts=6, seed=0)
    model = make_fact_lookup_model(task, d_model=4, d_mlp=8, seed=0)
    mlp = model.blocks[0].mlp
    with torch.no_grad():
        mlp.W_out[5] = 0  # neuron 5 unused: what it did before the split is gone either way
    before = model(task.sequences())
    W_in, b_in, W_out = mlp.W_in.clone(), mlp.b_in.clone(), mlp.W_out.clone()
    split_neuron(model, 2, 5, noise=0.0)
    torch.testing.assert_close(model(task.sequences()), before)  # no noise: the same function
    assert torch.equal(mlp.W_in[:, 5], W_in[:, 2]) and mlp.b_in[5] == b_in[2]
    torch.testing.assert_close(mlp.W_out[2], W_out[2] / 2)
    torch.testing.assert_close(mlp.W_out[5], W_out[2] / 2)
    split_neuron(model, 3, 6, noise=0.1, generator=torch.Generator().manual_seed(0))
    moved = (mlp.W_in[:, 6] - mlp.W_in[:, 3]).norm() / W_in[:, 3].norm()
    assert 0.01 < moved < 0.5  # a small nudge so that training can pull the two apart
    untouched = [n for n in range(8) if n not in (2, 3, 5, 6)]
    assert torch.equal(mlp.W_in[:, untouched], W_in[:, untouched])
    with pytest.raises(ValueError, match="itself"):
        split_neuron(model, 1, 1)


def test_least_used_neurons_orders_by_total_activation():
    task = FactLookupTask(n_facts=5, seed=0)
    model = make_fact_lookup_model(task, d_model=4, d_mlp=8, seed=1)
    _, cache = model.run_with_cache(task.sequences())
    post = cache["blocks.0.mlp.hook_post"]
    use = [sum(abs(post[i, p, n].item()) for i in range(5) for p in range(2)) for n in range(8)]
    order = least_used_neurons(model, task, exclude={0, 3})
    assert order == sorted((n for n in range(8) if n not in (0, 3)), key=use.__getitem__)


class _FixedCI:
    """Stands in for an SPD decomposition whose causal importances are given."""

    def __init__(self, ci_at_sep: torch.Tensor):
        self.ci_at_sep = ci_at_sep

    def causal_importances(self, x):
        ci = torch.zeros(x.shape[0], x.shape[1], self.ci_at_sep.shape[-1])
        ci[:, -1] = self.ci_at_sep
        return {"blocks.0.mlp.W_in": ci}


def _facts_own_by_loops(ci: torch.Tensor) -> list[bool]:
    own = []
    for i in range(ci.shape[0]):
        top = max(range(ci.shape[1]), key=lambda c: ci[i, c].item())
        ok = ci[i, top].item() >= 0.5
        for j in range(ci.shape[0]):
            if j != i and ci[j, top].item() >= 0.1:
                ok = False
        own.append(ok)
    return own


def test_facts_with_own_subcomponent_matches_loops():
    task = FactLookupTask(n_facts=6, seed=0)
    gen = torch.Generator().manual_seed(0)
    # designed: facts 0-2 own subcomponents 3, 1, 4; fact 3's top (5) also fires at fact 4 (0.2); fact 4's
    # top is below 0.5; fact 5 shares fact 0's subcomponent
    ci = torch.rand(6, 8, generator=gen) * 0.05
    ci[0, 3], ci[1, 1], ci[2, 4] = 0.9, 1.0, 0.6
    ci[3, 5], ci[4, 5], ci[4, 6] = 0.8, 0.2, 0.4
    ci[5, 3] = 0.95
    facts = facts_with_own_subcomponent(_FixedCI(ci), task)
    assert facts.own == _facts_own_by_loops(ci) == [False, True, True, False, False, False]
    assert facts.top[:5] == [3, 1, 4, 5, 6] and facts.n_own == 2
    for seed in range(20):  # random CIs with many values near the thresholds
        ci = (torch.rand(6, 8, generator=torch.Generator().manual_seed(seed)) ** 4).round(decimals=1)
        ci += torch.arange(8) * 1e-4  # no ties in the argmax
        facts = facts_with_own_subcomponent(_FixedCI(ci), task)
        assert facts.own == _facts_own_by_loops(ci), seed


def test_short_spd_decomposition_of_the_mlp(trained):
    task, model = trained
    config = fact_lookup_spd_config(task, steps=20, batch_size=32, progress=False)
    keys = task.sample_keys(256, torch.Generator().manual_seed(1))
    dec = apd_lens.decompose(model, task.sequences(keys), config, weights=select_weights(model, config.weights))
    assert dec.sites == ["blocks.0.mlp.W_in", "blocks.0.mlp.W_out"]
    facts = facts_with_own_subcomponent(dec, task)
    assert len(facts.top) == task.n_facts and facts.n_own == sum(facts.own)
    drawn = []
    sample_masks = dec.sample_masks

    def record(ci, generator=None):
        drawn.append(sample_masks(ci, generator))
        return drawn[-1]

    dec.sample_masks = record  # the instance's draws, kept for the explicit computation below
    kl = stochastic_recon_kl(dec, model, task, n_samples=4)
    del dec.sample_masks
    # the same KL by explicit loops over draws, facts and positions: the one-layer model's output at (i, p)
    # is the model on sequence i with W_in, W_out at token (i, p)'s masked weights (written out by loops)
    with torch.no_grad():
        x, ref = task.sequences(), model(task.sequences()).log_softmax(-1)
        params = {k: v.detach() for k, v in model.named_parameters()}
        total = 0.0
        for masks in drawn:
            for i in range(x.shape[0]):
                for p in range(2):
                    for name in dec.sites:
                        params[name] = masked_weight(dec, name, masks[name][i, p], 1.0)
                    out = functional_call(model, params, (x[i : i + 1],))[0, p].log_softmax(-1)
                    total += (ref[i, p].exp() * (ref[i, p] - out)).sum().item() / (2 * x.shape[0])
    explicit = total / len(drawn)
    assert len(drawn) == 4
    assert kl == pytest.approx(explicit, rel=1e-4)
    assert kl > 0
    with pytest.raises(ValueError, match="not decomposed"):
        facts_with_own_subcomponent(dec, task, weight="blocks.0.attn.W_Q")
