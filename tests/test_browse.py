"""The browsing site (apd_lens.browse): files, data against the harvest, the run loader's errors, the CLI."""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformer_lens.HookedTransformer")

from apd_lens import APDConfig, Decomposition, SPDConfig, SPDDecomposition  # noqa: E402
from apd_lens.adapters import specs_for_model  # noqa: E402
from apd_lens.analysis.harvest import harvest  # noqa: E402
from apd_lens.browse import BrowseError, OpenedRun, build_site, harvest_run, make_server, open_run  # noqa: E402
from apd_lens.cli import load_target, main, save_target  # noqa: E402
from apd_lens.models.tms import TMS  # noqa: E402
from tests.test_harvest import CTX, VOCAB  # noqa: E402
from tests.transformer_checks import spread_ci_, tiny_lm  # noqa: E402

ODD_STRINGS = ["\n", "</script>", 'a"b', "\u2028"]
TOKEN_STRINGS = ODD_STRINGS + [f" t{i}" for i in range(len(ODD_STRINGS), VOCAB)]


def parse_assignment(text: str, name: str):
    prefix = f"window.{name} = "
    assert text.startswith(prefix) and text.rstrip().endswith(";")
    return json.loads(text[len(prefix) :].rstrip()[:-1])


def parse_card(text: str) -> tuple[int, dict]:
    match = re.fullmatch(r"APD_CARD\((\d+), (.*)\);\s*", text, flags=re.S)
    assert match, text[:80]
    return int(match.group(1)), json.loads(match.group(2))


def tiny_lm_harvest():
    """A tiny HookedTransformer's SPD decomposition (CI spread out), its tokens and their harvest."""
    model = tiny_lm(VOCAB, CTX)
    dec = spread_ci_(SPDDecomposition(model, specs_for_model(model), SPDConfig(n_subcomponents=3, seed=1)))
    tokens = torch.randint(0, VOCAB, (5, CTX), generator=torch.Generator().manual_seed(4))
    result = harvest(dec, tokens, batch_size=2, n_top=3, n_samples=2, token_strings=TOKEN_STRINGS, progress=False)
    return dec, tokens, result


@pytest.fixture(scope="module")
def lm_harvest():
    return tiny_lm_harvest()


def test_site_files_and_data_match_the_harvest(lm_harvest, tmp_path):
    _, _, result = lm_harvest
    index_html = build_site(result, tmp_path / "site", run_dir=tmp_path, title="tiny")
    site = index_html.parent
    for name in ("index.html", "app.js", "style.css", "data/index.js", "data/graph.js", "data/clusters.js"):
        assert (site / name).is_file(), name
    html = index_html.read_text()
    assert "http://" not in html and "https://" not in html  # no CDN
    index = parse_assignment((site / "data/index.js").read_text(), "APD_INDEX")
    cards = result.all_cards()
    assert len(index["rows"]) == len(cards) == len(list((site / "data/cards").iterdir()))
    assert index["notes"]["graph"] == "no attribution_graph.json in the run folder"
    assert parse_assignment((site / "data/graph.js").read_text(), "APD_GRAPH") is None
    for row, card in zip(index["rows"], cards, strict=True):
        site_name, c, density, mean_ci, n_firing, tokens, ablation, cluster, n = row
        assert (site_name, c, n_firing, cluster) == (card.site, card.index, card.n_firing, None)
        assert density == card.density and mean_ci == card.mean_ci and ablation == card.ablation
        assert tokens == " ".join(TOKEN_STRINGS[t] for t, _ in card.current_tokens[:5])
        number, data = parse_card((site / f"data/cards/{n}.js").read_text())
        assert number == n and data["density"] == card.density and data["n_firing"] == card.n_firing
        assert data["current"] == [[TOKEN_STRINGS[t], k] for t, k in card.current_tokens]
        for shown, ctx in zip(data["top"], card.top_contexts, strict=True):
            assert shown["t"] == [TOKEN_STRINGS[t] for t in ctx.tokens]
            assert shown["ci"] == ctx.ci and shown["f"] == ctx.focus and shown["s"] == ctx.score
        if card.promoted is not None:
            assert data["promoted"] == [[TOKEN_STRINGS[t], v] for t, v in card.promoted]


