"""Checkpoints and resume: an interrupted run continues to the same result, bit for bit (CPU)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import apd_lens
from apd_lens.models.tms import TMS, TMSData
from apd_lens.training.checkpoint import (
    CheckpointError,
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from apd_lens.training.data import DataNotResumableError


def config(**kw):
    base = {"steps": 24, "batch_size": 32, "progress": False, "log_every": 5}
    return TMS(5, 2).apd_default_config().replace(**{**base, **kw})


def make_data(kind: str):
    if kind == "tensor":  # 100 examples, batches of 32: epochs of 3 batches, 4 examples dropped
        return TMSData(5, 100, p=0.2, seed=5).sample()
    if kind == "generator":
        return TMSData(5, 32, p=0.2, seed=5)
    return [TMSData(5, 32, p=0.2, seed=s).sample() for s in range(5)]  # list of 5 batches


def same_components(a, b) -> bool:
    return all(
        torch.equal(a.components[n].A, b.components[n].A) and torch.equal(a.components[n].B, b.components[n].B)
        for n in a.components
    )


@pytest.mark.parametrize("kind", ["tensor", "generator", "list"])
def test_resume_from_a_middle_checkpoint_equals_uninterrupted_run(tmp_path, kind):
    cfg = config()
    plain = apd_lens.decompose(TMS(5, 2), make_data(kind), cfg)  # no run dir, no checkpoints
    full = apd_lens.decompose(
        TMS(5, 2), make_data(kind), cfg, run_dir=tmp_path / "a", checkpoint_every=7, keep_checkpoints=0
    )
    assert same_components(plain, full)  # checkpointing does not perturb the run
    steps = [int(p.stem.split("_")[1]) for p in list_checkpoints(tmp_path / "a")]
    assert steps == [7, 14, 21, 24]
    middle = checkpoint_path(tmp_path / "a", 14)
    resumed = apd_lens.decompose(TMS(5, 2), make_data(kind), cfg, run_dir=tmp_path / "b", resume=middle)
    assert same_components(resumed, plain)
    assert resumed.loss_history == plain.loss_history
    assert (tmp_path / "b" / "metrics.jsonl").read_text() == (tmp_path / "a" / "metrics.jsonl").read_text()
    # a finished run resumes to itself without further steps
    again = apd_lens.decompose(TMS(5, 2), make_data(kind), None, resume=tmp_path / "a")
    assert same_components(again, plain)


def test_vpd_persistent_sources_resume_exactly(tmp_path):
    """SPD with persistent adversarial sources, the global CI MLP and the V/U clip: the sources and their
    Adam moments are checkpointed, so a run resumed from the middle ends where an uninterrupted one does."""
    cfg = TMS(5, 2).spd_default_config().replace(
        steps=12, batch_size=32, progress=False, log_every=3, faithfulness_warmup_steps=3, pgd_recon_coeff=0.5,
        pgd_scope="persistent", pgd_subset_routing=True, ci_fn="global_mlp", grad_clip_subcomponents=0.01,
    )  # fmt: skip
    plain = apd_lens.decompose(TMS(5, 2), make_data("tensor"), cfg)
    run_a = tmp_path / "a"
    apd_lens.decompose(TMS(5, 2), make_data("tensor"), cfg, run_dir=run_a, checkpoint_every=5, keep_checkpoints=0)
    saved = load_checkpoint(checkpoint_path(run_a, 5))["persistent_pgd"]
    assert saved["updates"] == 5 * 3  # 2 warm-up updates and 1 after the backward per step
    assert {k: tuple(s.shape) for k, s in saved["sources"].items()} == {"W": (32, 41), "W:use1": (32, 41)}
    resumed = apd_lens.decompose(
        TMS(5, 2), make_data("tensor"), cfg, run_dir=tmp_path / "b", resume=checkpoint_path(tmp_path / "a", 5)
    )
    for name, t in plain.state_tensors().items():
        assert torch.equal(resumed.state_tensors()[name], t), name
    for key, t in plain.persistent_sources.state_dict()["sources"].items():
        assert torch.equal(resumed.persistent_sources.state_dict()["sources"][key], t)
    assert resumed.loss_history == plain.loss_history


WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    import apd_lens
    from apd_lens.models.tms import TMS, TMSData

    run_dir, slow = Path(sys.argv[1]), sys.argv[2] == "slow"

    class Data(TMSData):
        def sample(self, batch_size=None):
            if slow:
                time.sleep(0.01)
            return super().sample(batch_size)

    model = TMS(5, 2, seed=0)
    cfg = model.apd_default_config().replace(steps=200, batch_size=64, progress=False, log_every=25)
    resume = True if (run_dir / "checkpoints").exists() else None
    apd_lens.decompose(model, Data(5, 64, seed=7), cfg, run_dir=run_dir, checkpoint_every=20, resume=resume)
    """
)


