"""Clustering subcomponents into components by co-activation, with VPD's description-length cost.

A subcomponent is *on* at a data point (a token) where its CI exceeds 0.01; a group is on where any
of its members is on (the OR). For a partition of the subcomponents into ``k`` groups::

    L = Σ_i s_i (log₂ k + α · rank_i)

``s_i`` the number of data points on which group ``i`` is on, ``rank_i`` the number of its members
(each a rank-one matrix; members of different weights have no common matrix to take a rank of, so
the rank is this sum, an upper bound of the rank of their summed matrix for members of one weight).
Greedy merging: start from singletons of the alive subcomponents (on at least once; dead ones are
listed apart and in no group), merge the pair whose merge lowers ``L`` most, while one does. The
change of merging ``i`` and ``j`` (``n_ij`` points where both are on, ``S = Σ s``)::

    ΔL = log₂(k-1) (S - n_ij) - log₂(k) S + α ((s_i + s_j - n_ij)(r_i + r_j) - s_i r_i - s_j r_j)

is evaluated for every pair at once from the co-occurrence matrix; after a merge only the merged
group's row of that matrix is recomputed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch
from jaxtyping import Bool, Shaped
from torch import Tensor

from apd_lens.analysis.json_result import JsonResult

CLUSTERS_FILE = "clusters.json"
CI_ON_THRESHOLD = 0.01
"""A subcomponent is on at a data point where its CI exceeds this."""
Label = tuple[str, int]
"""(site, subcomponent)"""


@dataclass
class Coactivation:
    """Which subcomponents are on at which data points: ``active[n, j]`` for subcomponent ``labels[j]``."""

    active: Bool[Tensor, "n_points n_subcomponents"]
    labels: list[Label]
    ci_threshold: float = CI_ON_THRESHOLD


@torch.no_grad()
def coactivation_data(
    decomposition, inputs: Shaped[Tensor, "n_samples ..."], batch_size: int = 32, ci_threshold: float = CI_ON_THRESHOLD
) -> Coactivation:
    """CI ``> ci_threshold`` of every subcomponent (sites in ``decomposition.sites`` order, then
    subcomponent index) at every data point of ``inputs`` (a position of a token sequence counts as
    one point), computed ``batch_size`` samples at a time."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(inputs, Tensor) or inputs.numel() == 0:
        raise ValueError("coactivation_data needs a non-empty tensor of inputs")
    sites = decomposition.sites
    rows = []
    for batch in inputs.split(batch_size):
        ci = decomposition.causal_importances(batch)
        rows.append(torch.cat([ci[s].reshape(-1, ci[s].shape[-1]) > ci_threshold for s in sites], dim=1).cpu())
    labels = [(s, c) for s in sites for c in range(decomposition.n_subcomponents(s))]
    return Coactivation(torch.cat(rows), labels, float(ci_threshold))


def _check_active(active: Tensor) -> Tensor:
    if not isinstance(active, Tensor) or active.ndim != 2 or active.dtype != torch.bool:
        got = f"{active.dtype} {tuple(active.shape)}" if isinstance(active, Tensor) else type(active).__name__
        raise ValueError(f"active must be a bool tensor [n_points, n_subcomponents], got {got}")
    return active


def clustering_cost(
    active: Bool[Tensor, "n_points n_subcomponents"], groups: Sequence[Sequence[int]], alpha: float
) -> float:
    """``L = Σ_i s_i (log₂ k + α · rank_i)`` of a grouping of ``active``'s columns (``rank_i`` = number of members)."""
    active = _check_active(active)
    k = len(groups)
    if k == 0:
        return 0.0
    total = 0.0
    for members in groups:
        s = int(active[:, list(members)].any(dim=1).sum())
        total += s * (math.log2(k) + alpha * len(members))
    return total


@dataclass
class Cluster:
    id: int
    members: list[Label]
    frequency: int
    """``s``: the number of data points on which any member is on."""


@dataclass
class Clustering(JsonResult):
    """Clusters of alive subcomponents (``dead``: never on, in no cluster); ``save(dir)`` /
    ``Clustering.load(dir)`` use ``dir/clusters.json``."""

    FILE: ClassVar[str] = CLUSTERS_FILE

    clusters: list[Cluster]
    cost: float
    cost_before: float
    """The cost of the singletons of the alive subcomponents."""
    alpha: float
    n_points: int
    ci_threshold: float = CI_ON_THRESHOLD
    dead: list[Label] = field(default_factory=list)
    n_merges: int = 0
    rank: str = "number of rank-one members"

    def cluster_of(self, site: str, subcomponent: int) -> int | None:
        """The id of the cluster holding this subcomponent; None for a dead one."""
        for cluster in self.clusters:
            if (site, subcomponent) in cluster.members:
                return cluster.id
        return None

    def to_dict(self) -> dict:
        out = asdict(self)
        for cluster in out["clusters"]:
            cluster["members"] = [{"site": s, "subcomponent": c} for s, c in cluster["members"]]
        out["dead"] = [{"site": s, "subcomponent": c} for s, c in self.dead]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Clustering:
        data = dict(data)

        def labels(items: list[dict]) -> list[Label]:
            return [(m["site"], int(m["subcomponent"])) for m in items]

        data["clusters"] = [Cluster(c["id"], labels(c["members"]), c["frequency"]) for c in data["clusters"]]
        data["dead"] = labels(data.get("dead", []))
        return cls(**data)


