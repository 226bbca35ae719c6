"""Train a one-layer transformer on key -> value fact lookup, decompose its MLP with APD, and count
how many facts get a dedicated component.

    python examples/transformer.py [--facts 24] [--steps N] [--seed 0] [--apd topk=1.0,rank=2]

Prints wall time and peak memory, and as its LAST line ``FACTS_DEDICATED=<n>/<total> RECON_KL=<x>``
(RECON_KL: KL(target || top-k masked model) over all facts and positions, batch top-k mask).
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

import apd_lens
from apd_lens.adapters import select_weights
from apd_lens.engine.losses import output_loss
from apd_lens.models.fact_lookup import (
    FactLookupTask,
    dedicated_facts,
    fact_accuracy,
    fact_lookup_apd_config,
    make_fact_lookup_model,
    mlp_dependence,
    train_fact_lookup,
)


def main(argv: list[str] | None = None) -> tuple[int, int, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--facts", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="APD steps (default: the config's)")
    parser.add_argument("--target-steps", type=int, default=3000)
    parser.add_argument("--d-model", type=int, default=16)
    parser.add_argument("--d-mlp", type=int, default=48)
    parser.add_argument("--act-l1", type=float, default=0.01, help="L1 on MLP activations in target training")
    parser.add_argument("--ablated", type=float, default=1.0, help="target: penalty on predicting with no MLP at SEP")
    parser.add_argument("--overlap", type=float, default=10.0, help="target: penalty on neurons shared between facts")
    parser.add_argument("--ramp", type=float, default=0.5, help="target: overlap penalty ramp-up fraction")
    parser.add_argument("--apd", default="", help="APD config changes, e.g. 'topk=1.0,rank=2'")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    task = FactLookupTask(args.facts, seed=args.seed)
    target = make_fact_lookup_model(task, d_model=args.d_model, d_mlp=args.d_mlp, seed=args.seed)
    train_fact_lookup(
        target,
        task,
        steps=args.target_steps,
        seed=args.seed,
        act_l1=args.act_l1,
        ablated_coeff=args.ablated,
        overlap_coeff=args.overlap,
        ramp_frac=args.ramp,
        progress=not args.no_progress,
    )
    accuracy = fact_accuracy(target, task)
    dependence = mlp_dependence(target, task)
    print(f"target: {task.n_facts} facts, accuracy {accuracy:.3f}, wrong without the MLP {dependence:.3f}")

    config = fact_lookup_apd_config(task, seed=args.seed, progress=not args.no_progress)
    if args.steps is not None:
        config = config.replace(steps=args.steps)
    if args.apd:
        config = config.replace(**{k: _parse(v) for k, v in (kv.split("=", 1) for kv in args.apd.split(","))})
    keys = task.sample_keys(8192, torch.Generator().manual_seed(args.seed + 1000))
    specs = select_weights(target, list(config.weights))
    decomposition = apd_lens.decompose(target, task.sequences(keys), config, weights=specs)
    elapsed = time.perf_counter() - start

    assignment = dedicated_facts(decomposition, task)
    x = task.sequences()
    with torch.no_grad():
        mask = decomposition.topk_mask(x)
        recon_kl = output_loss(decomposition(x, mask), target(x), "kl").item()
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    final = decomposition.loss_history[-1]
    print(f"steps={config.steps} wall_time={elapsed:.1f}s peak_rss={peak_mib:.0f}MiB threads={torch.get_num_threads()}")
    print("final losses: " + " ".join(f"{k}={v:.3g}" for k, v in final.items() if k not in ("step", "lr")))
    print(f"shared components at SEP: {assignment.shared}; own component per fact: {assignment.own}")
    print(f"FACTS_DEDICATED={assignment.n_dedicated}/{task.n_facts} RECON_KL={recon_kl:.4g}")
    return assignment.n_dedicated, task.n_facts, recon_kl


def _parse(value: str):
    """A config value from the command line: int, float, None, bool, a tuple of hooks, or a string."""
    if value in ("None", "True", "False"):
        return {"None": None, "True": True, "False": False}[value]
    if value.startswith("("):
        return tuple(v for v in value.strip("()").split(";") if v)
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


if __name__ == "__main__":
    main()
