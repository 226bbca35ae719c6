"""Figures of a residual-MLP decomposition (matplotlib, Agg backend: files only)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from torch import Tensor  # noqa: E402

from apd_lens.analysis.plotting import save_figure  # noqa: E402
from apd_lens.analysis.resid_mlp import ResidMLPReport  # noqa: E402
from apd_lens.methods.apd.decomposition import Decomposition  # noqa: E402


def plot_scrub_histogram(scrubbed: Tensor, antiscrubbed: Tensor, path: str | Path, title: str = "") -> Path:
    """Histogram (log bins) of per-feature MSEs with half the components ablated, sparing
    (scrubbed) or including (anti-scrubbed) the feature's own; dashed lines at the means."""
    s, a = scrubbed.detach().cpu().numpy(), antiscrubbed.detach().cpu().numpy()
    both = np.concatenate([s, a])
    positive = both[both > 0]
    low = positive.min() if positive.size else 1e-8
    bins = np.logspace(np.log10(low), np.log10(max(both.max(), low * 10)), 40)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for values, name, color in ((s, "scrubbed", "tab:blue"), (a, "anti-scrubbed", "tab:red")):
        ax.hist(
            np.clip(values, low, None), bins=bins, alpha=0.6, color=color, label=f"{name} (mean {values.mean():.2e})"
        )
        ax.axvline(values.mean(), color=color, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("MSE vs target output (per feature)")
    ax.set_ylabel("features")
    ax.legend(fontsize=8)
    ax.set_title(title or "half of the components ablated", fontsize=10)
    return save_figure(fig, path)


def plot_neuron_contributions(target: Tensor, component: Tensor, path: str | Path, title: str = "") -> Path:
    """Neuron contributions [L, F, d_mlp] of the target (top row) and of each feature's component
    (bottom row), one column per layer; x: feature, y: contribution of each neuron (colour)."""
    target, component = target.detach().cpu().numpy(), component.detach().cpu().numpy()
    n_layers, n_features, d_mlp = target.shape
    fig, axes = plt.subplots(2, n_layers, figsize=(7 * n_layers, 6), squeeze=False, sharey=True)
    colors = plt.cm.viridis(np.linspace(0, 1, d_mlp))
    feats = np.arange(n_features)
    for L in range(n_layers):
        for row, (values, name) in enumerate(((target, "target"), (component, "feature's APD component"))):
            ax = axes[row, L]
            for n in range(d_mlp):
                ax.scatter(feats, values[L, :, n], s=4, color=colors[n])
            ax.set_title(f"layer {L}: {name}", fontsize=9)
            ax.set_xlabel("input feature")
            ax.set_ylabel("neuron contribution")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_per_feature_mse(report: ResidMLPReport, path: str | Path, title: str = "") -> Path:
    """Per-feature MSE of the top-k pass (vs the target's output), of the target and of the
    monosemantic baseline (vs the labels), log scale."""
    fig, ax = plt.subplots(figsize=(8, 3.5))
    series = (
        (report.mse_topk, "APD top-k vs target", "tab:green"),
        (report.mse_target_vs_labels, "target vs labels", "tab:blue"),
        (report.mse_mono_vs_labels, "monosemantic baseline vs labels", "tab:gray"),
    )
    feats = np.arange(report.n_features)
    for values, name, color in series:
        v = values.detach().cpu().numpy()
        ax.scatter(feats, np.clip(v, 1e-9, None), s=8, color=color, label=f"{name} (mean {v.mean():.2e})")
    ax.set_yscale("log")
    ax.set_xlabel("feature")
    ax.set_ylabel("MSE")
    ax.legend(fontsize=8)
    ax.set_title(title or "per-feature MSE", fontsize=10)
    return save_figure(fig, path)


def plot_resid_mlp_report(
    decomposition: Decomposition, report: ResidMLPReport, out_dir: str | Path, prefix: str = "resid_mlp"
) -> list[Path]:
    """All three figures into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    s = report.summary()
    head = f"{report.n_layers}-layer resid MLP, C={decomposition.n_components}: "
    head += f"{s['dedicated']}/{s['n_features']} dedicated"
    return [
        plot_scrub_histogram(report.mse_scrubbed, report.mse_antiscrubbed, out_dir / f"{prefix}_scrub.png", head),
        plot_neuron_contributions(
            report.target_contributions, report.component_contributions, out_dir / f"{prefix}_neurons.png", head
        ),
        plot_per_feature_mse(report, out_dir / f"{prefix}_mse.png", head),
    ]
