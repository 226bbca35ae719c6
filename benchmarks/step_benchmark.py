"""Time one APD step and its parts: apd_lens vs the paper's per-output-loop attribution.

    python benchmarks/step_benchmark.py [--cases tms-5-2,tms-40-10,resid-mlp-1,resid-mlp-2,transformer-2l]
                                        [--repeats 5] [--scaling]

All variants run side by side in this one process on the same model, batch and components; they
differ only in how attributions are computed: "ours" (the case's default attribution backend),
"batched" (one batched autograd backward, ``attribution_backend="batched"``) and the baseline, the
paper's algorithm, one backward pass per output dimension in a Python loop, written plainly below.
Prints milliseconds per part, the full step, the baseline/apd_lens ratio, and the peak resident memory
of each case (each case runs in its own subprocess so peaks do not mix), and two floors computed from
the matmul calls of one apd_lens step, recorded as dispatched: FLOOR, their FLOPs at the process's own rate
on a large square matmul (the time no reordering of the same arithmetic could beat), and REPLAY, the
same calls (shapes, strides) each run alone on fresh operands and timed, plus the measured update: the
time the step's own matmuls take at their shapes on this machine, with no other work at all.
``--scaling`` adds step time vs output width (probe attributions) and vs C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
import types
from collections import Counter, defaultdict

import torch

from apd_lens import APDConfig
from apd_lens.engine.hooked_forward import PassRecord
from apd_lens.methods.apd.decomposition import Decomposition
from apd_lens.training.loop import apply_update, make_optimizer
from apd_lens.training.malloc_tuning import keep_freed_memory

PARTS = ("target_forward", "attribution", "masked_forward", "losses", "backward", "optimizer")


# ----------------------------------------------------------------------------- the baseline
def per_output_loop_attributions(self: Decomposition, record: PassRecord, generator=None, x=None):
    """The paper's algorithm: for each output dim o, one backward of f_o; attr += (sum_u g_u . a_u)^2."""
    specs = {s.name: s for s in self.specs}
    keys = self.plan.use_keys()
    leaves = [record.leaves[k] for k in keys]
    comp_outs = {}
    with torch.no_grad():
        for name, i in keys:
            use = specs[name].uses[i]
            comp_outs[(name, i)] = self.components[name].component_outputs(record.enters[(name, i)], use.transposed)
    out = record.output.reshape(record.output.shape[0], -1)
    n_points = next(iter(comp_outs.values())).shape[0]
    attr = torch.zeros(n_points, self.n_components)
    for o in range(out.shape[1]):
        grads = torch.autograd.grad(out[:, o].sum(), leaves, retain_graph=True, allow_unused=True)
        inner = torch.zeros(n_points, self.n_components)
        for key, g in zip(keys, grads, strict=True):
            if g is not None:
                inner += torch.einsum("nd,ncd->nc", g.reshape(n_points, -1), comp_outs[key])
        attr += inner.square()
    return attr


# ----------------------------------------------------------------------------- cases
CASES = ("tms-5-2", "tms-40-10", "resid-mlp-1", "resid-mlp-2", "transformer-2l")


def build_case(name: str, n_components: int | None = None, probes: int | None = None):
    """(model, config, batch) for a benchmark case; targets are untrained (timing only)."""
    if name.startswith("tms"):
        from apd_lens.models.tms import TMS, TMSData

        f, h = (5, 2) if name == "tms-5-2" else (40, 10)
        model = TMS(f, h)
        config = model.apd_default_config()
        if name == "tms-40-10":
            config = config.replace(n_components=40)  # the reference code's C, as in the timing
        x = TMSData(f, config.batch_size, seed=1).sample()
    elif name in ("resid-mlp-1", "resid-mlp-2", "resid-mlp-3"):
        from apd_lens.models.resid_mlp import ResidMLPData, ResidualMLP

        model = ResidualMLP.paper(int(name[-1]))
        config = model.apd_default_config()
        x = ResidMLPData(model.n_features, config.batch_size, seed=1).sample()
    elif name.startswith("transformer-2l"):
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        cfg = HookedTransformerConfig(
            n_layers=2,
            d_model=32,
            d_head=8,
            n_heads=4,
            d_mlp=64,
            d_vocab=64,
            n_ctx=16,
            act_fn="gelu",
            normalization_type="LNPre",
            device="cpu",
            seed=0,
        )
        model = HookedTransformer(cfg)
        config = APDConfig(n_components=40, topk=2.0, batch_size=16, output_loss="kl")
        x = torch.randint(0, 64, (16, 16), generator=torch.Generator().manual_seed(0))
    else:
        raise ValueError(f"unknown case {name!r}")
    changes = {"progress": False}
    if n_components is not None:
        changes.update(n_components=n_components, topk=min(config.topk, n_components))
    if probes is not None:
        changes["attribution_probes"] = probes
    return model, config.replace(**changes), x


