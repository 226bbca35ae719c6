"""Analysis of a residual-MLP decomposition: which component computes which feature, and how well.

Evaluation data has exactly one active feature per sample (value U[-1, 1]). MSEs are the squared
error averaged over the output dims, then over a feature's samples ("per-feature MSE"); the
reported numbers average those over features. Top-k, scrubbed and anti-scrubbed passes are
compared with the TARGET model's output; the target and the monosemantic baseline with the labels
``x + ReLU(x)`` (the task).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor

from apd_lens.methods.apd.attributions import gradient_attributions
from apd_lens.methods.apd.decomposition import Decomposition
from apd_lens.models.resid_mlp import ResidualMLP, resid_mlp_labels


# ----------------------------------------------------------------------------- data
def one_feature_batch(
    n_features: int, n_per_feature: int, generator: torch.Generator
) -> tuple[Float[Tensor, "n n_features"], Int[Tensor, " n"]]:
    """``n_per_feature`` samples per feature with only that feature on, value U[-1, 1]; and each
    sample's feature index."""
    if n_features < 1 or n_per_feature < 1:
        raise ValueError(f"n_features and n_per_feature must be >= 1, got {n_features}, {n_per_feature}")
    feature = torch.arange(n_features).repeat_interleave(n_per_feature)
    x = torch.zeros(feature.numel(), n_features)
    x[torch.arange(feature.numel()), feature] = torch.rand(feature.numel(), generator=generator) * 2 - 1
    return x, feature


def per_feature_mse(
    output: Float[Tensor, "n d"], reference: Float[Tensor, "n d"], feature: Int[Tensor, " n"], n_features: int
) -> Float[Tensor, " n_features"]:
    """Squared error averaged over output dims, then over the samples of each feature."""
    err = (output - reference).square().mean(-1)
    counts = torch.bincount(feature, minlength=n_features).to(err.dtype)
    if (counts == 0).any():
        raise ValueError("every feature needs at least one sample")
    return torch.zeros(n_features, dtype=err.dtype).index_add_(0, feature, err) / counts


def ideal_monosemantic_outputs(x: Float[Tensor, "n n_features"], n_mono: int) -> Float[Tensor, "n n_features"]:
    """``x + ReLU(x)`` on the first ``n_mono`` features and ``x`` on the others: one perfect neuron per
    feature for the first ``n_mono``, without any embedding interference."""
    return x + torch.relu(x) * (torch.arange(x.shape[-1], device=x.device) < n_mono).to(x.dtype)


# ----------------------------------------------------------------------------- attributions
@torch.no_grad()
def exact_attributions(decomposition: Decomposition, x: Tensor, chunk: int = 256) -> Float[Tensor, "n C"]:
    """Exact gradient attributions (one-hot output probes) of every component, in chunks of ``chunk``
    samples, whatever attribution estimate the decomposition was trained with."""
    parts = []
    for start in range(0, x.shape[0], chunk):
        record = decomposition.target_pass(x[start : start + chunk])
        with torch.enable_grad():
            parts.append(gradient_attributions(record, decomposition.plan, decomposition.components).detach())
    return torch.cat(parts)


@dataclass
class FeatureAssignment:
    """Feature -> component map from the attributions on one-hot inputs."""

    attributions: Float[Tensor, "n_features C"]
    component: Int[Tensor, " n_features"]
    """The component with the largest attribution on feature i's one-hot input."""
    counts: Int[Tensor, " C"]
    """How many features each component serves."""
    dead: Int[Tensor, " n_dead"]
    """Components whose attribution on every one-hot input is below ``dead_tol`` times the largest."""

    @property
    def dedicated(self) -> Tensor:
        """Per feature: does its component serve no other feature?"""
        return self.counts[self.component] == 1

    @property
    def n_dedicated(self) -> int:
        return int(self.dedicated.sum())

    @property
    def mixing(self) -> Int[Tensor, " n_mixing"]:
        """Components serving more than one feature (mechanism mixing)."""
        return torch.nonzero(self.counts > 1).flatten()


