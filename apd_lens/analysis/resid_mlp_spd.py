"""Analysis of an SPD decomposition of a residual MLP: which subcomponents compute which feature.

Probes are one-hot inputs ``x_i = ±0.75`` (the SPD paper's). Per feature and layer, the W_in
subcomponent with the largest causal importance (CI) on ``+0.75 e_i``; a feature has its own
subcomponent when its top W_in subcomponent over all layers has CI >= 0.5 on ``+0.75 e_i`` and < 0.1
on every other feature's probes (both signs). W_out subcomponents that are on (CI >= 0.5) for every
feature form the one high-rank component the paper finds. Neuron contributions follow the paper:
target ``(W_U[i] W_out) ⊙ (W_in W_E[:, i])``, and the same with W_in replaced by the sum of the
feature's W_in subcomponents in that layer (those with CI >= 0.5 on its probe).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from apd_lens.analysis.ownership import Ownership, own_subcomponents
from apd_lens.analysis.resid_mlp import neuron_contributions, one_feature_batch, per_feature_mse
from apd_lens.methods.spd.decomposition import CI_L0_THRESHOLD, SPDDecomposition
from apd_lens.models.resid_mlp import ResidMLPData, ResidualMLP

PROBE_VALUE = 0.75
ON, OFF = 0.5, 0.1


def probe_inputs(n_features: int, value: float = PROBE_VALUE) -> Float[Tensor, "2*{n_features} {n_features}"]:
    """``+value e_i`` for every feature, then ``-value e_i``."""
    eye = torch.eye(n_features)
    return torch.cat([value * eye, -value * eye])


def _layer_sites(decomposition: SPDDecomposition, matrix: str) -> list[str]:
    """The sites of ``blocks.L.mlp.<matrix>`` in layer order (every layer must be decomposed)."""
    model = decomposition.model
    sites = [f"blocks.{L}.mlp.{matrix}" for L in range(model.n_layers)]
    missing = [s for s in sites if s not in decomposition.sites]
    if missing:
        raise ValueError(f"the residual-MLP analysis needs every layer's W_in and W_out decomposed; missing {missing}")
    return sites


def slope_through_origin(x: Tensor, y: Tensor) -> float:
    """Least-squares slope of ``y ≈ s x``."""
    return float((x * y).sum() / (x * x).sum().clamp_min(1e-30))


@torch.no_grad()
def feature_contributions(
    model: ResidualMLP, W_in_parts: Float[Tensor, "L C d_resid d_mlp"], active: Bool[Tensor, "L n_features C"]
) -> tuple[Float[Tensor, "L n_features d_mlp"], Float[Tensor, "L n_features d_mlp"]]:
    """Per layer, the target's neuron contributions to each feature and those with W_in replaced by
    the sum of the feature's active W_in subcomponents (``active[L, i]``)."""
    target, sub = [], []
    for L in range(model.n_layers):
        W_in, W_out = (w.detach() for w in model.mlp_weights(L))
        target.append(neuron_contributions(model.W_E, W_in, W_out))
        per_feature_W_in = torch.einsum("fc,cdn->fdn", active[L].to(W_in), W_in_parts[L])  # [F, d_resid, d_mlp]
        read = torch.einsum("fd,fdn->fn", model.W_E, per_feature_W_in)
        write = model.W_E @ W_out.T
        sub.append(read * write)
    return torch.stack(target), torch.stack(sub)


