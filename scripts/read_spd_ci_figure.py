"""Read the causal importances off the SPD paper's residual-MLP CI figures (CI on the one-hot inputs
x_i = 0.75, features by subcomponents) and count them the way ``analyse_spd_resid_mlp`` counts a run.

    python scripts/read_spd_ci_figure.py resid_mlp_varying_importance_minimality_coeff_ci_vals.png   # figure 8
    python scripts/read_spd_ci_figure.py causal_importance_upper_leaky_2layers_wau744ht.png          # figure 12

The PNGs are in the reference repository (goodfire-ai/spd, ``papers/Stochastic_Parameter_Decomposition/
figures/``); every heat map is coloured with matplotlib's ``Reds`` from 0 to 1.
- Figure 8 (1 layer, five importance coefficients): the panel of the best coefficient (1e-5) is framed in
  blue; its two heat maps (W_in above, W_out below) are 100 x 100 grids. The frame hides the maps' outer
  pixels, so the cell boundaries are taken from the steps of W_in's diagonal (one cell per feature) and
  extended by one cell at each end (of which only the part inside the frame is sampled).
- Figure 12 (2 layers): four heat maps stacked (W_in, W_out of layer 1, then of layer 2), 100 features by
  C subcomponents: the map's height and width are split evenly, into 100 rows and into as many columns as
  the slope of layer 1's W_in diagonal (one feature per column) gives; where the diagonal line meets the
  map's corner says how many pixels the axes' spines hide on each side. Each cell is one pixel there: its
  centre, or the visible pixel nearest to it.
Each cell is sampled at its centre and mapped back to the nearest colour of the map.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib
import matplotlib.image
import numpy as np

from apd_lens.analysis.resid_mlp_spd import OFF, ON


def blue_frame(image: np.ndarray) -> np.ndarray:
    """Pixels of the blue frame figure 8 draws around its best panel."""
    return (image[..., 2] > 0.4) & (image[..., 0] < 0.2) & (image[..., 1] < 0.2)


def zero_coloured(image: np.ndarray) -> np.ndarray:
    """Pixels of the colour map's 0 colour (a heat map's empty cells)."""
    return np.abs(image - np.array(matplotlib.colormaps["Reds"](0.0)[:3])).sum(-1) < 0.02


def dark_pixels(image: np.ndarray, box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(rows, columns), relative to ``box``, of the pixels dark enough to be cells near CI 1."""
    top, bottom, left, right = box
    return np.nonzero(image[top : bottom + 1, left : right + 1].sum(-1) < 1.0)


