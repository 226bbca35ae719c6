"""Seconds per step of the LM decomposition, the VPD preset against the toy models' SPD recipe on the
same target, matrices, C and batch: two step counts differenced (no warm-up in the difference), the
presets alternating, 1 thread.

    python benchmarks/lm_step_benchmark.py [--target runs/lm_target] [--batch 8] [--rounds 1]
"""

from __future__ import annotations

import argparse
import time

import torch

import apd_lens
from apd_lens.methods.spd.presets import SPD_PRESETS
from apd_lens.models.lm import load_or_train_lm_target


def seconds(model, tokens, preset: str, steps: int, batch: int) -> float:
    config = SPD_PRESETS[preset](model, steps=steps, batch_size=batch, faithfulness_warmup_steps=0, progress=False)
    start = time.perf_counter()
    apd_lens.decompose(model, tokens, config)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="runs/lm_target")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--short", type=int, default=2)
    parser.add_argument("--long", type=int, default=6)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    target = load_or_train_lm_target(args.target, progress=False)
    tokens = target.train_tokens[:256]
    per_step = {name: [] for name in SPD_PRESETS}
    for _ in range(args.rounds):
        for name in SPD_PRESETS:
            diff = seconds(target.model, tokens, name, args.long, args.batch)
            diff -= seconds(target.model, tokens, name, args.short, args.batch)
            per_step[name].append(diff / (args.long - args.short))
    print(f"cpu: {torch.backends.cpu.get_cpu_capability()}, 1 thread, batch {args.batch} x {target.model.cfg.n_ctx}")
    best = {name: min(v) for name, v in per_step.items()}
    for name, s in best.items():
        print(f"{name:>8}: {s:.3f} s/step")
    print(f"lm_toy / vpd: {best['lm_toy'] / best['vpd']:.2f}")
    return best


if __name__ == "__main__":
    main()
