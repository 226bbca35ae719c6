"""Train a one-layer transformer on key -> value fact lookup, decompose its MLP with APD, and count
how many facts get a dedicated component.

    python examples/transformer.py [--facts 24] [--steps N] [--seed 0]

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
from apd_lens.losses import output_loss
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
    parser.add_argument("--target-steps", type=int, default=1500)
    parser.add_argument("--act-l1", type=float, default=0.1, help="L1 on MLP activations in target training")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    task = FactLookupTask(args.facts, seed=args.seed)
    target = make_fact_lookup_model(task, seed=args.seed)
    train_fact_lookup(
        target, task, steps=args.target_steps, seed=args.seed, act_l1=args.act_l1, progress=not args.no_progress
    )
    accuracy = fact_accuracy(target, task)
    dependence = mlp_dependence(target, task)
    print(f"target: {task.n_facts} facts, accuracy {accuracy:.3f}, wrong without the MLP {dependence:.3f}")

    config = fact_lookup_apd_config(task, seed=args.seed, progress=not args.no_progress)
    if args.steps is not None:
        config = config.replace(steps=args.steps)
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


if __name__ == "__main__":
    main()
