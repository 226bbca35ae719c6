"""``apd_lens.load``: load any saved decomposition, whatever its method."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from apd_lens.engine.base import DecompositionBase
from apd_lens.io import read_cfg, saved_method
from apd_lens.methods import get_method


def load(path: str | Path, model: nn.Module, *, check_values: bool = True) -> DecompositionBase:
    """Load the decomposition saved in ``path`` (by ``save`` or a run directory) onto ``model``, with
    the class of its method (read from ``cfg.json``), checking that it fits the model."""
    method = get_method(saved_method(read_cfg(path)))
    return method.decomposition_class.load(path, model, check_values=check_values)
