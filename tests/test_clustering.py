"""MDL clustering of subcomponents (apd_lens.analysis.clustering) against hand-computed costs and a
brute force over every partition of a small set."""

from __future__ import annotations

import math

import pytest
import torch

from apd_lens import SPDConfig, SPDDecomposition
from apd_lens.analysis.clustering import (
    Clustering,
    Coactivation,
    cluster_subcomponents,
    clustering_cost,
    coactivation_data,
)
from tests.toy_models import TwoLayerMLP, two_layer_specs

NAMES = "abcde"


def active_from_rows(rows: list[str], names: str = NAMES) -> torch.Tensor:
    """Tokens as strings of the subcomponents on there ("ab": a and b on)."""
    return torch.tensor([[n in row for n in names] for row in rows])


def cost_by_hand(rows: list[str], partition: list[str], alpha: float) -> float:
    """L = Σ_i s_i (log₂ k + α · rank_i), s_i counted over the tokens, rank_i = len(group)."""
    k = len(partition)
    return sum(
        sum(any(n in row for n in group) for row in rows) * (math.log2(k) + alpha * len(group)) for group in partition
    )


def partitions(items: str):
    """Every set partition of ``items`` (groups as strings)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for smaller in partitions(rest):
        yield [first, *smaller]
        for i in range(len(smaller)):
            yield [*smaller[:i], first + smaller[i], *smaller[i + 1 :]]


def test_cost_of_a_hand_computed_case():
    # 6 tokens over a, b, c, d: ab, ab, abc, c, d, (nothing)
    active = active_from_rows(["ab", "ab", "abc", "c", "d", ""], "abcd")
    # groups {a,b}, {c}, {d}: s = 3, 2, 1; k = 3; ranks 2, 1, 1; alpha 0.5
    # L = 3 (log2 3 + 1) + 2 (log2 3 + 0.5) + 1 (log2 3 + 0.5) = 6 log2 3 + 4.5
    assert clustering_cost(active, [[0, 1], [2], [3]], alpha=0.5) == pytest.approx(14.009775004326937, abs=1e-12)
    # singletons: s = 3, 3, 2, 1; k = 4: L = 9 (2 + 0.5)
    assert clustering_cost(active, [[0], [1], [2], [3]], alpha=0.5) == pytest.approx(22.5, abs=1e-12)
    # one group: s = 5, k = 1, rank 4: L = 5 (0 + 0.5 * 4)
    assert clustering_cost(active, [[0, 1, 2, 3]], alpha=0.5) == pytest.approx(10.0, abs=1e-12)


ROWS = ["ab", "ab", "abcd", "cd", "cd", "c", "e", "e", "", "abe", "cd", "", "d", "e", "ab"]


@pytest.mark.parametrize(
    ("alpha", "expected"),
    [(0.3, ("abcde",)), (0.5, ("abe", "cd")), (1.0, ("ab", "cd", "e")), (3.0, ("ab", "cd", "e"))],
)
def test_greedy_reaches_the_brute_force_optimum(alpha, expected):
    """Larger alpha (the price of rank) keeps groups small; a and b always co-active, c and d mostly."""
    active = active_from_rows(ROWS)
    labels = [("site", j) for j in range(5)]
    costs = {tuple(sorted(p)): cost_by_hand(ROWS, p, alpha) for p in partitions(NAMES)}
    assert len(costs) == 52  # Bell(5)
    for p, cost in costs.items():  # the library's cost against the hand loop on every partition
        assert clustering_cost(active, [[NAMES.index(n) for n in g] for g in p], alpha) == pytest.approx(cost)
    best = min(costs, key=costs.get)
    assert best == expected
    result = cluster_subcomponents(active, labels, alpha=alpha)
    found = tuple(sorted("".join(NAMES[c] for _, c in cluster.members) for cluster in result.clusters))
    assert found == best
    assert result.cost == pytest.approx(costs[best])
    assert result.cost_before == pytest.approx(costs["a", "b", "c", "d", "e"])
    assert result.cost_before > result.cost
    assert result.n_merges == 5 - len(expected) and result.alpha == alpha and result.n_points == len(ROWS)
    for cluster in result.clusters:
        assert cluster.frequency == sum(any(NAMES[c] in row for _, c in cluster.members) for row in ROWS)


def test_merging_identical_columns_lowers_the_cost_and_greedy_stops_at_a_local_minimum():
    generator = torch.Generator().manual_seed(0)
    active = torch.rand(40, 6, generator=generator) < 0.25
    active[:, 5] = active[:, 2]  # always co-active with subcomponent 2
    singletons = [[j] for j in range(6)]
    merged = [[0], [1], [2, 5], [3], [4]]
    assert clustering_cost(active, merged, 1.0) < clustering_cost(active, singletons, 1.0)
    result = cluster_subcomponents(active, [("s", j) for j in range(6)], alpha=1.0)
    assert result.cluster_of("s", 2) == result.cluster_of("s", 5)
    groups = [[c for _, c in cluster.members] for cluster in result.clusters]
    for i in range(len(groups)):  # no further merge lowers the cost
        for j in range(i + 1, len(groups)):
            rest = [g for n, g in enumerate(groups) if n not in (i, j)]
            assert clustering_cost(active, [*rest, groups[i] + groups[j]], 1.0) >= result.cost - 1e-9


def test_candidate_cap_keeps_the_rest_as_singletons_and_dead_ones_apart(tmp_path):
    rows = [*ROWS, ""]
    active = torch.cat([active_from_rows(rows), torch.zeros(len(rows), 1, dtype=torch.bool)], dim=1)
    labels = [("w", j) for j in range(6)]
    result = cluster_subcomponents(Coactivation(active, labels), alpha=1.0, max_candidates=2)
    # a, b, c, d are on 5 times each, e 4 times: the candidates are a and b (ties by index), which merge
    assert result.dead == [("w", 5)] and result.cluster_of("w", 5) is None
    assert sorted(len(c.members) for c in result.clusters) == [1, 1, 1, 2]
    assert result.cluster_of("w", 0) == result.cluster_of("w", 1)
    assert result.cost == pytest.approx(cost_by_hand(rows, ["ab", "c", "d", "e"], 1.0))
    result.save(tmp_path)
    assert Clustering.load(tmp_path) == result


def test_coactivation_data_batches_in_order():
    model = TwoLayerMLP(d_in=4, d_hidden=6, d_out=3, seed=2).double()
    dec = SPDDecomposition(model, two_layer_specs(), SPDConfig(n_subcomponents=3, seed=0))
    x = torch.randn(7, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    data = coactivation_data(dec, x, batch_size=3)
    assert data.labels == [("W1", 0), ("W1", 1), ("W1", 2), ("W2", 0), ("W2", 1), ("W2", 2)]
    for n in range(7):  # one sample at a time, by hand
        ci = dec.causal_importances(x[n : n + 1])
        expected = [bool(ci[site][0, c] > 0.01) for site, c in data.labels]
        assert data.active[n].tolist() == expected


def test_bad_input_raises(tmp_path):
    with pytest.raises(ValueError, match="nothing to cluster"):
        cluster_subcomponents(torch.zeros(4, 3, dtype=torch.bool), [("s", j) for j in range(3)])
    with pytest.raises((ValueError, TypeError), match="bool tensor|parameter 'active'"):  # jaxtyping under the hook
        cluster_subcomponents(torch.zeros(4, 3), [("s", j) for j in range(3)])
    with pytest.raises(ValueError, match="labels"):
        cluster_subcomponents(torch.ones(4, 3, dtype=torch.bool), [("s", 0)])
    with pytest.raises(FileNotFoundError, match="clusters.json"):
        Clustering.load(tmp_path)
