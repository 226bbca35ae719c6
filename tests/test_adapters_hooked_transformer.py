"""HookedTransformer adapter: exact pairing of every weight on many configs, refusals, selection."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformer_lens.HookedTransformer")

from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402

from apd_lens import APDConfig, SPDConfig, decompose  # noqa: E402
from apd_lens.adapters import select_weights, specs_for_model, weight_catalog  # noqa: E402
from apd_lens.adapters.hooked_transformer import fold_norms  # noqa: E402
from tests.transformer_checks import check_exact_split, randomize_  # noqa: E402

BASE = dict(
    n_layers=2, d_model=16, d_head=4, n_heads=4, d_mlp=24, d_vocab=19, n_ctx=8, act_fn="gelu", device="cpu", seed=0
)
CONFIGS = {
    "LN": dict(normalization_type="LN"),
    "LNPre": dict(normalization_type="LNPre"),
    "RMS": dict(normalization_type="RMS"),
    "RMSPre": dict(normalization_type="RMSPre"),
    "no_norm_parallel": dict(normalization_type=None, parallel_attn_mlp=True),
    "gated_mlp": dict(normalization_type="RMS", gated_mlp=True, act_fn="silu"),
    "GQA": dict(normalization_type="RMS", n_key_value_heads=2),
    "rotary": dict(normalization_type="LN", positional_embedding_type="rotary", rotary_dim=4),
    "attn_only": dict(normalization_type="LNPre", attn_only=True),
    "hook_tokens_tied_shapes": dict(normalization_type="LN", use_hook_tokens=True, d_vocab_out=19),
}


def build(seed: int = 0, **overrides) -> HookedTransformer:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(HookedTransformerConfig(**{**BASE, **overrides}))
    randomize_(model, seed=seed)
    return model.eval()


def tokens(batch: int = 3, pos: int = 7, vocab: int = 19, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, pos), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_exact_split_matches_logits(name):
    model = build(**CONFIGS[name])
    x = tokens()
    if model.cfg.normalization_type in ("LN", "RMS"):
        with torch.no_grad():
            before = model(x)
        fold_norms(model)
        with torch.no_grad():
            assert (model(x) - before).abs().max() < 1e-5, "folding the norms changed the logits"
    specs = specs_for_model(model)
    names = set(weight_catalog(model).specs)
    n_attn = 4 * model.cfg.n_layers
    n_mlp = 0 if model.cfg.attn_only else (3 if model.cfg.gated_mlp else 2) * model.cfg.n_layers
    assert len(specs) == n_attn + n_mlp + 1 + ("embed.W_E" in names)
    assert ("embed.W_E" in names) == bool(model.cfg.use_hook_tokens)
    check_exact_split(model, specs, x)


def test_gqa_uses_the_stored_kv_heads():
    model = build(normalization_type="LNPre", n_key_value_heads=2)
    (spec,) = select_weights(model, "blocks.1.attn.W_K")
    assert spec.name == "blocks.1.attn._W_K" and spec.uses[0].bias == "blocks.1.attn._b_K"


def test_selection_by_name_pattern():
    model = build(normalization_type="LNPre")
    assert [s.name for s in select_weights(model, "blocks.*.mlp.W_in")] == ["blocks.0.mlp.W_in", "blocks.1.mlp.W_in"]
    assert [s.name.split(".")[-1] for s in select_weights(model, ["blocks.0.attn.*"])] == ["W_Q", "W_K", "W_V", "W_O"]
    with pytest.raises(KeyError, match="matches none"):
        select_weights(model, "blocks.7.*")


@pytest.mark.parametrize(
    "overrides, flag",
    [
        (dict(normalization_type="LN"), "normalization_type='LN'"),
        (dict(normalization_type="RMS"), "normalization_type='RMS'"),
        (
            dict(normalization_type="RMSPre", use_normalization_before_and_after=True),
            "use_normalization_before_and_after",
        ),
        (dict(normalization_type="LNPre", use_split_qkv_input=True), "use_split_qkv_input"),
        (dict(normalization_type="LNPre", positional_embedding_type="shortformer"), "shortformer"),
        (
            dict(normalization_type="LNPre", n_key_value_heads=2, ungroup_grouped_query_attention=True),
            "ungroup_grouped_query_attention",
        ),
    ],
)
def test_unpairable_configs_are_refused(overrides, flag):
    model = build(**overrides)
    with pytest.raises(ValueError, match=flag):
        specs_for_model(model)


def test_embeddings_without_hooks_are_refused_by_name():
    model = build(normalization_type="LNPre")
    with pytest.raises(ValueError, match="use_hook_tokens"):
        select_weights(model, "embed.W_E")
    with pytest.raises(ValueError, match="W_pos"):
        select_weights(model, "pos_embed.*")


def test_decompose_runs_on_tokens_with_kl():
    model = build(normalization_type="LNPre", n_layers=1)
    data = torch.randint(0, 19, (16, 6), generator=torch.Generator().manual_seed(0))
    cfg = APDConfig(
        n_components=4, rank=2, topk=1.0, steps=3, batch_size=4, output_loss="kl", attribution_probes=4, progress=False
    )
    decomp = decompose(model, data, cfg, weights=select_weights(model, "blocks.0.mlp.*"))
    assert [s.name for s in decomp.specs] == ["blocks.0.mlp.W_in", "blocks.0.mlp.W_out"]
    mask = decomp.topk_mask(data[:4])
    assert mask.shape == (4, 6, 4)  # one mask row per token
    assert mask.sum().item() == int(1.0 * 4 * 6)  # batch top-k over all tokens of the batch
    assert torch.isfinite(torch.tensor([r["total"] for r in decomp.loss_history])).all()


def test_spd_learns_on_tokens_with_kl():
    """SPD on every weight of a 1-layer model, tokens as data points: the stochastic-masked KL falls."""
    model = build(normalization_type="LNPre", n_layers=1)
    data = torch.randint(0, 19, (64, 6), generator=torch.Generator().manual_seed(0))
    cfg = SPDConfig(n_subcomponents=6, steps=60, batch_size=16, lr=1e-2, output_loss="kl", log_every=59, progress=False)
    dec = decompose(model, data, cfg)
    assert len(dec.specs) == 4 + 2 + 1 and dec.causal_importances(data[:2])["blocks.0.mlp.W_in"].shape == (2, 6, 6)
    first, last = dec.loss_history[0], dec.loss_history[-1]
    assert last["stochastic_recon"] < 0.5 * first["stochastic_recon"], (first, last)
