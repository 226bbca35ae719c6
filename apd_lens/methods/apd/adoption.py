"""Orphan adoption: give a mechanism that no component carries to an unused component.

A run can end with a mechanism no component owns: its weight smeared thinly over many components
(TMS 40-10 with merging, seeds 1 and 3: one feature's row of W spread over components none of which
holds more than a fifth of it), so every top-k forward that needs it is wrong, while the splitter sees
no over-used component and the unused ones stay unused. With ``adopt_orphans``, each split check
that leaves an unused component looks at the ``adopt_orphans`` share of the kept data points that
the top-k forward reconstructs worst, takes the input direction ``u`` they share (per weight: the
direction of the activations entering it that those points use more than the others do), and moves
that direction's slice of every other component into the unused one (``P_t += u u^T sum_{c != t} P_c``
and ``A_c -= u u^T A_c``; for a transposed use the same on the B side): the sum of all components is
unchanged. The move is kept only if it lowers the top-k forward's mean error on the kept points by at least
``ADOPT_MIN_GAIN``, and undone otherwise (the worst points then share no missing mechanism). The same
idea as re-seeding dead k-means centres or VQ codes at the worst-reconstructed points.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from apd_lens.engine.losses import output_loss_per_point
from apd_lens.methods.apd.component_ops import (
    factor_to_rank,
    optimizer_moments,
    reading_uses,
    unit_norm_A_keeping_P,
)

ADOPT_MIN_GAIN = 0.05
"""An adoption is kept when it lowers the top-k forward's mean error on the kept points by this share."""
MIN_WORST_POINTS = 4


@dataclass(frozen=True)
class Adoption:
    step: int
    target: int
    error_before: float
    """Mean top-k output error on the kept points before the move, and after it."""
    error_after: float


@torch.no_grad()
def topk_errors(decomposition, batches: list[Tensor]) -> tuple[Float[Tensor, " n"], dict[str, Float[Tensor, "n _d"]]]:
    """Per data point of ``batches``: the top-k forward's output error (the config's output loss, each
    batch its own batch top-k as in training), and per weight the activations entering its reading use."""
    dec = decomposition
    reading = reading_uses(dec)
    errors, enters = [], {name: [] for name in reading}
    for x in batches:
        record = dec.target_pass(x, make_leaves=dec._needs_leaves())
        mask = dec.mask_from_attributions(dec.attributions(x, record=record))
        output = dec.forward_with_mask(x, mask).output
        errors.append(output_loss_per_point(output, record.output, dec.config.output_loss, len(record.batch_shape)))
        for name, (i, _) in reading.items():
            enters[name].append(record.enters[(name, i)].detach())
    return torch.cat(errors).double(), {name: torch.cat(parts) for name, parts in enters.items()}


def orphan_directions(
    errors: Float[Tensor, " n"], enters: dict[str, Float[Tensor, "n _d"]], worst_share: float
) -> dict[str, Float[Tensor, " _d"]]:
    """Per weight, the input direction over-represented among the ``worst_share`` of the data points with
    the largest error (at least ``MIN_WORST_POINTS``): the top eigenvector of their mean ``x x^T`` minus
    that of all points (what the worst points have that every point has, e.g. other features of a sparse
    input, cancels)."""
    n_worst = min(len(errors), max(MIN_WORST_POINTS, int(worst_share * len(errors))))
    worst = errors.topk(n_worst).indices
    directions = {}
    for name, x in enters.items():
        x = x.double()
        contrast = x[worst].T @ x[worst] / n_worst - x.T @ x / len(x)
        directions[name] = torch.linalg.eigh(contrast).eigenvectors[:, -1]
    return directions


@torch.no_grad()
def carve_direction(
    decomposition, optimizer: torch.optim.Optimizer, target: int, directions: dict[str, Float[Tensor, " _d"]]
) -> bool:
    """Move every other component's slice along each weight's input direction into ``target`` (module doc).
    Returns False, changing nothing, when a weight's new ``P_target`` exceeds the components' rank. The
    target's optimizer moments are reset."""
    dec = decomposition
    reading = reading_uses(dec)
    factors = {}
    for name, comp in dec.components.items():
        u, transposed = directions[name].double(), reading[name][1]
        parts = torch.einsum("cir,cro->cio", comp.A.double(), comp.B.double())
        others = parts.sum(0) - parts[target]
        carved = torch.outer(others @ u, u) if transposed else torch.outer(u, u @ others)
        factors[name] = factor_to_rank(parts[target] + carved, comp.A.shape[-1])
        if factors[name] is None:
            return False
    for name, comp in dec.components.items():
        u, transposed = directions[name].to(comp.A.dtype), reading[name][1]
        if transposed:  # B_c -= (B_c u) u^T
            comp.B.sub_(torch.einsum("cro,o->cr", comp.B, u)[:, :, None] * u)
        else:  # A_c -= u (u^T A_c)
            comp.A.sub_(u[:, None] * torch.einsum("i,cir->cr", u, comp.A)[:, None, :])
        a, b = factors[name]
        comp.A[target].copy_(a.to(comp.A.dtype))
        comp.B[target].copy_(b.to(comp.B.dtype))
        if dec.config.unit_norm_A:
            unit_norm_A_keeping_P(comp, range(comp.A.shape[0]))
        for moment in optimizer_moments(optimizer, comp):
            moment[target].zero_()
    return True


@torch.no_grad()
def adopt_orphans(
    decomposition,
    optimizer: torch.optim.Optimizer,
    targets: list[int],
    batches: list[Tensor],
    worst_share: float,
    step: int,
) -> list[Adoption]:
    """Adopt orphans into the unused ``targets`` one at a time, each kept only if it lowers the top-k
    forward's mean error on ``batches`` by ``ADOPT_MIN_GAIN`` (module doc); stops at the first that does not."""
    if not targets or not batches:
        return []
    errors, enters = topk_errors(decomposition, batches)
    adoptions = []
    for target in targets:
        saved = {name: (comp.A.clone(), comp.B.clone()) for name, comp in decomposition.components.items()}
        moments = {
            name: [m[target].clone() for m in optimizer_moments(optimizer, comp)]
            for name, comp in decomposition.components.items()
        }
        if not carve_direction(decomposition, optimizer, target, orphan_directions(errors, enters, worst_share)):
            break
        new_errors, _ = topk_errors(decomposition, batches)
        before, after = float(errors.mean()), float(new_errors.mean())
        if after > (1 - ADOPT_MIN_GAIN) * before:
            for name, comp in decomposition.components.items():
                comp.A.copy_(saved[name][0])
                comp.B.copy_(saved[name][1])
                for moment, old in zip(optimizer_moments(optimizer, comp), moments[name], strict=True):
                    moment[target].copy_(old)
            break
        adoptions.append(Adoption(step, target, before, after))
        errors = new_errors
    return adoptions
