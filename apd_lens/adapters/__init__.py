"""Adapters: weight descriptions for models that do not declare their own."""

from __future__ import annotations

from torch import nn

from apd_lens.spec import WeightSpec


def specs_for_model(model: nn.Module) -> list[WeightSpec]:
    """Weight descriptions for a known model family; raises for models it does not know."""
    raise TypeError(
        f"apd_lens does not know which weights of {type(model).__name__} to decompose. Give them with "
        "decompose(model, data, weights=[WeightSpec(...)]) or define model.apd_weight_specs()."
    )
