"""A shortened LM decomposition (examples/lm.py) on a slice of real text: it trains, checkpoints,
resumes and loads, and after a short run the decomposed model is close to the target."""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

import pytest

pytest.importorskip("transformer_lens.HookedTransformer")

from examples_runner import run_example  # noqa: E402

from apd_lens.analysis.lm_eval import LMEvaluation  # noqa: E402
from apd_lens.models.lm import LMTargetConfig, load_or_train_lm_target  # noqa: E402
from apd_lens.training.resumable import train_or_continue  # noqa: E402

SLICE = ("bisect.py", "colorsys.py", "keyword.py", "stat.py", "this.py", "fnmatch.py", "glob.py", "shlex.py")
TINY = LMTargetConfig(n_layers=1, d_model=16, n_heads=2, d_mlp=32, n_ctx=16, vocab_size=300, steps=150, batch_size=16)


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory):
    """A tiny target trained on a few real standard-library files."""
    root = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in SLICE:
        shutil.copy(stdlib / name, root / name)
    folder = tmp_path_factory.mktemp("target")
    target = load_or_train_lm_target(folder, root, TINY, progress=False)
    return root, folder, target


def argv(root, folder, out, steps: int) -> list[str]:
    return [
        "--corpus", str(root), "--target", str(folder), "--out", str(out), "--steps", str(steps), "--batch", "4",
        "--n-eval", "8", "--eval-adv-batches", "1", "--checkpoint-every", "20", "--no-progress",
        "--set", "faithfulness_warmup_steps=20",
    ]  # fmt: skip


def test_short_vpd_run_reproduces_the_target_and_resumes(tiny_target, tmp_path, capsys):
    root, folder, target = tiny_target
    result = run_example("lm.py", argv(root, folder, tmp_path, 60))
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("CE_TARGET=") and " CE_CI=" in last and " ADV_KL20=" in last and " ALIVE=" in last
    # thresholds measured on this slice (60 steps): all on equals the target (delta on); CI masks within 10%
    assert abs(result.ce_all_on - result.ce_target) < 1e-4
    assert result.ce_ci < 1.10 * result.ce_target
    assert result.ce_stochastic < 1.10 * result.ce_target
    assert 0 < result.l0_total < result.subcomponents_total
    run_dir = tmp_path / "lm_spd_vpd_seed0"
    assert LMEvaluation.load(run_dir) == result or LMEvaluation.load(run_dir).ce_ci == result.ce_ci

    again = run_example("lm.py", argv(root, folder, tmp_path, 60))  # a finished run is loaded, not retrained
    assert "decomposition loaded" in capsys.readouterr().out
    assert again.ce_ci == pytest.approx(result.ce_ci, rel=1e-6)
    with pytest.raises(ValueError, match="other settings"):
        run_example("lm.py", argv(root, folder, tmp_path, 61))


def test_an_interrupted_run_continues_to_the_same_result(tiny_target, tmp_path):
    import torch

    import apd_lens
    from apd_lens.methods.spd.presets import vpd_config
    from apd_lens.training.checkpoint import latest_checkpoint

    _, _, target = tiny_target
    config = vpd_config(target.model, steps=40, batch_size=4, faithfulness_warmup_steps=5, progress=False)
    whole, _, done = train_or_continue(target.model, target.train_tokens, config, tmp_path / "whole")
    assert done == "trained"
    apd_lens.decompose(  # the same run, then as if killed after its step-20 checkpoint
        target.model, target.train_tokens, config, run_dir=tmp_path / "cut", checkpoint_every=20, keep_checkpoints=0
    )
    (tmp_path / "cut" / "cfg.json").unlink()
    latest_checkpoint(tmp_path / "cut").unlink()
    with pytest.raises(ValueError, match="other settings"):
        train_or_continue(target.model, target.train_tokens, config.replace(lr=1e-3), tmp_path / "cut")
    cut, _, done = train_or_continue(target.model, target.train_tokens, config, tmp_path / "cut")
    assert done == "continued"
    for (name, a), (_, b) in zip(whole.state_dict().items(), cut.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