def diagonal_cells(image: np.ndarray, box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Row and column centres (pixels relative to ``box``) of the cells of a heat map with a full diagonal:
    the steps of the dark pixels' mean column per row (and mean row per column) are the cell boundaries."""
    top, bottom, left, right = box
    ys, xs = dark_pixels(image, box)
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


def read_grid(image: np.ndarray, top: int, left: int, rows: np.ndarray, cols: np.ndarray, half: int = 1) -> np.ndarray:
    """The values of the heat map whose cells are centred at ``top + rows`` x ``left + cols`` (the mean colour
    of the ``2 half + 1`` pixels square there)."""
    reds = matplotlib.colormaps["Reds"](np.linspace(0, 1, 256))[:, :3]
    values = np.zeros((len(rows), len(cols)))
    for i, y in enumerate(rows):
        for j, x in enumerate(cols):
            y0, x0 = int(round(top + y)), int(round(left + x))
            colour = image[y0 - half : y0 + half + 1, x0 - half : x0 + half + 1].reshape(-1, 3).mean(0)
            values[i, j] = np.argmin(((reds - colour) ** 2).sum(1)) / 255
    return values


def heat_map_boxes(image: np.ndarray) -> list[tuple[int, int, int, int]]:
    """The pixel boxes of the two heat maps in the blue frame: the extent of the colour map's 0 colour
    inside each half of the frame."""
    blue = blue_frame(image)
    no_frame = "no blue-framed panel in this image: give the SPD paper's figure 8 PNG (see the docstring)"
    ys, xs = np.nonzero(blue)
    if len(xs) == 0:
        raise SystemExit(no_frame)
    x0, x1 = xs.min(), xs.max()
    frame_rows = np.nonzero(blue[:, x0 : x1 + 1].sum(1) > 0.4 * (x1 - x0))[0]
    if len(frame_rows) < 2:
        raise SystemExit(no_frame)
    zero = zero_coloured(image)
    boxes = []
    middle = (frame_rows.min() + frame_rows.max()) // 2
    for y0, y1 in ((frame_rows.min(), middle), (middle, frame_rows.max())):
        ry, rx = np.nonzero(zero[y0:y1, x0:x1])
        boxes.append((ry.min() + y0, ry.max() + y0, rx.min() + x0, rx.max() + x0))
    return boxes


def stacked_heat_map_boxes(image: np.ndarray) -> list[tuple[int, int, int, int]]:
    """The pixel boxes (top, bottom, left, right) of heat maps stacked one above the other: the runs of rows
    mostly of the colour map's 0 colour, and in each the columns where that colour fills most rows."""
    zero = zero_coloured(image)
    in_map = np.concatenate([[False], zero.sum(1) > 0.3 * image.shape[1], [False]])
    starts = np.nonzero(~in_map[:-1] & in_map[1:])[0]
    ends = np.nonzero(in_map[:-1] & ~in_map[1:])[0] - 1
    boxes = []
    for top, bottom in zip(starts, ends, strict=True):
        cols = np.nonzero(zero[top : bottom + 1].sum(0) > 0.5 * (bottom - top))[0]
        boxes.append((int(top), int(bottom), int(cols.min()), int(cols.max())))
    return boxes


def count_w_out(name: str, w_out: np.ndarray) -> None:
    """Print the counts of ``analyse_spd_resid_mlp`` for one W_out map (features x subcomponents)."""
    live = w_out.max(0) > OFF
    on = w_out >= ON
    share = on[:, live].mean(0)
    print(f"{name}: live subcomponents (CI > {OFF} on some feature): {live.sum()}")
    print(f"{name}: on (CI >= {ON}) for every feature: {on.all(0).sum()}  (WOUT_COACTIVE)")
    print(f"{name}: CI > 0 for every feature: {(w_out > 0).all(0).sum()}")
    print(f"{name}: on per feature: mean {on.sum(1).mean():.1f}, min {on.sum(1).min()}, max {on.sum(1).max()}")
    print(
        f"{name}: share of features each live one is on for: median {np.median(share):.2f}, "
        f"min {share.min():.2f}, max {share.max():.2f}"
    )


def check_diagonal(name: str, w_in: np.ndarray) -> None:
    """Print how well the reading recovers W_in's diagonal (first ``n_features`` columns)."""
    n = w_in.shape[0]
    diagonal = np.diag(w_in[:, :n]) >= ON
    off = (w_in > OFF) & ~np.eye(n, w_in.shape[1], dtype=bool)
    cells = f"{w_in.shape[0]} x {w_in.shape[1]} cells"
    print(f"{name}: {cells}; diagonal >= {ON}: {diagonal.sum()}, others > {OFF}: {off.sum()}")


def read_figure8(image: np.ndarray) -> None:
    w_in_box, w_out_box = heat_map_boxes(image)
    rows, cols = diagonal_cells(image, w_in_box)
    check_diagonal("W_in", read_grid(image, w_in_box[0], w_in_box[2], rows, cols))
    count_w_out("W_out", read_grid(image, w_out_box[0], w_out_box[2], rows, cols))


def read_figure12(image: np.ndarray, n_features: int) -> None:
    boxes = stacked_heat_map_boxes(image)
    if len(boxes) != 4:
        raise SystemExit(f"expected 4 stacked heat maps (W_in, W_out of 2 layers), found {len(boxes)}")
    top, bottom, left, right = boxes[0]
    ys, xs = dark_pixels(image, boxes[0])  # W_in's diagonal
    slope, intercept = np.polyfit(ys, xs, 1)
    inset = -intercept / (1 - slope)  # the axes' spines hide this many pixels of the map on each side
    height, width = bottom - top + 1 + 2 * inset, right - left + 1 + 2 * inset
    n_cols = round(width / (slope * height / n_features))
    # cell centres, the edge cells' moved to their visible pixels (the first and last column show one pixel)
    rows = ((np.arange(n_features) + 0.5) * height / n_features - inset).clip(0, bottom - top)
    cols = ((np.arange(n_cols) + 0.5) * width / n_cols - inset).clip(0, right - left)
    w_outs = []
    for layer in range(2):
        (in_top, _, in_left, _), (out_top, _, out_left, _) = boxes[2 * layer], boxes[2 * layer + 1]
        check_diagonal(f"layer {layer + 1} W_in", read_grid(image, in_top, in_left, rows, cols, half=0))
        w_outs.append(read_grid(image, out_top, out_left, rows, cols, half=0))
        count_w_out(f"layer {layer + 1} W_out", w_outs[-1])
    count_w_out("both W_out", np.concatenate(w_outs, axis=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("png")
    parser.add_argument("--features", type=int, default=100, help="rows of each heat map (figure 12)")
    args = parser.parse_args()
    if args.features < 2:
        parser.error(f"--features must be >= 2, got {args.features}")
    if not Path(args.png).is_file():
        parser.error(f"no such file: {args.png}")
    image = matplotlib.image.imread(args.png)[..., :3]
    if blue_frame(image).any():  # figure 8 frames its best panel in blue
        read_figure8(image)
    else:
        read_figure12(image, args.features)


if __name__ == "__main__":
    main()
