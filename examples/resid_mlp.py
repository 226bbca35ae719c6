"""Decompose a residual MLP doing compressed computation (1 or 2 layers) with the paper's settings.

    python examples/resid_mlp.py --layers 1 --seed 0 [--steps N] [--out runs/resid_mlp]
    python examples/resid_mlp.py --layers 1 --seed 0 --load runs/resid_mlp/resid_mlp_1L_seed0.pt

Trains the target (or loads it and the decomposition from a checkpoint), decomposes W_in and
W_out of every layer, saves a checkpoint and figures, and prints as its LAST line
``DEDICATED=<n>/100 TOPK_MSE=<x> SCRUBBED=<y> ANTISCRUBBED=<z> MONO=<w>``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import apd_lens
from apd_lens.methods.apd.config import APDConfig
from apd_lens.methods.apd.decomposition import Decomposition
from apd_lens.models.resid_mlp import ResidMLPData, ResidualMLP, train_resid_mlp


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, choices=(1, 2), default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="APD steps (default: the paper's 10000)")
    parser.add_argument("--target-steps", type=int, default=1000, help="target training steps (batch 2048)")
    parser.add_argument("--rank", type=int, default=None, help="inner rank m (default: min(d_in, d_out))")
    parser.add_argument("--lr", type=float, default=None, help="APD learning rate (default: the paper's 1e-3)")
    parser.add_argument("--probes", type=int, default=None, help="random attribution probes (default: exact)")
    parser.add_argument(
        "--split-every",
        type=int,
        default=None,
        help="split over-used components every N steps (0: never; default: the config's)",
    )
    parser.add_argument("--n-eval", type=int, default=100, help="evaluation samples per feature")
    parser.add_argument("--out", type=Path, default=Path("runs/resid_mlp"))
    parser.add_argument("--load", type=Path, default=None, help="checkpoint to analyse instead of training")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def train(args) -> tuple[Decomposition, dict]:
    """Target training and decomposition; returns the decomposition and timings."""
    timings = {}
    start = time.perf_counter()
    target = ResidualMLP(n_layers=args.layers, seed=args.seed)
    train_resid_mlp(target, steps=args.target_steps, seed=args.seed, progress=not args.no_progress)
    timings["target_s"] = time.perf_counter() - start
    config = target.apd_default_config().replace(seed=args.seed, progress=not args.no_progress)
    changes = {"steps": args.steps, "rank": args.rank, "attribution_probes": args.probes, "lr": args.lr}
    config = config.replace(**{k: v for k, v in changes.items() if v is not None})
    if args.split_every is not None:
        config = config.replace(split_every=args.split_every or None)
    data = ResidMLPData(target.n_features, config.batch_size, seed=args.seed + 1000)
    start = time.perf_counter()
    decomposition = apd_lens.decompose(target, data, config)
    timings["apd_s"] = time.perf_counter() - start
    timings["apd_s_per_step"] = timings["apd_s"] / max(config.steps, 1)
    return decomposition, timings


def save(decomposition: Decomposition, timings: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    model = decomposition.model
    torch.save(
        {
            "model_kwargs": {"n_layers": model.n_layers, "n_features": model.n_features, "d_resid": model.d_resid},
            "model_state": model.state_dict(),
            "config": decomposition.config.to_dict(),
            "state": decomposition.state_dict(),
            "loss_history": decomposition.loss_history,
            "timings": timings,
        },
        path,
    )


def load(path: Path) -> tuple[Decomposition, dict]:
    ckpt = torch.load(path, weights_only=False)
    model = ResidualMLP(**ckpt["model_kwargs"])
    model.load_state_dict(ckpt["model_state"])
    decomposition = Decomposition(model, model.apd_weight_specs(), APDConfig.from_dict(ckpt["config"]))
    decomposition.load_state_dict(ckpt["state"])
    decomposition.loss_history = ckpt["loss_history"]
    return decomposition, ckpt["timings"]


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    tag = f"resid_mlp_{args.layers}L_seed{args.seed}"
    if args.load is not None:
        decomposition, timings = load(args.load)
    else:
        decomposition, timings = train(args)
        save(decomposition, timings, args.out / f"{tag}.pt")
    from apd_lens.analysis.resid_mlp import analyse_resid_mlp
    from apd_lens.analysis.resid_mlp_plots import plot_resid_mlp_report

    start = time.perf_counter()
    report = analyse_resid_mlp(decomposition, n_per_feature=args.n_eval, seed=args.seed + 2000)
    timings["analysis_s"] = time.perf_counter() - start
    figures = plot_resid_mlp_report(decomposition, report, args.out, prefix=tag)
    summary = report.summary()
    summary["timings"] = timings
    summary["config"] = decomposition.config.to_dict()
    (args.out / f"{tag}.json").write_text(json.dumps(summary, indent=2, default=str))
    final = decomposition.loss_history[-1] if decomposition.loss_history else {}
    print("timings: " + " ".join(f"{k}={v:.1f}" for k, v in timings.items()))
    print("final losses: " + " ".join(f"{k}={v:.3g}" for k, v in final.items() if k not in ("step", "lr")))
    print(report.describe())
    print("figures: " + " ".join(str(f) for f in figures))
    print(report.last_line())
    return summary


if __name__ == "__main__":
    main()
