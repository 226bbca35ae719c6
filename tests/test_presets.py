"""The toy models' two presets: "default" (this library's best recipe) and "paper" (the paper's exact
settings), through the models, ``default_config``, the CLI and the examples' flags."""

from __future__ import annotations

import json

import pytest
import torch

from apd_lens.cli import main
from apd_lens.models.resid_mlp import ResidualMLP
from apd_lens.models.tms import TMS
from apd_lens.training.loop import default_config


def changed_fields(a, b) -> set[str]:
    one, two = a.to_dict(), b.to_dict()
    return {k for k in one if one[k] != two[k]}


def test_apd_presets_differ_by_splitting_and_for_tms_by_merging_and_more():
    extra = {(5, 2): {"topk", "merge_coactive"}, (40, 10): {"merge_coactive", "adopt_orphans"}, 2: {"lr"}}
    for model in (TMS(5, 2), TMS(40, 10), ResidualMLP(n_layers=1), ResidualMLP(n_layers=2)):
        paper, default = model.apd_default_config(preset="paper"), model.apd_default_config()
        assert paper.split_every is None and default.split_every == 500
        assert paper.merge_coactive is None and paper.adopt_orphans is None
        changed = changed_fields(paper, default)
        size = (model.n_features, model.n_hidden) if isinstance(model, TMS) else model.n_layers
        assert "split_every" in changed
        assert changed - {"split_every", "split_until"} == extra.get(size, set())
    paper, default = TMS(5, 2).apd_default_config(preset="paper"), TMS(5, 2).apd_default_config()
    assert (paper.topk, default.topk, default.merge_coactive) == (0.211, 0.15, 0.8)
    default = TMS(40, 10).apd_default_config()
    assert (default.topk, default.merge_coactive, default.adopt_orphans) == (2.0, 0.8, 0.01)
    two_layers = ResidualMLP(n_layers=2)
    assert (two_layers.apd_default_config(preset="paper").lr, two_layers.apd_default_config().lr) == (5e-4, 3e-4)


def test_spd_paper_presets_are_the_reference_codes():
    paper = TMS(5, 2).spd_default_config(preset="paper")
    got = (paper.n_subcomponents, paper.batch_size, paper.lr, paper.steps, paper.importance_minimality_coeff)
    assert got == (20, 4096, 1e-3, 10_000, 3e-3)
    big = TMS(40, 10, identity=True).spd_default_config(preset="paper")
    assert (big.n_subcomponents, big.stochastic_recon_layerwise_coeff, big.importance_p) == (200, 1.0, 2.0)
    assert TMS(40, 10).spd_default_config().stochastic_recon_layerwise_coeff == 3.0


@pytest.mark.parametrize("method", ["apd", "spd"])
def test_default_config_passes_the_preset_on(method):
    model = TMS(40, 10)
    make = getattr(model, f"{method}_default_config")
    assert default_config(model, method, "paper") == make(preset="paper")
    assert default_config(model, method) == make() == default_config(model, method, "default")
    with pytest.raises(ValueError, match="preset must be one of"):
        default_config(model, method, "papers")


def test_a_model_without_its_own_settings_refuses_a_preset():
    with pytest.raises(ValueError, match="no apd_default_config"):
        default_config(torch.nn.Linear(2, 2), "apd", "paper")
    # "default" (the CLI's default) means the method's own defaults there
    assert default_config(torch.nn.Linear(2, 2), "spd", "default") == default_config(torch.nn.Linear(2, 2), "spd")


def test_cli_preset(tmp_path):
    target = tmp_path / "target"
    main(["train-target", "tms-40-10", "--out", str(target), "--steps", "5", "--no-progress"])
    for preset in ("paper", "default"):
        run = tmp_path / preset
        argv = ["decompose", str(target), "--out", str(run), "--preset", preset, "--steps", "2", "--no-progress"]
        assert main(argv) == 0
        saved = json.loads((run / "run.json").read_text())["config"]
        assert saved["split_every"] == (None if preset == "paper" else 500)
