"""Turning what the user passes as ``data`` into an endless stream of checked batches."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor


def _first_tensor(batch) -> Tensor:
    """A DataLoader over a TensorDataset yields [x] or (x, y): the input is the first tensor."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    if isinstance(batch, dict) and "input_ids" in batch:
        return batch["input_ids"]
    raise TypeError(
        f"a data batch must be a Tensor (or a tuple/list whose first item is one), got {type(batch).__name__}"
    )


def iterate_batches(
    data: Tensor | Iterable, batch_size: int, generator: torch.Generator, device: str | torch.device
) -> Iterator[Tensor]:
    """Yield batches forever.

    A Tensor is shuffled (with ``generator``) and cut into batches of ``batch_size``, epoch after
    epoch. Any other iterable (a list of batches, a DataLoader, an endless generator) is taken as
    it comes and re-iterated when it runs out; a one-shot iterator that runs out raises.
    """
    if isinstance(data, Tensor):
        if data.ndim < 1 or data.shape[0] == 0:
            raise ValueError(f"data tensor of shape {tuple(data.shape)} holds no examples")
        n = data.shape[0]
        while True:
            order = torch.randperm(n, generator=generator)
            for start in range(0, n - min(batch_size, n) + 1, min(batch_size, n)):
                yield data[order[start : start + batch_size]].to(device)
    if not isinstance(data, Iterable):
        raise TypeError(f"data must be a Tensor, an iterable of batches or a DataLoader, got {type(data).__name__}")
    one_shot = iter(data) is data
    while True:
        produced = False
        for batch in data:
            produced = True
            yield _first_tensor(batch).to(device)
        if not produced:
            raise ValueError("data yielded no batches")
        if one_shot:
            raise RuntimeError(
                "the data iterator ran out before the requested number of steps; pass a "
                "re-iterable (list, DataLoader) or an endless generator, or fewer steps"
            )
