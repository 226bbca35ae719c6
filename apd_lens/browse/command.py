"""What ``apd-lens browse`` does: open the run, harvest it if it has no harvest yet (saved with the
run), compute the prompt's attribution graph if asked (saved with the run), and build the site."""

from __future__ import annotations

import json
from pathlib import Path

from apd_lens.analysis.harvest import (
    FIRING_THRESHOLD,
    Harvest,
    NothingFiresError,
    harvest,
)
from apd_lens.analysis.token_purity import neuron_token_purity, token_purity
from apd_lens.browse.runs import BrowseError, OpenedRun, ToyTargetLoader, open_run
from apd_lens.browse.site import build_site
from apd_lens.io import atomic_write_bytes


def harvest_run(run: OpenedRun, *, batch_size: int = 16, progress: bool = True, **settings) -> Harvest:
    """Harvest the run's data and save it in the run folder."""
    try:
        result = harvest(
            run.decomposition,
            run.data,
            batch_size=batch_size,
            token_strings=run.token_strings,
            progress=progress,
            **settings,
        )
    except NothingFiresError as err:
        raise BrowseError(f"{run.run_dir}: {err}") from err
    result.save(run.run_dir)
    return result


PURITY_FILE = "token_purity.json"


def purity_report(run: OpenedRun, result: Harvest) -> str:
    """Token purity of the alive subcomponents and of the target's MLP neurons on the harvested text,
    saved as ``token_purity.json`` in the run folder; returns a line with both medians."""
    subcomponents = token_purity(result).summary()
    neurons = neuron_token_purity(run.model, run.data).summary()
    report = {"subcomponents": subcomponents, "mlp_neurons": neurons, "n_tokens": result.n_points}
    atomic_write_bytes(run.run_dir / PURITY_FILE, (json.dumps(report, indent=1) + "\n").encode())

    def medians(summary: dict) -> str:
        return " / ".join(f"{summary.get(f'{which}_q50', float('nan')):.3f}" for which in ("current", "next"))

    return (
        f"token purity (current / next token, median): {subcomponents['n_units']} alive subcomponents "
        f"{medians(subcomponents)}; {neurons['n_units']} MLP neurons {medians(neurons)} "
        f"(saved to {run.run_dir / PURITY_FILE})"
    )


def graph_of_prompt(run: OpenedRun, prompt: str) -> str:
    """Compute and save the attribution graph of ``prompt`` (nodes: CI > FIRING_THRESHOLD, as the harvest's
    firing); returns a line saying what happened."""
    tokens = run.encode_prompt(prompt)
    try:
        from apd_lens.analysis.attribution_graph import attribution_graph
    except ImportError as err:
        return f"attribution graph skipped: apd_lens.analysis.attribution_graph is not available ({err})"
    strings = [run.token_strings[i] for i in tokens[0].tolist()]
    graph = attribution_graph(run.decomposition, tokens, ci_threshold=FIRING_THRESHOLD, token_strings=strings)
    graph.save(run.run_dir)
    return f"attribution graph of {tokens.shape[1]} tokens: {len(graph.nodes)} nodes, {len(graph.edges)} edges"


def browse(
    run_dir: str | Path,
    out: str | Path,
    *,
    prompt: str | None = None,
    target: str | Path | None = None,
    n_sequences: int = 256,
    reharvest: bool = False,
    progress: bool = True,
    load_toy_target: ToyTargetLoader | None = None,
) -> Path:
    """Build the site of the run in ``run_dir`` into ``out``; returns the path of its index.html.
    ``load_toy_target``: how to rebuild a toy run's target (:func:`apd_lens.cli.load_target`)."""
    run_dir = Path(run_dir)
    run: OpenedRun | None = None
    if reharvest or prompt is not None or not Harvest.exists(run_dir):
        run = open_run(run_dir, target=target, n_sequences=n_sequences, load_toy_target=load_toy_target)
    if prompt is not None:
        run.encode_prompt(prompt)  # a bad prompt fails before the (long) harvest
    if reharvest or not Harvest.exists(run_dir):
        print(f"harvesting {run.data.shape[0]} {'sequences' if run.kind == 'lm' else 'data points'} of {run_dir}")
        result = harvest_run(run, progress=progress)
        if run.kind == "lm":
            print(purity_report(run, result))
    else:
        result = Harvest.load(run_dir)
    if prompt is not None:
        print(graph_of_prompt(run, prompt))
    return build_site(result, out, run_dir=run_dir, title=run_dir.name)
