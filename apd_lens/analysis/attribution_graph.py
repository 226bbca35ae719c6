"""Attribution graphs between an SPD decomposition's subcomponents on one prompt (direct effects).

Nodes are ``(position, site, subcomponent)`` with causal importance above a threshold on the prompt,
plus one output node (a logit). The model runs with the CI values as masks (the delta component,
if the decomposition has one, added fully). Write ``a_c = x · V[:, c]`` for a subcomponent's inner
activation at its site and position (``x`` the site's entering activation; ``x · U[c, :]`` for a
transposed use) and ``ã_c = a_c · g_c`` for what the CI-masked model passes on through ``U[c, :]``.

Edge weight from source ``c'`` to target ``c``::

    w(c' → c) = (∂a_c / ∂ã_c') · a_c' · g_c'          (= (∂a_c / ∂ã_c') · ã_c')

and to the output node ``(∂ logit / ∂ã_c') · a_c' · g_c'``. The derivative is taken with respect to
the coefficient ``ã_c'`` that the model multiplies ``U[c', :]`` by (so the mask enters once, as the
``g_c'`` factor, not a second time inside the derivative). Gradients are stopped through every other
subcomponent (direct effects): every decomposed site's output is computed from a detached copy of
its own masked inner activations (``out = ã.detach() U`` plus the detached delta component's
output), so a path from ``ã_c'`` to ``a_c`` runs through the model's own undecomposed computation
(residual stream, norms, nonlinearities, attention patterns and mixing over positions: keys and
values feed later positions) and through no other decomposed weight. One forward with every site
cut this way gives the direct effect of every source site at once; each target node is one row of
the Jacobian (rows batched with ``is_grads_batched``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch
from jaxtyping import Float, Shaped
from torch import Tensor

from apd_lens.analysis.json_result import JsonResult
from apd_lens.methods.spd.decomposition import SPDDecomposition, site_name

GRAPH_FILE = "attribution_graph.json"
OUTPUT_SITE = "output"
"""The ``site`` of the output node (its ``subcomponent`` is the token / output index)."""


@dataclass(frozen=True)
class GraphNode:
    """A subcomponent at a position (``kind="subcomponent"``) or the output logit (``kind="output"``:
    ``site="output"``, ``subcomponent`` the token id, ``ci`` None, ``activation`` the logit)."""

    id: str
    position: int
    site: str
    subcomponent: int
    ci: float | None
    activation: float
    """``a_c = x · V[:, c]`` (before the mask); the logit for the output node."""
    kind: str = "subcomponent"


@dataclass(frozen=True)
class GraphEdge:
    source: str
    target: str
    weight: float


@dataclass
class AttributionGraph(JsonResult):
    """The pruned graph of one prompt; ``save(dir)`` / ``AttributionGraph.load(dir)`` use
    ``dir/attribution_graph.json``."""

    FILE: ClassVar[str] = GRAPH_FILE

    prompt_tokens: list[str]
    nodes: list[GraphNode]
    edges: list[GraphEdge]
    target: tuple[int, int]
    """(position, token) of the output node."""
    ci_threshold: float
    max_edges: int | None
    n_nodes_before_pruning: int
    n_edges_before_pruning: int
    """Nonzero edges among all nodes with CI above the threshold."""
    token_ids: list[int] | None = None
    edge_definition: str = field(default="(d a_c / d (a_c' g_c')) * a_c' * g_c', direct effects")

    def node(self, node_id: str) -> GraphNode:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise KeyError(f"no node {node_id!r} in the graph")

    def to_dict(self) -> dict:
        out = asdict(self)
        out["target"] = list(self.target)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> AttributionGraph:
        data = dict(data)
        data["nodes"] = [GraphNode(**n) for n in data["nodes"]]
        data["edges"] = [GraphEdge(**e) for e in data["edges"]]
        data["target"] = tuple(data["target"])
        return cls(**data)


def node_id(position: int, site: str, subcomponent: int) -> str:
    return f"{position}:{site}:{subcomponent}"


@dataclass
class _DirectEffectPass:
    """One CI-masked forward with every site's output cut from its input (see the module docstring)."""

    output: Float[Tensor, "n_points n_out"]
    inner: dict[str, Float[Tensor, "n_points _C"]]
    """``a = x V`` per site (live: differentiable with respect to upstream sites' ``coefficients``)."""
    coefficients: dict[str, Float[Tensor, "n_points _C"]]
    """``ã = a ⊙ g`` per site: the autograd leaves the site's output is computed from."""


