"""Write the static browsing site of a harvest: the page (shipped in ``apd_lens/browse/static``) and its
data as JavaScript files that assign globals, so that the page works from ``file://`` (where a browser
blocks ``fetch()`` of local files):

- ``data/index.js``: ``window.APD_INDEX = {...}``: the run's summary and one row per subcomponent
  (site, index, density, mean CI, firing count, top tokens, ablation, cluster, card number);
- ``data/cards/<n>.js``: ``APD_CARD(n, {...})``: one subcomponent's card, loaded when it is opened;
- ``data/graph.js`` / ``data/clusters.js``: ``window.APD_GRAPH`` / ``window.APD_CLUSTERS``, the run's
  ``attribution_graph.json`` and ``clusters.json`` when present (else null, with a note saying so).
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

from apd_lens.analysis.harvest import Context, Harvest, SubcomponentCard

GRAPH_FILE = "attribution_graph.json"
CLUSTERS_FILE = "clusters.json"
STATIC_FILES = ("index.html", "app.js", "style.css")
TOP_TOKENS_IN_TABLE = 5


def js_assignment(name: str, value: Any) -> str:
    """``window.NAME = <JSON>;`` (JSON is valid JavaScript; non-ASCII escaped)."""
    return f"window.{name} = {json.dumps(value, allow_nan=False)};\n"


def _finite(x: float | None) -> float | None:
    return None if x is None or x != x else x


def _context(card: SubcomponentCard, ctx: Context) -> dict[str, Any]:
    return {
        "t": [card.label(t) for t in ctx.tokens],
        "ci": [_finite(g) for g in ctx.ci],
        "f": ctx.focus,
        "s": ctx.score,
        "v": ctx.values,
        "q": ctx.sequence,
    }


def card_data(card: SubcomponentCard) -> dict[str, Any]:
    """What a card of the page shows (token ids replaced by their text)."""

    def pairs(items):
        return None if items is None else [[card.label(t), v] for t, v in items]

    return {
        "site": card.site,
        "index": card.index,
        "n_firing": card.n_firing,
        "density": card.density,
        "mean_ci": card.mean_ci,
        "ablation": card.ablation,
        "ablation_metric": card.ablation_metric,
        "current": pairs(card.current_tokens),
        "next": pairs(card.next_tokens),
        "n_firing_with_next": card.n_firing_with_next,
        "promoted": pairs(card.promoted),
        "suppressed": pairs(card.suppressed),
        "top": [_context(card, c) for c in card.top_contexts],
        "sample": [_context(card, c) for c in card.sample_contexts],
    }


def read_optional_json(path: Path) -> tuple[Any, str | None]:
    """(parsed JSON, None) or (None, why not): absent, unreadable or malformed files are a note, not an error."""
    if not path.is_file():
        return None, f"no {path.name} in the run folder"
    try:
        return json.loads(path.read_text()), None
    except (OSError, ValueError) as err:
        return None, f"{path.name} could not be read: {err}"


def _graph(data: Any) -> tuple[Any, str | None]:
    ok = (
        isinstance(data, dict)
        and isinstance(data.get("nodes"), list)
        and isinstance(data.get("edges"), list)
        and all(isinstance(n, dict) and {"id", "position", "site", "subcomponent"} <= n.keys() for n in data["nodes"])
        and all(isinstance(e, dict) and {"source", "target", "weight"} <= e.keys() for e in data["edges"])
    )
    if not ok:
        return None, f"{GRAPH_FILE} lacks nodes (id, position, site, subcomponent) or edges (source, target, weight)"
    return data, None


def _clusters(data: Any) -> tuple[Any, str | None, dict[tuple[str, int], Any]]:
    clusters = data.get("clusters") if isinstance(data, dict) else None
    if not isinstance(clusters, list) or not all(isinstance(c, dict) and "members" in c for c in clusters):
        return None, f"{CLUSTERS_FILE} lacks a list of clusters with members", {}
    member_of = {}
    for i, cluster in enumerate(clusters):
        for m in cluster["members"]:
            if isinstance(m, dict) and "site" in m and "subcomponent" in m:
                member_of[(m["site"], int(m["subcomponent"]))] = cluster.get("id", i)
    return data, None, member_of


def build_site(harvest: Harvest, out: str | Path, *, run_dir: str | Path | None = None, title: str = "") -> Path:
    """Write the site for ``harvest`` into ``out`` (the page, ``data/``); the attribution graph and the
    clusters are read from ``run_dir`` when it holds them. Returns the path of ``index.html``."""
    out = Path(out)
    cards_dir = out / "data" / "cards"
    if cards_dir.exists():
        shutil.rmtree(cards_dir)
    cards_dir.mkdir(parents=True)
    static = resources.files("apd_lens.browse") / "static"
    for name in STATIC_FILES:
        (out / name).write_bytes((static / name).read_bytes())

    notes = {}
    graph = clusters = None
    member_of: dict[tuple[str, int], Any] = {}
    if run_dir is not None:
        graph, notes["graph"] = read_optional_json(Path(run_dir) / GRAPH_FILE)
        if graph is not None:
            graph, notes["graph"] = _graph(graph)
        clusters, notes["clusters"] = read_optional_json(Path(run_dir) / CLUSTERS_FILE)
        if clusters is not None:
            clusters, notes["clusters"], member_of = _clusters(clusters)
    else:
        notes = {"graph": "no run folder given", "clusters": "no run folder given"}

    rows = []
    for n, card in enumerate(harvest.all_cards()):
        (cards_dir / f"{n}.js").write_text(f"APD_CARD({n}, {json.dumps(card_data(card), allow_nan=False)});\n")
        tokens = " ".join(card.label(t) for t, _ in card.current_tokens[:TOP_TOKENS_IN_TABLE])
        cluster = member_of.get((card.site, card.index))
        rows.append(
            [card.site, card.index, card.density, card.mean_ci, card.n_firing, tokens, card.ablation, cluster, n]
        )
    index = {
        "title": title,
        "kind": harvest.kind,
        "n_points": harvest.n_points,
        "n_sequences": harvest.n_sequences,
        "threshold": harvest.threshold,
        "ablation_metric": harvest.ablation_metric,
        "sites": harvest.sites,
        "columns": ["site", "c", "density", "mean_ci", "n_firing", "top_tokens", "ablation", "cluster", "card"],
        "rows": rows,
        "notes": notes,
    }
    data = out / "data"
    (data / "index.js").write_text(js_assignment("APD_INDEX", index))
    (data / "graph.js").write_text(js_assignment("APD_GRAPH", graph))
    (data / "clusters.js").write_text(js_assignment("APD_CLUSTERS", clusters))
    return out / "index.html"