def _greedy_merges(
    on: Bool[Tensor, "n_points m"], n_fixed: int, fixed_total: int, alpha: float
) -> tuple[list[list[int]], list[int]]:
    """Greedy merging of the groups ``on``'s columns (every group rank one at the start); ``n_fixed``
    further groups, on ``fixed_total`` times in all, count in ``k`` and ``S`` but are never merged.
    Returns the groups (column indices) and their frequencies."""
    m = on.shape[1]
    on = on.clone()
    floats = on.double()
    pair = floats.T @ floats  # n_ij
    s = pair.diagonal().clone()
    r = torch.ones(m, dtype=torch.float64)
    live = torch.ones(m, dtype=torch.bool)
    members = [[j] for j in range(m)]
    k = m + n_fixed
    total = float(s.sum()) + fixed_total
    while k >= 2 and int(live.sum()) >= 2:
        union = s[:, None] + s[None, :] - pair
        change = (
            math.log2(k - 1) * (total - pair)
            - math.log2(k) * total
            + alpha * (union * (r[:, None] + r[None, :]) - (s * r)[:, None] - (s * r)[None, :])
        )
        blocked = ~(live[:, None] & live[None, :]) | torch.eye(m, dtype=torch.bool)
        change = change.masked_fill(blocked, math.inf)
        best = int(torch.argmin(change))
        i, j = divmod(best, m)
        if not change[i, j] < -1e-9 * max(total, 1.0):
            break
        total -= float(pair[i, j])
        on[:, i] |= on[:, j]
        column = on[:, i].double()
        pair[i] = pair[:, i] = column @ on.double()
        s[i] = pair[i, i]
        r[i] += r[j]
        live[j] = False
        members[i] += members[j]
        k -= 1
    kept = live.nonzero().flatten().tolist()
    return [members[i] for i in kept], [int(s[i]) for i in kept]


def cluster_subcomponents(
    active: Bool[Tensor, "n_points n_subcomponents"] | Coactivation,
    labels: Sequence[Label] | None = None,
    *,
    alpha: float = 1.0,
    max_candidates: int = 4096,
) -> Clustering:
    """Greedy MDL clustering (see the module docstring) of ``active``'s columns, named by ``labels``
    ((site, subcomponent) each; a :class:`Coactivation` brings both). Only the ``max_candidates``
    most frequent alive subcomponents are merged (the merge search is quadratic in them); the other
    alive ones stay singletons and count in the cost."""
    ci_threshold = CI_ON_THRESHOLD
    if isinstance(active, Coactivation):
        active, labels, ci_threshold = active.active, active.labels, active.ci_threshold
    active = _check_active(active)
    if labels is None:
        raise ValueError("labels ((site, subcomponent) per column) are needed with a plain active matrix")
    labels = [(str(s), int(c)) for s, c in labels]
    if len(labels) != active.shape[1]:
        raise ValueError(f"{len(labels)} labels for {active.shape[1]} columns of active")
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    if not isinstance(max_candidates, int) or max_candidates < 2:
        raise ValueError(f"max_candidates must be an integer >= 2, got {max_candidates!r}")
    counts = active.sum(dim=0)
    alive = counts.nonzero().flatten()
    if alive.numel() == 0:
        raise ValueError(f"no subcomponent is on at any of the {active.shape[0]} data points: nothing to cluster")
    by_frequency = alive[torch.argsort(counts[alive], descending=True, stable=True)]
    candidates, fixed = by_frequency[:max_candidates], by_frequency[max_candidates:]
    groups, frequencies = _greedy_merges(active[:, candidates], len(fixed), int(counts[fixed].sum()), alpha)
    groups = [[int(candidates[j]) for j in g] for g in groups] + [[int(j)] for j in fixed]
    frequencies += [int(counts[j]) for j in fixed]
    order = sorted(range(len(groups)), key=lambda g: (-frequencies[g], min(groups[g])))
    clusters = [Cluster(n, [labels[j] for j in sorted(groups[g])], frequencies[g]) for n, g in enumerate(order)]
    return Clustering(
        clusters=clusters,
        cost=clustering_cost(active, [groups[g] for g in order], alpha),
        cost_before=clustering_cost(active, [[int(j)] for j in alive], alpha),
        alpha=float(alpha),
        n_points=int(active.shape[0]),
        ci_threshold=ci_threshold,
        dead=[labels[j] for j in (counts == 0).nonzero().flatten().tolist()],
        n_merges=int(alive.numel()) - len(groups),
    )