def _direct_effect_pass(
    dec: SPDDecomposition, x: Tensor, masks: dict[str, Float[Tensor, "n_points _C"]]
) -> _DirectEffectPass:
    subs = dec.subcomponents
    deltas = None
    if dec.config.use_delta_component:
        sums = dec.summed_matrices()
        deltas = {name: (t - sums[name]).detach() for name, t in dec.target_matrices().items()}
    inner: dict[str, Tensor] = {}
    coefficients: dict[str, Tensor] = {}

    def replace(key, enter: Tensor, leave: Tensor, batch_shape: tuple[int, ...]) -> Tensor:
        site = site_name(key)
        sub = subs[key[0]]
        transposed = dec.specs_by_name[key[0]].uses[key[1]].transposed
        a = sub.inner_acts(enter, transposed)
        inner[site] = a
        leaf = (a * masks[site]).detach().requires_grad_(True)
        coefficients[site] = leaf
        out = sub.outer(leaf, transposed)
        if deltas is not None:
            delta = deltas[key[0]]
            out = out + (enter @ (delta.T if transposed else delta)).detach()
        return out

    with torch.enable_grad(), _frozen(dec.trainable_parameters()):
        record = dec.hooked_pass(x, replace=replace)
    n_points = math.prod(record.batch_shape)
    output = record.output
    if output.numel() % n_points:
        raise ValueError(
            f"the model's output of shape {tuple(output.shape)} is not one vector per position "
            f"(batch shape {record.batch_shape}); attribution graphs need [*batch, n_out] outputs"
        )
    return _DirectEffectPass(output.reshape(n_points, -1), inner, coefficients)


@contextlib.contextmanager
def _frozen(parameters: list[torch.nn.Parameter]):
    """The parameters without gradients for a while (so that only activations carry a graph, and a site
    with no decomposed site upstream has inner activations that need no gradient)."""
    before = [p.requires_grad for p in parameters]
    try:
        for p in parameters:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(parameters, before, strict=True):
            p.requires_grad_(flag)


def _check_prompt(dec: SPDDecomposition, prompt: Tensor) -> None:
    if not isinstance(dec, SPDDecomposition):
        raise TypeError(f"attribution graphs need an SPDDecomposition (CI per subcomponent), got {type(dec).__name__}")
    if not isinstance(prompt, Tensor):
        raise TypeError(f"the prompt must be a tensor [1, pos] of token ids (or [1, d] input), got {type(prompt)}")
    if prompt.ndim < 2 or prompt.shape[0] != 1:
        raise ValueError(
            f"attribution_graph takes one prompt of shape [1, pos] (token ids) or [1, d] (a toy input), "
            f"got shape {tuple(prompt.shape)}"
        )
    if prompt.numel() == 0:
        raise ValueError(f"the prompt is empty (shape {tuple(prompt.shape)})")
    dec.check_input(prompt)  # out-of-vocabulary ids, longer than n_ctx, dtype, NaN


def _prompt_strings(dec: SPDDecomposition, prompt: Tensor, token_strings: Sequence[str] | None) -> list[str]:
    if torch.is_floating_point(prompt):
        flat = prompt.reshape(-1, prompt.shape[-1])
        rows = []
        for row in flat:
            on = torch.nonzero(row).flatten().tolist()
            rows.append("x: " + (", ".join(f"{i}={row[i].item():.3g}" for i in on[:8]) or "0") + (" …" * (len(on) > 8)))
        strings = rows
    else:
        ids = prompt.reshape(-1).tolist()
        tokenizer = getattr(dec.model, "tokenizer", None)
        strings = [tokenizer.decode([i]) for i in ids] if tokenizer is not None else [str(i) for i in ids]
    if token_strings is not None:
        if len(token_strings) != len(strings):
            raise ValueError(f"token_strings has {len(token_strings)} entries, the prompt {len(strings)} positions")
        strings = [str(s) for s in token_strings]
    return strings


def _source_weights(
    targets: Float[Tensor, " n_targets"],
    coefficients: list[Float[Tensor, "n_points _C"]],
    sources: list[Shaped[Tensor, "_n_site_sources 2"]],
    batch_size: int,
) -> Float[Tensor, "n_targets n_sources"]:
    """``(∂targets[i] / ∂ã_j) · ã_j`` for every target ``i`` and source node ``j`` (``sources[s]``: the
    (point, subcomponent) of site ``s``'s source nodes; ``coefficients[s]`` its leaves ``ã``), Jacobian
    rows in batches of ``batch_size`` (one at a time where an op has no batching rule)."""
    picked = [coef[src[:, 0], src[:, 1]].detach() for coef, src in zip(coefficients, sources, strict=True)]

    def select(grads: Sequence[Tensor | None], n_rows: int) -> Tensor:
        cols = [
            torch.zeros(n_rows, src.shape[0], dtype=val.dtype, device=val.device)
            if g is None
            else g[:, src[:, 0], src[:, 1]] * val
            for g, src, val in zip(grads, sources, picked, strict=True)
        ]
        return torch.cat(cols, dim=1)

    n = targets.shape[0]
    if not targets.requires_grad:
        return select([None] * len(sources), n)
    eye = torch.eye(n, dtype=targets.dtype, device=targets.device)
    batched, out = True, []
    for start in range(0, n, batch_size):
        rows = eye[start : start + batch_size]
        if batched:
            try:
                grads = torch.autograd.grad(
                    targets, coefficients, rows, retain_graph=True, allow_unused=True, is_grads_batched=True
                )
                out.append(select(grads, rows.shape[0]))
                continue
            except (RuntimeError, NotImplementedError):  # an op without a batching rule
                batched = False
        for row in rows:
            grads = torch.autograd.grad(targets, coefficients, row, retain_graph=True, allow_unused=True)
            out.append(select([None if g is None else g[None] for g in grads], 1))
    return torch.cat(out)


