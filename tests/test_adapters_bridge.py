"""TransformerBridge adapter (TL 3.9 and 4.x): exact pairing of every weight, embeddings included.

Runs under the project venv (TL 3.9) and under TL 4.x via scripts/test_tl4.sh.
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformer_lens.model_bridge")

from transformer_lens.config import TransformerBridgeConfig  # noqa: E402
from transformer_lens.model_bridge import TransformerBridge  # noqa: E402

from apd_lens import APDConfig, SPDConfig, decompose  # noqa: E402
from apd_lens.adapters import select_weights, specs_for_model, weight_catalog  # noqa: E402
from tests.transformer_checks import _matrix_by_hand, check_exact_split, randomize_  # noqa: E402

BASE = dict(
    n_layers=2, d_model=16, d_head=4, n_heads=4, d_mlp=24, d_vocab=19, n_ctx=8, act_fn="gelu", device="cpu", seed=0
)
CONFIGS = {
    "LN": dict(normalization_type="LN"),
    "RMS_gated_GQA_rotary": dict(
        normalization_type="RMS", gated_mlp=True, act_fn="silu", n_key_value_heads=2, positional_embedding_type="rotary"
    ),
    "LNPre_attn_only": dict(normalization_type="LNPre", attn_only=True),
}


def build(seed: int = 0, **overrides) -> TransformerBridge:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_native(TransformerBridgeConfig(**{**BASE, **overrides}), device="cpu")
    randomize_(bridge, seed=seed)
    return bridge.eval()


def tokens(batch: int = 3, pos: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, BASE["d_vocab"], (batch, pos), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_exact_split_matches_logits(name):
    bridge = build(**CONFIGS[name])
    cfg = bridge.cfg
    names = set(weight_catalog(bridge).specs)
    per_layer = 4 + (0 if cfg.attn_only else (3 if cfg.gated_mlp else 2))
    has_pos = cfg.positional_embedding_type == "standard"
    assert len(names) == per_layer * cfg.n_layers + 2 + has_pos
    assert {"embed.W_E", "unembed.W_U", "blocks.1.attn.W_O"} <= names
    assert ("pos_embed.W_pos" in names) == has_pos
    check_exact_split(bridge, specs_for_model(bridge), tokens())


def test_selection_uses_tl_names():
    bridge = build(normalization_type="LN")
    specs = select_weights(bridge, "blocks.*.mlp.W_in")
    assert len(specs) == 2 and all(s.matrix_pattern == "o i -> i o" for s in specs)
    assert all(s.uses[0].enter.endswith("mlp.in.hook_in") for s in specs)
    (emb,) = select_weights(bridge, "embed.W_E")
    assert emb.uses[0].enter == "embed.hook_in" and emb.matrix_pattern is None


def test_decompose_bridge_runs():
    bridge = build(normalization_type="LN", n_layers=1)
    data = torch.randint(0, 19, (8, 5), generator=torch.Generator().manual_seed(0))
    cfg = APDConfig(n_components=3, rank=2, steps=2, batch_size=4, output_loss="kl", progress=False)
    decomp = decompose(bridge, data, cfg, weights=select_weights(bridge, ["embed.W_E", "blocks.0.attn.W_Q"]))
    assert decomp.topk_mask(data[:4]).shape == (4, 5, 3)


def test_spd_through_the_bridge_runs_with_tokens_as_data_points():
    bridge = build(normalization_type="LN", n_layers=1)
    data = torch.randint(0, 19, (8, 5), generator=torch.Generator().manual_seed(0))
    cfg = SPDConfig(n_subcomponents=3, steps=2, batch_size=4, output_loss="kl", progress=False)
    specs = select_weights(bridge, ["embed.W_E", "blocks.0.mlp.W_in"])
    dec = decompose(bridge, data, cfg, weights=specs)
    ci = dec.causal_importances(data[:4])  # keyed by the bridge's own parameter names
    assert {k: tuple(v.shape) for k, v in ci.items()} == {s.name: (4, 5, 3) for s in specs}
    ones = {k: torch.ones_like(v) for k, v in ci.items()}
    with torch.no_grad():  # all subcomponents and the delta on: the target's logits
        torch.testing.assert_close(dec(data[:4], ones), bridge(data[:4]), rtol=1e-4, atol=1e-4)


def _bridge_and_hooked_transformer_with_the_same_weights():
    """A TransformerBridge and a HookedTransformer (LNPre: no norm weights to fold) of one config, the
    bridge's linear and embedding layers set from the HookedTransformer's weights by explicit reshapes."""
    from apd_lens.engine.spec import get_parameter

    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    except ImportError:  # transformer-lens 4.x removed it
        pytest.skip("this transformer-lens has no HookedTransformer")

    overrides = dict(normalization_type="LNPre", act_fn="gelu_new")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ht = HookedTransformer(HookedTransformerConfig(**{**BASE, **overrides})).eval()
    randomize_(ht, seed=3)
    bridge = build(**overrides)
    ht_specs, br_specs = weight_catalog(ht).specs, weight_catalog(bridge).specs
    with torch.no_grad():
        for tl_name, br_spec in br_specs.items():
            w = get_parameter(ht, tl_name)
            # [d_in, d_out] by hand (heads as (h e)); embeddings (not in HT's catalog here) keep their layout
            matrix = _matrix_by_hand(w, ht_specs[tl_name]) if tl_name in ht_specs else w
            get_parameter(bridge, br_spec.name).copy_(matrix.T if br_spec.matrix_pattern == "o i -> i o" else matrix)
            ht_bias = ht_specs[tl_name].uses[0].bias if tl_name in ht_specs else None
            br_bias = br_spec.uses[0].bias
            assert (ht_bias is None) == (br_bias is None), tl_name
            if ht_bias is not None:
                get_parameter(bridge, br_bias).copy_(get_parameter(ht, ht_bias).reshape(-1))
    return bridge, ht


def test_spd_masked_forward_through_the_bridge_equals_hooked_transformer():
    """The same SPD decomposition (V, U and CI functions copied) of the same weights, through the bridge's
    adapter and through HookedTransformer's: equal causal importances and equal masked forwards with random
    masks and delta masks per token."""
    from apd_lens import SPDDecomposition

    bridge, ht = _bridge_and_hooked_transformer_with_the_same_weights()
    x = tokens(batch=3, pos=7)
    torch.testing.assert_close(bridge(x), ht(x), rtol=1e-5, atol=1e-5)  # the weights were paired right

    names = [f"blocks.{layer}.{w}" for layer in range(2) for w in ("attn.W_Q", "attn.W_K", "attn.W_V", "attn.W_O")]
    names += [f"blocks.{layer}.mlp.{w}" for layer in range(2) for w in ("W_in", "W_out")] + ["unembed.W_U"]
    br_specs, ht_specs = weight_catalog(bridge).specs, weight_catalog(ht).specs
    cfg = SPDConfig(n_subcomponents=5, ci_fn="mlp", progress=False)
    dec_ht = SPDDecomposition(ht, [ht_specs[n] for n in names], cfg)
    dec_br = SPDDecomposition(bridge, [br_specs[n] for n in names], cfg.replace(seed=1))
    for n in names:  # the same matrix view ([d_in, d_out], heads as (h e)) on both sides
        dec_br.subcomponents[br_specs[n].name].load_state_dict(dec_ht.subcomponents[n].state_dict())

    gen = torch.Generator().manual_seed(7)
    masks = {n: torch.rand(3, 7, 5, generator=gen) for n in names}
    deltas = {n: torch.rand(3, 7, generator=gen) for n in names}
    with torch.no_grad():
        out_ht = dec_ht.forward_with_masks(x, masks, delta_masks=deltas).output
        as_bridge = {n: br_specs[n].name for n in names}
        out_br = dec_br.forward_with_masks(
            x, {as_bridge[n]: m for n, m in masks.items()}, delta_masks={as_bridge[n]: d for n, d in deltas.items()}
        ).output
        ci_ht, ci_br = dec_ht.causal_importances(x), dec_br.causal_importances(x)
    assert not torch.allclose(out_ht, ht(x), atol=1e-3)  # the masks change the output
    torch.testing.assert_close(out_br, out_ht, rtol=1e-5, atol=1e-5)
    for n in names:
        torch.testing.assert_close(ci_br[br_specs[n].name], ci_ht[n], rtol=1e-5, atol=1e-5)


def test_spd_masked_forward_through_the_bridge_matches_masked_weights_set_by_hand():
    """No HookedTransformer needed (so it runs under transformer-lens 4.x too): the bridge's SPD masked
    forward, with random masks and delta masks per sequence on the embedding, every attention and MLP
    weight and the unembedding, equals a copy of the bridge run sequence by sequence with each weight
    set to its masked weight written out by loops; and the CI are in [0, 1] at every token."""
    import copy

    from apd_lens import SPDDecomposition
    from apd_lens.engine.spec import get_parameter
    from tests.transformer_checks import masked_weight

    bridge = build(normalization_type="LN")
    specs = list(weight_catalog(bridge).specs.values())
    dec = SPDDecomposition(bridge, specs, SPDConfig(n_subcomponents=4, ci_fn="mlp", progress=False))
    with torch.no_grad():  # V U away from W, so that the delta term matters
        for sub in dec.subcomponents.values():
            sub.U.mul_(1.7)
    x = tokens(batch=3, pos=6)
    gen = torch.Generator().manual_seed(11)
    masks = {s.name: torch.rand(3, dec.n_subcomponents(s.name), generator=gen) for s in specs}
    deltas = {s.name: torch.rand(3, generator=gen) for s in specs}
    with torch.no_grad():
        got = dec.forward_with_masks(
            x,
            {n: m[:, None].expand(-1, 6, -1) for n, m in masks.items()},
            delta_masks={n: d[:, None].expand(-1, 6) for n, d in deltas.items()},
        ).output
        reference = copy.deepcopy(bridge)
        want = []
        for b in range(3):
            for s in specs:
                get_parameter(reference, s.name).copy_(masked_weight(dec, s.name, masks[s.name][b], deltas[s.name][b]))
            want.append(reference(x[b : b + 1])[0])
        want = torch.stack(want)
        assert not torch.allclose(want, bridge(x), atol=1e-3)  # the masks change the output
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for name, g in dec.causal_importances(x).items():
            assert g.shape == (3, 6, 4) and bool(((g >= 0) & (g <= 1)).all()), name
