"""Checking token ids before they reach a transformer that embeds them.

A HookedTransformer or TransformerBridge indexes its embedding with the ids it is given: a negative
id silently reads a row from the end (a wrong result), an id >= ``d_vocab`` or a float tensor fails
deep inside the forward, and a sequence longer than ``n_ctx`` fails in the positional embedding.
:func:`check_tokens` turns each of these into one clear error naming the value and the limit.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def token_limits(model: nn.Module) -> tuple[int, int | None] | None:
    """``(d_vocab, n_ctx)`` of a model that takes token ids (HookedTransformer, TransformerBridge);
    ``n_ctx`` is None where the config has none; None for any other model."""
    from apd_lens.adapters.bridge import is_transformer_bridge
    from apd_lens.adapters.hooked_transformer import is_hooked_transformer

    if not (is_hooked_transformer(model) or is_transformer_bridge(model)):
        return None
    cfg = model.cfg
    d_vocab = getattr(cfg, "d_vocab", None)
    if not isinstance(d_vocab, int) or d_vocab <= 0:
        return None
    n_ctx = getattr(cfg, "n_ctx", None)
    return d_vocab, n_ctx if isinstance(n_ctx, int) and n_ctx > 0 else None


def check_tokens(model: nn.Module, tokens: Tensor) -> None:
    """Raise if ``tokens`` are not valid input ids of ``model``: an integer tensor ``[batch, pos]``
    (or ``[pos]``) with every id in ``[0, d_vocab)`` and ``pos <= n_ctx``. Models that do not take
    token ids pass unchecked."""
    limits = token_limits(model)
    if limits is None:
        return
    d_vocab, n_ctx = limits
    name = type(model).__name__
    if tokens.dtype == torch.bool or torch.is_floating_point(tokens) or torch.is_complex(tokens):
        raise TypeError(
            f"a {name} takes integer token ids in [0, d_vocab={d_vocab}), got a tensor of dtype {tokens.dtype}"
        )
    if tokens.ndim not in (1, 2):
        raise ValueError(f"a {name} takes token ids of shape [batch, pos], got shape {tuple(tokens.shape)}")
    if n_ctx is not None and tokens.shape[-1] > n_ctx:
        raise ValueError(
            f"sequences of {tokens.shape[-1]} tokens are longer than the {name}'s context n_ctx={n_ctx} "
            f"(token ids of shape {tuple(tokens.shape)}, positions last)"
        )
    if tokens.numel() == 0:
        return
    lowest, highest = (v.item() for v in torch.aminmax(tokens))
    if lowest < 0:
        raise ValueError(
            f"token id {lowest} is negative: ids must lie in [0, d_vocab={d_vocab}) "
            "(a negative id would silently read an embedding row from the end)"
        )
    if highest >= d_vocab:
        raise ValueError(f"token id {highest} is out of range: ids must lie in [0, d_vocab={d_vocab})")
