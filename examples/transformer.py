"""Train a one-layer transformer on key -> value fact lookup, decompose its MLP with APD or SPD, and
count how many facts get a component of their own.

    python examples/transformer.py [--method apd|spd] [--facts 24] [--steps N] [--seed 0]
                                   [--config topk=1.0,rank=2] [--plain-target]

Prints wall time and peak memory, and as its LAST line
- APD: ``FACTS_DEDICATED=<n>/<total> RECON_KL=<x>`` (KL(target || top-k masked model) over all facts and
  positions, batch top-k mask);
- SPD: ``FACTS_OWN=<n>/<total> RECON_KL=<x>`` (a fact's W_in subcomponent with the largest causal importance
  at its SEP position has CI >= 0.5 there and < 0.1 at every other fact's SEP; KL(target || stochastic-masked
  model) averaged over 16 mask draws).
The target is trained so that every fact has a neuron of its own at SEP (a neuron two facts share is split
and trained apart, ``--repair-steps``); ``--plain-target`` trains it with cross-entropy alone (no sparsity, no
per-fact-neuron penalties, no repair).
"""

from __future__ import annotations

import argparse
import dataclasses
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
    fact_lookup_spd_config,
    facts_with_own_subcomponent,
    make_fact_lookup_model,
    mlp_dependence,
    stochastic_recon_kl,
    train_fact_lookup,
)
from apd_lens.models.fact_neurons import shared_fact_neurons


def main(argv: list[str] | None = None) -> tuple[int, int, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=("apd", "spd"), default="apd")
    parser.add_argument("--facts", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="decomposition steps (default: the config's)")
    parser.add_argument("--target-steps", type=int, default=3000)
    parser.add_argument("--d-model", type=int, default=16)
    parser.add_argument("--d-mlp", type=int, default=48)
    parser.add_argument("--act-l1", type=float, default=0.01, help="L1 on MLP activations in target training")
    parser.add_argument("--ablated", type=float, default=1.0, help="target: penalty on predicting with no MLP at SEP")
    parser.add_argument("--overlap", type=float, default=1.0, help="target: penalty on neurons shared between facts")
    parser.add_argument("--ramp", type=float, default=0.5, help="target: overlap penalty ramp-up fraction")
    parser.add_argument(
        "--repair-steps", type=int, default=1000, help="target: steps after splitting a neuron two facts share (0: off)"
    )
    parser.add_argument("--plain-target", action="store_true", help="target: cross-entropy only")
    parser.add_argument("--config", "--apd", dest="changes", default="", help="config changes, e.g. 'topk=1.0'")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.plain_target:
        args.act_l1 = args.ablated = args.overlap = 0.0
        args.repair_steps = 0
    start = time.perf_counter()
    task = FactLookupTask(args.facts, seed=args.seed)
    # the config first, so that a bad --config fails before the target is trained
    make_config = fact_lookup_apd_config if args.method == "apd" else fact_lookup_spd_config
    config = make_config(task, seed=args.seed, progress=not args.no_progress)
    if args.steps is not None:
        config = config.replace(steps=args.steps)
    if args.changes:
        changes = {k: _parse(v) for k, v in (kv.split("=", 1) for kv in args.changes.split(","))}
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(config)})
        if unknown:
            parser.error(f"--config: {type(config).__name__} has no field(s) {unknown}")
        config = config.replace(**changes)
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
        repair_steps=args.repair_steps,
        progress=not args.no_progress,
    )
    accuracy = fact_accuracy(target, task)
    dependence = mlp_dependence(target, task)
    print(f"target: {task.n_facts} facts, accuracy {accuracy:.3f}, wrong without the MLP {dependence:.3f}")
    shared = shared_fact_neurons(target, task)
    print(f"target neurons that are the main neuron of several facts: {shared or 'none'}")

    keys = task.sample_keys(8192, torch.Generator().manual_seed(args.seed + 1000))
    specs = select_weights(target, list(config.weights))
    decomposition = apd_lens.decompose(target, task.sequences(keys), config, weights=specs)
    elapsed = time.perf_counter() - start

    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    final = decomposition.loss_history[-1]
    print(f"steps={config.steps} wall_time={elapsed:.1f}s peak_rss={peak_mib:.0f}MiB threads={torch.get_num_threads()}")
    print("final losses: " + " ".join(f"{k}={v:.3g}" for k, v in final.items() if k not in ("step", "lr")))
    report = _report_spd if args.method == "spd" else _report_apd
    return report(decomposition, target, task)


def _report_spd(decomposition, target, task: FactLookupTask) -> tuple[int, int, float]:
    facts = facts_with_own_subcomponent(decomposition, task)
    recon_kl = stochastic_recon_kl(decomposition, target, task)
    print(f"top W_in subcomponent per fact: {facts.top}")
    print(f"FACTS_OWN={facts.n_own}/{task.n_facts} RECON_KL={recon_kl:.4g}")
    return facts.n_own, task.n_facts, recon_kl


def _report_apd(decomposition, target, task: FactLookupTask) -> tuple[int, int, float]:
    assignment = dedicated_facts(decomposition, task)
    x = task.sequences()
    with torch.no_grad():
        recon_kl = output_loss(decomposition(x, decomposition.topk_mask(x)), target(x), "kl").item()
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
