"""Figures of an SPD residual-MLP analysis (matplotlib, Agg backend: files only)."""

from __future__ import annotations

from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor

from apd_lens.analysis.plotting import plt, save_figure
from apd_lens.analysis.resid_mlp_spd import SPDResidMLPReport


def feature_order(ci: Float[Tensor, "n_features C"]) -> Int[Tensor, " C"]:
    """Columns permuted feature by feature: each feature's top subcomponent (first time it is a top),
    then the others by their largest CI, descending."""
    order: list[int] = []
    for c in ci.argmax(-1).tolist():
        if c not in order:
            order.append(c)
    rest = [c for c in ci.max(0).values.argsort(descending=True).tolist() if c not in order]
    return torch.tensor(order + rest, dtype=torch.long)


def coactivity_order(ci: Float[Tensor, "n_features C"], on: float = 0.5) -> Int[Tensor, " C"]:
    """Columns by the number of features they are on for (CI >= ``on``), descending."""
    return (ci >= on).sum(0).argsort(descending=True, stable=True)


def plot_probe_ci(report: SPDResidMLPReport, path: str | Path, title: str = "") -> Path:
    """Causal importance of every subcomponent (x) on each feature's probe ``x_i = +0.75`` (y), one
    panel per matrix (rows W_in, W_out; columns layers); W_in columns permuted feature by feature,
    W_out columns by how many features they are on for (the SPD paper's figure)."""
    L, F = report.n_layers, report.n_features
    fig, axes = plt.subplots(2, L, figsize=(5.5 * L + 1.5, 8.5), squeeze=False, layout="constrained")
    for layer in range(L):
        for row, matrix in enumerate(("W_in", "W_out")):
            site = f"blocks.{layer}.mlp.{matrix}"
            ci = report.ci_probes[site][:F].detach().cpu()
            order = feature_order(ci) if matrix == "W_in" else coactivity_order(ci)
            ax = axes[row, layer]
            image = ax.imshow(ci[:, order].numpy(), aspect="auto", cmap="Blues", vmin=0, vmax=1, interpolation="none")
            ax.set_title(f"{site}", fontsize=9)
            ax.set_xlabel("subcomponent (permuted)")
            ax.set_ylabel("input feature (x_i = 0.75)")
    fig.colorbar(image, ax=axes, shrink=0.6, label="causal importance")
    default = f"SPD causal importances on one-hot inputs\n{report.n_own}/{F} features own a W_in subcomponent"
    fig.suptitle(title or default, fontsize=10)
    return save_figure(fig, path)


def plot_contribution_scatter(report: SPDResidMLPReport, path: str | Path, title: str = "") -> Path:
    """Neuron contributions to each feature: target (x) vs the feature's W_in subcomponents (y), one
    panel per layer, with the line y = x and the least-squares slope."""
    target = report.target_contributions.detach().cpu()
    sub = report.subcomponent_contributions.detach().cpu()
    L = report.n_layers
    fig, axes = plt.subplots(1, L, figsize=(4.5 * L, 4.2), squeeze=False)
    for layer in range(L):
        ax = axes[0, layer]
        t, s = target[layer].flatten().numpy(), sub[layer].flatten().numpy()
        ax.scatter(t, s, s=3, alpha=0.4)
        lim = max(abs(t).max(), abs(s).max(), 1e-6) * 1.05
        ax.plot([-lim, lim], [-lim, lim], color="gray", lw=0.8, ls="--")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_title(f"layer {layer}: slope {report.contribution_slope_per_layer[layer]:.3f}", fontsize=9)
        ax.set_xlabel("target neuron contribution")
        ax.set_ylabel("subcomponent neuron contribution")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_spd_resid_mlp_report(report: SPDResidMLPReport, out: str | Path, prefix: str = "spd") -> list[Path]:
    """Both figures into ``out``."""
    out = Path(out)
    return [
        plot_probe_ci(report, out / f"{prefix}_ci_one_hot.png"),
        plot_contribution_scatter(report, out / f"{prefix}_neuron_contributions.png"),
    ]