def test_sigkill_then_resume_gives_the_uninterrupted_result(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = [sys.executable, str(script)]
    reference = subprocess.Popen([*run, str(tmp_path / "ref"), "fast"], env=env)
    victim = subprocess.Popen([*run, str(tmp_path / "run"), "slow"], env=env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        found = list_checkpoints(tmp_path / "run")
        if found and int(found[-1].stem.split("_")[1]) >= 40:
            break
        assert victim.poll() is None, "the run finished or failed before it could be killed"
        time.sleep(0.02)
    else:
        pytest.fail("no checkpoint appeared in time")
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    assert not (tmp_path / "run" / "components.safetensors").exists(), "killed after it finished"
    killed_at = int(list_checkpoints(tmp_path / "run")[-1].stem.split("_")[1])
    assert 40 <= killed_at < 200
    subprocess.run([*run, str(tmp_path / "run"), "fast"], env=env, check=True, timeout=180)
    assert reference.wait(timeout=180) == 0
    a = load_file(tmp_path / "ref" / "components.safetensors")
    b = load_file(tmp_path / "run" / "components.safetensors")
    assert a.keys() == b.keys() and {"W.A", "W.B"} <= a.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == (tmp_path / "ref" / "metrics.jsonl").read_text()


def test_damaged_checkpoints_are_refused(tmp_path):
    path = save_checkpoint(tmp_path / "c.ckpt", {"step": 3, "x": torch.arange(1000.0)})
    assert load_checkpoint(path)["step"] == 3
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 100])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_checkpoint(path)
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="checksum does not match"):
        load_checkpoint(path)
    path.write_bytes(b"PK\x03\x04 something else")
    with pytest.raises(CheckpointError, match="not an apd_lens checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        load_checkpoint(tmp_path / "missing.ckpt")


def test_resume_refuses_a_corrupted_newest_checkpoint(tmp_path):
    cfg = config(steps=10)
    apd_lens.decompose(TMS(5, 2), make_data("generator"), cfg, run_dir=tmp_path, checkpoint_every=5)
    newest = list_checkpoints(tmp_path)[-1]
    newest.write_bytes(newest.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=f"{newest.name} is truncated or corrupted"):
        apd_lens.decompose(TMS(5, 2), make_data("generator"), cfg, run_dir=tmp_path, resume=True)


def test_a_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "c.ckpt"
    save_checkpoint(path, {"step": 1})

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("apd_lens.io.os.replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.ckpt"]  # no temporary file left
    # a temporary file left by a killed writer is never taken for a checkpoint
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / ".step_000000010.ckpt.tmp-123").write_bytes(b"partial")
    assert list_checkpoints(tmp_path / "run") == []


def test_unresumable_data_is_refused_clearly(tmp_path, caplog):
    cfg = config(steps=6)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(make_data("tensor")), batch_size=32, shuffle=True
    )
    with caplog.at_level(logging.WARNING, logger="apd_lens.training.loop"):
        apd_lens.decompose(TMS(5, 2), loader, cfg, run_dir=tmp_path / "a", checkpoint_every=3)
    assert "cannot be resumed exactly" in caplog.text
    with pytest.raises(DataNotResumableError, match="DataLoader has no state_dict"):
        apd_lens.decompose(TMS(5, 2), loader, cfg, resume=checkpoint_path(tmp_path / "a", 3), run_dir=tmp_path / "b")
    endless = (x for x in make_data("list") * 10)
    with pytest.raises(DataNotResumableError, match="generator data has no state to save"):
        apd_lens.decompose(TMS(5, 2), endless, cfg, resume=checkpoint_path(tmp_path / "a", 3), run_dir=tmp_path / "c")