def time_steps(dec: Decomposition, x, repeats: int) -> dict[str, float]:
    """Median milliseconds of each part of a step and of the whole step."""
    optimizer = make_optimizer(dec.trainable_parameters(), lr=1e-4)
    samples: dict[str, list[float]] = defaultdict(list)

    @contextlib.contextmanager
    def section(name):
        start = time.perf_counter()
        yield
        samples[name].append(time.perf_counter() - start)

    dec.section_timer = section
    for _ in range(repeats + 1):  # the first step warms up
        start = time.perf_counter()
        terms = dec.losses(x)
        with section("backward"):
            optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
        with section("optimizer"):
            apply_update(dec, optimizer)  # as in training: Adam, then A renormalized if unit_norm_A
        samples["step"].append(time.perf_counter() - start)
    dec.section_timer = None
    return {k: 1000 * statistics.median(v[1:]) for k, v in samples.items()}


def run_measure(measure, args: tuple, queue) -> None:
    """In a case's process: ``measure(*args)`` put on ``queue``, or the traceback of its failure."""
    try:
        queue.put(measure(*args))
    except Exception:  # report the failure to the parent instead of leaving it waiting
        import traceback

        queue.put({"error": traceback.format_exc()})


def measure_case(name: str, repeats: int, n_components: int | None, probes: int | None, baseline: bool) -> dict:
    keep_freed_memory()  # as decompose() does; baseline and ours share this process
    torch.manual_seed(0)
    model, config, x = build_case(name, n_components, probes)
    from apd_lens.training.loop import resolve_specs

    dec = Decomposition(model, resolve_specs(model, None, config.weights), config)
    result = {"ours": time_steps(dec, x, repeats)}
    if baseline:
        # same engine with the batched-backward attributions (before vmap), then the paper's loop;
        # both need the target pass to record leaving activations with a graph
        dec.config = config.replace(attribution_backend="batched")
        result["batched"] = time_steps(dec, x, repeats)
        dec.attribution_values = types.MethodType(per_output_loop_attributions, dec)
        result["baseline"] = time_steps(dec, x, repeats)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    dec.config = config
    vars(dec).pop("attribution_values", None)  # back to apd_lens' own attributions
    calls = step_matmul_calls(dec, x)
    result["gflop_per_step"] = sum(map(matmul_flop, calls)) / 1e9
    result["matmul_gflops"] = matmul_rate()
    result["replayed_matmul_ms"] = replayed_matmul_ms(calls)
    return result


MATMUL_OPS = ("mm", "bmm", "addmm", "addbmm", "baddbmm", "mv", "addmv", "dot")


def step_matmul_calls(dec: Decomposition, x) -> list[tuple]:
    """The matmul calls (aten op, argument shapes, strides and dtypes, scalars) of one apd_lens step's
    forward and backward, in order, as dispatched (after vmap and autograd have done their work)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    ops = {getattr(torch.ops.aten, name).default for name in MATMUL_OPS}

    def describe(arg):
        if isinstance(arg, torch.Tensor):
            return ("tensor", tuple(arg.shape), tuple(arg.stride()), arg.dtype)
        return arg

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls: list[tuple] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in ops:
                self.calls.append((func, tuple(describe(a) for a in args), tuple(sorted(kwargs.items()))))
            return func(*args, **kwargs)

    for param in dec.trainable_parameters():
        param.grad = None
    with Recorder() as recorder:
        dec.losses(x)["total"].backward()
    return recorder.calls


def op_name(call: tuple) -> str:
    """The aten op of a recorded call without its overload: ``"mm"``, ``"addbmm"``, ..."""
    return call[0].__name__.split(".")[0]


def matmul_flop(call: tuple) -> int:
    """Floating-point operations of one recorded matmul call: 2 per multiply-add (the added input of
    addmm & co. not counted). ``torch.utils.flop_counter`` has no formula for ``addbmm``."""
    _, args, _ = call
    shapes = [a[1] for a in args if isinstance(a, tuple) and a and a[0] == "tensor"]
    name = op_name(call)
    if name in ("addmm", "addbmm", "baddbmm", "addmv"):
        shapes = shapes[1:]  # the added input
    left, right = shapes
    if name == "dot":
        return 2 * left[0]
    if name in ("mv", "addmv"):
        return 2 * left[0] * left[1]
    return 2 * math.prod(left) * right[-1]  # [*b, m, k] @ [*b, k, n]


def replayed_matmul_ms(calls: list[tuple], repeats: int = 5) -> float:
    """Milliseconds the given matmul calls take when each runs alone on fresh random operands of
    the same shapes, strides and dtypes (median of ``repeats`` per distinct call, summed over calls):
    the step's own matmuls at the rate this machine gets in their shapes, with nothing else."""

    def operand(arg):
        if not (isinstance(arg, tuple) and arg and arg[0] == "tensor"):
            return arg
        _, shape, stride, dtype = arg
        if 0 in shape:
            return torch.empty(shape, dtype=dtype)
        storage = 1 + sum((n - 1) * st for n, st in zip(shape, stride, strict=True))
        return torch.randn(storage, dtype=dtype).as_strided(shape, stride)

    total = 0.0
    for (func, args, kwargs), count in Counter(calls).items():
        real, named = [operand(a) for a in args], dict(kwargs)
        total += count * median_ms(lambda: func(*real, **named), repeats, warmup=1)  # noqa: B023 -- called here
    return total


