"""Which inputs have a subcomponent of their own: the rule FEATURES_OWN and FACTS_OWN share."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


@dataclass
class Ownership:
    """Per owner (a feature, a fact): its top subcomponent and whether that one is its own."""

    top: Int[Tensor, " n_owners"]
    """The subcomponent with the largest causal importance on the owner's probe input."""
    top_ci: Float[Tensor, " n_owners"]
    """That causal importance."""
    worst_other: Float[Tensor, " n_owners"]
    """The largest causal importance of the top subcomponent on any input of another owner."""
    own: Bool[Tensor, " n_owners"]

    @property
    def n_own(self) -> int:
        return int(self.own.sum())


@torch.no_grad()
def own_subcomponents(
    ci: Float[Tensor, "n_inputs C"],
    owner: Int[Tensor, " n_inputs"],
    probe: Int[Tensor, " n_owners"],
    on: float = 0.5,
    off: float = 0.1,
) -> Ownership:
    """Owner ``o``'s top subcomponent ``c`` is the argmax of ``ci[probe[o]]``; it is ``o``'s own when
    ``ci[probe[o], c] >= on`` and ``ci[j, c] < off`` at every input ``j`` with ``owner[j] != o``.

    ``ci``: causal importances of the subcomponents (columns) on a set of inputs (rows); ``owner``:
    which owner each input belongs to (0 .. n_owners - 1; several inputs may share one); ``probe``:
    the input that picks each owner's top subcomponent."""
    if ci.ndim != 2 or owner.shape != ci.shape[:1]:
        raise ValueError(f"ci must be [n_inputs, C] and owner [n_inputs], got {tuple(ci.shape)}, {tuple(owner.shape)}")
    n_owners = probe.numel()
    if owner.numel() and (owner.min() < 0 or owner.max() >= n_owners):
        raise ValueError(f"owner ids must lie in [0, {n_owners}) (one probe per owner)")
    top_ci, top = ci[probe].max(-1)
    at_top = ci[:, top]  # [input j, owner o]: CI on input j of owner o's top subcomponent
    others = owner[:, None] != torch.arange(n_owners, device=owner.device)[None, :]
    worst_other = at_top.masked_fill(~others, float("-inf")).max(0).values
    return Ownership(top, top_ci, worst_other, (top_ci >= on) & (worst_other < off))
