"""Turning what the user passes as ``data`` into an endless, resumable stream of checked batches.

What a checkpoint can resume exactly (the stream's ``state_dict``):

- a Tensor of inputs: shuffled with the stream's generator, epoch after epoch; the state is the
  generator's state at the start of the current epoch and the position inside it;
- an object with ``state_dict()`` / ``load_state_dict()`` (e.g. a stateful data loader): its own state;
- an object with a ``torch.Generator`` attribute ``generator`` that draws each batch from it when
  the batch is requested (e.g. :class:`~apd_lens.models.tms.TMSData`): the generator's state;
- a list or tuple of batches: the position in it.

Anything else (a DataLoader, a one-shot iterator, ...) still trains, but its checkpoints cannot
be resumed: :meth:`BatchStream.load_state_dict` raises :class:`DataNotResumableError`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from apd_lens.adapters.tokens import check_tokens


class DataNotResumableError(RuntimeError):
    """The data stream cannot be put back to where a checkpoint left it."""


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


class BatchStream(Iterator[Tensor]):
    """An endless iterator of batches whose position can be saved and restored."""

    resumable: bool = False
    """Whether :meth:`load_state_dict` can restore the stream exactly."""
    reason: str | None = None
    """Why the stream cannot be resumed (None when it can)."""

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError


class TensorBatches(BatchStream):
    """A Tensor of examples, reshuffled every epoch with ``generator`` and cut into batches.

    Every batch has ``min(batch_size, n)`` examples; an incomplete last batch of an epoch is dropped.
    """

    resumable = True

    def __init__(self, data: Tensor, batch_size: int, generator: torch.Generator, device: str | torch.device):
        if data.ndim < 1 or data.shape[0] == 0:
            raise ValueError(f"data tensor of shape {tuple(data.shape)} holds no examples")
        self.data, self.generator, self.device = data, generator, device
        self.n = data.shape[0]
        self.size = min(batch_size, self.n)
        self.per_epoch = self.n // self.size
        self._epoch_state = generator.get_state()
        self._order: Tensor | None = None
        self._pos = 0

    def __next__(self) -> Tensor:
        if self._order is None or self._pos >= self.per_epoch:
            self._epoch_state = self.generator.get_state()
            self._order = torch.randperm(self.n, generator=self.generator)
            self._pos = 0
        start = self._pos * self.size
        self._pos += 1
        return self.data[self._order[start : start + self.size]].to(self.device)

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "tensor",
            "n": self.n,
            "batch_size": self.size,
            "epoch_generator": self._epoch_state.clone(),
            "in_epoch": self._order is not None,
            "position": self._pos,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _expect_kind(state, "tensor")
        if (state["n"], state["batch_size"]) != (self.n, self.size):
            raise DataNotResumableError(
                f"the checkpoint's data had {state['n']} examples in batches of {state['batch_size']}, "
                f"this data has {self.n} in batches of {self.size}"
            )
        self.generator.set_state(state["epoch_generator"])
        self._epoch_state = state["epoch_generator"].clone()
        self._order = torch.randperm(self.n, generator=self.generator) if state["in_epoch"] else None
        self._pos = state["position"]


class IterableBatches(BatchStream):
    """Batches of an iterable (list of batches, DataLoader, endless generator), re-iterated when it
    runs out; a one-shot iterator that runs out raises."""

    def __init__(self, data: Iterable, device: str | torch.device):
        if not isinstance(data, Iterable):
            raise TypeError(f"data must be a Tensor, an iterable of batches or a DataLoader, got {type(data).__name__}")
        self.data, self.device = data, device
        self.kind, self.reason = _resume_kind(data)
        self.resumable = self.reason is None
        self._it: Iterator | None = None
        self._produced = False
        self._consumed = 0

    def __next__(self) -> Tensor:
        while True:
            if self._it is None:
                self._it, self._produced = iter(self.data), False
            try:
                batch = next(self._it)
            except StopIteration:
                if not self._produced:
                    raise ValueError("data yielded no batches") from None
                if self._it is self.data:
                    raise RuntimeError(
                        "the data iterator ran out before the requested number of steps; pass a "
                        "re-iterable (list, DataLoader) or an endless generator, or fewer steps"
                    ) from None
                self._it = None
                continue
            self._produced = True
            self._consumed += 1
            return _first_tensor(batch).to(self.device)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"kind": self.kind, "consumed": self._consumed}
        if self.kind == "state_dict":
            state["data"] = self.data.state_dict()
        elif self.kind == "generator":
            state["generator"] = self.data.generator.get_state()
        elif self.kind == "unresumable":
            state["reason"] = self.reason
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") == "unresumable" or self.reason is not None:
            why = self.reason or state.get("reason")
            raise DataNotResumableError(f"cannot resume the data stream exactly: {why}")
        _expect_kind(state, self.kind)
        self._it, self._consumed = None, state["consumed"]
        if self.kind == "state_dict":
            self.data.load_state_dict(state["data"])
        elif self.kind == "generator":
            self.data.generator.set_state(state["generator"])
        else:  # a list or tuple: replay up to the saved position
            self._it = iter(self.data[state["consumed"] % len(self.data) :])
            self._produced = True


def _resume_kind(data: Iterable) -> tuple[str, str | None]:
    """How ``data`` can be resumed, or why it cannot."""
    if callable(getattr(data, "state_dict", None)) and callable(getattr(data, "load_state_dict", None)):
        return "state_dict", None
    if isinstance(data, torch.utils.data.DataLoader):
        return "unresumable", (
            f"a {type(data).__name__} has no state_dict(); pass a Tensor, a list of batches, a stateful "
            "loader (state_dict / load_state_dict) or a generator object with a torch.Generator `generator`"
        )
    if isinstance(getattr(data, "generator", None), torch.Generator):
        return "generator", None
    if isinstance(data, (list, tuple)):
        return "replay", None
    return "unresumable", (
        f"{type(data).__name__} data has no state to save; pass a Tensor, a list of batches, an object with "
        "state_dict() / load_state_dict(), or an object drawing its batches from a torch.Generator `generator`"
    )


def _expect_kind(state: dict[str, Any], kind: str) -> None:
    if state.get("kind") != kind:
        raise DataNotResumableError(
            f"the checkpoint's data stream was of kind {state.get('kind')!r}, this data is of kind {kind!r}"
        )


def check_data_tensor(model: nn.Module, data: Tensor) -> None:
    """Check a whole Tensor of inputs once, before the first step: token ids of a transformer
    (dtype, range, length; :func:`~apd_lens.adapters.tokens.check_tokens`) and finite values."""
    if data.ndim < 1 or data.shape[0] == 0:
        return  # TensorBatches refuses it
    check_tokens(model, data)
    if torch.is_floating_point(data) and not torch.isfinite(data).all():
        example = (~torch.isfinite(data)).reshape(data.shape[0], -1).any(dim=1).nonzero()[0].item()
        raise ValueError(f"the data contains NaN or Inf values (first in example {example})")


def iterate_batches(
    data: Tensor | Iterable, batch_size: int, generator: torch.Generator, device: str | torch.device
) -> BatchStream:
    """Yield batches forever.

    A Tensor is shuffled (with ``generator``) and cut into batches of ``batch_size``, epoch after
    epoch. Any other iterable (a list of batches, a DataLoader, an endless generator) is taken as
    it comes and re-iterated when it runs out; a one-shot iterator that runs out raises.
    """
    if isinstance(data, Tensor):
        return TensorBatches(data, batch_size, generator, device)
    return IterableBatches(data, device)
