"""Attributions of every component on every data point.

Gradient attribution (the paper's): for data point n and component c,

    attr[n, c] = sum_o ( sum_u  d f_o / d leave_u [n]  .  (enter_u[n] @ P_c) )^2

with f the model output, u running over all uses of all decomposed weights. The gradients are
vector-Jacobian products of the output with a batch of output probes, all in one batched
backward (``is_grads_batched``): exact mode uses the one-hot basis of the output dims (every
dim but the first, which indexes independent examples), stochastic mode uses k Rademacher
probes r, for which E[(r^T J a)^2] = ||J a||^2.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor

from apd_lens.components import ComponentWeight
from apd_lens.hooked_forward import HookPlan, PassRecord


def exact_probes(output: Tensor) -> Tensor:
    """One-hot probes over all output dims but the first, broadcast over examples: [K, *output]."""
    n_out = math.prod(output.shape[1:])
    eye = torch.eye(n_out, dtype=output.dtype, device=output.device)
    return eye.reshape(n_out, 1, *output.shape[1:]).expand(n_out, *output.shape)


def random_probes(output: Tensor, n_probes: int, generator: torch.Generator | None = None) -> Tensor:
    """Rademacher probes [K, *output], the same for every example (dim 0): examples are independent,
    so each example's estimate stays unbiased, and a gradient that does not depend on the example
    stays shared (see :func:`gradient_attributions`)."""
    signs = torch.randint(0, 2, (n_probes, 1, *output.shape[1:]), generator=generator, device="cpu")
    return (signs.to(output.dtype) * 2 - 1).to(output.device).expand(n_probes, *output.shape)


def _shared_over_points(grad: Float[Tensor, "k n d"]) -> bool:
    """Whether every data point got the same gradient (e.g. a linear read-out after the hook)."""
    return grad.shape[1] > 1 and torch.equal(grad, grad[:, :1].expand_as(grad))


def gradient_attributions(
    record: PassRecord,
    plan: HookPlan,
    components: dict[str, ComponentWeight],
    n_probes: int | None = None,
    probe_chunk: int | None = None,
    generator: torch.Generator | None = None,
) -> Float[Tensor, "n_points C"]:
    """Gradient attributions from a pass recorded with ``make_leaves=True``.

    ``n_probes=None`` computes them exactly; otherwise an unbiased estimate from that many
    random probes. ``probe_chunk`` bounds how many probes go through one batched backward.

    For each use, ``g . (z_c @ outer_c)`` with ``z_c = enter @ A_c`` (the rank-m inner
    activations) is computed per data point, or, when the gradient is the same for every data
    point, as ``z_c . (g @ outer_c^T)`` with the projection done once: equal, and cheaper when
    ``d_out`` is large.
    """
    keys = plan.use_keys()
    leaves = [record.leaves[k] for k in keys]
    if not any(t.requires_grad for t in leaves):
        raise RuntimeError("no leaving activation carries a gradient path to the output")
    uses = {(s.name, i): u for s in plan.specs for i, u in enumerate(s.uses)}
    with torch.no_grad():
        inner_acts = {
            key: components[key[0]].inner_acts(record.enters[key], uses[key].transposed, detach=True) for key in keys
        }
    comp_outs: dict = {}

    def outputs(key) -> Tensor:
        if key not in comp_outs:
            comp_outs[key] = components[key[0]].outer(inner_acts[key], uses[key].transposed, detach=True)
        return comp_outs[key]

    probes = exact_probes(record.output) if n_probes is None else random_probes(record.output, n_probes, generator)
    chunk = probes.shape[0] if probe_chunk is None else probe_chunk
    n_points, n_components = next(iter(inner_acts.values())).shape[:2]
    total = torch.zeros(n_points, n_components, dtype=record.output.dtype, device=record.output.device)
    for start in range(0, probes.shape[0], chunk):
        part = probes[start : start + chunk]
        last = start + chunk >= probes.shape[0]
        grads = torch.autograd.grad(
            record.output, leaves, grad_outputs=part, retain_graph=not last, is_grads_batched=True, allow_unused=True
        )
        inner = torch.zeros(part.shape[0], n_points, n_components, dtype=total.dtype, device=total.device)
        for key, grad in zip(keys, grads, strict=True):
            if grad is None:
                continue
            g = grad.reshape(part.shape[0], n_points, -1)
            if _shared_over_points(g):
                projected = components[key[0]].project_onto_inner(g[:, 0], uses[key].transposed)
                inner += torch.einsum("ncm,kcm->knc", inner_acts[key], projected)
            else:
                inner += torch.einsum("knd,ncd->knc", g, outputs(key))
        total += inner.square().sum(0)
    return total if n_probes is None else total / n_probes


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