def attribution_graph(
    decomposition: SPDDecomposition,
    prompt: Shaped[Tensor, "1 ..."],
    *,
    ci_threshold: float = 0.0,
    max_edges: int | None = 500,
    target: tuple[int, int] | None = None,
    token_strings: Sequence[str] | None = None,
    grad_batch_size: int = 64,
) -> AttributionGraph:
    """The attribution graph of one prompt (token ids ``[1, pos]``, or a toy input ``[1, d]``).

    Nodes: every (position, site, subcomponent) with CI ``> ci_threshold``, and the output node,
    the logit of ``target = (position, token)`` (default: the argmax token at the last position of the
    CI-masked model). Edges: ``(∂a_c / ∂ã_c') · a_c' · g_c'`` (see the module docstring for the exact
    stop-gradient semantics), kept if nonzero; then the ``max_edges`` largest by ``|weight|`` (None: all),
    and the nodes without an edge dropped. ``token_strings``: how to show each position (default: the
    model's tokenizer, else the ids).
    """
    dec = decomposition
    _check_prompt(dec, prompt)
    if not ci_threshold >= 0:
        raise ValueError(f"ci_threshold must be >= 0, got {ci_threshold}")
    if max_edges is not None and (not isinstance(max_edges, int) or max_edges < 1):
        raise ValueError(f"max_edges must be a positive integer or None, got {max_edges!r}")
    ci = {site: g.reshape(-1, g.shape[-1]) for site, g in dec.causal_importances(prompt).items()}
    run = _direct_effect_pass(dec, prompt, ci)
    n_points, n_out = run.output.shape
    if target is None:
        target = (n_points - 1, int(run.output[-1].argmax()))
    position, token = (int(t) for t in target)
    if not (0 <= position < n_points and 0 <= token < n_out):
        raise ValueError(f"target (position, token) = {tuple(target)} outside [0, {n_points}) x [0, {n_out})")

    sites = dec.sites
    points = {site: torch.nonzero(ci[site] > ci_threshold) for site in sites}  # [n_nodes_site, 2] (point, c)
    nodes = []
    for site in sites:
        at = (points[site][:, 0], points[site][:, 1])
        values = zip(points[site].tolist(), ci[site][at].tolist(), run.inner[site][at].tolist(), strict=True)
        nodes += [GraphNode(node_id(p, site, c), p, site, c, g, a) for (p, c), g, a in values]
    logit = run.output[position, token]
    out_node = GraphNode(
        node_id(position, OUTPUT_SITE, token), position, OUTPUT_SITE, token, None, logit.item(), "output"
    )
    # weights[i, j]: target row i (the nodes, then the output) from source node j; the rows of a site
    # with no decomposed site upstream (inner activations without a graph) stay zero
    reached = [run.inner[site].requires_grad for site in sites]
    row_of_site = torch.tensor([0] + [points[site].shape[0] for site in sites]).cumsum(0).tolist()
    rows_reached = [i for n, site in enumerate(sites) if reached[n] for i in range(row_of_site[n], row_of_site[n + 1])]
    targets = torch.cat(
        [run.inner[site][points[site][:, 0], points[site][:, 1]] for n, site in enumerate(sites) if reached[n]]
        + [logit[None]]
    )
    coefficients = [run.coefficients[site] for site in sites]
    weights = torch.zeros(len(nodes) + 1, len(nodes), dtype=logit.dtype, device=logit.device)
    weights[[*rows_reached, len(nodes)]] = _source_weights(
        targets, coefficients, [points[site] for site in sites], grad_batch_size
    )
    rows, cols = torch.nonzero(weights, as_tuple=True)
    strength = weights[rows, cols].abs()
    order = torch.argsort(strength, descending=True, stable=True)
    kept = order if max_edges is None else order[:max_edges]
    all_targets = [*nodes, out_node]
    edges = [
        GraphEdge(nodes[j].id, all_targets[i].id, w)
        for i, j, w in zip(
            rows[kept].tolist(), cols[kept].tolist(), weights[rows[kept], cols[kept]].tolist(), strict=True
        )
    ]
    used = {e.source for e in edges} | {e.target for e in edges}
    return AttributionGraph(
        prompt_tokens=_prompt_strings(dec, prompt, token_strings),
        nodes=[n for n in all_targets if n.id in used],
        edges=edges,
        target=(position, token),
        ci_threshold=float(ci_threshold),
        max_edges=max_edges,
        n_nodes_before_pruning=len(nodes) + 1,
        n_edges_before_pruning=int(rows.shape[0]),
        token_ids=None if torch.is_floating_point(prompt) else [int(t) for t in prompt.reshape(-1).tolist()],
    )