def test_graph_and_clusters_are_shown_when_present_and_malformed_ones_noted(lm_harvest, tmp_path):
    _, _, result = lm_harvest
    graph = {
        "prompt_tokens": ["a", "b"],
        "nodes": [
            {"id": "0:blocks.0.mlp.W_in:1", "position": 0, "site": "blocks.0.mlp.W_in", "subcomponent": 1, "ci": 0.5},
            {"id": "1:blocks.0.mlp.W_out:2", "position": 1, "site": "blocks.0.mlp.W_out", "subcomponent": 2, "ci": 1},
        ],
        "edges": [{"source": "0:blocks.0.mlp.W_in:1", "target": "1:blocks.0.mlp.W_out:2", "weight": -0.25}],
    }
    clusters = {"clusters": [{"id": 7, "members": [{"site": "blocks.0.mlp.W_in", "subcomponent": 1}]}], "cost": 3.5}
    (tmp_path / "attribution_graph.json").write_text(json.dumps(graph))
    (tmp_path / "clusters.json").write_text(json.dumps(clusters))
    site = build_site(result, tmp_path / "site", run_dir=tmp_path).parent
    assert parse_assignment((site / "data/graph.js").read_text(), "APD_GRAPH") == graph
    assert parse_assignment((site / "data/clusters.js").read_text(), "APD_CLUSTERS") == clusters
    rows = parse_assignment((site / "data/index.js").read_text(), "APD_INDEX")["rows"]
    assert {(r[0], r[1]) for r in rows if r[7] == 7} == {("blocks.0.mlp.W_in", 1)}
    (tmp_path / "attribution_graph.json").write_text('{"nodes": 3}')
    (tmp_path / "clusters.json").write_text("not json")
    site = build_site(result, tmp_path / "site", run_dir=tmp_path).parent
    notes = parse_assignment((site / "data/index.js").read_text(), "APD_INDEX")["notes"]
    assert "lacks nodes" in notes["graph"] and "could not be read" in notes["clusters"]
    assert parse_assignment((site / "data/graph.js").read_text(), "APD_GRAPH") is None


def toy_run(folder: Path, *, target_seed: int = 0, silent: bool = False) -> Path:
    """A run folder as `apd-lens decompose` writes it (cfg.json, components, target/), with spread CI."""
    model = TMS(5, 2, seed=0)
    dec = spread_ci_(SPDDecomposition(model, model.apd_weight_specs(), SPDConfig(n_subcomponents=4, seed=2)))
    if silent:
        with torch.no_grad():
            for sub in dec.subcomponents.values():
                for fn in sub.ci_fns:
                    fn.b_out.fill_(-50.0)
    dec.save(folder)
    save_target(TMS(5, 2, seed=target_seed), "tms-5-2", target_seed, folder / "target", {})
    return folder


def test_cli_browse_of_a_toy_run_harvests_once_and_builds_the_site(tmp_path, capsys):
    run = toy_run(tmp_path / "run")
    assert main(["browse", str(run), "--out", str(tmp_path / "site"), "--n-sequences", "64", "--no-progress"]) == 0
    assert (run / "harvest" / "index.json").is_file()
    index = parse_assignment((tmp_path / "site/data/index.js").read_text(), "APD_INDEX")
    assert index["kind"] == "features" and index["n_points"] == 64 and index["sites"] == ["W", "W:use1"]
    assert "open file://" in capsys.readouterr().out
    stamp = (run / "harvest" / "index.json").stat().st_mtime_ns
    main(["browse", str(run), "--out", str(tmp_path / "site2"), "--no-progress"])  # reuses the saved harvest
    assert (run / "harvest" / "index.json").stat().st_mtime_ns == stamp


def test_bad_runs_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BrowseError, match="holds no run"):
        open_run(tmp_path / "empty", load_toy_target=load_target)
    with pytest.raises(SystemExit, match="holds no run"):
        main(["browse", str(tmp_path / "empty"), "--out", str(tmp_path / "site")])
    with pytest.raises(BrowseError, match="is not a folder"):
        open_run(tmp_path / "missing")
    other = toy_run(tmp_path / "other", target_seed=1)  # the target folder holds another model
    with pytest.raises(BrowseError, match="not a decomposition of the target"):
        open_run(other, load_toy_target=load_target)
    lm_run = tmp_path / "lm_run"
    toy_run(lm_run)
    (lm_run / "target" / "target.json").unlink()
    with pytest.raises(BrowseError, match="cannot find the target"):
        open_run(lm_run)
    with pytest.raises(BrowseError, match="no saved language-model target"):
        open_run(lm_run, target=tmp_path / "empty")
    with pytest.raises(BrowseError, match="is a toy run: pass load_toy_target"):
        open_run(other)
    apd = tmp_path / "apd"
    model = TMS(5, 2, seed=0)
    Decomposition(model, model.apd_weight_specs(), APDConfig(n_components=3)).save(apd)
    save_target(model, "tms-5-2", 0, apd / "target", {})
    with pytest.raises(BrowseError, match="holds an APD run; browsing needs SPD"):
        open_run(apd, load_toy_target=load_target)
    silent = open_run(toy_run(tmp_path / "silent", silent=True), n_sequences=32, load_toy_target=load_target)
    with pytest.raises(BrowseError, match="no subcomponent fires"):
        harvest_run(silent, progress=False)
    with pytest.raises(BrowseError, match="needs a language-model run"):
        silent.encode_prompt("hello")


