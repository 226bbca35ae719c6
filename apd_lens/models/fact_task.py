"""The fact-lookup task: which sequences a fact-lookup transformer reads and which tokens it must predict.

Its own module so that the target (:mod:`apd_lens.models.fact_lookup`) and the neuron analysis
(:mod:`apd_lens.models.fact_neurons`) both read it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor


@dataclass(frozen=True)
class FactLookupTask:
    """Tokens ``0..n_facts-1`` are keys, ``n_facts..2*n_facts-1`` values, ``2*n_facts`` is SEP."""

    n_facts: int = 24
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_facts < 2:
            raise ValueError(f"n_facts must be >= 2, got {self.n_facts}")

    @property
    def sep(self) -> int:
        return 2 * self.n_facts

    @property
    def d_vocab(self) -> int:
        return 2 * self.n_facts + 1

    def values(self) -> Int[Tensor, " n_facts"]:
        """The value token of every key."""
        perm = torch.randperm(self.n_facts, generator=torch.Generator().manual_seed(self.seed))
        return self.n_facts + perm

    def sequences(self, keys: Int[Tensor, " n"] | None = None) -> Int[Tensor, "n 2"]:
        """``[key, SEP]`` for the given keys (all facts by default)."""
        keys = torch.arange(self.n_facts) if keys is None else keys
        return torch.stack([keys, torch.full_like(keys, self.sep)], dim=1)

    def targets(self, keys: Int[Tensor, " n"] | None = None) -> Int[Tensor, "n 2"]:
        """Next-token labels: SEP after the key, the value after SEP."""
        keys = torch.arange(self.n_facts) if keys is None else keys
        return torch.stack([torch.full_like(keys, self.sep), self.values()[keys]], dim=1)

    def sample_keys(self, n: int, generator: torch.Generator) -> Int[Tensor, " n"]:
        return torch.randint(0, self.n_facts, (n,), generator=generator)
