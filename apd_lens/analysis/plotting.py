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


def plot_tms_components(
    target: Tensor,
    components: Tensor,
    path: str | Path,
    title: str = "",
    labels: list[str] | None = None,
    target_label: str = "target W",
) -> Path:
    """Target W (rows = features) next to every component P_c (or subcomponent), saved to ``path``.

    With a 2-dim hidden space each row is drawn as an arrow; otherwise as a heatmap. ``labels``: the
    panels' titles (default ``P_<c>``).
    """
    target, components = target.detach().cpu(), components.detach().cpu()
    n = 1 + components.shape[0]
    cols = min(n, 8)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.0 * cols, 2.0 * rows), squeeze=False)
    labels = labels or [f"P_{c}" for c in range(components.shape[0])]
    panels = [(target_label, target)] + [(labels[c], components[c]) for c in range(components.shape[0])]
    vmax = float(torch.cat([target.abs().flatten(), components.abs().flatten()]).max())
    for ax, (name, mat) in zip(axes.flat, panels, strict=False):
        if target.shape[1] == 2:
            _draw_vectors(ax, mat, name, 1.1 * vmax)
        else:
            ax.imshow(mat.T.numpy(), cmap="RdBu", vmin=-vmax, vmax=vmax)
            ax.set_title(name, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    """Lay out (unless the figure uses a constrained layout), write ``path`` (folders made), close."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not fig.get_constrained_layout():  # a constrained layout places its own colorbars and titles
        fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_largest_parts(
    target: Tensor, parts: Tensor, path: str | Path, title: str = "", max_panels: int = 47, name: str = "W"
) -> Path:
    """The target next to its largest parts (by norm, at most ``max_panels``, those above 1% of the
    largest), each labelled with its index."""
    norms = parts.detach().flatten(1).norm(dim=1)
    order = norms.argsort(descending=True)
    keep = [int(c) for c in order[:max_panels] if norms[c] > 0.01 * norms.max()]
    labels = [f"{c} ({float(norms[c]):.2f})" for c in keep]
    return plot_tms_components(target, parts[keep], path, title, labels=labels, target_label=f"target {name}")
