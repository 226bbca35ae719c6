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
from tests.transformer_checks import check_exact_split, randomize_  # noqa: E402

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
