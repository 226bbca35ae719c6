"""Read the causal importances off the SPD paper's figure 8 (1-layer residual MLP, CI on one-hot inputs
for five importance coefficients) and count them the way ``analyse_spd_resid_mlp`` counts a run.

    python scripts/read_spd_figure8.py resid_mlp_varying_importance_minimality_coeff_ci_vals.png

The PNG is in the reference repository (goodfire-ai/spd,
``papers/Stochastic_Parameter_Decomposition/figures/``). The panel of the best coefficient (1e-5) is
framed in blue; each of its two heat maps (W_in above, W_out below) is a 100 x 100 grid, features by
subcomponents, coloured with matplotlib's ``Reds`` from 0 to 1. The frame hides the maps' outer pixels, so
the cell boundaries are taken from the steps of W_in's diagonal (one cell per feature) and extended by one
cell at each end (of which only the part inside the frame is sampled); each cell is sampled at its centre
and mapped back to the nearest colour of the map.
"""

from __future__ import annotations

import argparse

import matplotlib
import matplotlib.image
import numpy as np

ON, OFF = 0.5, 0.1


def diagonal_cells(image: np.ndarray, box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Row and column centres (pixels relative to ``box``) of the cells of a heat map with a full diagonal:
    the steps of the dark pixels' mean column per row (and mean row per column) are the cell boundaries."""
    top, bottom, left, right = box
    ys, xs = np.nonzero(image[top : bottom + 1, left : right + 1].sum(-1) < 1.0)
    centres = []
    for along, across in ((ys, xs), (xs, ys)):
        keys = np.unique(along)
        means = np.array([across[along == k].mean() for k in keys])
        edges = keys[1:][np.abs(np.diff(means)) > 3].astype(float)
        size = np.diff(edges).mean()
        edges = np.concatenate([[edges[0] - size], edges, [edges[-1] + size]])
        visible = (bottom - top) if along is ys else (right - left)
        centres.append(((edges[:-1] + edges[1:]) / 2).clip(2, visible - 2))  # edge cells: their visible part
    return centres[0], centres[1]


def read_grid(image: np.ndarray, top: int, left: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """The values of the heat map whose cells are centred at ``top + rows`` x ``left + cols``."""
    reds = matplotlib.colormaps["Reds"](np.linspace(0, 1, 256))[:, :3]
    values = np.zeros((len(rows), len(cols)))
    for i, y in enumerate(rows):
        for j, x in enumerate(cols):
            y0, x0 = int(round(top + y)), int(round(left + x))
            colour = image[y0 - 1 : y0 + 2, x0 - 1 : x0 + 2].reshape(-1, 3).mean(0)
            values[i, j] = np.argmin(((reds - colour) ** 2).sum(1)) / 255
    return values


def heat_map_boxes(image: np.ndarray) -> list[tuple[int, int, int, int]]:
    """The pixel boxes of the two heat maps in the blue frame: the extent of the colour map's 0 colour
    inside each half of the frame."""
    blue = (image[..., 2] > 0.4) & (image[..., 0] < 0.2) & (image[..., 1] < 0.2)
    no_frame = "no blue-framed panel in this image: give the SPD paper's figure 8 PNG (see the docstring)"
    ys, xs = np.nonzero(blue)
    if len(xs) == 0:
        raise SystemExit(no_frame)
    x0, x1 = xs.min(), xs.max()
    frame_rows = np.nonzero(blue[:, x0 : x1 + 1].sum(1) > 0.4 * (x1 - x0))[0]
    if len(frame_rows) < 2:
        raise SystemExit(no_frame)
    zero = matplotlib.colormaps["Reds"](0.0)[:3]
    boxes = []
    middle = (frame_rows.min() + frame_rows.max()) // 2
    for y0, y1 in ((frame_rows.min(), middle), (middle, frame_rows.max())):
        region = np.abs(image[y0:y1, x0:x1] - zero).sum(-1) < 0.02
        ry, rx = np.nonzero(region)
        boxes.append((ry.min() + y0, ry.max() + y0, rx.min() + x0, rx.max() + x0))
    return boxes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("png")
    args = parser.parse_args()
    image = matplotlib.image.imread(args.png)[..., :3]
    w_in_box, w_out_box = heat_map_boxes(image)
    rows, cols = diagonal_cells(image, w_in_box)
    w_in = read_grid(image, w_in_box[0], w_in_box[2], rows, cols)
    w_out = read_grid(image, w_out_box[0], w_out_box[2], rows, cols)
    diagonal = np.diag(w_in) >= ON
    print(
        f"cells: {len(rows)} x {len(cols)}; W_in diagonal cells >= {ON}: {diagonal.sum()}, off-diagonal > {OFF}: "
        f"{((w_in > OFF) & ~np.eye(len(rows), dtype=bool)).sum()}"
    )
    live = w_out.max(0) > OFF
    on = w_out >= ON
    share = on[:, live].mean(0)
    print(f"W_out: live subcomponents (CI > {OFF} on some feature): {live.sum()}")
    print(f"W_out: on (CI >= {ON}) for every feature: {on.all(0).sum()}  (WOUT_COACTIVE)")
    print(f"W_out: on per feature: mean {on.sum(1).mean():.1f}, min {on.sum(1).min()}, max {on.sum(1).max()}")
    print(
        f"W_out: share of features each live one is on for: median {np.median(share):.2f}, "
        f"min {share.min():.2f}, max {share.max():.2f}"
    )


if __name__ == "__main__":
    main()