def assign_features(attributions: Float[Tensor, "n_features C"], dead_tol: float = 1e-2) -> FeatureAssignment:
    """Assign every feature to its max-attribution component (rows: one-hot inputs)."""
    if attributions.ndim != 2:
        raise ValueError(f"attributions must be [n_features, C], got shape {tuple(attributions.shape)}")
    component = attributions.argmax(-1)
    counts = torch.bincount(component, minlength=attributions.shape[1])
    dead = torch.nonzero(attributions.max(0).values < dead_tol * attributions.max()).flatten()
    return FeatureAssignment(attributions, component, counts, dead)


def feature_assignment(decomposition: Decomposition, value: float = 1.0, dead_tol: float = 1e-2) -> FeatureAssignment:
    """Attributions on the one-hot inputs ``value * e_i`` and the resulting assignment."""
    n_features = decomposition.model.n_features
    x = value * torch.eye(n_features).to(decomposition.model.W_E)
    return assign_features(exact_attributions(decomposition, x), dead_tol)


# ----------------------------------------------------------------------------- ablations
def scrub_masks(
    own: Int[Tensor, " n"], n_components: int, generator: torch.Generator
) -> tuple[Float[Tensor, "n C"], Float[Tensor, "n C"]]:
    """Masks ablating ``C // 2`` random components per sample.

    Scrubbed: the ablated half never includes the sample's own component ``own[n]``.
    Anti-scrubbed: it always does (plus ``C // 2 - 1`` random others). All other components are on.
    """
    n_ablate = n_components // 2
    if n_ablate < 1:
        raise ValueError(f"scrubbing needs at least 2 components, got {n_components}")
    scores = torch.rand(own.numel(), n_components, generator=generator)
    rows = torch.arange(own.numel())
    masks = []
    for own_score in (float("inf"), float("-inf")):
        s = scores.clone()
        s[rows, own] = own_score
        ablated = s.argsort(-1)[:, :n_ablate]
        masks.append(torch.ones_like(s).scatter_(-1, ablated, 0.0))
    return masks[0], masks[1]


@torch.no_grad()
def masked_outputs(decomposition: Decomposition, x: Tensor, mask: Tensor | None, chunk: int = 1024) -> Tensor:
    """Output of the component model with per-sample ``mask`` (None: all on), in chunks."""
    parts = []
    for start in range(0, x.shape[0], chunk):
        m = None if mask is None else mask[start : start + chunk]
        parts.append(decomposition(x[start : start + chunk], m))
    return torch.cat(parts)


@torch.no_grad()
def target_outputs(model: ResidualMLP, x: Tensor, chunk: int = 4096) -> Tensor:
    return torch.cat([model(x[s : s + chunk]) for s in range(0, x.shape[0], chunk)])


# ----------------------------------------------------------------------------- neuron contributions
@torch.no_grad()
def neuron_contributions(
    W_E: Float[Tensor, "n_features d_resid"],
    W_in: Float[Tensor, "*C d_resid d_mlp"],
    W_out: Float[Tensor, "*C d_mlp d_resid"],
) -> Float[Tensor, "*C n_features d_mlp"]:
    """Contribution of neuron n to feature i: ``(W_E[i] @ W_in)[n] * (W_out @ W_E[i])[n]``
    (read in through the embedding, written out through ``W_U = W_E^T``); leading dims broadcast."""
    read = W_E @ W_in  # [*C, F, d_mlp]
    write = (W_out @ W_E.T).transpose(-1, -2)  # [*C, F, d_mlp]
    return read * write


