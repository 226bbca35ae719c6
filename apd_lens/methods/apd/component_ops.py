"""Operations shared by the splitter, merging and orphan adoption: the geometry of the data points a
component is used on, factoring a matrix into one component, and keeping the optimizer's moments
in step with a component whose weights were rewritten."""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from torch import Tensor


def principal_direction(points: Float[Tensor, "n d"]) -> Float[Tensor, " d"]:
    """The unit top eigenvector of ``points^T points`` (the line through the origin closest to the
    points), from the smaller of the two Gram matrices: ``[d, d]``, or ``[n, d]``'s ``[n, n]``
    when there are fewer points than dims (e.g. 300 points of width 2000: a 300x300 eigh instead of
    a 2000x2000 one)."""
    if points.shape[0] >= points.shape[1]:
        return torch.linalg.eigh(points.T @ points).eigenvectors[:, -1]
    direction = points.T @ torch.linalg.eigh(points @ points.T).eigenvectors[:, -1]
    return direction / direction.norm().clamp_min(1e-300)


def two_line_clusters(points: Float[Tensor, "n d"], iterations: int = 20) -> Bool[Tensor, " n"]:
    """Split ``points`` into two groups, each close to a line through the origin (sign-blind
    2-means on directions): True marks the second group."""
    unit = points / points.norm(dim=1, keepdim=True).clamp_min(1e-12)
    first = principal_direction(unit)
    second = unit[(unit @ first).abs().argmin()]
    group = torch.zeros(len(unit), dtype=torch.bool, device=unit.device)
    for _ in range(iterations):
        new = (unit @ second).abs() > (unit @ first).abs()
        if new.all() or not new.any() or torch.equal(new, group):
            break
        group = new
        first = principal_direction(unit[~group])
        second = principal_direction(unit[group])
    return group


def reading_uses(decomposition) -> dict[str, tuple[int, bool]]:
    """Per decomposed weight, the use whose entering activations show how the weight is read: its first
    use that reads through A (else its first use), and whether that use is transposed."""
    reading = {}
    for spec in decomposition.specs:
        plain = [i for i, u in enumerate(spec.uses) if not u.transposed]
        index = plain[0] if plain else 0
        reading[spec.name] = (index, spec.uses[index].transposed)
    return reading


def factor_to_rank(
    total: Float[Tensor, "d_in d_out"], rank: int, tol: float = 1e-5
) -> tuple[Float[Tensor, "d_in rank"], Float[Tensor, "rank d_out"]] | None:
    """``(A, B)`` with ``A @ B == total`` (float64, balanced singular values), or None when ``total``
    has rank above ``rank`` (a singular value beyond it above ``tol`` of the largest)."""
    U, S, Vh = torch.linalg.svd(total.double(), full_matrices=False)
    if S.numel() > rank and S[rank] > tol * S[0]:
        return None
    n = min(rank, S.numel())
    root = S[:n].sqrt()
    a = torch.zeros(total.shape[0], rank, dtype=torch.float64, device=total.device)
    b = torch.zeros(rank, total.shape[1], dtype=torch.float64, device=total.device)
    a[:, :n], b[:n] = U[:, :n] * root, root[:, None] * Vh[:n]
    return a, b


def unit_norm_A_keeping_P(comp, components) -> None:
    """Rescale the columns of these components' A to unit norm, moving the scale into B."""
    for c in components:
        norms = comp.A[c].norm(dim=0).clamp_min(1e-12)  # [m]
        comp.A[c].div_(norms)
        comp.B[c].mul_(norms[:, None])  # P_c = A_c B_c unchanged


def optimizer_moments(optimizer: torch.optim.Optimizer, comp) -> list[Tensor]:
    """The optimizer's per-component moments of ``comp``'s A and B (Adam's running averages)."""
    return [
        moment
        for param in (comp.A, comp.B)
        for moment in optimizer.state.get(param, {}).values()
        if isinstance(moment, Tensor) and moment.shape == param.shape
    ]


def copy_moments(optimizer: torch.optim.Optimizer, comp, source: int, target: int) -> None:
    """Give ``target`` the optimizer moments of ``source``."""
    for moment in optimizer_moments(optimizer, comp):
        moment[target].copy_(moment[source])
