"""Train a 2-layer attention-only transformer to copy in context (induction heads), decompose W_Q, W_K, W_V
and W_O of both layers with APD or SPD, find the parts that do the copying and ablate them.

    python examples/induction.py [--method apd|spd] [--seed S] [--steps N] [--target-steps N]
                                 [--set FIELD=VALUE ...] [--out runs/induction] [--threads T]

Prints the target's losses on the first and second copy, each head's previous-token and induction scores,
which parts copy (where their weight sits, head by head), the losses with them ablated, kept alone (with
what the first copy uses) and with both layers' attention zeroed or mean-ablated, and as its LAST line
``IH_SUBCOMPONENTS=<n>/<total> REPEAT_LOSS_ABLATED=<x> FIRST_HALF_LOSS_ABLATED=<y> REPEAT_LOSS=<z>``.
Everything goes to ``--out/induction_<method>_seed<S>/`` (the target's weights, the decomposition, the figure:
the target's attention patterns on one sequence above those of the decomposition with only the kept parts
on); rerunning the same command analyses the saved run again.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import apd_lens
from apd_lens.adapters import select_weights
from apd_lens.analysis.induction import analyse_induction, head_roles, masks_keeping
from apd_lens.analysis.induction_plots import plot_attention_patterns
from apd_lens.cli import parse_set
from apd_lens.models.induction import (
    InductionTask,
    half_losses,
    induction_apd_config,
    induction_spd_config,
    make_induction_model,
    train_induction,
)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=("apd", "spd"), default="apd")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="decomposition steps (default: the config's)")
    parser.add_argument("--target-steps", type=int, default=6000)
    parser.add_argument("--vocab", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=8, help="longest repeated segment")
    parser.add_argument("--d-model", type=int, default=32)
    parser.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="any field of the method's config (JSON)"
    )
    parser.add_argument("--n-eval", type=int, default=512, help="evaluation sequences")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/induction"))
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None):
    args = parse(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    make_config = induction_apd_config if args.method == "apd" else induction_spd_config
    changes = parse_set(args.set)
    if args.steps is not None:
        changes["steps"] = args.steps
    try:  # before the target trains, so that a bad --set fails at once
        config = make_config(seed=args.seed, progress=not args.no_progress, **changes)
    except TypeError as err:
        raise SystemExit(f"--set: unknown field in {sorted(changes)}: {err}") from None
    run_dir = args.out / f"induction_{args.method}_seed{args.seed}"
    _check_settings(run_dir, args, config)
    start = time.perf_counter()
    task = InductionTask(d_vocab=args.vocab, max_len=args.max_len)
    target = make_induction_model(task, d_model=args.d_model, seed=args.seed)
    saved_target = run_dir / "target.pt"
    if saved_target.is_file():  # a rerun analyses the saved run again
        target.load_state_dict(torch.load(saved_target))
        target.requires_grad_(False)
    else:
        train_induction(target, task, steps=args.target_steps, seed=args.seed, progress=not args.no_progress)
        run_dir.mkdir(parents=True, exist_ok=True)
        torch.save(target.state_dict(), saved_target)
    target_seconds = time.perf_counter() - start

    probe, copies = task.sequences(args.n_eval, torch.Generator().manual_seed(args.seed + 2000))
    with torch.no_grad():
        logits, cache = target.run_with_cache(probe)
    first, repeat = half_losses(logits, probe, copies, task)
    print(
        f"target ({target_seconds:.0f}s): loss first copy {first:.4f} (chance {task.chance_loss():.4f}), "
        f"second copy {repeat:.4f}"
    )
    patterns = {L: cache[f"blocks.{L}.attn.hook_pattern"] for L in range(target.cfg.n_layers)}
    for head, role in head_roles(patterns, copies, task).items():
        print(f"  {head}: previous-token {role['prev_token']:.2f}, induction {role['induction']:.2f}")

    if (run_dir / "cfg.json").is_file():
        decomposition = apd_lens.load(run_dir, target)
        print(f"loaded the decomposition saved in {run_dir}")
    else:
        data, _ = task.sequences(8192, torch.Generator().manual_seed(args.seed + 1000))
        start = time.perf_counter()
        weights = select_weights(target, list(config.weights))
        decomposition = apd_lens.decompose(target, data, config, weights=weights, run_dir=run_dir, overwrite=True)
        print(f"{args.method.upper()}: {config.steps} steps in {time.perf_counter() - start:.0f}s")

    report = analyse_induction(decomposition, task, n_sequences=args.n_eval, seed=args.seed + 2000)
    one = probe[:1]
    with torch.no_grad():
        _, kept_cache = decomposition.run_with_cache(one, masks_keeping(decomposition, one, set(report.kept), 0.0))
    rows = {
        "target": {L: patterns[L][0] for L in patterns},
        "kept only": {L: kept_cache[f"blocks.{L}.attn.hook_pattern"][0] for L in patterns},
    }
    figure = plot_attention_patterns(rows, run_dir / "attention_patterns.png", f"copies at {copies[0].tolist()}")
    print(f"figure: {figure}")
    print(report.describe())
    print(report.last_line())
    return report


def _check_settings(run_dir: Path, args: argparse.Namespace, config) -> None:
    """Record the run's settings in ``run_dir/run.json``; refuse a rerun that asks for other ones (it would
    re-analyse the saved target and decomposition under the wrong settings)."""
    wanted = {
        "target": {k: getattr(args, k) for k in ("vocab", "max_len", "d_model", "target_steps")},
        "config": {k: v for k, v in config.to_dict().items() if k != "progress"},
    }
    wanted = json.loads(json.dumps(wanted))  # tuples as lists, as read back
    record = run_dir / "run.json"
    if record.is_file():
        saved = json.loads(record.read_text())
        differ = [f"{part}.{k}" for part in wanted for k in wanted[part] if saved[part].get(k) != wanted[part][k]]
        if differ:
            raise SystemExit(f"{run_dir} holds a run with other settings ({', '.join(differ)}); use another --out")
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(wanted, indent=2))


if __name__ == "__main__":
    main()