@torch.no_grad()
def layer_contributions(decomposition: Decomposition, component: Int[Tensor, " n_features"]) -> tuple[Tensor, Tensor]:
    """Per layer: the target's neuron contributions [L, F, d_mlp] and those of each feature's
    component (``component[i]`` for feature i) [L, F, d_mlp]."""
    model = decomposition.model
    comps = decomposition.component_weights()
    target, own = [], []
    feats = torch.arange(model.n_features)
    for L in range(model.n_layers):
        W_in, W_out = model.mlp_weights(L)
        target.append(neuron_contributions(model.W_E, W_in, W_out))
        per_comp = neuron_contributions(model.W_E, comps[f"blocks.{L}.mlp.W_in"], comps[f"blocks.{L}.mlp.W_out"])
        own.append(per_comp[component, feats])
    return torch.stack(target), torch.stack(own)


def layer_shares(contributions: Float[Tensor, "L n_features d_mlp"]) -> Float[Tensor, "L n_features"]:
    """Per feature, each layer's share of the summed absolute neuron contributions."""
    per_layer = contributions.abs().sum(-1)
    return per_layer / per_layer.sum(0, keepdim=True).clamp_min(1e-12)


# ----------------------------------------------------------------------------- the whole report
@dataclass
class ResidMLPReport:
    """Everything the resid-MLP example reports; per-feature tensors are [n_features]."""

    assignment: FeatureAssignment
    mse_topk: Tensor
    mse_scrubbed: Tensor
    mse_antiscrubbed: Tensor
    mse_target_vs_labels: Tensor
    mse_mono_vs_labels: Tensor
    """The monosemantic baseline model (same embedding as the target, so the same interference)."""
    mse_ideal_mono_vs_labels: Tensor
    """An ideal monosemantic output ``x + ReLU(x)`` on its first features, ``x`` on the others (no
    interference; what the paper's ~8.5e-4 baseline corresponds to)."""
    target_contributions: Tensor
    component_contributions: Tensor
    n_layers: int
    x: Tensor
    """The evaluation inputs (one active feature each) and each one's feature index."""
    feature: Tensor
    masks: dict[str, Tensor]
    """The ``"topk"``, ``"scrubbed"`` and ``"antiscrubbed"`` masks used on ``x``."""
    extra: dict = field(default_factory=dict)

    @property
    def n_features(self) -> int:
        return self.mse_topk.numel()

    def spanning(self, min_share: float = 0.1, of: str = "component") -> int:
        """Features whose component (``of="target"``: the target's neurons) carries at least
        ``min_share`` of the feature's neuron contributions in every layer."""
        if self.n_layers < 2:
            return 0
        contributions = {"component": self.component_contributions, "target": self.target_contributions}[of]
        return int((layer_shares(contributions).min(0).values >= min_share).sum())

    def summary(self) -> dict:
        a = self.assignment
        out = {
            "n_features": self.n_features,
            "dedicated": a.n_dedicated,
            "mixing_components": a.mixing.tolist(),
            "features_in_mixing": int((~a.dedicated).sum()),
            "dead_components": a.dead.numel(),
            "unused_components": int((a.counts == 0).sum()),
            "topk_mse": float(self.mse_topk.mean()),
            "scrubbed_mse": float(self.mse_scrubbed.mean()),
            "antiscrubbed_mse": float(self.mse_antiscrubbed.mean()),
            "target_vs_labels_mse": float(self.mse_target_vs_labels.mean()),
            "mono_vs_labels_mse": float(self.mse_mono_vs_labels.mean()),
            "ideal_mono_vs_labels_mse": float(self.mse_ideal_mono_vs_labels.mean()),
        }
        if self.n_layers > 1:
            shares = layer_shares(self.component_contributions)
            out["spanning_both_layers"] = self.spanning()
            out["target_spanning_both_layers"] = self.spanning(of="target")
            out["component_layer_share_mean"] = shares.mean(1).tolist()
            out["target_layer_share_mean"] = layer_shares(self.target_contributions).mean(1).tolist()
        out.update(self.extra)
        return out

    def describe(self) -> str:
        s = self.summary()
        lines = [
            f"features with a dedicated component: {s['dedicated']}/{s['n_features']}; "
            f"mixing components: {len(s['mixing_components'])} (serving {s['features_in_mixing']} features); "
            f"dead: {s['dead_components']}; unused: {s['unused_components']}",
            f"MSE vs target: top-k {s['topk_mse']:.3g}  scrubbed {s['scrubbed_mse']:.3g}  "
            f"anti-scrubbed {s['antiscrubbed_mse']:.3g}",
            f"MSE vs labels: target {s['target_vs_labels_mse']:.3g}  monosemantic {s['mono_vs_labels_mse']:.3g}  "
            f"ideal monosemantic (no interference) {s['ideal_mono_vs_labels_mse']:.3g}",
        ]
        if self.n_layers > 1:
            lines.append(
                f"components spanning both layers (>=10% each): {s['spanning_both_layers']}/{s['n_features']} "
                f"(target: {s['target_spanning_both_layers']}); "
                f"mean layer shares component {[round(v, 3) for v in s['component_layer_share_mean']]} "
                f"target {[round(v, 3) for v in s['target_layer_share_mean']]}"
            )
        return "\n".join(lines)

    def last_line(self) -> str:
        s = self.summary()
        return (
            f"DEDICATED={s['dedicated']}/{s['n_features']} TOPK_MSE={s['topk_mse']:.3e} "
            f"SCRUBBED={s['scrubbed_mse']:.3e} ANTISCRUBBED={s['antiscrubbed_mse']:.3e} "
            f"MONO={s['mono_vs_labels_mse']:.3e}"
        )


