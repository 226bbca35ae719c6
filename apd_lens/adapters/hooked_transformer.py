"""Weights of a TransformerLens HookedTransformer (TL 3.x) and where each matmul can be read.

Every weight is paired with the hook whose activation is exactly its matmul's input and the hook
whose activation is exactly its output (bias included). Configurations that break this pairing
are refused with an error naming the flag, never decomposed silently wrong.
"""

from __future__ import annotations

from torch import nn

from apd_lens.adapters.selection import WeightCatalog
from apd_lens.engine.spec import WeightSpec, WeightUse

_HEADS_IN = "h d e -> d (h e)"  # W_Q/W_K/W_V [head, d_model, d_head]
_HEADS_OUT = "h e d -> (h e) d"  # W_O [head, d_head, d_model]


def is_hooked_transformer(model: nn.Module) -> bool:
    try:
        from transformer_lens import HookedTransformer
    except ImportError:  # TL 4.x has no HookedTransformer
        return False
    return isinstance(model, HookedTransformer)


def fold_norms(model: nn.Module) -> nn.Module:
    """Fold the LN / RMS scale (and LN shift) into the following weights, in place; logits unchanged.

    After this ``cfg.normalization_type`` is ``"LNPre"`` / ``"RMSPre"``, so each
    ``hook_normalized`` is the exact input of the matmuls that read it.
    """
    model.process_weights_(fold_ln=True, center_writing_weights=False, center_unembed=False)
    return model


def _check_config(cfg) -> None:
    """Raise for settings under which some weight's hooks do not carry its matmul's input/output."""
    problems = []
    if cfg.normalization_type in ("LN", "RMS"):
        problems.append(
            f"cfg.normalization_type={cfg.normalization_type!r}: hook_normalized is taken before the norm's "
            "scale/shift, so it is not the input of the next matmul. Fold the norms first with "
            "apd_lens.adapters.hooked_transformer.fold_norms(model) (= model.process_weights_(fold_ln=True, "
            "center_writing_weights=False, center_unembed=False); logits are unchanged)"
        )
    flags = {
        "use_normalization_before_and_after": "a post-norm (ln*_post) sits between W_O / W_out and hook_attn_out / "
        "hook_mlp_out",
        "use_split_qkv_input": "each head reads its own normalized copy of the residual",
        "use_attn_in": "each head reads its own normalized copy of the residual",
    }
    problems += [f"cfg.{flag}=True: {why}" for flag, why in flags.items() if getattr(cfg, flag, False)]
    try:
        from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES
    except ImportError:  # pragma: no cover - older TL
        POST_NORM_ARCHITECTURES = ()
    if getattr(cfg, "original_architecture", None) in POST_NORM_ARCHITECTURES:
        problems.append(
            f"cfg.original_architecture={cfg.original_architecture!r} is a post-norm architecture: the norm sits "
            "between W_O / W_out and hook_attn_out / hook_mlp_out"
        )
    if cfg.positional_embedding_type == "shortformer":
        problems.append(
            "cfg.positional_embedding_type='shortformer': the positional embedding is added to the query/key "
            "inputs after ln1.hook_normalized"
        )
    if cfg.n_key_value_heads is not None and getattr(cfg, "ungroup_grouped_query_attention", False):
        problems.append(
            "cfg.ungroup_grouped_query_attention=True: hook_k/hook_v come from the head-repeated W_K/W_V, which "
            "is not a matmul with the stored _W_K/_W_V; use the default grouped mode"
        )
    if getattr(cfg, "num_experts", None):
        problems.append(f"cfg.num_experts={cfg.num_experts}: mixture-of-experts MLPs are not supported")
    if getattr(cfg, "gated_mlp", False) and cfg.is_layer_norm_activation():
        problems.append(f"cfg.gated_mlp=True with cfg.act_fn={cfg.act_fn!r}: W_in's output has no hook")
    if problems:
        raise ValueError(
            "apd_lens cannot pair this HookedTransformer's weights with its hooks exactly:\n  - "
            + "\n  - ".join(problems)
        )


def _linear(name: str, enter: str, leave: str, bias: str | None = None, pattern: str | None = None) -> WeightSpec:
    return WeightSpec(name, (WeightUse(enter=enter, leave=leave, bias=bias),), pattern)


