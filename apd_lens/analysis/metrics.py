"""Metrics comparing components with ground-truth mechanisms."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor


@torch.no_grad()
def mmcs_ml2r(
    components: Float[Tensor, "C n_features d"], target: Float[Tensor, "n_features d"], min_norm_frac: float = 0.0
) -> tuple[float, float]:
    """Mean max cosine similarity and mean L2 ratio of the features' vectors.

    For every feature j (a row of ``target``; for TMS, row j of W = the paper's column j), take
    the component whose row j is most cosine-similar; MMCS averages that similarity, ML2R the
    ratio of that component's row norm to the target's. ``min_norm_frac > 0``: only components
    (or subcomponents) whose whole norm is above that fraction of the largest one's take part, so a
    negligible leftover (SPD's unused subcomponents end with norms ~1e-3 of the used ones, and their
    direction can match a feature's to 1e-5) cannot win a feature's max cosine; 0 is the papers' metric.
    """
    if components.shape[1:] != target.shape:
        raise ValueError(f"components {tuple(components.shape)} do not match target {tuple(target.shape)}")
    if min_norm_frac > 0:
        norms = components.flatten(1).norm(dim=1)
        components = components[norms > min_norm_frac * norms.max()]
    comp_norm = components.norm(dim=-1)  # [C, F]
    target_norm = target.norm(dim=-1)  # [F]
    cos = (components * target).sum(-1) / (comp_norm * target_norm).clamp_min(1e-12)  # [C, F]
    best, idx = cos.max(0)
    ratio = comp_norm.gather(0, idx[None]).squeeze(0) / target_norm.clamp_min(1e-12)
    return float(best.mean()), float(ratio.mean())


@torch.no_grad()
def n_large(parts: Float[Tensor, "C ..."], rel: float = 0.01) -> int:
    """How many parts (components or subcomponents, ``[C, ...]``) have a Frobenius norm above ``rel``
    times the largest one's."""
    norms = parts.flatten(1).norm(dim=1)
    return int((norms > rel * norms.max()).sum())