@torch.no_grad()
def analyse_resid_mlp(decomposition: Decomposition, n_per_feature: int = 100, seed: int = 0) -> ResidMLPReport:
    """Assignment, per-feature MSEs (top-k, scrubbed, anti-scrubbed, target, monosemantic baseline)
    and neuron contributions of a residual-MLP decomposition."""
    model = decomposition.model
    if not isinstance(model, ResidualMLP):
        raise TypeError(f"expected a decomposition of a ResidualMLP, got {type(model).__name__}")
    generator = torch.Generator().manual_seed(seed)
    assignment = feature_assignment(decomposition)
    x, feature = one_feature_batch(model.n_features, n_per_feature, generator)
    x, F = x.to(model.W_E), model.n_features
    target_out = target_outputs(model, x)
    labels = resid_mlp_labels(x)
    topk_mask = decomposition.mask_from_attributions(exact_attributions(decomposition, x))
    scrubbed, anti = scrub_masks(assignment.component[feature], decomposition.n_components, generator)
    masks = {"topk": topk_mask, "scrubbed": scrubbed.to(x), "antiscrubbed": anti.to(x)}
    mse = {
        name: per_feature_mse(masked_outputs(decomposition, x, mask), target_out, feature, F)
        for name, mask in masks.items()
    }
    target_c, comp_c = layer_contributions(decomposition, assignment.component)
    n_mono = min(model.n_layers * model.d_mlp, F)
    return ResidMLPReport(
        assignment=assignment,
        mse_topk=mse["topk"],
        mse_scrubbed=mse["scrubbed"],
        mse_antiscrubbed=mse["antiscrubbed"],
        mse_target_vs_labels=per_feature_mse(target_out, labels, feature, F),
        mse_mono_vs_labels=per_feature_mse(target_outputs(model.monosemantic_baseline(), x), labels, feature, F),
        mse_ideal_mono_vs_labels=per_feature_mse(ideal_monosemantic_outputs(x, n_mono), labels, feature, F),
        target_contributions=target_c,
        component_contributions=comp_c,
        n_layers=model.n_layers,
        x=x,
        feature=feature,
        masks=masks,
        extra={"mean_active_components_topk": float(topk_mask.sum(-1).mean())},
    )