@dataclass
class SPDResidMLPReport:
    """What :func:`analyse_spd_resid_mlp` finds; per-feature tensors are [n_features]."""

    n_features: int
    n_layers: int
    ci_probes: dict[str, Tensor]
    """Site -> CI on the probes [2 n_features, C]: rows ``+0.75 e_i`` then ``-0.75 e_i``."""
    ownership: Ownership
    """Over all layers' W_in subcomponents together (index ``L * C + c``)."""
    top_per_layer: Int[Tensor, "L n_features"]
    """Per layer, the W_in subcomponent with the largest CI on ``+0.75 e_i`` ..."""
    top_ci_per_layer: Float[Tensor, "L n_features"]
    top_per_layer_negative: Int[Tensor, "L n_features"]
    """... and on ``-0.75 e_i``."""
    top_ci_per_layer_negative: Float[Tensor, "L n_features"]
    alive: dict[str, int]
    """Site -> subcomponents with CI > 0.1 on some probe or evaluation data point."""
    wout_coactive: list[tuple[int, int]]
    """(layer, c) of the W_out subcomponents with CI >= 0.5 on every feature's ``+0.75 e_i``."""
    wout_coactive_rank: list[int]
    """Per layer, the rank of the sum of its co-active W_out subcomponents (singular values above
    1e-3 of the largest)."""
    wout_on_per_feature: float
    """Mean over features of the number of W_out subcomponents (all layers) with CI >= 0.5 on the
    feature's ``+0.75 e_i``: about the number of neurons that matter per feature when W_out is split by
    neuron, the number of neurons when one all-on component holds it."""
    wout_feature_share: Float[Tensor, " n_alive"]
    """Per W_out subcomponent alive on the probes (all layers), the fraction of features with CI >= 0.5
    on their ``+0.75 e_i`` (1 for every member of an all-on component)."""
    wout_alive_rank: list[int]
    """Per layer, the rank of the sum of its W_out subcomponents with CI > 0.1 on some probe."""
    wout_neuron_aligned: list[int]
    """Per layer, how many of those read one neuron: ``|V[n, c]| >= 0.9 ||V[:, c]||`` for some neuron n."""
    wout_aligned_neurons: list[int]
    """Per layer, how many distinct neurons the aligned ones read."""
    target_contributions: Tensor
    subcomponent_contributions: Tensor
    contribution_slope: float
    contribution_slope_per_layer: list[float]
    masked_mse: float
    """Stochastic masks (mean of ``n_mask_samples``), one active feature per sample, per-feature MSE
    against the target averaged over features (as APD's top-k MSE)."""
    ci_masked_mse: float
    all_subcomponents_mse: float
    ci_l0: dict[str, float]
    """Site -> mean number of subcomponents with CI > 0.1 per data point of the training distribution."""
    extra: dict = field(default_factory=dict)

    @property
    def n_own(self) -> int:
        return self.ownership.n_own

    def features_in_layers(self) -> Bool[Tensor, "L n_features"]:
        """Per layer, the features with a W_in subcomponent of CI >= 0.5 on their probe there."""
        return self.top_ci_per_layer >= ON

    def spread(self, min_share: float = 0.1) -> tuple[int, int]:
        """(features the target spreads over every layer (>= ``min_share`` of the summed absolute neuron
        contributions in each), of those the ones with an active W_in subcomponent in every layer)."""
        if self.n_layers < 2:
            return 0, 0
        per_layer = self.target_contributions.abs().sum(-1)
        spread = (per_layer / per_layer.sum(0, keepdim=True).clamp_min(1e-12) >= min_share).all(0)
        found = spread & self.features_in_layers().all(0)
        return int(spread.sum()), int(found.sum())

    def summary(self) -> dict:
        spread, found = self.spread()
        out = {
            "n_features": self.n_features,
            "features_own": self.n_own,
            "features_not_own": [i for i, own in enumerate(self.ownership.own.tolist()) if not own],
            "wout_coactive": len(self.wout_coactive),
            "wout_coactive_rank": self.wout_coactive_rank,
            "wout_on_per_feature": self.wout_on_per_feature,
            "wout_feature_share_median_min_max": _median_min_max(self.wout_feature_share),
            "wout_alive_rank": self.wout_alive_rank,
            "wout_neuron_aligned": self.wout_neuron_aligned,
            "wout_aligned_neurons": self.wout_aligned_neurons,
            "alive": self.alive,
            "contribution_slope": self.contribution_slope,
            "contribution_slope_per_layer": self.contribution_slope_per_layer,
            "masked_mse": self.masked_mse,
            "ci_masked_mse": self.ci_masked_mse,
            "all_subcomponents_mse": self.all_subcomponents_mse,
            "ci_l0": self.ci_l0,
            "features_per_layer": self.features_in_layers().sum(1).tolist(),
        }
        if self.n_layers > 1:
            out["target_spread_over_all_layers"] = spread
            out["spread_found_in_all_layers"] = found
        out.update(self.extra)
        return out

    def describe(self) -> str:
        s = self.summary()
        lines = [
            f"features with their own W_in subcomponent: {s['features_own']}/{s['n_features']}"
            + _not_own(s["features_not_own"]),
            f"features with an active W_in subcomponent per layer: {s['features_per_layer']}",
            f"W_out subcomponents on for every feature: {s['wout_coactive']} (rank of their sum per layer: "
            f"{s['wout_coactive_rank']}); W_out subcomponents on for some feature: rank of their sum per layer "
            f"{s['wout_alive_rank']}, {s['wout_neuron_aligned']} of them read one neuron each "
            f"({s['wout_aligned_neurons']} distinct neurons); on per feature: {s['wout_on_per_feature']:.1f}; share of "
            f"features each live one is on for (median, min, max): "
            f"{[round(v, 2) for v in s['wout_feature_share_median_min_max']]}",
            f"alive subcomponents: {s['alive']}",
            f"CI L0 per site: { {k: round(v, 2) for k, v in s['ci_l0'].items()} }",
            f"neuron contributions, subcomponent vs target: slope {s['contribution_slope']:.3f} "
            f"(per layer {[round(v, 3) for v in s['contribution_slope_per_layer']]})",
            f"MSE vs target (one feature per sample): stochastic masks {s['masked_mse']:.3g}, CI masks "
            f"{s['ci_masked_mse']:.3g}, all subcomponents {s['all_subcomponents_mse']:.3g}",
        ]
        if self.n_layers > 1:
            lines.append(
                f"features the target spreads over every layer: {s['target_spread_over_all_layers']}; "
                f"with an active W_in subcomponent in every layer: {s['spread_found_in_all_layers']}"
            )
        return "\n".join(lines)

    def last_line(self) -> str:
        return (
            f"FEATURES_OWN={self.n_own}/{self.n_features} WOUT_COACTIVE={len(self.wout_coactive)} "
            f"MASKED_MSE={self.masked_mse:.3e} CONTRIB_SLOPE={self.contribution_slope:.3f}"
        )


