"""Decompose a residual MLP doing compressed computation (1, 2 or 3 layers) with APD or SPD.

    python examples/resid_mlp.py [--method apd|spd] [--layers 1|2|3] [--seed S] [--steps N] [--preset default|paper]
                                 [--set FIELD=VALUE ...] [--out runs/resid_mlp] [--threads T]

Trains the target (the paper's sizes: 100 features and 50 neurons over 1 or 2 layers, 102 features
and 3 x 17 neurons for 3), decomposes W_in and W_out of every layer with the method's defaults for
the residual MLP (``--preset paper``: the paper's settings), writes figures and a summary, and prints as its LAST line
- APD: ``DEDICATED=<n>/100 TOPK_MSE=<x> SCRUBBED=<y> ANTISCRUBBED=<z> MONO=<w>``;
- SPD: ``FEATURES_OWN=<n>/<n_features> WOUT_COACTIVE=<k> MASKED_MSE=<x> CONTRIB_SLOPE=<s>``.

Everything goes to ``--out/<method>_<L>L_seed<S>[_paper]/``: the target (``target/``), checkpoints every
``--checkpoint-every`` steps, the saved decomposition and the report. Rerunning the same command
continues an interrupted run from its newest checkpoint, or analyses the finished one again; that
folder is also what ``apd-lens report`` reads. ``--at-checkpoint`` analyses an unfinished run as it stands at
its newest checkpoint (figures and summary in ``<run>/step_<N>/``) without continuing it.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

import torch

import apd_lens
from apd_lens.cli import load_target, parse_set, save_target
from apd_lens.training.checkpoint import latest_checkpoint


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=("apd", "spd"), default="apd")
    parser.add_argument("--layers", type=int, choices=(1, 2, 3), default=1)
    parser.add_argument(
        "--preset", choices=("default", "paper"), default="default", help="the method's best recipe or the paper's"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="decomposition steps (default: the config's)")
    parser.add_argument("--target-steps", type=int, default=None, help="target steps (default 1000; 10000 for 3)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="any field of the method's config (JSON)"
    )
    parser.add_argument(
        "--split-every", type=int, default=None, help="APD: split over-used components every N steps (0: never)"
    )
    parser.add_argument("--n-eval", type=int, default=100, help="evaluation samples per feature")
    parser.add_argument("--checkpoint-every", type=int, default=1000)
    parser.add_argument(
        "--at-checkpoint", action="store_true", help="analyse the run at its newest checkpoint; do not continue it"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path("runs/resid_mlp"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.split_every is not None and args.method != "apd":
        parser.error("--split-every is an APD option")
    return args


def target(args: argparse.Namespace, folder: Path):
    """The run's target: loaded from ``folder`` when an earlier run saved it there, else trained and saved."""
    from apd_lens.models.resid_mlp import ResidualMLP, train_resid_mlp

    if (folder / "target.json").is_file():
        model, meta, _ = load_target(folder)
        return model, meta.get("seconds", 0.0)
    start = time.perf_counter()
    model = ResidualMLP.paper(args.layers, seed=args.seed)
    steps = args.target_steps or (10_000 if args.layers == 3 else 1000)
    losses = train_resid_mlp(model, steps=steps, seed=args.seed, progress=not args.no_progress)
    seconds = time.perf_counter() - start
    info = {"steps": steps, "final_loss": losses[-1], "seconds": seconds}
    save_target(model, f"resid-mlp-{args.layers}", args.seed, folder, info)
    model.requires_grad_(False)
    return model, seconds


def config_for(model, args: argparse.Namespace):
    make = model.apd_default_config if args.method == "apd" else model.spd_default_config
    changes = parse_set(args.set)
    if args.steps is not None:
        changes["steps"] = args.steps
    if args.split_every is not None:
        changes["split_every"] = args.split_every or None
    try:
        return make(preset=args.preset).replace(seed=args.seed, progress=not args.no_progress, **changes)
    except TypeError as err:
        raise SystemExit(f"--set: unknown field in {sorted(changes)}: {err}") from None


