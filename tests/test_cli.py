"""The ``apd-lens`` command line tool, each command run end to end with few steps."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from apd_lens.cli import main
from apd_lens.models.tms import TMS, TMSData

ROOT = Path(__file__).resolve().parents[1]


def test_console_script_is_declared_and_help_works_everywhere(capsys):
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, func = scripts["apd-lens"].split(":")
    assert getattr(importlib.import_module(module), func) is main
    for argv in ([], ["train-target"], ["decompose"], ["report"]):
        with pytest.raises(SystemExit) as exit_:
            main([*argv, "--help"])
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: apd-lens") and "--help" in out
    proc = subprocess.run([sys.executable, "-m", "apd_lens.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for command in ("train-target", "decompose", "report"):
        assert command in proc.stdout


def brute_mmcs_ml2r(components: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """Feature by feature, component by component (the slow obvious way)."""
    cos_sum = ratio_sum = 0.0
    for j in range(target.shape[0]):
        best, best_c = -2.0, 0
        for c in range(components.shape[0]):
            v, w = components[c, j], target[j]
            cos = float(v @ w / (v.norm() * w.norm()))
            if cos > best:
                best, best_c = cos, c
        cos_sum += best
        ratio_sum += float(components[best_c, j].norm() / target[j].norm())
    return cos_sum / target.shape[0], ratio_sum / target.shape[0]


def test_train_decompose_report_end_to_end(tmp_path, capsys):
    target, run = tmp_path / "target", tmp_path / "run"
    assert main(["train-target", "tms-5-2", "--out", str(target), "--steps", "200", "--no-progress"]) == 0
    meta = json.loads((target / "target.json").read_text())
    assert meta["name"] == "tms-5-2" and meta["steps"] == 200
    trained = TMS(5, 2, seed=0)
    trained.load_state_dict(load_file(target / "model.safetensors"))
    x = TMSData(5, 2000, seed=99).sample()
    with torch.no_grad():
        assert (trained(x) - x).square().mean() < (TMS(5, 2, seed=0)(x) - x).square().mean()

    argv = ["decompose", str(target), "--out", str(run), "--steps", "30", "--batch-size", "64"]
    assert main([*argv, "--checkpoint-every", "10", "--set", "simplicity_coeff=0.5", "--no-progress"]) == 0
    cfg = json.loads((run / "cfg.json").read_text())["config"]
    # top-k: the TMS 5-2 default
    assert (cfg["steps"], cfg["batch_size"], cfg["simplicity_coeff"], cfg["topk"]) == (30, 64, 0.5, 0.15)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000000020.ckpt", "step_000000030.ckpt"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 29]

    assert main(["report", str(run), "--eval-batch", "500"]) == 0
    out = capsys.readouterr().out
    assert "parts (the papers' metrics): MMCS=" in out and "largest norm (as the examples): MMCS=" in out
    report = json.loads((run / "report" / "metrics.json").read_text())
    tensors = load_file(run / "components.safetensors")
    components = tensors["W.A"] @ tensors["W.B"]
    W = trained.W.detach()
    mmcs, ml2r = brute_mmcs_ml2r(components, W)
    assert report["eval"]["mmcs"] == pytest.approx(mmcs, abs=1e-5)
    assert report["eval"]["ml2r"] == pytest.approx(ml2r, abs=1e-5)
    faith = float((W - components.sum(0)).square().sum() / W.square().sum())
    assert report["eval"]["relative_faithfulness"]["W"] == pytest.approx(faith, rel=1e-4)
    assert report["final_losses"] == rows[-1]
    assert report["eval_batch"] == 500
    # batch top-k keeps int(0.15 * 500) = 75 (point, component) pairs
    assert report["eval"]["mean_active_components"] == pytest.approx(75 / 500)
    for fig in report["figures"]:
        assert Path(fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {Path(f).name for f in report["figures"]} == {"losses.png", "component_frequency.png", "components_W.png"}


def test_decompose_resume_after_interruption(tmp_path):
    target = tmp_path / "target"
    main(["train-target", "tms-5-2", "--out", str(target), "--steps", "20", "--no-progress"])
    argv = ["decompose", str(target), "--steps", "12", "--batch-size", "32", "--checkpoint-every", "4"]
    main([*argv, "--out", str(tmp_path / "a"), "--keep-checkpoints", "0", "--no-progress"])
    main([*argv, "--out", str(tmp_path / "b"), "--keep-checkpoints", "0", "--no-progress"])
    # make b look like a run killed after its step-4 checkpoint
    for name in ("cfg.json", "components.safetensors"):
        (tmp_path / "b" / name).unlink()
    for late in ("step_000000008.ckpt", "step_000000012.ckpt"):
        (tmp_path / "b" / "checkpoints" / late).unlink()
    assert main(["decompose", str(target), "--out", str(tmp_path / "b"), "--resume", "--no-progress"]) == 0
    a = load_file(tmp_path / "a" / "components.safetensors")
    b = load_file(tmp_path / "b" / "components.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(FileExistsError, match="already holds a run"):
        main([*argv, "--out", str(tmp_path / "a"), "--no-progress"])


def test_cli_errors_are_clear(tmp_path):
    with pytest.raises(SystemExit, match="holds no trained target"):
        main(["decompose", str(tmp_path), "--out", str(tmp_path / "run")])
    target = tmp_path / "target"
    main(["train-target", "tms-5-2", "--out", str(target), "--steps", "5", "--no-progress"])
    with pytest.raises(SystemExit, match="unknown APDConfig field"):
        main(["decompose", str(target), "--out", str(tmp_path / "r1"), "--set", "no_such_field=1"])
    with pytest.raises(SystemExit, match="--set expects FIELD=VALUE"):
        main(["decompose", str(target), "--out", str(tmp_path / "r2"), "--set", "steps"])
    with pytest.raises(ValueError, match="topk must be > 0"):
        main(["decompose", str(target), "--out", str(tmp_path / "r3"), "--set", "topk=-1"])
    with pytest.raises(SystemExit, match="holds no run started by"):
        main(["decompose", str(target), "--out", str(tmp_path / "r4"), "--resume"])
    with pytest.raises(SystemExit) as exit_:
        main(["train-target", "tms-3-1", "--out", str(tmp_path / "x")])
    assert exit_.value.code == 2


def test_spd_train_decompose_resume_report(tmp_path, capsys):
    """SPD through the CLI on TMS 5-2 with the identity: decompose, resume (the run's method), report."""
    target = tmp_path / "target"
    assert main(["train-target", "tms-5-2-id", "--out", str(target), "--steps", "50", "--no-progress"]) == 0
    argv = [
        "decompose",
        str(target),
        "--method",
        "spd",
        "--steps",
        "8",
        "--batch-size",
        "32",
        "--checkpoint-every",
        "4",
    ]
    sets = ["--set", "n_subcomponents=5", "--set", "faithfulness_warmup_steps=3", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "a"), "--keep-checkpoints", "0", *sets]) == 0
    assert main([*argv, "--out", str(tmp_path / "b"), "--keep-checkpoints", "0", *sets]) == 0
    for name in ("cfg.json", "components.safetensors"):
        (tmp_path / "b" / name).unlink()
    (tmp_path / "b" / "checkpoints" / "step_000000008.ckpt").unlink()
    with pytest.raises(SystemExit, match="is an SPD run, not APD"):
        main(["decompose", str(target), "--out", str(tmp_path / "b"), "--resume", "--method", "apd"])
    assert main(["decompose", str(target), "--out", str(tmp_path / "b"), "--resume", "--no-progress"]) == 0
    a = load_file(tmp_path / "a" / "components.safetensors")
    b = load_file(tmp_path / "b" / "components.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {"W.V", "W.U", "I.V", "I.U"} <= set(a)
    assert json.loads((tmp_path / "a" / "cfg.json").read_text())["method"] == "spd"

    assert main(["report", str(tmp_path / "a"), "--eval-batch", "300"]) == 0
    assert "TMS W, all 5 parts (the papers' metrics): MMCS=" in capsys.readouterr().out
    report = json.loads((tmp_path / "a" / "report" / "metrics.json").read_text())
    assert report["method"] == "spd" and report["n_parts"] == {"W": 5, "I": 5}
    W = a["target.W"]
    subcomponents = a["W.V"].T[:, :, None] * a["W.U"][:, None, :]
    mmcs, ml2r = brute_mmcs_ml2r(subcomponents, W)
    assert report["eval"]["mmcs"] == pytest.approx(mmcs, abs=1e-5)
    assert report["eval"]["ml2r"] == pytest.approx(ml2r, abs=1e-5)
    assert set(report["eval"]["ci_l0"]) == {"W", "W:use1", "I"}
    names = {Path(f).name for f in report["figures"]}
    assert {"losses.png", "subcomponents_W.png", "subcomponents_I.png", "subcomponent_frequency_W_use1.png"} <= names


def test_spd_report_prints_both_ml2rs_and_draws_only_live_subcomponents(tmp_path, capsys, monkeypatch):
    """On an SPD TMS run with dead subcomponents the report prints the papers' all-parts MMCS/ML2R and
    the examples' figure over the parts above 1% of the largest norm, each labelled, and its
    subcomponent figure draws only the live ones, largest first (all checked against loops here)."""
    from safetensors.torch import save_file

    from apd_lens.analysis import plotting

    target, run = tmp_path / "target", tmp_path / "run"
    main(["train-target", "tms-5-2", "--out", str(target), "--steps", "20", "--no-progress"])
    argv = ["decompose", str(target), "--out", str(run), "--method", "spd", "--steps", "2", "--batch-size", "16"]
    assert main([*argv, "--set", "n_subcomponents=12", "--no-progress"]) == 0
    # kill 7 of the 12 subcomponents (norm ~1e-4 of the others), as a trained SPD run leaves them
    tensors = load_file(run / "components.safetensors")
    dead = [0, 2, 3, 6, 8, 10, 11]
    tensors["W.V"][:, dead] *= 1e-2
    tensors["W.U"][dead] *= 1e-2
    tensors["W.U"][5] *= 3.0  # one clearly largest part, so the figure's order is checked
    save_file(tensors, run / "components.safetensors")

    V, U, W = tensors["W.V"], tensors["W.U"], tensors["target.W"]
    norms = []
    for c in range(12):
        total = 0.0
        for i in range(V.shape[0]):
            for j in range(U.shape[1]):
                total += float(V[i, c] * U[c, j]) ** 2
        norms.append(total**0.5)
    live = sorted((c for c in range(12) if norms[c] > 0.01 * max(norms)), key=lambda c: -norms[c])
    assert sorted(live) == [c for c in range(12) if c not in dead]

    drawn = {}
    original = plotting.save_figure

    def record(fig, path):
        axes = [ax for ax in fig.axes if ax.axison]
        drawn[Path(path).name] = ([ax.get_title() for ax in axes], fig._suptitle and fig._suptitle.get_text())
        return original(fig, path)

    monkeypatch.setattr(plotting, "save_figure", record)
    assert main(["report", str(run), "--eval-batch", "100"]) == 0
    out = capsys.readouterr().out
    subcomponents = V.T[:, :, None] * U[:, None, :]
    mmcs, ml2r = brute_mmcs_ml2r(subcomponents, W)
    large_mmcs, large_ml2r = brute_mmcs_ml2r(subcomponents[sorted(live)], W)
    assert f"TMS W, all 12 parts (the papers' metrics): MMCS={mmcs:.4f} ML2R={ml2r:.4f}" in out
    examples = f"TMS W, the 5 parts above 1% of the largest norm (as the examples): MMCS={large_mmcs:.4f}"
    assert f"{examples} ML2R={large_ml2r:.4f}" in out
    assert ml2r < 0.5 * large_ml2r  # the stray parts win features and drag the papers' ML2R down
    report = json.loads((run / "report" / "metrics.json").read_text())
    assert report["tms"]["ml2r_large_parts"] == pytest.approx(large_ml2r, abs=1e-5)
    assert report["live_parts"]["W"] == len(live)

    titles, suptitle = drawn["subcomponents_W.png"]
    assert len(titles) - 1 == len(live)  # the target's panel and one per live subcomponent
    assert titles == ["target W"] + [str(c) for c in live]
    assert "5 live subcomponents of 12" in suptitle and "7 dead" in suptitle


def test_report_of_an_spd_residual_mlp_run_has_its_analysis(tmp_path, capsys):
    target, run = tmp_path / "target", tmp_path / "spd"
    main(["train-target", "resid-mlp-3", "--out", str(target), "--steps", "3", "--no-progress"])
    argv = ["decompose", str(target), "--out", str(run), "--method", "spd", "--steps", "3", "--batch-size", "32"]
    assert main([*argv, "--set", "n_subcomponents=20", "--set", "ci_hidden=4", "--no-progress"]) == 0
    assert main(["report", str(run), "--eval-batch", "64"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-2].startswith("FEATURES_OWN=")
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    assert metrics["resid_mlp"]["n_features"] == 102 and len(metrics["resid_mlp"]["features_per_layer"]) == 3
    for name in ("resid_mlp_ci_one_hot.png", "resid_mlp_neuron_contributions.png"):
        assert (run / "report" / name).stat().st_size > 0
