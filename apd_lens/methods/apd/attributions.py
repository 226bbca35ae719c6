"""Attributions of every component on every data point.

Gradient attribution (the paper's): for data point n and component c,

    attr[n, c] = sum_o ( sum_u  d f_o / d leave_u [n]  .  (enter_u[n] @ P_c) )^2

with f the model output, u running over all uses of all decomposed weights. The gradients are
vector-Jacobian products of the output with a batch of output probes, never a Python loop over
outputs (see :mod:`apd_lens.methods.apd.leave_gradients` for the two ways they are taken): exact mode uses
the one-hot basis of the output dims (every dim but the first, which indexes independent
examples), stochastic mode uses k Rademacher probes r, for which E[(r^T J a)^2] = ||J a||^2.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor, nn

from apd_lens.engine.hooked_forward import HookPlan, PassRecord, UseKey
from apd_lens.methods.apd.components import ComponentWeight
from apd_lens.methods.apd.leave_gradients import (
    LeaveGradients,
    batched_leave_gradients,
    leave_perturbations,
    shared_over_examples,
)

_CHUNK_ELEMENTS = 2**21
"""Per-example component outputs are built at most about this many elements at a time."""


MAX_PROBE_GRADIENT_BYTES = 8 * 2**30
"""Attributions refuse to take back more than this many bytes of leave gradients at once (all uses, one
probe chunk): an exact attribution of a language model has one probe per (position, vocab entry)."""


def exact_probes(output: Tensor, start: int = 0, stop: int | None = None) -> Tensor:
    """One-hot probes over all output dims but the first (which indexes independent examples):
    ``[K, 1, *output.shape[1:]]``, the same for every example; rows ``start:stop`` of them."""
    n_out = math.prod(output.shape[1:])
    stop = n_out if stop is None else min(stop, n_out)
    probes = torch.zeros(stop - start, n_out, dtype=output.dtype, device=output.device)
    probes[torch.arange(stop - start), torch.arange(start, stop)] = 1
    return probes.reshape(stop - start, 1, *output.shape[1:])


class ProbeMemoryError(ValueError):
    """Exact (or k-probe) attributions whose gradients would not fit in memory."""


def check_probe_memory(record: PassRecord, n_probes: int, chunk: int, exact: bool) -> None:
    """Refuse (with what to set instead) a probe chunk whose leave gradients would not fit in memory."""
    per_probe = sum(t.numel() * t.element_size() for t in record.leaves.values())
    need = min(chunk, n_probes) * per_probe
    if need <= MAX_PROBE_GRADIENT_BYTES:
        return
    what = (
        f"exact attributions take one output probe per output dim ({n_probes} for output shape "
        f"{tuple(record.output.shape[1:])} per example)"
        if exact
        else f"{n_probes} random probes"
    )
    raise ProbeMemoryError(
        f"{what}; their gradients at the leaving activations, {min(chunk, n_probes)} probes at once, would take "
        f"{need / 2**30:.3g} GiB (limit apd_lens.methods.apd.attributions.MAX_PROBE_GRADIENT_BYTES = "
        f"{MAX_PROBE_GRADIENT_BYTES / 2**30:.3g} GiB). Set attribution_probes=k for an unbiased estimate from k "
        "random probes (relative error about 1/sqrt(k)), or attribution_chunk to take the probes in chunks "
        f"(at most {max(1, MAX_PROBE_GRADIENT_BYTES // per_probe)} per chunk here; slower)"
    )


def random_probes(output: Tensor, n_probes: int, generator: torch.Generator | None = None) -> Tensor:
    """Rademacher probes ``[K, 1, *output.shape[1:]]``, the same for every example: examples are
    independent, so each example's estimate stays unbiased, and a gradient that does not depend
    on the example stays shared (see :func:`gradient_attributions`)."""
    signs = torch.randint(0, 2, (n_probes, 1, *output.shape[1:]), generator=generator, device="cpu")
    return (signs.to(output.dtype) * 2 - 1).to(output.device)


ZERO_ROWS_WORTH_SKIPPING = 0.125
"""Inner activations skip all-zero entering rows when at least this fraction of rows is zero."""


def live_row_inner_acts(comp: ComponentWeight, enter: Float[Tensor, "n d"], transposed: bool) -> Float[Tensor, "n C m"]:
    """Detached inner activations ``enter @ A_c``, computed only for rows of ``enter`` that are not all
    zero: sparse-feature toy models feed many examples with no active feature (37% of a residual MLP
    batch), whose rows are exactly zero, as are their inner activations."""
    live = enter.any(-1)
    n_live = int(live.sum())
    if n_live > (1 - ZERO_ROWS_WORTH_SKIPPING) * enter.shape[0]:
        return comp.inner_acts(enter, transposed, detach=True)
    out = enter.new_zeros(enter.shape[0], comp.n_components, comp.rank)
    if n_live:
        out[live] = comp.inner_acts(enter[live], transposed, detach=True)
    return out


class FeedsMismatch(RuntimeError):
    """A declared :attr:`apd_lens.engine.spec.WeightUse.feeds` does not describe the model."""


def check_fed_gradient(key, direct, shared: Tensor, examples: Tensor | None, grad: Tensor) -> None:
    """Raise unless the part of a feeding use's gradient ``grad [k, examples, p, d]`` that does not pass
    through the fed weights is the same for every example (checked on ``examples``; None: all)."""
    n_examples = grad.shape[1]
    examples = torch.arange(n_examples, device=grad.device) if examples is None else examples[examples < n_examples]
    got = direct(examples)
    scale = grad[:, examples].abs().max().clamp_min(torch.finfo(grad.dtype).tiny)
    error = (got - shared[:, None]).abs().max()  # got [k, e, p, d], shared [k, p, d]
    if error > 1000 * torch.finfo(grad.dtype).eps * scale:
        raise FeedsMismatch(
            f"weight use {key}: declared feeds, but the part of its gradient outside the fed weights differs "
            f"between examples (by {float(error / scale):.2g} of the gradient's scale): some path from its "
            "leaving activation to the output is nonlinear, normalized or not declared; fix WeightUse.feeds"
        )


def gradient_attributions(
    record: PassRecord,
    plan: HookPlan,
    components: dict[str, ComponentWeight],
    n_probes: int | None = None,
    probe_chunk: int | None = None,
    generator: torch.Generator | None = None,
    leave_gradients: LeaveGradients | None = None,
    fed_weights: dict[UseKey, list[tuple[UseKey, Tensor]]] | None = None,
    fed_check: Tensor | None = None,
) -> Float[Tensor, "n_points C"]:
    """Gradient attributions of every component on every data point of a recorded pass.

    ``n_probes=None`` computes them exactly; otherwise an unbiased estimate from that many
    random probes. ``probe_chunk`` bounds how many probes are taken back at once.
    ``leave_gradients`` computes the gradients of the probes at the leaving activations (see
    :mod:`apd_lens.methods.apd.leave_gradients`); default: one batched backward of ``record`` (recorded
    with ``make_leaves=True``).

    For each use, ``g . (z_c @ outer_c)`` with ``z_c = enter @ A_c`` (the rank-m inner
    activations) is computed per data point, or, when the gradient is the same for every example,
    as ``z_c . (g @ outer_c^T)`` with the projection done once per position: equal, and cheaper
    when ``d_out`` is large.

    ``fed_weights`` (see :attr:`apd_lens.engine.spec.WeightUse.feeds`): per use, the later uses that its leaving
    activation feeds unchanged and their target matrices ``[d, d']``. Such a use's per-example gradient
    is ``s + sum' g' @ W'^T`` with ``s`` the same for every example, and ``g . (z_c @ outer_c)`` is taken
    as ``s`` through the shared path plus ``g' . (z_c @ (outer_c @ W'))`` at the narrower width ``d'``
    (checked on the examples ``fed_check``, None: all; a mismatch raises :class:`FeedsMismatch`).
    """
    n_total = math.prod(record.output.shape[1:]) if n_probes is None else n_probes
    chunk = n_total if probe_chunk is None else probe_chunk
    check_probe_memory(record, n_total, chunk, exact=n_probes is None)
    keys = plan.use_keys()
    fed_weights = fed_weights or {}
    if leave_gradients is None:
        leave_gradients = batched_leave_gradients(record, keys)
    uses = {(s.name, i): u for s in plan.specs for i, u in enumerate(s.uses)}
    with torch.no_grad():
        inner_acts = {
            key: live_row_inner_acts(components[key[0]], record.enters[key], uses[key].transposed) for key in keys
        }

    def per_example_term(key, grad: Tensor) -> Tensor:
        """``g[k, n] . (enter[n] @ P_c)`` as ``[n, C, k]``, for a gradient that differs between
        examples, in chunks of data points so the component outputs ``[chunk, C, d]`` stay small
        (cache-sized)."""
        comp, transposed = components[key[0]], uses[key].transposed
        acts = inner_acts[key]
        chunk = max(1, _CHUNK_ELEMENTS // (acts.shape[1] * grad.shape[-1]))
        by_point = grad.permute(1, 2, 0)  # [n, d, k]
        if chunk >= acts.shape[0]:
            return torch.bmm(comp.outer(acts, transposed, detach=True), by_point)
        term = grad.new_empty(acts.shape[0], acts.shape[1], grad.shape[0])
        for start in range(0, acts.shape[0], chunk):
            rows = slice(start, start + chunk)
            torch.bmm(comp.outer(acts[rows], transposed, detach=True), by_point[rows], out=term[rows])
        return term

    def shared_term(key, grad: Tensor) -> Tensor:
        """The same as ``[n, C, k]``, for a gradient shared by all examples ``[k, positions, d]``:
        projected once onto the inner activations, then one matmul per component."""
        n_probe, n_positions, d = grad.shape
        projected = components[key[0]].project_onto_inner(grad.reshape(-1, d), uses[key].transposed)
        projected = projected.reshape(n_components, -1, n_probe, n_positions)  # [C, m, k, p]
        acts = inner_acts[key].reshape(-1, n_positions, n_components, projected.shape[1])
        return torch.einsum("bpcm,cmkp->bpck", acts, projected).reshape(-1, n_components, n_probe)

    def fed_term(key, grad: Tensor, grads: dict[UseKey, Tensor]) -> Tensor:
        """The per-example term of a use that feeds later uses unchanged (``grad [k, examples, p, d]``)."""
        fed = [(grads[k2], w) for k2, w in fed_weights[key]]  # [k, examples, p, d'], [d, d']

        def direct(examples: Tensor) -> Tensor:  # s at every position of the given examples: [k, e, p, d]
            return grad[:, examples] - sum(g2[:, examples] @ w.T for g2, w in fed)

        shared = direct(torch.zeros(1, dtype=torch.long, device=grad.device))[:, 0]  # [k, p, d]
        check_fed_gradient(key, direct, shared, fed_check, grad)
        term = shared_term(key, shared)
        for (k2, _), (g2, _) in zip(fed_weights[key], fed, strict=True):
            term = term + torch.bmm(fed_outputs(key, k2), g2.reshape(g2.shape[0], n_points, -1).permute(1, 2, 0))
        return term

    fed_output_cache: dict[tuple[UseKey, UseKey], Tensor] = {}

    def fed_outputs(key, fed_key) -> Tensor:
        """``z_c @ (outer_c @ W')`` ``[n, C, d']``: the components' outputs carried through one fed weight,
        which no probe changes (made once, not once per probe chunk)."""
        if (key, fed_key) not in fed_output_cache:
            matrix = dict(fed_weights[key])[fed_key]
            through = components[key[0]].project_onto_inner(matrix.T, uses[key].transposed)  # [C, m, d']
            fed_output_cache[(key, fed_key)] = torch.einsum("ncm,cmj->ncj", inner_acts[key], through)
        return fed_output_cache[(key, fed_key)]

    drawn = None if n_probes is None else random_probes(record.output, n_probes, generator)
    n_points, n_components = next(iter(inner_acts.values())).shape[:2]
    total = torch.zeros(n_points, n_components, dtype=record.output.dtype, device=record.output.device)
    for start in range(0, n_total, chunk):
        part = exact_probes(record.output, start, start + chunk) if drawn is None else drawn[start : start + chunk]
        last = start + chunk >= n_total
        grads = leave_gradients(part, retain_graph=not last)
        inner = None  # [n_points, C, K]: sum over uses of g . (enter @ P_c), probes last
        by_key = dict(zip(keys, grads, strict=True))
        for key, grad in by_key.items():
            if grad is None:
                continue
            n_probe, n_examples, n_positions, d = grad.shape
            if shared_over_examples(grad):
                term = shared_term(key, grad[:, 0])
            elif key in fed_weights and all(by_key[k2] is not None for k2, _ in fed_weights[key]):
                term = fed_term(key, grad, by_key)
            else:
                term = per_example_term(key, grad.reshape(n_probe, n_points, d))
            if inner is None:
                inner = term
            elif inner.is_contiguous():  # keep the sum contiguous for the vecdot over probes below
                inner.add_(term)
            else:
                inner = term.add_(inner)
        if inner is not None:
            total += torch.linalg.vecdot(inner, inner)  # over the probes (contiguous)
    return total if n_probes is None else total / n_probes


def jvp_attributions(
    model: nn.Module, x: Tensor, record: PassRecord, plan: HookPlan, components: dict[str, ComponentWeight]
) -> Float[Tensor, "n_examples C"]:
    """Exact gradient attributions by forward mode: per component c, one Jacobian-vector product
    of the model with tangent ``enter_u @ P_c`` at every leaving activation u, all components
    at once under ``vmap``; ``attr[n, c] = ||J_n a_c||^2``. Cheaper than probing every output
    when C is not much larger than the output width and the layers after the decomposed
    weights are cheap (e.g. the toy model of superposition). Needs data points = examples
    (one batch dim): a tangent at one token position would move every later position.
    """
    if len(record.batch_shape) != 1:
        raise ValueError(
            f"forward-mode (jvp) attributions need one batch dim (data points = examples), got batch shape "
            f"{record.batch_shape}; use attribution_backend='vmap' or 'batched'"
        )
    uses = {(s.name, i): u for s in plan.specs for i, u in enumerate(s.uses)}
    keys = plan.use_keys()
    n_components = next(iter(components.values())).n_components
    tangents = {  # [C, n, *leave feature dims], contiguous: vmap over a leading dim copies nothing
        k: components[k[0]]
        .outputs_by_component(record.enters[k], uses[k].transposed)
        .transpose(0, 1)
        .reshape(n_components, *record.leaves[k].shape)
        for k in keys
    }
    zeros = {k: torch.zeros_like(record.leaves[k]) for k in keys}  # made once, not once per vmapped call
    with leave_perturbations(model, plan, keys) as perturbed:

        def jvp_of(tangent):
            return torch.func.jvp(lambda deltas: perturbed(x, deltas), (zeros,), (tangent,))[1]

        out = torch.func.vmap(jvp_of)(tangents)  # [C, n, *output]
    flat = out.reshape(out.shape[0], out.shape[1], -1)
    return torch.linalg.vecdot(flat, flat).T


def activation_attributions(
    record: PassRecord, plan: HookPlan, components: dict[str, ComponentWeight]
) -> Float[Tensor, "n_points C"]:
    """Sum over uses of the squared norm of each component's output: ||enter_u @ P_c||^2."""
    specs = {s.name: s for s in plan.specs}
    total = None
    with torch.no_grad():
        for name, i in plan.use_keys():
            out = components[name].component_outputs(
                record.enters[(name, i)], specs[name].uses[i].transposed, detach=True
            )
            sq = out.square().sum(-1)
            total = sq if total is None else total + sq
    return total
