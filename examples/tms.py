"""Decompose the toy model of superposition with the paper's settings.

    python examples/tms.py --setting 5-2 --seed 0 [--steps N] [--out runs/tms]

Trains the target, decomposes it, saves a figure of the target's feature vectors next to every
component, and prints ``MMCS=<x> ML2R=<y>`` as its last line.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import apd_lens
from apd_lens.analysis.metrics import mmcs_ml2r
from apd_lens.analysis.plotting import plot_tms_components
from apd_lens.models.tms import TMS, TMSData, train_tms

SETTINGS = {"5-2": (5, 2), "40-10": (40, 10)}


def main(argv: list[str] | None = None) -> tuple[float, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="5-2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="APD steps (default: the paper's 20000)")
    parser.add_argument("--target-steps", type=int, default=None, help="target training steps (default 5000/2000)")
    parser.add_argument(
        "--split-every",
        type=int,
        default=None,
        help="split over-used components every N steps (0: never; default: the config's)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/tms"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(torch.get_num_threads(), 1))

    n_features, n_hidden = SETTINGS[args.setting]
    start = time.perf_counter()
    target = TMS(n_features, n_hidden, seed=args.seed)
    target_steps = args.target_steps or (5000 if args.setting == "5-2" else 2000)
    target_batch = 1024 if args.setting == "5-2" else 2048
    train_tms(target, steps=target_steps, batch_size=target_batch, seed=args.seed, progress=not args.no_progress)

    config = target.apd_default_config().replace(seed=args.seed, progress=not args.no_progress)
    if args.steps is not None:
        config = config.replace(steps=args.steps)
    if args.split_every is not None:
        config = config.replace(split_every=args.split_every or None)
    data = TMSData(n_features, config.batch_size, seed=args.seed + 1000)
    decomposition = apd_lens.decompose(target, data, config)
    elapsed = time.perf_counter() - start

    components = decomposition.component_weights()["W"]
    mmcs, ml2r = mmcs_ml2r(components, target.W.detach())
    fig = plot_tms_components(
        target.W,
        components,
        args.out / f"tms_{args.setting}_seed{args.seed}.png",
        title=f"TMS {args.setting}: MMCS={mmcs:.3f} ML2R={ml2r:.3f}",
    )
    final = decomposition.loss_history[-1]
    print(f"steps={config.steps} wall_time={elapsed:.1f}s figure={fig}")
    print("final losses: " + " ".join(f"{k}={v:.3g}" for k, v in final.items() if k not in ("step", "lr")))
    print(f"MMCS={mmcs:.4f} ML2R={ml2r:.4f}")
    return mmcs, ml2r


if __name__ == "__main__":
    main()