def hooked_transformer_catalog(model: nn.Module) -> WeightCatalog:
    """Every matrix weight of a HookedTransformer under its TL name, paired with its hooks.

    Attention weights are viewed head-flattened (``W_Q``: ``d_model x (head d_head)``). GQA's
    ``W_K``/``W_V`` are the stored ``_W_K``/``_W_V`` (n_key_value_heads), which is what hook_k/hook_v
    see. ``embed.W_E`` needs ``cfg.use_hook_tokens=True`` (the token ids enter it as one-hot rows);
    ``pos_embed.W_pos`` is refused (positions reach it through no hook).
    """
    cfg = model.cfg
    _check_config(cfg)
    cat = WeightCatalog()
    has_bias = {n for n, _ in model.named_parameters()}

    def bias(name: str) -> str | None:
        return name if name in has_bias else None

    if getattr(cfg, "post_embedding_ln", False):
        cat.refuse("embed.W_E", "cfg.post_embedding_ln=True: a norm sits between W_E and hook_embed")
    elif "hook_tokens" in model.hook_dict:
        cat.add("embed.W_E", _linear("embed.W_E", "hook_tokens", "hook_embed"))
    else:
        cat.refuse(
            "embed.W_E",
            "token ids reach W_E through no hook; build the model with cfg.use_hook_tokens=True (adds hook_tokens)",
        )
    if cfg.positional_embedding_type in ("standard", "shortformer"):
        cat.refuse(
            "pos_embed.W_pos",
            "positions reach W_pos through no hook in HookedTransformer; a TransformerBridge exposes them "
            "(pos_embed.hook_in)",
        )
    for layer in range(cfg.n_layers):
        p = f"blocks.{layer}"
        grouped = cfg.n_key_value_heads is not None
        for w, hook in (("Q", "q"), ("K", "k"), ("V", "v")):
            stored = f"_W_{w}" if grouped and w != "Q" else f"W_{w}"
            stored_b = f"_b_{w}" if grouped and w != "Q" else f"b_{w}"
            cat.add(
                f"{p}.attn.W_{w}",
                _linear(
                    f"{p}.attn.{stored}",
                    f"{p}.ln1.hook_normalized" if cfg.normalization_type else f"{p}.hook_resid_pre",
                    f"{p}.attn.hook_{hook}",
                    bias(f"{p}.attn.{stored_b}"),
                    _HEADS_IN,
                ),
            )
        cat.add(
            f"{p}.attn.W_O",
            _linear(f"{p}.attn.W_O", f"{p}.attn.hook_z", f"{p}.hook_attn_out", bias(f"{p}.attn.b_O"), _HEADS_OUT),
        )
        if cfg.attn_only:
            continue
        mlp_in = f"{p}.ln2.hook_normalized" if cfg.normalization_type else _mlp_input_hook(cfg, p)
        if cfg.gated_mlp:
            cat.add(f"{p}.mlp.W_gate", _linear(f"{p}.mlp.W_gate", mlp_in, f"{p}.mlp.hook_pre"))
            cat.add(f"{p}.mlp.W_in", _linear(f"{p}.mlp.W_in", mlp_in, f"{p}.mlp.hook_pre_linear"))
        else:
            cat.add(f"{p}.mlp.W_in", _linear(f"{p}.mlp.W_in", mlp_in, f"{p}.mlp.hook_pre", bias(f"{p}.mlp.b_in")))
        cat.add(
            f"{p}.mlp.W_out",
            _linear(f"{p}.mlp.W_out", f"{p}.mlp.hook_post", f"{p}.hook_mlp_out", bias(f"{p}.mlp.b_out")),
        )
    cat.add("unembed.W_U", _linear("unembed.W_U", "unembed.hook_in", "unembed.hook_out", bias("unembed.b_U")))
    return cat


def _mlp_input_hook(cfg, prefix: str) -> str:
    """Without a norm the MLP reads the residual: resid_mid, or resid_pre for parallel attn+MLP."""
    if cfg.use_hook_mlp_in:
        return f"{prefix}.hook_mlp_in"
    return f"{prefix}.hook_resid_pre" if cfg.parallel_attn_mlp else f"{prefix}.hook_resid_mid"
