"""Weights of a TransformerLens TransformerBridge (TL 3.9 and 4.x).

A bridge wraps every linear layer and embedding of the underlying model in a component with its
own ``hook_in`` (the exact input of the layer: token / position ids for embeddings) and
``hook_out`` (its exact output, bias included). Each such layer is one weight; its parameter lives
in the wrapped model as ``nn.Linear`` ``[out, in]`` (viewed as ``[in, out]``) or ``nn.Embedding``
``[n_ids, d_model]`` (ids enter as one-hot rows). A weight shared by the embedding and the
unembedding (tied embeddings) becomes one weight with two uses.
"""

from __future__ import annotations

from torch import nn

from apd_lens.adapters.selection import WeightCatalog
from apd_lens.engine.spec import WeightSpec, WeightUse

_TL_NAMES = {
    "attn.q": "attn.W_Q",
    "attn.k": "attn.W_K",
    "attn.v": "attn.W_V",
    "attn.o": "attn.W_O",
    "mlp.in": "mlp.W_in",
    "mlp.gate": "mlp.W_gate",
    "mlp.out": "mlp.W_out",
    "embed": "embed.W_E",
    "pos_embed": "pos_embed.W_pos",
    "unembed": "unembed.W_U",
}


def is_transformer_bridge(model: nn.Module) -> bool:
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:  # pragma: no cover - TL without bridges
        return False
    return isinstance(model, TransformerBridge)


def _tl_name(prefix: str) -> str:
    """``blocks.0.attn.q`` -> ``blocks.0.attn.W_Q``; unknown layers keep ``<prefix>.weight``."""
    for short, full in _TL_NAMES.items():
        if prefix == short or prefix.endswith("." + short):
            return prefix[: len(prefix) - len(short)] + full
    return prefix + ".weight"


def _wrapped_layer(module: nn.Module) -> nn.Module | None:
    inner = module._modules.get("_original_component")
    return inner if isinstance(inner, (nn.Linear, nn.Embedding)) else None


def _check_config(cfg) -> None:
    scale = getattr(cfg, "scale_embedding", None)
    if scale not in (None, False, 1, 1.0):
        raise ValueError(
            f"cfg.scale_embedding={scale!r}: the embedding output is rescaled, apd_lens cannot pair W_E exactly"
        )


def bridge_catalog(model: nn.Module) -> WeightCatalog:
    """Every linear / embedding weight of a TransformerBridge under its TL name, paired with the
    ``hook_in`` / ``hook_out`` of its bridge component."""
    _check_config(model.cfg)
    # a bias may be a frozen buffer (TL 4.x unembedding)
    param_names = {id(p): n for n, p in model.named_buffers()}
    param_names.update({id(p): n for n, p in model.named_parameters()})
    uses: dict[int, list[tuple[str, WeightUse, bool]]] = {}
    seen: set[int] = set()
    for module in model.modules():
        layer = _wrapped_layer(module)
        if layer is None or id(module) in seen:
            continue
        seen.add(id(module))
        hook_in, hook_out = module._modules.get("hook_in"), module._modules.get("hook_out")
        if hook_in is None or hook_out is None:
            continue
        prefix = hook_in.name.removesuffix(".hook_in")
        bias = getattr(layer, "bias", None)
        if bias is not None and id(bias) not in param_names:
            raise ValueError(f"the bias of {prefix!r} is neither a parameter nor a buffer of the bridge")
        use = WeightUse(
            enter=hook_in.name,
            leave=hook_out.name,
            transposed=False,
            bias=param_names[id(bias)] if bias is not None else None,
        )
        uses.setdefault(id(layer.weight), []).append((prefix, use, isinstance(layer, nn.Embedding)))
    cat = WeightCatalog()
    for weight_id, entries in uses.items():
        # A tied weight is viewed as the embedding's [n_ids, d_model]; linears using it are transposed uses.
        as_embedding = any(is_emb for _, _, is_emb in entries)
        entries = sorted(entries, key=lambda e: not e[2])
        spec_uses = tuple(
            WeightUse(u.enter, u.leave, transposed=as_embedding and not is_emb, bias=u.bias) for _, u, is_emb in entries
        )
        spec = WeightSpec(param_names[weight_id], spec_uses, None if as_embedding else "o i -> i o")
        cat.add(_tl_name(entries[0][0]), spec)
    if not cat.specs:
        raise ValueError(f"found no linear or embedding layer with hook_in/hook_out in {type(model).__name__}")
    return cat