def _rank_of_sum(parts: Float[Tensor, "C d_in d_out"], chosen: Bool[Tensor, " C"], rtol: float = 1e-3) -> int:
    """Rank of the sum of the chosen subcomponents (singular values above ``rtol`` of the largest)."""
    if not chosen.any():
        return 0
    s = torch.linalg.svdvals(parts[chosen].sum(0))
    return int((s > rtol * s.max()).sum())


def _median_min_max(values: Tensor) -> list[float]:
    if values.numel() == 0:
        return [0.0, 0.0, 0.0]
    return [float(values.median()), float(values.min()), float(values.max())]


def _not_own(features: list[int], shown: int = 10) -> str:
    if not features:
        return ""
    more = f" and {len(features) - shown} more" if len(features) > shown else ""
    return f" (not: {features[:shown]}{more})"


@torch.no_grad()
def _one_feature_mses(
    decomposition: SPDDecomposition, n_per_feature: int, n_mask_samples: int, generator: torch.Generator
) -> tuple[float, float, float]:
    model = decomposition.model
    F = model.n_features
    x, feature = one_feature_batch(F, n_per_feature, generator)
    x = x.to(model.W_E)
    target = model(x)

    def mse(out: Tensor) -> float:
        return float(per_feature_mse(out, target, feature, F).mean())

    ci = decomposition.causal_importances(x)  # once, for the CI masks and every stochastic draw
    draws = [mse(decomposition(x, decomposition.sample_masks(ci, generator))) for _ in range(n_mask_samples)]
    return sum(draws) / n_mask_samples, mse(decomposition(x, ci)), mse(decomposition(x))


