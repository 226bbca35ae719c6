"""Adapters: weight descriptions for model families that do not declare their own.

``specs_for_model(model)`` is what :func:`apd_lens.decompose` calls for a model without
``apd_weight_specs()``; ``select_weights(model, patterns)`` picks weights by TransformerLens-style
name pattern (``"blocks.*.mlp.W_in"``, ``"blocks.0.attn.*"``).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from apd_lens.adapters.selection import WeightCatalog
from apd_lens.engine.spec import WeightSpec


def weight_catalog(model: nn.Module) -> WeightCatalog:
    """All weights of a known model family, under TL-style names, and the ones refused (with why)."""
    from apd_lens.adapters.bridge import bridge_catalog, is_transformer_bridge
    from apd_lens.adapters.hooked_transformer import hooked_transformer_catalog, is_hooked_transformer

    if is_hooked_transformer(model):
        return hooked_transformer_catalog(model)
    if is_transformer_bridge(model):
        return bridge_catalog(model)
    raise TypeError(
        f"apd_lens does not know which weights of {type(model).__name__} to decompose. Give them with "
        "decompose(model, data, weights=[WeightSpec(...)]) or define model.apd_weight_specs()."
    )


def is_language_model(model: nn.Module) -> bool:
    """Whether ``model`` is a HookedTransformer or TransformerBridge (tokens in, logits out)."""
    from apd_lens.adapters.bridge import is_transformer_bridge
    from apd_lens.adapters.hooked_transformer import is_hooked_transformer

    return is_hooked_transformer(model) or is_transformer_bridge(model)


def specs_for_model(model: nn.Module) -> list[WeightSpec]:
    """Weight descriptions for a known model family (every weight it can pair exactly); raises for
    models it does not know or cannot describe."""
    return weight_catalog(model).select(None)


def select_weights(model: nn.Module, patterns: str | Iterable[str] | None = None) -> list[WeightSpec]:
    """The model's weights whose TL-style or parameter name matches one of the fnmatch ``patterns``."""
    return weight_catalog(model).select(patterns)


__all__ = ["WeightCatalog", "is_language_model", "select_weights", "specs_for_model", "weight_catalog"]
