"""Report of a finished decomposition run: metrics on fresh data (JSON) and figures."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from apd_lens.analysis.metrics import mmcs_ml2r
from apd_lens.analysis.plotting import plot_tms_components, plt
from apd_lens.engine.spec import get_parameter
from apd_lens.io import atomic_write_bytes
from apd_lens.methods.apd.decomposition import Decomposition

MAX_PANELS = 40


def read_metrics(run_dir: str | Path) -> list[dict[str, float]]:
    """The rows of a run's ``metrics.jsonl`` (a broken last line, from a crash, is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


@torch.no_grad()
def _mse(a: Tensor, b: Tensor) -> float:
    return float((a - b).square().mean())


def evaluate(decomposition: Decomposition, x: Tensor) -> dict[str, Any]:
    """Output errors against the target, active components and faithfulness on the batch ``x``."""
    target_out = decomposition.model(x).detach()
    mask = decomposition.topk_mask(x)
    with torch.no_grad():
        all_out = decomposition(x)
        topk_out = decomposition(x, mask)
    flat = mask.reshape(-1, decomposition.n_components)
    result: dict[str, Any] = {
        "mse_all_components": _mse(all_out, target_out),
        "mse_topk": _mse(topk_out, target_out),
        "mean_active_components": float(flat.sum(-1).mean()),
        "relative_faithfulness": {},
        "component_frequency": flat.mean(0).tolist(),
        "component_norms": {},
    }
    targets = decomposition.target_matrices()
    for name, comp in decomposition.components.items():
        with torch.no_grad():
            residual = targets[name] - comp.summed_matrix()
            result["relative_faithfulness"][name] = float(residual.square().sum() / targets[name].square().sum())
            result["component_norms"][name] = comp.component_matrices().flatten(1).norm(dim=1).tolist()
    return result


def _plot_losses(rows: list[dict[str, float]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    terms = [k for k in rows[0] if k not in ("step", "lr")]
    steps = [r["step"] for r in rows]
    for term in terms:
        ax.plot(steps, [max(r[term], 1e-12) for r in rows], label=term)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_frequency(freq: list[float], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(max(4, 0.15 * len(freq)), 3))
    ax.bar(range(len(freq)), freq)
    ax.set_xlabel("component")
    ax.set_ylabel("fraction of data points active")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(run_dir: str | Path, model: nn.Module, data: Iterable, out: str | Path) -> dict[str, Any]:
    """Load the decomposition saved in ``run_dir`` onto ``model``, evaluate it on one batch of
    ``data`` and write ``metrics.json`` and figures to ``out``; returns the metrics."""
    run_dir, out = Path(run_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    decomposition = Decomposition.load(run_dir, model)
    x = next(iter(data))
    rows = read_metrics(run_dir)
    metrics: dict[str, Any] = {
        "run_dir": str(run_dir),
        "target": type(model).__name__,
        "steps": decomposition.config.steps,
        "n_components": decomposition.n_components,
        "eval_batch": int(x.shape[0]),
        "final_losses": rows[-1] if rows else None,
        "eval": evaluate(decomposition, x),
        "figures": [],
    }
    weights = decomposition.component_weights()
    targets = {s.name: get_parameter(model, s.name).detach() for s in decomposition.specs}
    if list(weights) == ["W"] and hasattr(model, "n_hidden"):  # TMS: the paper's feature metrics
        mmcs, ml2r = mmcs_ml2r(weights["W"], targets["W"])
        metrics["eval"].update({"mmcs": mmcs, "ml2r": ml2r})
    figures = []
    if rows:
        figures.append(_plot_losses(rows, out / "losses.png"))
    figures.append(_plot_frequency(metrics["eval"]["component_frequency"], out / "component_frequency.png"))
    for name, comps in weights.items():
        norms = comps.flatten(1).norm(dim=1)
        shown = norms.argsort(descending=True)[:MAX_PANELS].sort().values
        note = "" if len(shown) == len(norms) else f" ({len(shown)} largest of {len(norms)})"
        if targets[name].ndim == 2:
            figures.append(
                plot_tms_components(targets[name], comps[shown], out / f"components_{name}.png", title=f"{name}{note}")
            )
    metrics["figures"] = [str(p) for p in figures]
    atomic_write_bytes(out / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())
    return metrics
