"""Gradients of output probes with respect to every leaving activation, per data point.

Gradient attributions need, for a batch of output probes r_k (the same for every example),
``g[k, n] = d (r_k . f(x_n)) / d leave_u[n]`` for every use u. Two ways to get them, equal up to
float rounding:

- ``batched``: one autograd backward of the whole batch with every probe at once
  (``is_grads_batched``). Each probe is propagated separately for every example, even through
  layers where the gradient does not depend on the example (e.g. the unembedding and every linear
  map after the last nonlinearity).
- ``vmap``: ``torch.func.vmap`` over examples of a per-example ``vjp``. Because the probes are
  the same for every example, functorch keeps every gradient that does not depend on the example
  un-batched: it is computed once, not once per example, and comes back as a stride-0 view
  (see :func:`shared_over_examples`). On a residual MLP this turns the costliest part of a step
  into a few small matmuls. It needs a forward that functorch can transform (no data-dependent
  Python control flow, no ``.item()``); :class:`~apd_lens.methods.apd.decomposition.Decomposition` falls
  back to ``batched`` with a warning when it is not.

Both return, per use key, a tensor ``[K, n_examples, n_positions, d_leave]``: examples are the
first batch dim (independent), positions are the other batch dims flattened (e.g. the token
positions of a transformer, which attention couples), ``d_leave`` the leaving activation's
feature dims flattened; ``None`` where the output does not depend on that use.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from jaxtyping import Float
from torch import Tensor, nn

from apd_lens.engine.hooked_forward import HookPlan, PassRecord, UseKey

LeaveGradients = Callable[[Tensor], list[Tensor | None]]
"""probes ``[K, 1, *output_shape[1:]]`` -> per use key, gradients ``[K, n_examples, n_positions, d]``."""


def _grid(grad: Tensor, n_batch_dims: int, n_probes: int) -> Tensor:
    """``[K, n_examples, *other batch dims, *features]`` -> ``[K, n_examples, n_positions, d]``."""
    n_examples = grad.shape[1]
    n_positions = math.prod(grad.shape[2 : 1 + n_batch_dims])
    return grad.reshape(n_probes, n_examples, n_positions, -1)


def batched_leave_gradients(record: PassRecord, keys: list[UseKey]) -> LeaveGradients:
    """Gradients by one batched autograd backward over a pass recorded with ``make_leaves=True``."""
    leaves = [record.leaves[k] for k in keys]
    if not any(t.requires_grad for t in leaves):
        raise RuntimeError("no leaving activation carries a gradient path to the output")
    n_batch_dims = len(record.batch_shape)

    def gradients(probes: Tensor, retain_graph: bool = True) -> list[Tensor | None]:
        expanded = probes.expand(probes.shape[0], *record.output.shape)
        grads = torch.autograd.grad(
            record.output,
            leaves,
            grad_outputs=expanded,
            retain_graph=retain_graph,
            is_grads_batched=True,
            allow_unused=True,
        )
        return [None if g is None else _grid(g, n_batch_dims, probes.shape[0]) for g in grads]

    return gradients


def vmap_leave_gradients(
    model: nn.Module, x: Tensor, plan: HookPlan, record: PassRecord, keys: list[UseKey]
) -> LeaveGradients:
    """Gradients by ``vmap`` over examples of a per-example ``vjp`` through the model's hooks.

    ``record`` (any pass of ``model`` on ``x``) gives the shapes of the leaving activations.
    """
    n_batch_dims = len(record.batch_shape)
    point_shapes = {k: (1, *record.leaves[k].shape[1:]) for k in keys}
    dtypes = {k: record.leaves[k].dtype for k in keys}

    def gradients(probes: Tensor, retain_graph: bool = True) -> list[Tensor | None]:
        point_probes = probes.reshape(probes.shape[0], *probes.shape[2:])

        with leave_perturbations(model, plan, keys) as perturbed:

            def per_example(x_n: Tensor) -> dict[UseKey, Tensor]:
                zeros = {k: torch.zeros(point_shapes[k], dtype=dtypes[k], device=x.device) for k in keys}
                _, pullback = torch.func.vjp(lambda deltas: perturbed(x_n[None], deltas)[0], zeros)
                return torch.func.vmap(pullback)(point_probes)[0]

            grads = torch.func.vmap(per_example)(x)
        # [n_examples, K, 1, *rest] -> [K, n_examples, *rest]
        return [_grid(grads[k].movedim(0, 1).squeeze(2), n_batch_dims, probes.shape[0]) for k in keys]

    return gradients


def shared_over_examples(grad: Float[Tensor, "k n p d"]) -> bool:
    """Whether every example got the same gradient (a stride-0 view from ``vmap``, or equal values)."""
    if grad.shape[1] < 2:
        return False
    if grad.stride(1) == 0:
        return True
    # two examples first: a per-example gradient usually differs there, without a pass over all of it
    return torch.equal(grad[:, 1], grad[:, 0]) and torch.equal(grad, grad[:, :1].expand_as(grad))


@contextlib.contextmanager
def leave_perturbations(
    model: nn.Module, plan: HookPlan, keys: list[UseKey]
) -> Iterator[Callable[[Tensor, dict[UseKey, Tensor]], Tensor]]:
    """Hooks that add a perturbation to the leaving activation of each use in ``keys``; yields
    ``run(x, deltas) -> model(x)`` with ``deltas[key]`` added at that use's leaving hook. Gradients
    (or tangents) with respect to the deltas at zero are those of the leaving activations."""
    leave_hook = {(s.name, i): u.leave for s in plan.specs for i, u in enumerate(s.uses)}
    current: dict[UseKey, Tensor] = {}

    def perturb(key: UseKey) -> Callable:
        return lambda t, hook: t + current[key]

    def run(x: Tensor, deltas: dict[UseKey, Tensor]) -> Tensor:
        current.clear()
        current.update(deltas)
        return model(x)

    try:
        with model.hooks(fwd_hooks=[(leave_hook[k], perturb(k)) for k in keys]):
            yield run
    finally:
        current.clear()
