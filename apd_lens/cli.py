"""The ``apd-lens`` command line tool.

    apd-lens train-target tms-5-2 --out runs/tms52/target
    apd-lens decompose runs/tms52/target --out runs/tms52/apd --checkpoint-every 1000
    apd-lens decompose runs/tms52/target --out runs/tms52/apd --resume     # after an interruption
    apd-lens decompose runs/tms52/target --out runs/tms52/spd --method spd # SPD instead of APD
    apd-lens report runs/tms52/apd                                         # metrics.json + figures
    apd-lens browse runs/tms52/spd --out runs/tms52/site                   # a page per subcomponent

Every command has ``--help``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save
from torch import nn

from apd_lens.engine.config import DecompositionConfig
from apd_lens.io import apd_lens_version, atomic_write_bytes, read_tensors
from apd_lens.methods import METHODS, get_method

TARGET_FILE = "target.json"
TARGET_WEIGHTS = "model.safetensors"
RUN_FILE = "run.json"


# ------------------------------------------------------------------------------ target kinds
@dataclass(frozen=True)
class TargetKind:
    """How the CLI builds, trains and feeds one kind of toy target."""

    build: Callable[[int], nn.Module]
    """seed -> untrained model"""
    train: Callable[..., list[float]]
    """(model, steps=, batch_size=, seed=, progress=) -> loss history"""
    data: Callable[[nn.Module, int, int], Iterable]
    """(model, batch_size, seed) -> endless resumable data"""
    train_steps: int
    train_batch: int


def _tms(n_features: int, n_hidden: int, steps: int, batch: int, identity: bool = False) -> TargetKind:
    from apd_lens.models.tms import TMS, TMSData, train_tms

    return TargetKind(
        build=lambda seed: TMS(n_features, n_hidden, seed=seed, identity=identity),
        train=train_tms,
        data=lambda model, batch_size, seed: TMSData(model.n_features, batch_size, seed=seed),
        train_steps=steps,
        train_batch=batch,
    )


def _resid_mlp(n_layers: int) -> TargetKind:
    try:
        from apd_lens.models.resid_mlp import ResidMLPData, ResidualMLP, train_resid_mlp
    except ImportError as err:  # pragma: no cover - depends on the installed version
        raise SystemExit(f"resid-mlp-{n_layers} needs apd_lens.models.resid_mlp: {err}") from err
    return TargetKind(
        build=lambda seed: ResidualMLP.paper(n_layers, seed=seed),
        train=train_resid_mlp,
        data=lambda model, batch_size, seed: ResidMLPData(model.n_features, batch_size, seed=seed),
        train_steps=10_000,
        train_batch=2048,
    )


TARGETS: dict[str, Callable[[], TargetKind]] = {
    "tms-5-2": lambda: _tms(5, 2, 5000, 1024),
    "tms-40-10": lambda: _tms(40, 10, 2000, 2048),
    "tms-5-2-id": lambda: _tms(5, 2, 5000, 1024, identity=True),
    "tms-40-10-id": lambda: _tms(40, 10, 2000, 2048, identity=True),
    "resid-mlp-1": lambda: _resid_mlp(1),
    "resid-mlp-2": lambda: _resid_mlp(2),
    "resid-mlp-3": lambda: _resid_mlp(3),
}


def save_target(model: nn.Module, name: str, seed: int, out: Path, info: dict[str, Any]) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(out / TARGET_WEIGHTS, st_save(state))
    meta = {"name": name, "seed": seed, "apd_lens_version": apd_lens_version(), **info}
    atomic_write_bytes(out / TARGET_FILE, (json.dumps(meta, indent=2) + "\n").encode())


def load_target(folder: Path) -> tuple[nn.Module, dict[str, Any], TargetKind]:
    """Rebuild a target saved by ``train-target`` from its folder."""
    file = folder / TARGET_FILE
    if not file.is_file():
        raise SystemExit(f"{folder} holds no trained target ({TARGET_FILE} missing); run `apd-lens train-target`")
    meta = json.loads(file.read_text())
    if meta.get("name") not in TARGETS:
        raise SystemExit(f"{file}: unknown target {meta.get('name')!r}; known: {sorted(TARGETS)}")
    kind = TARGETS[meta["name"]]()
    model = kind.build(meta["seed"])
    try:
        model.load_state_dict(read_tensors(folder / TARGET_WEIGHTS), strict=True)
    except (RuntimeError, ValueError, FileNotFoundError) as err:
        raise SystemExit(f"{folder / TARGET_WEIGHTS} does not hold a {meta['name']} target: {err}") from err
    model.requires_grad_(False)
    return model, meta, kind


# ------------------------------------------------------------------------------ commands
def cmd_train_target(args: argparse.Namespace) -> int:
    kind = TARGETS[args.name]()
    torch.manual_seed(args.seed)
    model = kind.build(args.seed)
    steps = args.steps if args.steps is not None else kind.train_steps
    batch = args.batch_size if args.batch_size is not None else kind.train_batch
    start = time.perf_counter()
    losses = kind.train(model, steps=steps, batch_size=batch, seed=args.seed, progress=not args.no_progress)
    info = {"steps": steps, "batch_size": batch, "final_loss": losses[-1] if losses else None, "losses": losses}
    save_target(model, args.name, args.seed, args.out, info)
    print(f"trained {args.name} ({steps} steps, {time.perf_counter() - start:.1f}s, final loss {losses[-1]:.3g})")
    print(f"saved to {args.out}")
    return 0


def parse_set(items: list[str]) -> dict[str, Any]:
    """``FIELD=VALUE`` strings (``--set``) as config changes; values are JSON where they parse as JSON."""
    changes = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects FIELD=VALUE, got {item!r}")
        try:
            changes[key] = json.loads(value)
        except json.JSONDecodeError:
            changes[key] = value
    return changes


def _build_config(model: nn.Module, args: argparse.Namespace) -> DecompositionConfig:
    from apd_lens.training.loop import default_config

    changes = parse_set(args.set)
    for field in ("steps", "batch_size", "seed", "device"):
        if getattr(args, field) is not None:
            changes[field] = getattr(args, field)
    changes["progress"] = not args.no_progress
    config = default_config(model, args.method, args.preset)
    try:
        return config.replace(**changes)
    except TypeError as err:
        raise SystemExit(f"unknown {type(config).__name__} field in {sorted(changes)}: {err}") from err


def cmd_decompose(args: argparse.Namespace) -> int:
    from apd_lens.training.loop import decompose

    model, meta, kind = load_target(args.target)
    out: Path = args.out
    run_file = out / RUN_FILE
    if args.resume:
        if not run_file.is_file():
            raise SystemExit(f"--resume: {out} holds no run started by `apd-lens decompose` ({RUN_FILE} missing)")
        run = json.loads(run_file.read_text())
        method = get_method(run.get("method", "apd"))
        if args.method is not None and args.method != method.name:
            raise SystemExit(f"--resume: {out} is an {method.name.upper()} run, not {args.method.upper()}")
        config = method.config_class.from_dict(run["config"]).replace(progress=not args.no_progress)
        data_seed = run["data_seed"]
    else:
        args.method = args.method or "apd"
        config = _build_config(model, args)
        data_seed = args.data_seed if args.data_seed is not None else config.seed + 1000
        out.mkdir(parents=True, exist_ok=True)
        shutil.copytree(args.target, out / "target", dirs_exist_ok=True)
        run = {"target": meta["name"], "method": config.method, "config": config.to_dict(), "data_seed": data_seed}
        atomic_write_bytes(run_file, (json.dumps(run, indent=2) + "\n").encode())
    data = kind.data(model, config.batch_size, data_seed)
    start = time.perf_counter()
    decompose(
        model,
        data,
        config,
        run_dir=out,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints,
        resume=True if args.resume else None,
        overwrite=args.overwrite,
        wandb_project=args.wandb_project,
    )
    name = config.method.upper()
    took = time.perf_counter() - start
    print(f"decomposed {meta['name']} with {name} ({config.steps} steps, {took:.1f}s); saved to {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from apd_lens.analysis.report import tms_metric_lines, write_report

    model, meta, kind = load_target(args.run_dir / "target")
    data = kind.data(model, args.eval_batch, args.seed)
    out = args.out if args.out is not None else args.run_dir / "report"
    metrics = write_report(args.run_dir, model, data, out)
    tms = metrics.get("tms", {})
    summary = {k: v for k, v in metrics["eval"].items() if isinstance(v, float) and k not in tms}
    print(" ".join(f"{k}={v:.4g}" for k, v in summary.items()))
    for line in tms_metric_lines(tms) if tms else []:
        print(line)
    if "resid_mlp" in metrics:
        print(metrics["resid_mlp"]["last_line"])
    print(f"report written to {out}")
    return 0


def cmd_browse(args: argparse.Namespace) -> int:
    from apd_lens.browse import BrowseError, browse, serve

    try:
        index = browse(
            args.run_dir,
            args.out,
            prompt=args.prompt,
            target=args.target,
            n_sequences=args.n_sequences,
            reharvest=args.reharvest,
            progress=not args.no_progress,
            load_toy_target=load_target,
        )
    except BrowseError as err:
        raise SystemExit(f"apd-lens browse: {err}") from None
    print(f"site written to {args.out}; open {index.resolve().as_uri()}")
    if args.serve:
        serve(args.out, args.port)
    return 0


# ------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apd-lens", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"apd-lens {apd_lens_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train-target", help="train a toy target model and save it", description="Train a toy target.")
    p.add_argument("name", choices=sorted(TARGETS), help="which toy model")
    p.add_argument("--out", type=Path, required=True, help="folder to save the trained target in")
    p.add_argument("--steps", type=int, help="training steps (default: the paper's)")
    p.add_argument("--batch-size", type=int, help="batch size (default: the paper's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the data (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train_target)

    p = sub.add_parser(
        "decompose",
        help="decompose a trained target with APD or SPD",
        description="Decompose a target saved by train-target; the run folder receives metrics.jsonl, "
        "checkpoints and the saved decomposition (cfg.json, components.safetensors).",
    )
    p.add_argument("target", type=Path, help="folder written by `apd-lens train-target`")
    p.add_argument("--out", type=Path, required=True, help="run folder")
    p.add_argument(
        "--method", choices=sorted(METHODS), help="decomposition method (default apd; with --resume: the run's)"
    )
    p.add_argument(
        "--preset",
        choices=("default", "paper"),
        default="default",
        help="the model's settings: this library's best recipe (default) or the paper's exact ones",
    )
    p.add_argument("--steps", type=int, help="decomposition steps (default: the model's settings for the method)")
    p.add_argument("--batch-size", type=int, help="batch size (default: the preset's)")
    p.add_argument("--seed", type=int, help="seed of the decomposition (default: the config's)")
    p.add_argument("--data-seed", type=int, help="seed of the data (default: seed + 1000)")
    p.add_argument("--device", help="e.g. cpu, cuda (default: the config's)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="any field of the method's config (JSON value)",
    )
    p.add_argument("--checkpoint-every", type=int, help="save a checkpoint every N steps")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints to keep (<1: all)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a previous run in --out")
    p.add_argument("--wandb-project", help="also log to this Weights & Biases project")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_decompose)

    p = sub.add_parser(
        "report",
        help="metrics JSON and figures of a finished run",
        description="Evaluate a decomposition run on fresh data; writes metrics.json and figures.",
    )
    p.add_argument("run_dir", type=Path, help="run folder written by `apd-lens decompose`")
    p.add_argument("--out", type=Path, help="report folder (default RUN_DIR/report)")
    p.add_argument("--eval-batch", type=int, default=4096, help="data points to evaluate on (default 4096)")
    p.add_argument("--seed", type=int, default=12345, help="seed of the evaluation data")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "browse",
        help="a static site to browse a run's subcomponents",
        description="Harvest an SPD run (once; saved in RUN_DIR/harvest) and write a static site (table of "
        "subcomponents, cards, the prompt's attribution graph, clusters) that opens from file://.",
    )
    p.add_argument("run_dir", type=Path, help="run folder (apd-lens decompose, or examples/lm.py)")
    p.add_argument("--out", type=Path, required=True, help="folder for the site")
    p.add_argument("--prompt", help="language models: compute and show this text's attribution graph")
    p.add_argument("--target", type=Path, help="the language-model target's folder (default: found beside the run)")
    p.add_argument("--n-sequences", type=int, default=256, help="held-out inputs to harvest (default 256)")
    p.add_argument("--reharvest", action="store_true", help="harvest again even if the run has a harvest")
    p.add_argument("--serve", action="store_true", help="then serve the site on localhost until Ctrl-C")
    p.add_argument("--port", type=int, default=8000, help="port for --serve (default 8000)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_browse)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
