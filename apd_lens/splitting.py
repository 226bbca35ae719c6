"""Component splitting: during training, move an over-used component's second job into an unused one.

APD's typical failure on the toy models is two mechanisms merged in one component while other
components stay unused (the merged one is then active about twice as often as the others).
Top-k never selects an unused component again, so the run cannot repair itself. Every
``split_every`` steps (until ``split_until`` of the run) the splitter counts how often each
component was kept by the top-k mask since the last check (read from ``hook_mask``), then, for
each component active at least ``split_ratio`` times as often as the median live component, takes
an unused one (active on at most 1% of the median's rate) and splits: both get the over-used
component's A, each half its B (so the sum of all components, hence faithfulness, is unchanged),
with a small multiplicative noise on the copy to break the tie, and the copy gets the original's
optimizer moments. The same idea as splitting clusters in k-means or re-seeding dead codes from
busy ones in vector quantization.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from apd_lens import distributed

logger = logging.getLogger(__name__)

DEAD_FRACTION = 0.01
"""A component is unused if it was active at most this fraction as often as the median live one."""
SPLIT_NOISE = 0.1
"""Relative size of the multiplicative noise put on the copy's A and B."""


@dataclass(frozen=True)
class Split:
    step: int
    source: int
    target: int
    source_rate: float
    median_rate: float


def choose_splits(
    active_counts: Float[Tensor, " C"], n_points: int, split_ratio: float
) -> tuple[list[tuple[int, int]], float]:
    """``(over-used, unused)`` pairs to split, most over-used first, and the median live rate."""
    rate = active_counts.double() / max(n_points, 1)
    live = rate[rate > 0]
    if live.numel() == 0:
        return [], 0.0
    median = float(live.median())
    over = [int(c) for c in torch.argsort(rate, descending=True, stable=True) if rate[c] >= split_ratio * median]
    dead = [int(c) for c in range(rate.numel()) if rate[c] <= DEAD_FRACTION * median]
    return list(zip(over, dead, strict=False)), median


@torch.no_grad()
def split_component(decomposition, optimizer: torch.optim.Optimizer, source: int, target: int, generator) -> None:
    """Make ``target`` a noisy copy of ``source`` sharing its weight: every decomposed weight's
    ``B[source]`` is halved and copied to ``B[target]``, ``A[source]`` copied to ``A[target]``."""
    for comp in decomposition.components.values():
        comp.B[source].mul_(0.5)
        for param in (comp.A, comp.B):
            noise = torch.randn(param[source].shape, generator=generator, dtype=param.dtype)
            param[target].copy_(param[source] * (1 + SPLIT_NOISE * noise.to(param.device)))
            for moment in optimizer.state.get(param, {}).values():
                if isinstance(moment, Tensor) and moment.shape == param.shape:
                    moment[target].copy_(moment[source])
        if decomposition.config.unit_norm_A:
            comp.normalize_A()


class ComponentSplitter:
    """Counts top-k activity through ``hook_mask`` and splits over-used components (see module doc)."""

    def __init__(self, decomposition, optimizer: torch.optim.Optimizer):
        cfg = decomposition.config
        self.decomposition, self.optimizer = decomposition, optimizer
        self.every, self.ratio = cfg.split_every, cfg.split_ratio
        self.last_step = int(cfg.split_until * cfg.steps)
        self.seed = cfg.seed
        self.counts = torch.zeros(cfg.n_components, dtype=torch.float64)
        self.n_points = 0
        self.history: list[Split] = []
        self._handle = None
        if self.every is not None:
            self._handle = decomposition.hook_mask.register_forward_hook(self._count)

    def _count(self, module, inputs, mask: Tensor) -> None:
        flat = mask.detach().reshape(-1, mask.shape[-1])
        self.counts += (flat > 0).sum(0).to(device="cpu", dtype=torch.float64)
        self.n_points += flat.shape[0]

    def after_step(self, step: int) -> list[Split]:
        """Split after step ``step`` (0-based) if it ends a counting window; returns the splits."""
        done = step + 1
        if self.every is None or done % self.every or done > self.last_step:
            return []
        counts = distributed.sum_over_ranks(self.counts)
        n_points = int(distributed.sum_over_ranks(torch.tensor([float(self.n_points)])).item())
        pairs, median = choose_splits(counts, n_points, self.ratio)
        logger.debug("step %d: component activity rates %s", done, (counts / max(n_points, 1)).tolist())
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + done)
        splits = []
        for source, target in pairs:
            split_component(self.decomposition, self.optimizer, source, target, generator)
            splits.append(Split(done, source, target, float(counts[source]) / max(n_points, 1), median))
        self.history.extend(splits)
        self.counts.zero_()
        self.n_points = 0
        return splits

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def state_dict(self) -> dict:
        return {
            "counts": self.counts.clone(),
            "n_points": self.n_points,
            "history": [vars(s) for s in self.history],
        }

    def load_state_dict(self, state: dict) -> None:
        self.counts = state["counts"].clone().double()
        self.n_points = int(state["n_points"])
        self.history = [Split(**s) for s in state["history"]]