@torch.no_grad()
def analyse_spd_resid_mlp(
    decomposition: SPDDecomposition,
    n_per_feature: int = 100,
    n_mask_samples: int = 16,
    eval_batch: int = 2048,
    seed: int = 0,
) -> SPDResidMLPReport:
    """Everything :class:`SPDResidMLPReport` holds, for an SPD decomposition of a :class:`ResidualMLP`
    with every layer's W_in and W_out decomposed. ``seed``: the masks' and evaluation data's draws."""
    model = getattr(decomposition, "model", None)
    if not isinstance(decomposition, SPDDecomposition) or not isinstance(model, ResidualMLP):
        raise TypeError(
            "analyse_spd_resid_mlp needs an SPD decomposition of a ResidualMLP, got "
            f"{type(decomposition).__name__} of {type(model).__name__}"
        )
    F, n_layers = model.n_features, model.n_layers
    in_sites, out_sites = _layer_sites(decomposition, "W_in"), _layer_sites(decomposition, "W_out")
    x = probe_inputs(F).to(model.W_E)
    ci = decomposition.causal_importances(x)
    data = ResidMLPData(F, eval_batch, seed=seed, device=model.W_E.device).sample()
    ci_data = decomposition.causal_importances(data)

    ci_in = torch.stack([ci[s] for s in in_sites])  # [L, 2F, C]
    n_C = ci_in.shape[-1]
    features = torch.arange(F, device=x.device)
    ownership = own_subcomponents(
        torch.cat(list(ci_in), dim=-1), torch.cat([features, features]), features, on=ON, off=OFF
    )
    top_ci, top = ci_in[:, :F].max(-1)
    top_ci_neg, top_neg = ci_in[:, F:].max(-1)

    ci_out = torch.cat([ci[s][:F] for s in out_sites], dim=-1)  # [F, L*C]
    on_out = ci_out >= ON  # [F, L*C]
    coactive = torch.nonzero(on_out.all(0)).flatten().tolist()
    wout_coactive = [(c // n_C, c % n_C) for c in coactive]
    parts = decomposition.subcomponent_weights()
    alive_out = [(ci[s][:F] > OFF).any(0) for s in out_sites]
    coactive_mask = [torch.zeros_like(a) for a in alive_out]
    for layer, c in wout_coactive:
        coactive_mask[layer][c] = True
    aligned, neurons = [], []
    for L, site in enumerate(out_sites):
        V = decomposition.subcomponents[site].V.detach()  # [d_mlp, C]
        one_neuron = (V.abs().max(0).values >= 0.9 * V.norm(dim=0)) & alive_out[L]
        aligned.append(int(one_neuron.sum()))
        neurons.append(len(set(V.abs().argmax(0)[one_neuron].tolist())))
    W_in_parts = torch.stack([parts[s] for s in in_sites])  # [L, C, d_resid, d_mlp]
    target_c, sub_c = feature_contributions(model, W_in_parts, ci_in[:, :F] >= ON)
    generator = torch.Generator().manual_seed(seed)
    masked, ci_masked, all_sub = _one_feature_mses(decomposition, n_per_feature, n_mask_samples, generator)
    return SPDResidMLPReport(
        n_features=F,
        n_layers=n_layers,
        ci_probes=ci,
        ownership=ownership,
        top_per_layer=top,
        top_ci_per_layer=top_ci,
        top_per_layer_negative=top_neg,
        top_ci_per_layer_negative=top_ci_neg,
        alive={
            s: int(((ci[s] > CI_L0_THRESHOLD).any(0) | (ci_data[s] > CI_L0_THRESHOLD).any(0)).sum())
            for s in decomposition.sites
        },
        wout_coactive=wout_coactive,
        wout_coactive_rank=[_rank_of_sum(parts[s], m) for s, m in zip(out_sites, coactive_mask, strict=True)],
        wout_on_per_feature=float(on_out.sum(-1).float().mean()),
        wout_feature_share=on_out.float().mean(0)[torch.cat(alive_out)],
        wout_alive_rank=[_rank_of_sum(parts[s], m) for s, m in zip(out_sites, alive_out, strict=True)],
        wout_neuron_aligned=aligned,
        wout_aligned_neurons=neurons,
        target_contributions=target_c,
        subcomponent_contributions=sub_c,
        contribution_slope=slope_through_origin(target_c, sub_c),
        contribution_slope_per_layer=[slope_through_origin(t, s) for t, s in zip(target_c, sub_c, strict=True)],
        masked_mse=masked,
        ci_masked_mse=ci_masked,
        all_subcomponents_mse=all_sub,
        ci_l0={s: float((g > CI_L0_THRESHOLD).sum(-1).float().mean()) for s, g in ci_data.items()},
    )
