"""Time one SPD step and its parts next to one APD step, on the same models, in one run.

    python benchmarks/spd_step_benchmark.py [--cases tms-5-2,tms-40-10-ref,...] [--repeats 5] [--threads N]
                                            [--json out.json]

Cases: tms-5-2, tms-5-2-ref, tms-40-10, tms-40-10-ref, resid-mlp-1, resid-mlp-1-ref, resid-mlp-2,
resid-mlp-2-ref, resid-mlp-3, resid-mlp-3-ref, transformer-2l (default: all).

Per case (each in its own subprocess, so peak memories do not mix), on one untrained target and one
batch: "apd" (the model's APD default, as in step_benchmark.py), "spd" (the model's SPD default:
``spd_default_config()``; a generic SPDConfig for the transformer) and "spd-plain-ci", the same SPD
step with the per-subcomponent CI MLPs computed by their plain formula (one [n, C, hidden] tensor
through autograd, as the reference code does) instead of apd_lens' fused, cache-sized slices.
The ``-ref`` cases are at the reference code's own sizes (TMS: C 20 / 200 per matrix, batch 4096; residual
MLPs: C 100 / 400 / 500, batch 2048), for comparison with its step times.
Prints milliseconds per part, the full step, data points per step, ratios, peak resident memory, and
the SPD step's matmul floor (its matmuls' FLOPs at this machine's large-matmul rate) and REPLAY (the
same matmul calls each run alone).
"""

from __future__ import annotations

import json
import resource
import sys

import torch
from step_benchmark import (  # this directory is on sys.path when run as a script
    build_case,
    in_subprocess,
    matmul_flop,
    matmul_rate,
    parse_common,
    replayed_matmul_ms,
    step_matmul_calls,
    time_steps,
)

from apd_lens import SPDConfig
from apd_lens.methods.apd.decomposition import Decomposition
from apd_lens.methods.spd import causal_importance
from apd_lens.methods.spd.decomposition import SPDDecomposition
from apd_lens.training.loop import resolve_specs
from apd_lens.training.malloc_tuning import keep_freed_memory

CASES = (
    "tms-5-2",
    "tms-5-2-ref",
    "tms-40-10",
    "tms-40-10-ref",
    "resid-mlp-1",
    "resid-mlp-1-ref",
    "resid-mlp-2",
    "resid-mlp-2-ref",
    "resid-mlp-3",
    "resid-mlp-3-ref",
    "transformer-2l",
)
REFERENCE_SIZES = {
    "tms-5-2-ref": (20, 4096),
    "tms-40-10-ref": (200, 4096),
    "resid-mlp-1-ref": (100, 2048),
    "resid-mlp-2-ref": (400, 2048),
    "resid-mlp-3-ref": (500, 2048),
}
"""(C per matrix, batch) of the reference code's own TMS configs."""


def spd_config(name: str, model) -> SPDConfig:
    if name == "transformer-2l":
        return SPDConfig(n_subcomponents=40, batch_size=16, output_loss="kl", progress=False)
    config = model.spd_default_config().replace(progress=False)
    if name in REFERENCE_SIZES:
        c, batch = REFERENCE_SIZES[name]
        config = config.replace(n_subcomponents=c, batch_size=batch)
    return config


def spd_batch(name: str, model, config: SPDConfig, apd_batch: torch.Tensor) -> torch.Tensor:
    """A batch of the SPD config's size from the case's data."""
    if name.startswith("tms"):
        from apd_lens.models.tms import TMSData

        return TMSData(model.n_features, config.batch_size, seed=1).sample()
    if name.startswith("resid"):
        from apd_lens.models.resid_mlp import ResidMLPData

        return ResidMLPData(model.n_features, config.batch_size, seed=1).sample()
    return apd_batch


def plain_ci(self, inner):
    return causal_importance.scalar_mlp_reference(inner, self.w_in, self.b_in, self.w_out, self.b_out)


def measure(name: str, repeats: int) -> dict:
    keep_freed_memory()  # as decompose() does
    torch.manual_seed(0)
    apd_name = name.removesuffix("-ref")
    model, apd_cfg, x_apd = build_case(apd_name)
    specs = resolve_specs(model, None, None)
    result = {}
    apd = Decomposition(model, specs, apd_cfg)
    result["apd"] = time_steps(apd, x_apd, repeats) | {"points": x_apd.shape[: apd.n_batch_dims(x_apd)].numel()}
    del apd
    cfg = spd_config(name, model)
    x = spd_batch(name, model, cfg, x_apd)
    spd = SPDDecomposition(model, specs, cfg)
    points = x.shape[: spd.n_batch_dims(x)].numel()
    result["spd"] = time_steps(spd, x, repeats) | {"points": points}
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    calls = step_matmul_calls(spd, x)
    result["gflop_per_step"] = sum(map(matmul_flop, calls)) / 1e9
    result["matmul_gflops"] = matmul_rate()
    result["replayed_matmul_ms"] = replayed_matmul_ms(calls)
    fused = causal_importance.ScalarMLPCI.forward
    causal_importance.ScalarMLPCI.forward = plain_ci
    try:
        result["spd-plain-ci"] = time_steps(spd, x, repeats) | {"points": points}
    finally:
        causal_importance.ScalarMLPCI.forward = fused
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_common(__doc__, CASES, argv)
    results = {}
    for name in args.cases.split(","):
        res = in_subprocess(measure, name, args.repeats)
        results[name] = res
        for variant in ("apd", "spd", "spd-plain-ci"):
            row = res[variant]
            parts = " ".join(f"{k}={v:.1f}" for k, v in row.items() if k not in ("step", "points"))
            print(f"{name:<15}{variant:<13} step {row['step']:8.1f} ms  ({row['points']} points)  {parts}")
        spd, apd, plain = res["spd"]["step"], res["apd"]["step"], res["spd-plain-ci"]["step"]
        per_point = (apd / res["apd"]["points"]) / (spd / res["spd"]["points"])
        print(
            f"{name:<15}RATIO apd/spd per step {apd / spd:.2f}x, per data point {per_point:.2f}x; "
            f"plain-CI/spd {plain / spd:.2f}x; peak RSS {res['peak_rss_mb']:.0f} MB"
        )
        floor = 1000 * res["gflop_per_step"] / res["matmul_gflops"]
        replay = res["replayed_matmul_ms"] + res["spd"]["optimizer"]
        print(
            f"{name:<15}FLOOR {res['gflop_per_step']:.3g} GFLOP of matmuls per SPD step >= {floor:.1f} ms at "
            f"{res['matmul_gflops']:.0f} GFLOP/s (step = {spd / floor:.1f}x); REPLAY matmuls + update "
            f"{replay:.1f} ms (step = {spd / replay:.2f}x)"
        )
        sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
