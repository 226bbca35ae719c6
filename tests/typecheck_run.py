"""Run by tests/test_typecheck.py in a fresh interpreter: apd_lens imported through jaxtyping's import
hook with beartype (every hint checked on every call), a few tiny decompositions, then three calls
with a wrong shape. Prints one JSON object: the outputs' errors against independent computations,
whether the hook wrapped apd_lens, and each wrong-shape call's exception type and message."""

from __future__ import annotations

import json
import sys

from jaxtyping import install_import_hook

if "apd_lens" in sys.modules:
    raise RuntimeError("apd_lens was imported before the hook")
install_import_hook("apd_lens", "beartype.beartype")

import torch  # noqa: E402
from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402

import apd_lens  # noqa: E402
from apd_lens.adapters import select_weights  # noqa: E402
from apd_lens.adapters.hooked_transformer import fold_norms  # noqa: E402
from apd_lens.models.tms import TMS, TMSData  # noqa: E402

torch.manual_seed(0)
report: dict = {"hooked": hasattr(apd_lens.Decomposition.forward, "__wrapped__")}


def tms_output(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """TMS by hand: relu(x W W^T + b), W [n_features, n_hidden]."""
    return torch.relu(x @ W @ W.T + b)


target = TMS(5, 2, seed=0)
data = TMSData(5, 64, seed=1)
apd = apd_lens.decompose(target, data, target.apd_default_config().replace(steps=3, progress=False))
spd = apd_lens.decompose(target, data, target.spd_default_config().replace(steps=3, progress=False))
x = data.sample(8)

keep = [0, 2]
apd_by_hand = tms_output(x, apd.component_weights()["W"][keep].sum(0), target.b_final)
report["apd_error"] = float((apd(x, apd.component_mask(x, keep=keep)) - apd_by_hand).abs().max())
ones = {site: torch.ones(8, spd.n_subcomponents(site)) for site in spd.sites}
assert spd.config.use_delta_component  # all subcomponents on plus the delta component: the target's W
report["spd_error"] = float((spd(x, ones) - tms_output(x, target.W, target.b_final)).abs().max())
report["spd_ci_shapes"] = {site: list(ci.shape) for site, ci in spd.causal_importances(x).items()}

cfg = HookedTransformerConfig(
    n_layers=1, d_model=8, d_head=4, n_heads=2, d_mlp=16, d_vocab=20, n_ctx=6, act_fn="gelu", normalization_type="LN"
)
model = HookedTransformer(cfg)
fold_norms(model)
tokens = torch.randint(0, cfg.d_vocab, (8, 6))
config = apd_lens.SPDConfig(n_subcomponents=4, steps=2, batch_size=4, output_loss="kl", progress=False)
dec = apd_lens.decompose(model, tokens, config, weights=select_weights(model, ["blocks.*.mlp.*"]))
report["transformer_error"] = float((dec(tokens[:2]) - model(tokens[:2])).abs().max())
report["transformer_ci_shapes"] = {site: list(ci.shape) for site, ci in dec.causal_importances(tokens[:2]).items()}
config = apd_lens.APDConfig(n_components=4, steps=2, batch_size=4, output_loss="kl", attribution_backend="vmap")
dec = apd_lens.decompose(model, tokens, config, weights=select_weights(model, ["blocks.*.mlp.*"]))  # vmap or raise
report["transformer_apd_mask_shape"] = list(dec.topk_mask(tokens[:2]).shape)

wrong_shape_calls = {
    "mask_of_wrong_C": lambda: apd(x, torch.ones(8, apd.n_components + 1)),
    "data_of_wrong_width": lambda: apd(torch.rand(8, 6)),
    "site_ci_of_another_batch": lambda: spd(
        x, {**spd.causal_importances(x), "W:use1": spd.causal_importances(x[:4])["W:use1"]}
    ),
}
report["wrong_shape"] = {}
for name, call in wrong_shape_calls.items():
    try:
        call()
        report["wrong_shape"][name] = {"type": None, "message": ""}
    except Exception as err:  # noqa: BLE001 -- the test reads which one it was
        report["wrong_shape"][name] = {"type": f"{type(err).__module__}.{type(err).__name__}", "message": str(err)}
print(json.dumps(report))
