"""Attention patterns of the induction target next to those of a decomposition with only some parts kept."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from jaxtyping import Float  # noqa: E402
from torch import Tensor  # noqa: E402

from apd_lens.analysis.plotting import save_figure  # noqa: E402


def plot_attention_patterns(
    rows: dict[str, dict[int, Float[Tensor, "head q k"]]], path: str | Path, title: str = ""
) -> Path:
    """One row per model (e.g. ``{"target": ..., "kept only": ...}``), one column per layer and head."""
    names = list(rows)
    columns = [(layer, head) for layer, pattern in rows[names[0]].items() for head in range(pattern.shape[0])]
    fig, axes = plt.subplots(len(names), len(columns), figsize=(2.6 * len(columns), 2.6 * len(names)), squeeze=False)
    for r, name in enumerate(names):
        for c, (layer, head) in enumerate(columns):
            ax = axes[r][c]
            ax.imshow(rows[name][layer][head].detach().cpu().numpy(), vmin=0, vmax=1, cmap="viridis")
            ax.set_title(f"{name}: L{layer}H{head}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    axes[-1][0].set_xlabel("key position")
    axes[-1][0].set_ylabel("query position")
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)