class WordTokenizer:
    """A stand-in tokenizer: one id per word, ``int(word)``."""

    class Encoding:
        def __init__(self, ids):
            self.ids = ids

    def encode(self, text):
        return self.Encoding([int(w) for w in text.split()])


def test_bad_prompts_are_clear_errors(lm_harvest):
    dec, tokens, _ = lm_harvest
    run = OpenedRun(Path("."), dec, "lm", tokens, TOKEN_STRINGS, WordTokenizer())
    assert run.encode_prompt("1 2 3").tolist() == [[1, 2, 3]]
    with pytest.raises(BrowseError, match="tokenizes to nothing"):
        run.encode_prompt("   ")
    with pytest.raises(BrowseError, match="more than the model's context"):
        run.encode_prompt(" ".join(["1"] * (CTX + 1)))
    with pytest.raises(BrowseError, match="outside the model's vocabulary"):
        run.encode_prompt(f"1 {VOCAB}")


def test_serve_serves_the_site(lm_harvest, tmp_path):
    _, _, result = lm_harvest
    build_site(result, tmp_path / "site")
    server = make_server(tmp_path / "site", port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/data/index.js"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert parse_assignment(response.read().decode(), "APD_INDEX")["n_points"] == result.n_points
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(FileNotFoundError, match="no built site"):
        make_server(tmp_path, port=0)


def test_a_prompts_attribution_graph_is_saved_with_the_run_and_shown(lm_harvest, tmp_path):
    pytest.importorskip("apd_lens.analysis.attribution_graph")
    from apd_lens.browse.command import graph_of_prompt

    dec, tokens, result = lm_harvest
    run = OpenedRun(tmp_path, dec, "lm", tokens, TOKEN_STRINGS, WordTokenizer())
    line = graph_of_prompt(run, "1 2 3")
    saved = json.loads((tmp_path / "attribution_graph.json").read_text())
    assert saved["prompt_tokens"] == TOKEN_STRINGS[1:4] and line.startswith("attribution graph of 3 tokens")
    site = build_site(result, tmp_path / "site", run_dir=tmp_path).parent
    assert parse_assignment((site / "data/graph.js").read_text(), "APD_GRAPH") == saved


def test_cli_browse_of_a_language_model_run_with_a_prompt(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    from apd_lens.models.lm import load_or_train_lm_target
    from tests.test_lm_target import TINY, make_corpus

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    torch.manual_seed(0)
    untrained = dataclasses.replace(TINY, steps=1)  # (the page needs no trained target)
    target = load_or_train_lm_target(tmp_path / "runs" / "lm_target", make_corpus(corpus), untrained, progress=False)
    model = target.model
    dec = spread_ci_(SPDDecomposition(model, specs_for_model(model), SPDConfig(n_subcomponents=4, seed=1)))
    run = tmp_path / "runs" / "lm" / "run"  # examples/lm.py's layout: runs/lm/<run> beside runs/lm_target
    dec.save(run)
    site = tmp_path / "site"
    prompt = "def f"
    argv = ["browse", str(run), "--out", str(site), "--prompt", prompt, "--n-sequences", "4", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "token purity" in printed and "attribution graph of" in printed
    index = parse_assignment((site / "data/index.js").read_text(), "APD_INDEX")
    assert index["kind"] == "tokens" and index["n_points"] == 4 * TINY.n_ctx
    graph = parse_assignment((site / "data/graph.js").read_text(), "APD_GRAPH")
    assert "".join(graph["prompt_tokens"]) == prompt
    purity = json.loads((run / "token_purity.json").read_text())
    assert 0 < purity["subcomponents"]["current_q50"] <= 1 and 0 < purity["mlp_neurons"]["current_q50"] <= 1
    with pytest.raises(SystemExit, match="more than the model's context"):
        main(["browse", str(run), "--out", str(site), "--prompt", prompt * TINY.n_ctx])
    with pytest.raises(SystemExit, match="tokenizes to nothing"):
        main(["browse", str(run), "--out", str(site), "--prompt", ""])
