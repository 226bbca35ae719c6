"""Decompose the toy model of superposition with APD or SPD.

    python examples/tms.py [--method apd|spd] [--setting 5-2|40-10] [--identity] [--seed S] [--steps N]
                           [--preset default|paper] [--out runs/tms]

Trains the target (with ``--identity``: ReLU(Wᵀ I W x + b) with I a frozen identity), decomposes it
with the method's defaults for TMS (``TMS.apd_default_config()`` / ``TMS.spd_default_config()``; with
``--preset paper`` the paper's settings), saves
a figure of the target's feature vectors next to the largest components / subcomponents (and of I's),
and prints ``MMCS=<x> ML2R=<y>`` as its last line, with ``--identity`` followed by
`` ID_SUBCOMPONENTS=<n>/<m1>`` (parts of I with a norm above 1% of the largest, out of I's rank).
MMCS / ML2R in the last line count only parts with a norm above 1% of the largest part of W (the same
rule, so that a negligible leftover cannot win a feature's max cosine); the line before it gives the
papers' metric over all parts (``all parts: MMCS=... ML2R=...``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import apd_lens
from apd_lens.analysis.metrics import mmcs_ml2r, n_large
from apd_lens.analysis.plotting import plot_largest_parts
from apd_lens.models.tms import TMS, TMSData, train_tms

SETTINGS = {"5-2": (5, 2), "40-10": (40, 10)}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=["apd", "spd"], default="apd")
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="5-2")
    parser.add_argument(
        "--preset", choices=("default", "paper"), default="default", help="the method's best recipe or the paper's"
    )
    parser.add_argument("--identity", action="store_true", help="insert a frozen identity I between W and Wᵀ")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="decomposition steps (default: the method's)")
    parser.add_argument("--target-steps", type=int, default=None, help="target training steps (default 5000/2000)")
    parser.add_argument(
        "--split-every",
        type=int,
        default=None,
        help="APD: split over-used components every N steps (0: never; default: the config's)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path("runs/tms"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.split_every is not None and args.method != "apd":
        parser.error("--split-every is an APD option")
    return args


def main(argv: list[str] | None = None) -> tuple[float, float]:
    args = parse(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    n_features, n_hidden = SETTINGS[args.setting]
    start = time.perf_counter()
    target = TMS(n_features, n_hidden, seed=args.seed, identity=args.identity)
    target_steps = args.target_steps or (5000 if args.setting == "5-2" else 2000)
    target_batch = 1024 if args.setting == "5-2" else 2048
    train_tms(target, steps=target_steps, batch_size=target_batch, seed=args.seed, progress=not args.no_progress)

    make_config = target.apd_default_config if args.method == "apd" else target.spd_default_config
    config = make_config(preset=args.preset).replace(seed=args.seed, progress=not args.no_progress)
    if args.steps is not None:
        config = config.replace(steps=args.steps)
    if args.split_every is not None:
        config = config.replace(split_every=args.split_every or None)
    data = TMSData(n_features, config.batch_size, seed=args.seed + 1000)
    decomposition = apd_lens.decompose(target, data, config)
    elapsed = time.perf_counter() - start

    parts = decomposition.weight_parts()
    mmcs, ml2r = mmcs_ml2r(parts["W"], target.W.detach(), min_norm_frac=0.01)
    raw_mmcs, raw_ml2r = mmcs_ml2r(parts["W"], target.W.detach())
    name = f"tms_{args.setting}{'_id' if args.identity else ''}_{args.method}_seed{args.seed}"
    title = f"{args.method.upper()} TMS {args.setting}: MMCS={mmcs:.3f} ML2R={ml2r:.3f}"
    figures = [plot_largest_parts(target.W, parts["W"], args.out / f"{name}.png", title)]
    last = f"MMCS={mmcs:.4f} ML2R={ml2r:.4f}"
    if args.identity:
        n_id = n_large(parts["I"])
        figures.append(
            plot_largest_parts(target.I, parts["I"], args.out / f"{name}_I.png", f"I: {n_id} parts", name="I")
        )
        last += f" ID_SUBCOMPONENTS={n_id}/{n_hidden}"
    final = decomposition.loss_history[-1]
    print(f"steps={config.steps} wall_time={elapsed:.1f}s figures={' '.join(str(f) for f in figures)}")
    print("final losses: " + " ".join(f"{k}={v:.3g}" for k, v in final.items() if k not in ("step", "lr")))
    print(f"all parts: MMCS={raw_mmcs:.4f} ML2R={raw_ml2r:.4f}")
    print(last)
    return mmcs, ml2r


if __name__ == "__main__":
    main()
