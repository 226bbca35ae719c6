"""The browsing page in a real headless browser (Debian's Chromium): a card opened by URL and by a click
on the first table row, its numbers checked against the harvest; the attribution graph drawn."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("transformer_lens.HookedTransformer")

from apd_lens.browse import build_site  # noqa: E402
from tests.test_browse import tiny_lm_harvest  # noqa: E402

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium on this machine: `make test` installs Debian's `chromium` when run as root; "
    "elsewhere install it (apt-get install chromium) to run the page in a real browser",
)


def dump_dom(url: str, profile: Path) -> str:
    """The page's DOM after it loaded (card scripts inserted during load delay the load event)."""
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-extensions",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        "--dump-dom",
        url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "<body" in done.stdout, done.stderr[-2000:]
    return done.stdout


def stats(dom: str) -> dict[str, float]:
    return {k: json.loads(v) for k, v in re.findall(r'class="stat" data-key="(\w+)" data-value="([^"]*)"', dom)}


def table_pairs(dom: str, title: str) -> list[tuple[str, float]]:
    match = re.search(rf'<table class="pairs" data-key="{title}">(.*?)</table>', dom, flags=re.S)
    if match is None:
        return []
    cells = re.findall(r'<td class="tok">(.*?)</td><td class="num[^"]*" data-value="([^"]*)"', match.group(1))
    return [(html.unescape(t), json.loads(v)) for t, v in cells]


def shown(token: str) -> str:
    return token.replace("\n", "\u21b5").replace("\t", "\u2192")


def check_card(dom: str, card) -> None:
    assert f'data-card-ready="{card.site}:{card.index}"' in dom
    got = stats(dom)
    assert got["density"] == card.density and got["mean_ci"] == card.mean_ci and got["n_firing"] == card.n_firing
    assert got.get("ablation") == card.ablation
    assert table_pairs(dom, "current token") == [(shown(card.label(t)), n) for t, n in card.current_tokens]
    assert table_pairs(dom, "next token") == [(shown(card.label(t)), n) for t, n in card.next_tokens]
    if card.promoted is not None:
        assert table_pairs(dom, "promotes") == [(shown(card.label(t)), v) for t, v in card.promoted]
    top = re.search(r'<div id="top-contexts">(.*?)</div><h3>', dom, flags=re.S).group(1)
    scores = [json.loads(s) for s in re.findall(r'class="context" data-score="([^"]*)"', top)]
    assert scores == [ctx.score for ctx in card.top_contexts]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    _, _, result = tiny_lm_harvest()
    run_dir = tmp_path_factory.mktemp("run")
    writer = next(c for c in result.alive_cards() if c.site.endswith("mlp.W_out"))
    reader = next(c for c in result.alive_cards() if c.site.endswith("mlp.W_in"))
    graph = {
        "prompt_tokens": ["\n", "x", "</script>"],
        "nodes": [
            {"id": "a", "position": 0, "site": reader.site, "subcomponent": reader.index, "ci": 0.5},
            {"id": "b", "position": 2, "site": writer.site, "subcomponent": writer.index, "ci": 1.0},
            {"id": "o", "position": 2, "site": "output", "subcomponent": 3, "ci": None, "kind": "output"},
        ],
        "edges": [{"source": "a", "target": "b", "weight": 0.3}, {"source": "b", "target": "o", "weight": -1.2}],
    }
    (run_dir / "attribution_graph.json").write_text(json.dumps(graph))
    members = [{"site": c.site, "subcomponent": c.index} for c in (reader, writer)]
    (run_dir / "clusters.json").write_text(json.dumps({"clusters": [{"id": 4, "members": members}]}))
    index = build_site(result, run_dir / "site", run_dir=run_dir)
    return result, index


def test_a_card_opened_by_url_shows_the_harvests_numbers(site, tmp_path):
    result, index = site
    card = max(result.alive_cards(), key=lambda c: (c.promoted is not None, c.ablation is not None, c.n_firing))
    dom = dump_dom(f"{index.as_uri()}#card={card.site}:{card.index}", tmp_path / "profile")
    check_card(dom, card)


def test_clicking_the_first_row_opens_the_densest_subcomponents_card(site, tmp_path):
    result, index = site
    dom = dump_dom(f"{index.as_uri()}?test=click-first", tmp_path / "profile")
    cards = result.all_cards()
    densest = min(range(len(cards)), key=lambda n: (-cards[n].density, n))  # the table's default order
    check_card(dom, cards[densest])
    rows = re.findall(r'<tr data-key="([^"]+)" data-card="\d+"', dom)
    assert len(rows) == min(100, len(result.alive_cards()))
    assert rows[0] == f"{cards[densest].site}:{cards[densest].index}"


def test_the_attribution_graph_and_the_clusters_are_drawn(site, tmp_path):
    _, index = site
    dom = dump_dom(f"{index.as_uri()}?view=graph", tmp_path / "profile")
    svg = re.search(r'<svg [^>]*id="graph-svg".*?</svg>', dom, flags=re.S).group(0)
    assert len(re.findall(r'<circle[^>]*class="node"', svg)) == 3
    widths = [
        float(w) for w in re.findall(r'class="edge" stroke="[^"]+" stroke-opacity="[^"]+" stroke-width="([^"]+)"', svg)
    ]
    colours = re.findall(r'class="edge" stroke="([^"]+)"', svg)
    assert colours == ["#1a5fb4", "#c01c28"] and widths == pytest.approx([0.3 + 5 * 0.3 / 1.2, 5.3])
    assert "&lt;/script&gt;" in svg  # token text is text, not markup
    cluster = re.search(r'<div class="cluster" data-cluster="4">(.*?)</div>', dom, flags=re.S).group(1)
    assert len(re.findall(r"<a>", cluster)) == 2
