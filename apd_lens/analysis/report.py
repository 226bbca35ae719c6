"""Report of a finished decomposition run: metrics on fresh data (JSON) and figures."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from apd_lens.analysis.metrics import mmcs_ml2r
from apd_lens.analysis.plotting import plot_tms_components, plt, save_figure
from apd_lens.engine.base import DecompositionBase
from apd_lens.engine.spec import get_parameter
from apd_lens.io import atomic_write_bytes
from apd_lens.loading import load
from apd_lens.methods.apd.decomposition import Decomposition
from apd_lens.methods.spd.decomposition import CI_L0_THRESHOLD, SPDDecomposition
from apd_lens.models.resid_mlp import ResidualMLP

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


STOCHASTIC_SAMPLES = 16
"""SPD: the stochastic-masked output error is averaged over this many mask samples."""


def evaluate(decomposition: DecompositionBase, x: Tensor) -> dict[str, Any]:
    """The method's evaluation on the batch ``x`` (:func:`evaluate_apd` or :func:`evaluate_spd`)."""
    if isinstance(decomposition, SPDDecomposition):
        return evaluate_spd(decomposition, x)
    return evaluate_apd(decomposition, x)


def _relative_faithfulness(decomposition: DecompositionBase) -> dict[str, float]:
    """Per weight: ``||W - Σ parts||² / ||W||²``."""
    targets = decomposition.target_matrices()
    out = {}
    with torch.no_grad():
        for name, parts in decomposition.weight_parts().items():
            spec = decomposition.specs_by_name[name]
            summed = spec.to_matrix(parts.sum(0))
            out[name] = float((targets[name] - summed).square().sum() / targets[name].square().sum())
    return out


def _part_norms(decomposition: DecompositionBase) -> dict[str, list[float]]:
    return {name: parts.flatten(1).norm(dim=1).tolist() for name, parts in decomposition.weight_parts().items()}


def evaluate_spd(decomposition: SPDDecomposition, x: Tensor) -> dict[str, Any]:
    """SPD on the batch ``x``: the output error of the unmasked sum, of the CI-masked model and of the
    stochastic-masked model (mean of STOCHASTIC_SAMPLES samples); per site the CI L0, the subcomponents
    alive (CI > 0.1 on some data point) and how often each is active; relative faithfulness and norms."""
    target_out = decomposition.model(x).detach()
    with torch.no_grad():
        ci = decomposition.causal_importances(x)
        stochastic = [
            _mse(decomposition(x, decomposition.sample_masks(ci)), target_out) for _ in range(STOCHASTIC_SAMPLES)
        ]
        result: dict[str, Any] = {
            "mse_all_subcomponents": _mse(decomposition(x), target_out),
            "mse_ci_masked": _mse(decomposition(x, ci), target_out),
            "mse_stochastic_masked": sum(stochastic) / len(stochastic),
            "ci_l0": {},
            "subcomponents_alive": {},
            "subcomponent_frequency": {},
        }
    for site, g in ci.items():
        active = (g > CI_L0_THRESHOLD).reshape(-1, g.shape[-1]).float()
        result["ci_l0"][site] = float(active.sum(-1).mean())
        result["subcomponents_alive"][site] = int((active.sum(0) > 0).sum())
        result["subcomponent_frequency"][site] = active.mean(0).tolist()
    result["relative_faithfulness"] = _relative_faithfulness(decomposition)
    result["subcomponent_norms"] = _part_norms(decomposition)
    return result


def evaluate_apd(decomposition: Decomposition, x: Tensor) -> dict[str, Any]:
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
    return save_figure(fig, path)


def _plot_frequency(freq: list[float], path: Path, what: str = "component") -> Path:
    fig, ax = plt.subplots(figsize=(max(4, 0.15 * len(freq)), 3))
    ax.bar(range(len(freq)), freq)
    ax.set_xlabel(what)
    ax.set_ylabel("fraction of data points active")
    return save_figure(fig, path)


def write_report(run_dir: str | Path, model: nn.Module, data: Iterable, out: str | Path) -> dict[str, Any]:
    """Load the decomposition saved in ``run_dir`` onto ``model`` (either method), evaluate it on one
    batch of ``data`` and write ``metrics.json`` and figures to ``out``; returns the metrics."""
    run_dir, out = Path(run_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    decomposition = load(run_dir, model)
    x = next(iter(data))
    rows = read_metrics(run_dir)
    spd = isinstance(decomposition, SPDDecomposition)
    metrics: dict[str, Any] = {
        "run_dir": str(run_dir),
        "method": decomposition.method,
        "target": type(model).__name__,
        "steps": decomposition.config.steps,
        "n_parts": {name: int(p.shape[0]) for name, p in decomposition.weight_parts().items()},
        "eval_batch": int(x.shape[0]),
        "final_losses": rows[-1] if rows else None,
        "eval": evaluate(decomposition, x),
        "figures": [],
    }
    weights = decomposition.weight_parts()
    targets = {s.name: get_parameter(model, s.name).detach() for s in decomposition.specs}
    if "W" in weights and hasattr(model, "n_hidden"):  # TMS: the paper's feature metrics
        mmcs, ml2r = mmcs_ml2r(weights["W"], targets["W"])
        metrics["eval"].update({"mmcs": mmcs, "ml2r": ml2r})
    figures = []
    if spd and isinstance(model, ResidualMLP):  # the SPD paper's residual-MLP analysis and figures
        from apd_lens.analysis.resid_mlp_spd import analyse_spd_resid_mlp
        from apd_lens.analysis.resid_mlp_spd_plots import plot_spd_resid_mlp_report

        resid = analyse_spd_resid_mlp(decomposition)
        metrics["resid_mlp"] = resid.summary()
        metrics["resid_mlp"]["last_line"] = resid.last_line()
        figures += plot_spd_resid_mlp_report(resid, out, prefix="resid_mlp")
    if rows:
        figures.append(_plot_losses([{k: v for k, v in r.items() if "/" not in k} for r in rows], out / "losses.png"))
    if spd:
        for site, freq in metrics["eval"]["subcomponent_frequency"].items():
            safe = site.replace(":", "_")
            figures.append(_plot_frequency(freq, out / f"subcomponent_frequency_{safe}.png", f"{site} subcomponent"))
    else:
        figures.append(_plot_frequency(metrics["eval"]["component_frequency"], out / "component_frequency.png"))
    for name, comps in weights.items():
        norms = comps.flatten(1).norm(dim=1)
        shown = norms.argsort(descending=True)[:MAX_PANELS].sort().values
        note = "" if len(shown) == len(norms) else f" ({len(shown)} largest of {len(norms)})"
        if targets[name].ndim == 2:
            labels = [f"{int(c)}" for c in shown]
            path = out / f"{'subcomponents' if spd else 'components'}_{name}.png"
            figures.append(plot_tms_components(targets[name], comps[shown], path, title=f"{name}{note}", labels=labels))
    metrics["figures"] = [str(p) for p in figures]
    atomic_write_bytes(out / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())
    return metrics
