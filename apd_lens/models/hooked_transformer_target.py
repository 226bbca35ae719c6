"""Building a small HookedTransformer target from config fields (no downloads)."""

from __future__ import annotations

import warnings


def build_hooked_transformer(what: str, **cfg):
    """A TL 3.x ``HookedTransformer`` on CPU with LNPre and ``d_head = d_model // n_heads`` (``cfg`` gives
    the rest of ``HookedTransformerConfig``); ``what`` names the target in the error under TL 4.x."""
    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    except ImportError as err:  # TL 4.x
        raise ImportError(f"the {what} model is a HookedTransformer: it needs transformer-lens 3.x") from err
    config = HookedTransformerConfig(
        d_head=cfg["d_model"] // cfg["n_heads"], normalization_type="LNPre", device="cpu", **cfg
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HookedTransformer's deprecation notice in TL 3.9
        return HookedTransformer(config)
