"""SPD's loss terms and mask sampling, with the spec's normalizations.

The output distance and activation reconstruction are shared with every method
(:mod:`apd_lens.engine.losses`); the stochastic reconstruction losses are those distances on
masked passes (see :meth:`~apd_lens.methods.spd.decomposition.SPDDecomposition.losses`).
"""

from __future__ import annotations

from collections.abc import Hashable

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from apd_lens.training.distributed import local_part, sum_over_ranks, world_size


def faithfulness_loss(targets: dict[str, Tensor], sums: dict[str, Tensor]) -> Tensor:
    """``sum_l ||W_l - V_l U_l||^2`` divided by the number of decomposed parameters."""
    n_params = sum(w.numel() for w in targets.values())
    return sum((targets[name] - sums[name]).square().sum() for name in targets) / n_params


def importance_minimality_loss(
    ci_upper: dict[Hashable, Float[Tensor, "n _C"]], p: float, eps: float, beta: float = 0.0
) -> Tensor:
    """``sum_sites sum_c mean_n (g_upper[n, c] + eps)^p``: summed over subcomponents and weight uses,
    averaged over data points (not over layers, as the reference).

    With ``beta > 0`` each subcomponent's mean is multiplied by ``1 + beta log2(1 + s_c)``, ``s_c`` its
    sum over the global batch's data points (summed over the ranks of a distributed run before the log,
    with gradients, so that the ranks' averaged gradients are one process's, as VPD's spec asks): the
    reference's later frequency term, which makes a subcomponent that is on for many data points cost
    more than two that share them."""
    total = 0
    for g in ci_upper.values():
        sums = (g + eps).pow(p).sum(0)
        weights = 1 + beta * torch.log2(1 + _summed_over_ranks_with_grad(sums)) if beta else 1
        total = total + (sums * weights).sum() / g.shape[0]
    return total


def _summed_over_ranks_with_grad(t: Tensor) -> Tensor:
    """``t`` summed over the ranks of a distributed run, differentiable (its backward sums the ranks'
    gradients); ``t`` itself in one process."""
    return t if world_size() == 1 else _SumOverRanks.apply(t)


class _SumOverRanks(torch.autograd.Function):
    """``y = Σ_ranks x``, the same on every rank; ``dL/dx`` on each rank is ``Σ_ranks dL_rank/dy``."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        return sum_over_ranks(t.contiguous())

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return sum_over_ranks(grad.contiguous())


def _draw(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    """U(0, 1) draws of ``shape`` (the same on every rank: their generators are in step)."""
    if generator is None:
        return torch.rand(shape, device=like.device, dtype=like.dtype)
    return torch.rand(shape, generator=generator, dtype=like.dtype, device=generator.device).to(like.device)


def _uniform(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    """U(0, 1) draws of ``shape`` for this rank's rows: drawn for the global batch of a distributed
    run (so that it means the same as one process) and cut to this rank's part."""
    n = world_size()
    draws = _draw((shape[0] * n, *shape[1:]), like, generator)
    return local_part(draws, shape[0]) if n > 1 else draws


def stochastic_masks(
    ci: dict[Hashable, Float[Tensor, "*batch _C"]], sampling: str, generator: torch.Generator | None = None
) -> dict[Hashable, Float[Tensor, "*batch _C"]]:
    """``m = g + (1 - g) r`` per data point and subcomponent, ``r`` ~ U(0, 1) (``"continuous"``) or
    Bernoulli(1/2) (``"binomial"``)."""
    sources = {}
    for key, g in ci.items():
        r = _uniform(tuple(g.shape), g, generator)
        sources[key] = (r < 0.5).to(g.dtype) if sampling == "binomial" else r
    return masks_from_sources(ci, sources)


def masks_from_sources(
    ci: dict[Hashable, Float[Tensor, "*batch _C"]], sources: dict[Hashable, Tensor]
) -> dict[Hashable, Float[Tensor, "*batch _C"]]:
    """``m = g + (1 - g) s`` per site: the masks of causal importances ``g`` and sources ``s`` in [0, 1]
    (random draws, or adversarial ones for PGD; a source row of 1 broadcasts over the data points)."""
    return {key: g + (1 - g) * sources[key] for key, g in ci.items()}


def subset_routes(
    names: list[Hashable], n_points: int, like: Tensor, generator: torch.Generator | None = None
) -> dict[Hashable, Bool[Tensor, " n"]]:
    """Uniform-k subset routing (the reference's ``uniform_k_subset``): per data point, k uniform in
    1..len(names) and a uniformly random k-subset of ``names`` is routed to its subcomponents (True);
    the other weights keep the target's own."""
    n_names = len(names)
    k = (_uniform((n_points,), like, generator) * n_names).floor().clamp(max=n_names - 1) + 1
    ranks = _uniform((n_points, n_names), like, generator).argsort(-1).argsort(-1)
    return {name: ranks[:, i] < k for i, name in enumerate(names)}


def delta_masks(
    keys: list[Hashable], n_points: int, like: Tensor, generator: torch.Generator | None = None
) -> dict[Hashable, Float[Tensor, " n"]]:
    """One U(0, 1) mask per data point for each use's delta component."""
    return {key: _uniform((n_points,), like, generator) for key in keys}


def pgd_sources(
    shapes: dict[Hashable, tuple[int, ...]],
    init: str,
    like: Tensor,
    generator: torch.Generator | None = None,
    shared: bool = False,
) -> dict[Hashable, Tensor]:
    """Adversarial mask sources before the first ascent step: U(0, 1) (``"random"``), ones or zeros.
    ``shapes`` give this rank's rows; with ``shared`` (one row for the whole batch) every rank draws
    the same."""
    out = {}
    for key, shape in shapes.items():
        if init == "ones":
            out[key] = torch.ones(shape, device=like.device, dtype=like.dtype)
        elif init == "zeros":
            out[key] = torch.zeros(shape, device=like.device, dtype=like.dtype)
        else:
            out[key] = _draw(shape, like, generator) if shared else _uniform(shape, like, generator)
    return out


def pgd_ascent(
    sources: dict[Hashable, Tensor], grads: dict[Hashable, Tensor], step_size: float, shared: bool = False
) -> dict[Hashable, Tensor]:
    """One signed-gradient ascent step ``clip(s + step_size sign(grad), 0, 1)``; ``shared`` sources
    step along the sign of the gradient summed over ranks."""
    out = {}
    for key, s in sources.items():
        grad = sum_over_ranks(grads[key]) if shared else grads[key]
        out[key] = (s.detach() + step_size * grad.sign()).clamp(0.0, 1.0)
    return out
