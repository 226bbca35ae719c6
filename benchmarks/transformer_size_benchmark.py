"""SPD vs APD step time and peak memory on HookedTransformers of growing size, every matrix decomposed.

    python benchmarks/transformer_size_benchmark.py [--sizes s1,s2,s3,s4,s5] [--repeats 3] [--threads N]
                                                    [--budget-s 120] [--memory-gb 16] [--json out.json]

Sizes (untrained models, LNPre, GELU MLP of 4 d_model, sequences of 32 tokens, batch 8 sequences = 256
token positions; every block matrix W_Q, W_K, W_V, W_O, W_in, W_out and the unembedding W_U decomposed):
s1 d_model 64, 2 layers, vocab 1k; s2 128, 2, 4k; s3 256, 4, 8k; s4 512, 4, 16k; s5 768, 6, 32k.
Methods: SPD (C 64 per matrix, CI MLPs of 16 hidden units; ``spd`` with the toy models' layerwise term, one
masked forward per matrix, ``spd-subset`` with the reference's language-model reconstruction loss instead:
one forward with a random subset of the matrices masked per token, no all-masked or layerwise term),
APD with exact attributions (one output probe
per vocabulary entry and position, in chunks of 1024 probes) and APD with 16 random output probes (C 64
components of rank 8 each, batch top-k 2). Each (size, method) runs in its own process under an
address-space limit of ``--memory-gb`` and a wall-clock budget of ``--budget-s`` (building, a warm-up step
and ``--repeats`` timed steps); a method that runs out of either is not tried at the larger sizes.
Prints ms per step (and per section of the step: target forward, masked forwards, backward, ...) and peak
resident memory.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import queue as queue_module
import resource
import time
import traceback

import torch

SIZES = {
    "s1": (64, 2, 1024),
    "s2": (128, 2, 4096),
    "s3": (256, 4, 8192),
    "s4": (512, 4, 16384),
    "s5": (768, 6, 32768),
}
METHODS = ("spd", "spd-subset", "apd-probes", "apd-exact")
N_CTX, BATCH, C = 32, 8, 64


def build(size: str, method: str):
    """(decomposition, batch of tokens) for one size and method."""
    import warnings

    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from apd_lens import APDConfig, SPDConfig
    from apd_lens.adapters import select_weights
    from apd_lens.methods.apd.decomposition import Decomposition
    from apd_lens.methods.spd.decomposition import SPDDecomposition

    d_model, n_layers, vocab = SIZES[size]
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=d_model,
        d_head=64 if d_model >= 128 else 16,
        n_heads=max(1, d_model // 64) if d_model >= 128 else 4,
        d_mlp=4 * d_model,
        d_vocab=vocab,
        n_ctx=N_CTX,
        act_fn="gelu",
        normalization_type="LNPre",
        device="cpu",
        seed=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(cfg)
    model.requires_grad_(False)
    specs = select_weights(model, ["blocks.*.attn.W_[QKVO]", "blocks.*.mlp.W_*", "unembed.W_U"])
    if method.startswith("spd"):
        lean = {
            "stochastic_recon_subset_coeff": 1.0,
            "stochastic_recon_coeff": 0.0,
            "stochastic_recon_layerwise_coeff": 0.0,
        }
        config = SPDConfig(
            n_subcomponents=C,
            batch_size=BATCH,
            output_loss="kl",
            progress=False,
            **(lean if method == "spd-subset" else {}),
        )
        dec = SPDDecomposition(model, specs, config)
    else:
        exact = {"attribution_chunk": 1024} if method == "apd-exact" else {"attribution_probes": 16}
        config = APDConfig(
            n_components=C, rank=8, topk=2.0, batch_size=BATCH, output_loss="kl", progress=False, **exact
        )
        dec = Decomposition(model, specs, config)
    tokens = torch.randint(0, vocab, (BATCH, N_CTX), generator=torch.Generator().manual_seed(0))
    return dec, tokens


def measure(size: str, method: str, repeats: int, memory_gb: float, out) -> None:
    """In the case's process: time ``repeats`` steps after one warm-up; put the result (or error) on ``out``."""
    resource.setrlimit(resource.RLIMIT_AS, (int(memory_gb * 2**30), resource.RLIM_INFINITY))
    try:
        from step_benchmark import time_steps  # this directory is on sys.path when run as a script

        dec, tokens = build(size, method)
        start = time.perf_counter()
        times = time_steps(dec, tokens, repeats)
        out.put(
            {
                "step_ms": times["step"],
                "sections_ms": {k: v for k, v in times.items() if k != "step"},
                "seconds": time.perf_counter() - start,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "n_parameters_decomposed": sum(p.numel() for p in dec.trainable_parameters()),
            }
        )
    except (MemoryError, RuntimeError) as err:  # torch reports a failed allocation as a RuntimeError
        out.put(
            {"error": "out of memory" if "alloc" in str(err).lower() or isinstance(err, MemoryError) else repr(err)}
        )
    except Exception as err:
        out.put(
            {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}", "traceback": traceback.format_exc()}
        )


def run_case(size: str, method: str, repeats: int, budget_s: float, memory_gb: float) -> dict:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=measure, args=(size, method, repeats, memory_gb, out))
    start = time.perf_counter()
    proc.start()
    try:
        result = out.get(timeout=budget_s)
    except queue_module.Empty:
        result = {"error": f"over the {budget_s:.0f} s budget"}
        proc.kill()
    proc.join()
    if proc.exitcode not in (0, None) and "error" not in result:
        result = {"error": f"killed (exit code {proc.exitcode})"}
    result["wall_s"] = time.perf_counter() - start
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--budget-s", type=float, default=120.0)
    parser.add_argument("--memory-gb", type=float, default=16.0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        import os

        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {BATCH} x {N_CTX} tokens, C {C}")
    results: dict[str, dict[str, dict]] = {}
    stopped: dict[str, str] = {}
    for size in args.sizes.split(","):
        d_model, n_layers, vocab = SIZES[size]
        results[size] = {}
        for method in args.methods.split(","):
            if method in stopped:
                results[size][method] = {"error": f"not tried: {stopped[method]}"}
            else:
                results[size][method] = run_case(size, method, args.repeats, args.budget_s, args.memory_gb)
                if "error" in results[size][method]:
                    stopped[method] = f"{results[size][method]['error']} at {size}"
            r = results[size][method]
            what = r["error"] if "error" in r else f"{r['step_ms']:10.1f} ms/step  peak {r['peak_rss_mb']:7.0f} MB"
            print(f"{size} (d_model {d_model}, {n_layers} layers, vocab {vocab}) {method:<11} {what}", flush=True)
            if "sections_ms" in r:  # where the step's time goes, largest first
                parts = sorted(r["sections_ms"].items(), key=lambda kv: -kv[1])
                print("    " + ", ".join(f"{k} {v:.0f} ms ({v / r['step_ms']:.0%})" for k, v in parts), flush=True)
        probes = results[size].get("apd-probes", {})
        for spd_kind in ("spd", "spd-subset"):
            spd = results[size].get(spd_kind, {})
            if "step_ms" in spd and "step_ms" in probes:
                ratio = probes["step_ms"] / spd["step_ms"]
                print(f"{size} RATIO apd-probes/{spd_kind} per step {ratio:.2f}x", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