def median_ms(fn, repeats: int, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``repeats`` calls, after ``warmup`` calls."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def matmul_rate(size: int = 2048, repeats: int = 5) -> float:
    """This process's float32 matmul rate (GFLOP/s) on a large square product: what the step's
    counted FLOPs would take at best."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def in_subprocess(measure, *args) -> dict:
    """``measure(*args)`` in a spawned process (so peak memories do not mix): its result, or its error raised."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=run_measure, args=(measure, args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    if "error" in result:
        raise RuntimeError(f"benchmark case {args[0]!r} failed:\n{result['error']}")
    return result


def parse_common(doc: str, cases: tuple[str, ...], argv: list[str] | None, scaling: bool = False) -> argparse.Namespace:
    """The benchmark scripts' shared arguments (cases, repeats, threads, json), checked before any case runs;
    ``--threads`` is applied here (and inherited by the spawned case processes)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(cases))
    parser.add_argument("--repeats", type=positive_int, default=5)
    if scaling:
        parser.add_argument("--scaling", action="store_true")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads per case (default: torch's)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.cases.split(",") if name not in cases]
    if unknown:  # before any case runs, not after the earlier ones
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(cases)}")
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, repeats {args.repeats}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_common(__doc__, CASES, argv, scaling=True)
    results = {}
    header = f"{'case':<16}{'variant':<10}" + "".join(f"{p:>15}" for p in (*PARTS, "step")) + f"{'peak MB':>10}"
    print(header)
    for name in args.cases.split(","):
        res = in_subprocess(measure_case, name, args.repeats, None, None, True)
        results[name] = res
        for variant in ("baseline", "batched", "ours"):
            row = res[variant]
            print(
                f"{name:<16}{variant:<10}"
                + "".join(f"{row.get(p, 0):>15.2f}" for p in (*PARTS, "step"))
                + f"{res['peak_rss_mb']:>10.0f}"
            )
        ratio = res["baseline"]["step"] / res["ours"]["step"]
        attr_ratio = res["baseline"]["attribution"] / res["ours"]["attribution"]
        print(f"{name:<16}RATIO full step baseline/apd_lens = {ratio:.1f}x   attribution = {attr_ratio:.1f}x")
        floor_ms = 1000 * res["gflop_per_step"] / res["matmul_gflops"]
        print(
            f"{name:<16}FLOOR {res['gflop_per_step']:.3g} GFLOP per apd_lens step (matmuls); at this machine's "
            f"{res['matmul_gflops']:.0f} GFLOP/s matmul rate >= {floor_ms:.1f} ms; measured step = "
            f"{res['ours']['step'] / floor_ms:.1f}x that"
        )
        replay, update = res["replayed_matmul_ms"], res["ours"]["optimizer"]
        print(
            f"{name:<16}REPLAY the step's own matmul calls, each run alone at its shapes: {replay:.1f} ms; "
            f"+ update {update:.1f} ms = {replay + update:.1f} ms; measured step = "
            f"{res['ours']['step'] / (replay + update):.2f}x that"
        )
        sys.stdout.flush()
    if args.scaling:
        results["scaling"] = scaling(args.repeats)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


def scaling(repeats: int) -> dict:
    """Step time vs output width (TMS n_features, 16 probes) and vs C (TMS 40-10)."""
    out: dict = {"width": {}, "C": {}}
    print("\nstep time vs output width (TMS n_features -> 10 hidden, C 40, 16 probes, batch 256)")
    for width in (10, 100, 1000, 10_000):
        res = in_subprocess(measure_width, width, repeats)
        out["width"][width] = res
        print(f"  width {width:>6}: step {res['step']:8.2f} ms  attribution {res['attribution']:8.2f} ms")
    print("step time vs C (TMS 40-10, exact attributions)")
    for c in (10, 40, 160, 640):
        res = in_subprocess(measure_case, "tms-40-10", repeats, c, None, False)["ours"]
        out["C"][c] = res
        print(f"  C {c:>5}: step {res['step']:8.2f} ms  attribution {res['attribution']:8.2f} ms")
    return out


def measure_width(width: int, repeats: int) -> dict:
    keep_freed_memory()
    from apd_lens.models.tms import TMS, TMSData

    model = TMS(width, 10)  # output width = n_features
    config = APDConfig(n_components=40, topk=2.0, batch_size=256, attribution_probes=16, progress=False)
    dec = Decomposition(model, model.apd_weight_specs(), config)
    return time_steps(dec, TMSData(width, 256, seed=1).sample(), repeats)


if __name__ == "__main__":
    main()
