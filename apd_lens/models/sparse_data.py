"""Endless batches of sparse features, the data of the toy models."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from jaxtyping import Float
from torch import Tensor


class SparseFeatureData:
    """Each feature on with probability ``p``, its value then uniform in [``low``, ``high``).

    Iterating yields batches of ``batch_size`` forever; the batches come from ``self.generator``
    (so a checkpoint can save and restore the stream exactly).
    """

    def __init__(
        self,
        n_features: int,
        batch_size: int,
        p: float,
        low: float,
        high: float,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ):
        if not 0 < p <= 1:
            raise ValueError(f"feature probability must be in (0, 1], got {p}")
        if n_features < 1 or batch_size < 1:
            raise ValueError(f"n_features and batch_size must be >= 1, got {n_features}, {batch_size}")
        self.n_features, self.batch_size, self.p, self.device = n_features, batch_size, p, device
        self.low, self.high = low, high
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, batch_size: int | None = None) -> Float[Tensor, "batch n_features"]:
        n = batch_size or self.batch_size
        on = torch.rand(n, self.n_features, generator=self.generator) < self.p
        values = torch.rand(n, self.n_features, generator=self.generator) * (self.high - self.low) + self.low
        return (on * values).to(self.device)

    def __iter__(self) -> Iterator[Float[Tensor, "batch n_features"]]:
        while True:
            yield self.sample()
