"""Report of a finished decomposition run: metrics on fresh data (JSON) and figures."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from apd_lens.analysis.metrics import mmcs_ml2r, n_large
from apd_lens.analysis.plotting import plot_tms_components, plt, save_figure
from apd_lens.engine.base import DecompositionBase
from apd_lens.engine.spec import get_parameter
from apd_lens.io import atomic_write_bytes
from apd_lens.loading import load
from apd_lens.methods.apd.decomposition import Decomposition
from apd_lens.methods.spd.decomposition import CI_L0_THRESHOLD, SPDDecomposition
from apd_lens.models.resid_mlp import ResidualMLP

MAX_PANELS = 40
"""A parts figure draws at most this many live parts (the largest)."""

STRAY_NORM_FRAC = 0.01
"""A part (component or subcomponent) whose norm is at most this fraction of the largest one's is
stray: the filtered TMS feature metrics (``mmcs_ml2r(..., min_norm_frac=0.01)``, as examples/tms.py and
the README report them) leave it out, and the parts figures count it as dead instead of drawing it."""


def read_metrics(run_dir: str | Path) -> list[dict[str, int | float]]:
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


def live_parts(parts: Float[Tensor, "C ..."]) -> Int[Tensor, " n_live"]:
    """Indices of the parts whose norm is above STRAY_NORM_FRAC of the largest, largest norm first."""
    norms = parts.detach().flatten(1).norm(dim=1)
    order = norms.argsort(descending=True, stable=True)
    return order[norms[order] > STRAY_NORM_FRAC * norms.max()]


def tms_feature_metrics(parts: Float[Tensor, "C F d"], target: Float[Tensor, "F d"]) -> dict[str, float | int]:
    """MMCS and ML2R of a TMS decomposition's ``W`` parts twice: over all parts (the papers' metrics)
    and over the parts above STRAY_NORM_FRAC of the largest norm (the figure the examples print)."""
    mmcs, ml2r = mmcs_ml2r(parts, target)
    large_mmcs, large_ml2r = mmcs_ml2r(parts, target, min_norm_frac=STRAY_NORM_FRAC)
    return {
        "mmcs": mmcs,
        "ml2r": ml2r,
        "mmcs_large_parts": large_mmcs,
        "ml2r_large_parts": large_ml2r,
        "n_parts": int(parts.shape[0]),
        "n_large_parts": n_large(parts, STRAY_NORM_FRAC),
    }


def tms_metric_lines(tms: dict[str, float | int]) -> list[str]:
    """:func:`tms_feature_metrics` as two labelled lines (all parts; the parts the examples keep)."""
    large = f"the {tms['n_large_parts']} parts above {STRAY_NORM_FRAC:.0%} of the largest norm (as the examples)"
    return [
        f"TMS W, all {tms['n_parts']} parts (the papers' metrics): MMCS={tms['mmcs']:.4f} ML2R={tms['ml2r']:.4f}",
        f"TMS W, {large}: MMCS={tms['mmcs_large_parts']:.4f} ML2R={tms['ml2r_large_parts']:.4f}",
    ]


def _plot_parts(target: Tensor, parts: Tensor, path: Path, name: str, what: str) -> Path:
    """The live parts (:func:`live_parts`, at most MAX_PANELS), largest norm first, next to the
    target; the dead ones are counted in the title, not drawn."""
    live = live_parts(parts)
    shown = live[:MAX_PANELS]
    title = f"{name}: {len(live)} live {what}s of {len(parts)}, largest norm first"
    n_dead = len(parts) - len(live)
    if n_dead:
        title += f"; {n_dead} dead (norm <= {STRAY_NORM_FRAC:g} x largest) not drawn"
    if len(shown) < len(live):
        title += f"; {len(live) - len(shown)} smaller live not drawn"
    labels = [f"{int(c)}" for c in shown]
    return plot_tms_components(target, parts[shown], path, title=title, labels=labels)


def _plot_losses(rows: list[dict[str, int | float]], path: Path) -> Path:
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
    if "W" in weights and hasattr(model, "n_hidden"):  # TMS: the papers' feature metrics, and the examples'
        metrics["tms"] = tms_feature_metrics(weights["W"], targets["W"])
        metrics["eval"].update({k: metrics["tms"][k] for k in ("mmcs", "ml2r")})
    metrics["live_parts"] = {name: len(live_parts(parts)) for name, parts in weights.items()}
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
    what = "subcomponent" if spd else "component"
    for name, parts in weights.items():
        if targets[name].ndim == 2:
            figures.append(_plot_parts(targets[name], parts, out / f"{what}s_{name}.png", name, what))
    metrics["figures"] = [str(p) for p in figures]
    atomic_write_bytes(out / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())
    return metrics
