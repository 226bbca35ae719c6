"""Decompose a language model trained on real text: every attention and MLP matrix of a 2-layer
HookedTransformer trained on the Python standard library's own source, with SPD's VPD preset (or, with
``--preset lm_toy``, the toy models' SPD recipe on the same matrices, for comparison), then evaluate it on
held-out files.

    python examples/lm.py [--method spd] [--preset vpd|lm_toy] [--seed S] [--steps N] [--batch B]
                          [--set FIELD=VALUE ...] [--target runs/lm_target] [--out runs/lm]
                          [--checkpoint-every N] [--n-eval N] [--threads T] [--no-progress]

The target is trained once (about 17 min estimated on a quiet CPU) into ``--target`` and reused; a changed corpus is
refused. The decomposition goes to ``--out/lm_spd_<preset>_seed<S>/`` with checkpoints: rerunning the same
command continues an interrupted run, or evaluates the finished one again. Prints the evaluation table
(also ``lm_eval.json`` in the run folder) and as its LAST line
``CE_TARGET=<x> CE_CI=<x> CE_STOCH=<x> ADV_KL20=<x> L0=<x> ALIVE=<n>/<total>``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from apd_lens.analysis.lm_eval import evaluate_lm
from apd_lens.cli import parse_set
from apd_lens.methods.spd.presets import SPD_PRESETS
from apd_lens.models.lm import load_or_train_lm_target
from apd_lens.models.lm.target import summary
from apd_lens.training.resumable import train_or_continue


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=("spd",), default="spd")
    parser.add_argument("--preset", choices=sorted(SPD_PRESETS), default="vpd")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="decomposition steps (default: the preset's)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default: the preset's)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="any SPDConfig field (JSON value)"
    )
    parser.add_argument("--target", type=Path, default=Path("runs/lm_target"), help="the target's folder")
    parser.add_argument("--corpus", type=Path, default=None, help="corpus folder (default: the standard library)")
    parser.add_argument("--out", type=Path, default=Path("runs/lm"))
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--n-eval", type=int, default=256, help="held-out sequences to evaluate on")
    parser.add_argument("--eval-adv-batches", type=int, default=4, help="batches of 16 for the adversarial KL")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def config_for(model, args: argparse.Namespace):
    changes = parse_set(args.set)
    changes.update({k: v for k, v in (("steps", args.steps), ("batch_size", args.batch)) if v is not None})
    try:
        return SPD_PRESETS[args.preset](model, seed=args.seed, progress=not args.no_progress, **changes)
    except TypeError as err:
        raise SystemExit(f"--set: unknown field in {sorted(changes)}: {err}") from None


def main(argv: list[str] | None = None):
    args = parse(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    target = load_or_train_lm_target(args.target, args.corpus, progress=not args.no_progress)
    print(("trained the target: " if target.trained_now else "the target: ") + str(args.target))
    print(summary(target))
    config = config_for(target.model, args)
    run_dir = args.out / f"lm_{args.method}_{args.preset}_seed{args.seed}"
    decomposition, seconds, done = train_or_continue(
        target.model, target.train_tokens, config, run_dir, checkpoint_every=args.checkpoint_every
    )
    steps = decomposition.loss_history[-1]["step"] + 1 if decomposition.loss_history else config.steps
    print(f"decomposition {done}: {run_dir} ({steps} steps, {seconds:.0f} s of training in all)")
    held_out = target.held_out_tokens[: args.n_eval]
    result = evaluate_lm(
        decomposition,
        held_out,
        adversarial_batches=args.eval_adv_batches,
        seed=args.seed,
        progress=not args.no_progress,
    )
    result.extra.update({"train_seconds": seconds, "steps": steps})
    result.save(run_dir)
    print(result.table())
    print(f"wall time of this command: {time.perf_counter() - start:.0f} s")
    print(result.summary_line())
    return result


if __name__ == "__main__":
    main()