def decomposition_for(model, args: argparse.Namespace, run_dir: Path):
    """Train (or continue, or load) the decomposition in ``run_dir``; returns it, its seconds of training and,
    with ``--at-checkpoint`` on an unfinished run, the checkpoint it was read from (else None)."""
    from apd_lens.analysis.report import read_metrics
    from apd_lens.models.resid_mlp import ResidMLPData

    timing_file = run_dir / "decomposition_seconds.json"
    config = config_for(model, args)  # the same command continues the run; another config is refused
    if (run_dir / "cfg.json").is_file():  # finished earlier: analyse it again
        decomposition = _load_same_settings(run_dir, model, config, "a finished run")
        decomposition.loss_history = read_metrics(run_dir)
        return decomposition, json.loads(timing_file.read_text())["seconds"], None
    resume = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    earlier = json.loads(timing_file.read_text())["seconds"] if timing_file.is_file() else 0.0
    if args.at_checkpoint:
        if resume is None:
            raise SystemExit(f"--at-checkpoint: {run_dir} holds no checkpoint (nor a finished run)")
        decomposition = _load_same_settings(resume, model, config, "a checkpoint of a run")
        print(f"the run as it stands at {resume} (not continued)")
        return decomposition, earlier, resume
    data = ResidMLPData(model.n_features, config.batch_size, seed=args.seed + 1000)
    if resume is not None:
        print(f"continuing from {resume}")
    start = time.perf_counter()
    try:
        decomposition = apd_lens.decompose(
            model, data, config, run_dir=run_dir, checkpoint_every=args.checkpoint_every, resume=resume
        )
    finally:  # also on Ctrl-C, so that a continued run reports its whole time
        seconds = earlier + time.perf_counter() - start
        timing_file.write_text(json.dumps({"seconds": seconds}))
    return decomposition, seconds, None


def _load_same_settings(path: Path, model, config, what: str):
    """The decomposition saved at ``path`` (a folder or a checkpoint); refused if made with other settings."""
    decomposition = apd_lens.load(path, model)
    differ = _differences(decomposition.config, config)
    if differ:
        raise SystemExit(f"{path} holds {what} with other settings ({differ}); use another --out")
    return decomposition


def _differences(saved, wanted) -> str:
    mine, theirs = wanted.to_dict(), saved.to_dict()
    return ", ".join(
        f"{k}: saved {theirs.get(k)!r}, asked {v!r}" for k, v in mine.items() if k != "progress" and theirs.get(k) != v
    )


def analyse(decomposition, args: argparse.Namespace, out: Path, tag: str):
    """The method's report, its figures and summary file; returns the report."""
    if decomposition.method == "spd":
        from apd_lens.analysis.resid_mlp_spd import analyse_spd_resid_mlp
        from apd_lens.analysis.resid_mlp_spd_plots import plot_spd_resid_mlp_report

        report = analyse_spd_resid_mlp(decomposition, n_per_feature=args.n_eval, seed=args.seed + 2000)
        figures = plot_spd_resid_mlp_report(report, out, prefix=tag)
    else:
        from apd_lens.analysis.resid_mlp import analyse_resid_mlp
        from apd_lens.analysis.resid_mlp_plots import plot_resid_mlp_report

        report = analyse_resid_mlp(decomposition, n_per_feature=args.n_eval, seed=args.seed + 2000)
        figures = plot_resid_mlp_report(decomposition, report, out, prefix=tag)
    print("figures: " + " ".join(str(f) for f in figures))
    return report


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    # a `kill` (SIGTERM) unwinds like Ctrl-C, so that the time spent so far is recorded for the continued run
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    tag = f"{args.method}_{args.layers}L_seed{args.seed}" + ("_paper" if args.preset == "paper" else "")
    run_dir = args.out / tag
    if args.at_checkpoint and not (run_dir / "target" / "target.json").is_file():
        raise SystemExit(f"--at-checkpoint: {run_dir} holds no run")
    model, target_seconds = target(args, run_dir / "target")
    decomposition, seconds, checkpoint = decomposition_for(model, args, run_dir)
    out = run_dir if checkpoint is None else run_dir / checkpoint.stem  # e.g. step_000002500
    out.mkdir(exist_ok=True)
    start = time.perf_counter()
    report = analyse(decomposition, args, out, tag)
    summary = report.summary()
    summary.update(
        {
            "timings": {"target_s": target_seconds, "decomposition_s": seconds},
            "analysis_s": time.perf_counter() - start,
            "config": decomposition.config.to_dict(),
        }
    )
    (out / f"{tag}.json").write_text(json.dumps(summary, indent=2, default=str))
    final = decomposition.loss_history[-1] if decomposition.loss_history else {}
    print(f"timings: target {target_seconds:.1f}s, decomposition {seconds:.1f}s ({decomposition.config.steps} steps)")
    print("final losses: " + " ".join(f"{k}={v:.3g}" for k, v in final.items() if k not in ("step", "lr")))
    print(report.describe())
    print(report.last_line())
    return summary


if __name__ == "__main__":
    main()