def test_resume_refuses_another_config_or_target(tmp_path):
    cfg = config(steps=6)
    apd_lens.decompose(TMS(5, 2), make_data("generator"), cfg, run_dir=tmp_path / "a", checkpoint_every=3)
    ckpt = checkpoint_path(tmp_path / "a", 3)
    with pytest.raises(ValueError, match="different config .*steps: checkpoint 6, given 8"):
        apd_lens.decompose(TMS(5, 2), make_data("generator"), cfg.replace(steps=8), resume=ckpt)
    with pytest.raises(ValueError, match="weight 'W' has other values"):
        apd_lens.decompose(TMS(5, 2, seed=3), make_data("generator"), cfg, resume=ckpt)
    with pytest.raises(DataNotResumableError, match="of kind 'generator', this data is of kind 'tensor'"):
        apd_lens.decompose(TMS(5, 2), make_data("tensor"), cfg, resume=ckpt, run_dir=tmp_path / "b")
    with pytest.raises(FileExistsError, match="already holds a run"):
        apd_lens.decompose(TMS(5, 2), make_data("generator"), cfg, run_dir=tmp_path / "a")
    apd_lens.decompose(TMS(5, 2), make_data("generator"), cfg.replace(steps=2), run_dir=tmp_path / "a", overwrite=True)
    assert list_checkpoints(tmp_path / "a") == []  # the old run's checkpoints are gone
    assert json.loads((tmp_path / "a" / "cfg.json").read_text())["config"]["steps"] == 2
    with pytest.raises(ValueError, match="checkpoint_every needs run_dir"):
        apd_lens.decompose(TMS(5, 2), make_data("generator"), cfg, checkpoint_every=2)
    with pytest.raises(CheckpointError, match="holds no checkpoints"):
        apd_lens.decompose(TMS(5, 2), make_data("generator"), cfg, resume=tmp_path)


def test_wandb_logging_is_off_by_default_and_logs_every_row(tmp_path, monkeypatch):
    calls = []

    class FakeRun:
        id = "abc123"

        def log(self, row, step):
            calls.append(("log", step, row))

        def finish(self):
            calls.append(("finish",))

    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)) or FakeRun())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = config(steps=12)
    apd_lens.decompose(TMS(5, 2), make_data("generator"), cfg, run_dir=tmp_path / "off")
    assert calls == []
    dec = apd_lens.decompose(TMS(5, 2), make_data("generator"), cfg, run_dir=tmp_path / "on", wandb_project="p")
    assert calls[0][0] == "init" and calls[0][1]["project"] == "p" and calls[0][1]["config"] == cfg.to_dict()
    logged = [(step, row) for kind, *rest in calls if kind == "log" for step, row in [rest]]
    assert [s for s, _ in logged] == [r["step"] for r in dec.loss_history] == [0, 5, 10, 11]
    assert logged[1][1]["total"] == dec.loss_history[1]["total"]
    assert calls[-1] == ("finish",)
    assert (tmp_path / "on" / "wandb_run_id").read_text() == "abc123"


def test_metrics_jsonl_is_written_during_training(tmp_path):
    seen = []

    class Spy(TMSData):
        def sample(self, batch_size=None):
            path = tmp_path / "metrics.jsonl"
            seen.append(len(path.read_text().splitlines()) if path.exists() else 0)
            return super().sample(batch_size)

    apd_lens.decompose(TMS(5, 2), Spy(5, 32, p=0.2), config(steps=12), run_dir=tmp_path)
    # before step s is drawn, the rows of steps 0, 5, 10 logged so far are on disk
    assert seen == [0] + [1] * 5 + [2] * 5 + [3]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4
    assert Path(tmp_path / "cfg.json").exists() and Path(tmp_path / "components.safetensors").exists()
