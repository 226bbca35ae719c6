"""The cost of runtime type checking: one decomposition step with apd_lens imported plainly and through
jaxtyping's import hook with beartype (``install_import_hook("apd_lens", "beartype.beartype")``), side by
side in one run.

    python benchmarks/typecheck_cost.py [--methods spd,apd] [--steps 50] [--rounds 5] [--warmup 5]

Each (method, checked or not) runs in its own worker process (the hook must be installed before apd_lens
is first imported), one torch thread each, on TMS 5-2 with the model's default config (its batch size
and C). The parent alternates the workers: every round, each worker runs ``--steps`` steps (losses,
backward, optimizer step) while the others wait, so a change in machine load hits both sides alike.
Prints ms/step (median over rounds) per method, plain and checked, their ratio, and the CPU capability.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

import torch


def worker(method: str, checked: bool, conn) -> None:
    """Build a TMS 5-2 decomposition and time ``n`` steps each time the parent sends ``n`` (None: stop)."""
    torch.set_num_threads(1)
    if checked:
        from jaxtyping import install_import_hook

        install_import_hook("apd_lens", "beartype.beartype")
    from apd_lens import Decomposition, SPDDecomposition
    from apd_lens.models.tms import TMS, TMSData
    from apd_lens.training.loop import apply_update, make_optimizer

    target = TMS(5, 2, seed=0)
    config = (target.spd_default_config() if method == "spd" else target.apd_default_config()).replace(progress=False)
    cls = SPDDecomposition if method == "spd" else Decomposition
    decomposition = cls(target, target.apd_weight_specs(), config)
    optimizer = make_optimizer(decomposition.trainable_parameters(), config.lr)
    batches = iter(TMSData(5, config.batch_size, seed=1))
    generator = torch.Generator().manual_seed(2)
    step = 0
    conn.send("ready")
    while (n := conn.recv()) is not None:
        start = time.perf_counter()
        for _ in range(n):
            terms = decomposition.losses(next(batches), generator, step)
            optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
            apply_update(decomposition, optimizer)
            step += 1
        conn.send((time.perf_counter() - start) / n * 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="spd,apd", help="comma-separated: spd, apd")
    parser.add_argument("--steps", type=int, default=50, help="steps per worker per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per worker first")
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or set(methods) - {"spd", "apd"}:
        parser.error(f"--methods must name spd and/or apd, got {args.methods!r}")
    if args.steps < 1 or args.rounds < 1 or args.warmup < 0:
        parser.error("--steps and --rounds must be >= 1, --warmup >= 0")

    context = mp.get_context("spawn")  # a fresh interpreter per worker: apd_lens not yet imported
    workers = {}
    for method in methods:
        for checked in (False, True):
            parent, child = context.Pipe()
            process = context.Process(target=worker, args=(method, checked, child), daemon=True)
            process.start()
            workers[(method, checked)] = (process, parent)
    for _, conn in workers.values():
        if conn.recv() != "ready":
            raise RuntimeError("a worker failed to start")
    times: dict[tuple[str, bool], list[float]] = {key: [] for key in workers}
    try:
        for round_ in range(args.rounds + (1 if args.warmup else 0)):
            for key, (_, conn) in workers.items():  # one at a time, alternating plain and checked
                conn.send(args.warmup if round_ == 0 and args.warmup else args.steps)
                ms = conn.recv()
                if not (round_ == 0 and args.warmup):
                    times[key].append(ms)
    finally:
        for process, conn in workers.values():
            conn.send(None)
            process.join(timeout=30)

    print(f"CPU capability: {torch.backends.cpu.get_cpu_capability()}; torch {torch.__version__}; 1 thread per worker")
    print(f"TMS 5-2, model defaults; {args.rounds} rounds x {args.steps} steps each, alternating; median ms/step")
    print(f"{'method':<8}{'plain':>12}{'checked':>12}{'checked/plain':>16}")
    for method in methods:
        plain = statistics.median(times[(method, False)])
        checked = statistics.median(times[(method, True)])
        print(f"{method:<8}{plain:>12.2f}{checked:>12.2f}{checked / plain:>16.2f}")


if __name__ == "__main__":
    main()
