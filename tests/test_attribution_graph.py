"""Attribution graph edges (apd_lens.analysis.attribution_graph) against central finite differences
through the model's own hooks, with every other decomposed site's output frozen at its clean value."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformer_lens.HookedTransformer")


from apd_lens import SPDConfig, SPDDecomposition  # noqa: E402
from apd_lens.adapters import select_weights  # noqa: E402
from apd_lens.analysis.attribution_graph import AttributionGraph, attribution_graph, node_id  # noqa: E402
from apd_lens.methods.spd.decomposition import site_name  # noqa: E402
from tests.toy_models import TwoLayerMLP, two_layer_specs  # noqa: E402
from tests.transformer_checks import spread_ci_, tiny_lm  # noqa: E402

VOCAB, CTX = 11, 4
EPS = 1e-5


@pytest.fixture(scope="module")
def transformer():
    model = tiny_lm(VOCAB, CTX)
    dec = SPDDecomposition(model, select_weights(model, "blocks.*"), SPDConfig(n_subcomponents=3, seed=1))
    return spread_ci_(dec, low=-0.3, u_scale=1.0), torch.tensor([[3, 7, 1, 9]])


@pytest.fixture(scope="module")
def toy_mlp():
    model = TwoLayerMLP(d_in=4, d_hidden=6, d_out=3, seed=2).double()
    dec = SPDDecomposition(model, two_layer_specs(), SPDConfig(n_subcomponents=6, seed=0))
    return spread_ci_(dec, low=-0.3, u_scale=1.0), torch.tensor([[0.9, 0.0, -0.6, 1.3]], dtype=torch.float64)


def frozen_forward(dec, x, clean, source=None):
    """``(output [n_points, n_out], {site: a = x V [n_points, C]})`` of the model run with TL hooks that
    set every decomposed site's leaving activation to its clean CI-masked value, plus, for ``source =
    (site, point, c, eps)``, ``eps · U[c]`` at that point of that site (ã_c moved by eps)."""
    n_points = math.prod(clean.batch_shape)
    subs, inner, hooks = dec.subcomponents, {}, {}
    for key in dec.site_keys:
        use = dec.specs_by_name[key[0]].uses[key[1]]
        hooks.setdefault(use.leave, []).append(("leave", key, use.transposed))
        hooks.setdefault(use.enter, []).append(("enter", key, use.transposed))

    def fn(t, hook):
        for role, key, transposed in hooks[hook.name]:
            sub = subs[key[0]]
            if role == "leave":
                flat = clean.leaves[key].reshape(n_points, -1).clone()
                if source is not None and source[0] == site_name(key):
                    _, point, c, eps = source
                    flat[point] += eps * (sub.V[:, c] if transposed else sub.U[c])
                t = flat.reshape(t.shape)
            else:
                inner[site_name(key)] = t.reshape(n_points, -1) @ (sub.U.T if transposed else sub.V)
        return t

    with torch.no_grad(), dec.model.hooks(fwd_hooks=[(name, fn) for name in hooks]):
        out = dec.model(x)
    return out.reshape(n_points, -1), inner


def finite_difference_edges(dec, x, target):
    """Every (source node -> target node) weight by central differences, as {(source_id, target_id): w}."""
    ci = {s: g.reshape(-1, g.shape[-1]) for s, g in dec.causal_importances(x).items()}
    with torch.no_grad():
        clean = dec.forward_with_masks(x, dec.causal_importances(x))
    _, clean_inner = frozen_forward(dec, x, clean)
    position, token = target
    nodes = [(site, p, c) for site in dec.sites for p, c in torch.nonzero(ci[site] > 0).tolist()]
    assert len(nodes) > 5
    edges = {}
    for site, p, c in nodes:
        up, inner_up = frozen_forward(dec, x, clean, (site, p, c, EPS))
        down, inner_down = frozen_forward(dec, x, clean, (site, p, c, -EPS))
        coefficient = clean_inner[site][p, c] * ci[site][p, c]  # ã = a · g
        source = node_id(p, site, c)
        for t_site, tp, tc in nodes:
            slope = (inner_up[t_site][tp, tc] - inner_down[t_site][tp, tc]) / (2 * EPS)
            edges[source, node_id(tp, t_site, tc)] = (slope * coefficient).item()
        slope = (up[position, token] - down[position, token]) / (2 * EPS)
        edges[source, node_id(position, "output", token)] = (slope * coefficient).item()
    return edges


@pytest.mark.parametrize("case", ["transformer", "toy_mlp"])
def test_edges_match_finite_differences(case, request):
    dec, x = request.getfixturevalue(case)
    graph = attribution_graph(dec, x, max_edges=None, grad_batch_size=5)
    got = {(e.source, e.target): e.weight for e in graph.edges}
    expected = finite_difference_edges(dec, x, graph.target)
    assert set(got) <= set(expected)
    scale = max(abs(w) for w in expected.values())
    for pair, w in expected.items():
        assert got.get(pair, 0.0) == pytest.approx(w, abs=1e-6 * scale), pair
    assert sum(abs(w) > 1e-3 * scale for w in got.values()) >= 8  # the check compares real edges
    nodes = {n.id: n for n in graph.nodes}
    if case == "transformer":  # attention carries edges to later positions; never to earlier ones
        assert any(nodes[s].position < nodes[t].position for s, t in got)
        assert all(nodes[s].position <= nodes[t].position for s, t in got)


def test_default_target_and_node_values(transformer):
    dec, x = transformer
    graph = attribution_graph(dec, x)
    with torch.no_grad():
        logits = dec(x, masks="ci")[0]
    assert graph.target == (CTX - 1, int(logits[-1].argmax()))
    out = graph.node(node_id(CTX - 1, "output", graph.target[1]))
    assert out.kind == "output" and out.activation == pytest.approx(logits[-1].max().item())
    ci = dec.causal_importances(x)
    for n in graph.nodes:
        if n.kind == "subcomponent":
            assert n.ci == pytest.approx(ci[n.site][0, n.position, n.subcomponent].item()) and n.ci > 0
    assert graph.prompt_tokens == ["3", "7", "1", "9"] and graph.token_ids == [3, 7, 1, 9]


def test_pruning_keeps_the_strongest_edges_and_connected_nodes(transformer, tmp_path):
    dec, x = transformer
    full = attribution_graph(dec, x, max_edges=None, target=(1, 2))
    pruned = attribution_graph(dec, x, max_edges=7, target=(1, 2), ci_threshold=0.5)
    kept = sorted((abs(e.weight) for e in pruned.edges), reverse=True)
    thresholded = attribution_graph(dec, x, max_edges=None, target=(1, 2), ci_threshold=0.5)
    assert kept == pytest.approx(sorted((abs(e.weight) for e in thresholded.edges), reverse=True)[:7])
    assert len(full.edges) == full.n_edges_before_pruning > len(thresholded.edges)
    ids = {n.id for n in pruned.nodes}
    assert ids == {e.source for e in pruned.edges} | {e.target for e in pruned.edges}
    assert all(n.ci is None or n.ci > 0.5 for n in pruned.nodes)
    assert pruned.target == (1, 2)
    pruned.save(tmp_path)
    assert AttributionGraph.load(tmp_path) == pruned


@pytest.mark.parametrize(
    ("prompt", "match"),
    [
        (torch.tensor([[1, VOCAB]]), "out of range"),
        (torch.zeros(1, CTX + 1, dtype=torch.long), "longer than"),
        (torch.zeros(1, 0, dtype=torch.long), "empty"),
        # under APD_LENS_TYPECHECK=1 jaxtyping refuses this shape first, naming the parameter
        (torch.zeros(2, 3, dtype=torch.long), "one prompt|parameter 'prompt'"),
    ],
)
def test_bad_prompts_raise(transformer, prompt, match):
    dec, _ = transformer
    with pytest.raises((ValueError, TypeError), match=match):
        attribution_graph(dec, prompt)


def test_bad_target_and_missing_file_raise(transformer, tmp_path):
    dec, x = transformer
    with pytest.raises(ValueError, match="target"):
        attribution_graph(dec, x, target=(CTX, 0))
    with pytest.raises(FileNotFoundError, match="attribution_graph.json"):
        AttributionGraph.load(tmp_path)
