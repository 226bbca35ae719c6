"""Data-parallel APD on TMS 5-2 with torchrun (gloo on CPU, nccl on GPU).

    torchrun --standalone --nproc_per_node 2 examples/torchrun_tms.py [--steps N] [--device cuda]

Each rank trains the same target (seeded) and takes rank 0's copy; ``decompose`` then shards every
global batch over the ranks. Rank 0 prints ``MMCS=<x> ML2R=<y> RANKS=<n>`` as its last line.
"""

from __future__ import annotations

import argparse

import apd_lens
from apd_lens.analysis.metrics import mmcs_ml2r
from apd_lens.models.tms import TMS, TMSData, train_tms
from apd_lens.training import distributed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    distributed.init_from_env(args.device)
    target = TMS(5, 2, seed=args.seed).to(distributed.resolve_device(args.device))
    train_tms(target, steps=2000, seed=args.seed, progress=False)
    distributed.broadcast_module(target)
    config = target.apd_default_config().replace(steps=args.steps, seed=args.seed, device=args.device)
    dec = apd_lens.decompose(target, TMSData(5, config.batch_size, seed=args.seed + 1000), config)
    if distributed.is_main_process():
        mmcs, ml2r = mmcs_ml2r(dec.component_weights()["W"].cpu(), target.W.detach().cpu())
        print(f"MMCS={mmcs:.4f} ML2R={ml2r:.4f} RANKS={distributed.world_size()}")


if __name__ == "__main__":
    main()
