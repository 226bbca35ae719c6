"""Figures (matplotlib, Agg backend: files only, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402


def _draw_vectors(ax, rows: Tensor, title: str, lim: float) -> None:
    for j, (a, b) in enumerate(rows.tolist()):
        ax.plot([0, a], [0, b], color=plt.cm.tab10(j % 10), lw=2)
        ax.scatter([a], [b], color=plt.cm.tab10(j % 10), s=12)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_tms_components(target: Tensor, components: Tensor, path: str | Path, title: str = "") -> Path:
    """Target W (rows = features) next to every component P_c, saved to ``path``.

    With a 2-dim hidden space each row is drawn as an arrow; otherwise as a heatmap.
    """
    target, components = target.detach().cpu(), components.detach().cpu()
    n = 1 + components.shape[0]
    cols = min(n, 8)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.0 * cols, 2.0 * rows), squeeze=False)
    panels = [("target W", target)] + [(f"P_{c}", components[c]) for c in range(components.shape[0])]
    vmax = float(torch.cat([target.abs().flatten(), components.abs().flatten()]).max())
    for ax, (name, mat) in zip(axes.flat, panels, strict=False):
        if target.shape[1] == 2:
            _draw_vectors(ax, mat, name, 1.1 * vmax)
        else:
            ax.imshow(mat.T, cmap="RdBu", vmin=-vmax, vmax=vmax)
            ax.set_title(name, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
