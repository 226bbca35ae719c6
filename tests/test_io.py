"""Save / load of decompositions, and the Decomposition's own hooks and inspection helpers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from toy_models import TwoLayerMLP, two_layer_specs

import apd_lens
from apd_lens import APDConfig, Decomposition
from apd_lens.models.tms import TMS, TMSData


def small_config(**kw) -> APDConfig:
    base = {"n_components": 4, "topk": 1.5, "steps": 5, "batch_size": 32, "lr": 1e-2, "progress": False}
    return APDConfig(**{**base, **kw})


def trained(kind: str):
    """A briefly trained decomposition (so components are not the initial ones) and its data."""
    if kind == "tms":
        model = TMS(5, 2, seed=0)
        data = TMSData(5, 32, p=0.3, seed=1)
        dec = apd_lens.decompose(model, data, small_config(n_components=5, attribution_source="components"))
        return dec, data.sample(64), lambda: TMS(5, 2, seed=0)
    model = TwoLayerMLP(seed=0)
    x = torch.randn(200, 4, generator=torch.Generator().manual_seed(1))
    dec = apd_lens.decompose(model, x, small_config(), weights=two_layer_specs())
    return dec, x[:64], lambda: TwoLayerMLP(seed=0)


@pytest.mark.parametrize("kind", ["tms", "two_layer"])
def test_save_load_round_trip_is_identical(tmp_path, kind):
    dec, x, fresh = trained(kind)
    dec.save(tmp_path / "dec")
    loaded = Decomposition.load(tmp_path / "dec", fresh())
    assert loaded.config == dec.config
    assert loaded.specs == dec.specs
    assert loaded.loss_history == dec.loss_history and len(dec.loss_history) > 0
    for name, comp in dec.components.items():
        assert torch.equal(loaded.components[name].A, comp.A)
        assert torch.equal(loaded.components[name].B, comp.B)
    assert torch.equal(loaded.attributions(x), dec.attributions(x))
    mask = dec.topk_mask(x)
    assert torch.equal(loaded.topk_mask(x), mask)
    with torch.no_grad():
        assert torch.equal(loaded(x), dec(x))
        assert torch.equal(loaded(x, mask), dec(x, mask))
    # the file itself holds the factors and the target's matrix, readable without apd_lens
    tensors = load_file(tmp_path / "dec" / "components.safetensors")
    for spec in dec.specs:
        assert torch.equal(tensors[f"{spec.name}.A"], dec.components[spec.name].A.detach())
        assert torch.equal(tensors[f"target.{spec.name}"], getattr(dec.model, spec.name).detach())
    cfg = json.loads((tmp_path / "dec" / "cfg.json").read_text())
    assert cfg["apd_lens_version"] == apd_lens.__version__
    assert [apd_lens.WeightSpec.from_dict(d) for d in cfg["weights"]] == dec.specs


def test_loading_onto_a_wrong_model_names_the_mismatch(tmp_path):
    dec, _, _ = trained("tms")
    dec.save(tmp_path / "tms")
    with pytest.raises(ValueError) as err:
        Decomposition.load(tmp_path / "tms", TMS(6, 2))
    assert "parameter 'W': saved shape (5, 2), model has (6, 2)" in str(err.value)
    assert "parameter 'b_final': saved shape (5,), model has (6,)" in str(err.value)

    with pytest.raises(
        ValueError, match=r"weight .W. has other values than the target .*\(max \|difference\| [0-9.]+\)"
    ):
        Decomposition.load(tmp_path / "tms", TMS(5, 2, seed=1))
    loaded = Decomposition.load(tmp_path / "tms", TMS(5, 2, seed=1), check_values=False)
    assert torch.equal(loaded.components["W"].A, dec.components["W"].A)

    with pytest.raises(ValueError) as err:
        Decomposition.load(tmp_path / "tms", TwoLayerMLP())
    msg = str(err.value)
    assert "(made of a TMS) does not fit this TwoLayerMLP" in msg
    assert "parameter 'W' (shape (5, 2)) does not exist in TwoLayerMLP" in msg
    assert "hook 'hook_hidden' does not exist in TwoLayerMLP" in msg


def test_damaged_or_foreign_directories_are_refused(tmp_path):
    dec, _, fresh = trained("tms")
    path = dec.save(tmp_path / "dec")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        Decomposition.load(tmp_path / "nowhere", fresh())
    data = (path / "components.safetensors").read_bytes()
    (path / "components.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        Decomposition.load(path, fresh())
    cfg = json.loads((path / "cfg.json").read_text())
    (path / "cfg.json").write_text(json.dumps({**cfg, "format_version": 99}))
    with pytest.raises(ValueError, match="format version 99"):
        Decomposition.load(path, fresh())
    (path / "cfg.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Decomposition.load(path, fresh())
    (path / "cfg.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no cfg.json"):
        Decomposition.load(path, fresh())


# ------------------------------------------------------------------ hooks and inspection
def two_layer_decomposition():
    model = TwoLayerMLP(seed=0)
    cfg = small_config(topk=2.0)
    dec = Decomposition(model, two_layer_specs(), cfg)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(3))
    return dec, model, x


def functional_output(model, x, matrices: dict[str, torch.Tensor]) -> torch.Tensor:
    """The target's output with its weights replaced (the slow obvious reference)."""
    params = {**dict(model.named_parameters()), **matrices}
    return torch.func.functional_call(model, params, (x,))


def test_own_hooks_work_with_run_with_cache():
    dec, _, x = two_layer_decomposition()
    out, cache = dec.run_with_cache(x, mask="topk")
    for name in ("W1.hook_component_acts", "W2.hook_component_acts", "hook_attributions", "hook_mask"):
        assert name in cache, name
    mask = dec.topk_mask(x)
    assert torch.equal(cache["hook_mask"], mask)
    assert int(mask.sum()) == int(2.0 * 16)
    assert torch.equal(cache["hook_attributions"], dec.attributions(x))
    a1 = dec.components["W1"].A.detach()
    expected_acts = torch.einsum("ni,cim->ncm", x, a1) * mask[:, :, None]
    torch.testing.assert_close(cache["W1.hook_component_acts"], expected_acts)
    torch.testing.assert_close(out, dec(x, mask))


def test_run_with_hooks_ablation_matches_weight_replacement():
    dec, model, x = two_layer_decomposition()
    P = {name: w.detach() for name, w in dec.component_weights().items()}
    c = 2

    def zero_component(acts, hook):
        acts = acts.clone()
        acts[:, c] = 0
        return acts

    hooks = [("W1.hook_component_acts", zero_component), ("W2.hook_component_acts", zero_component)]
    with torch.no_grad():
        hooked = dec.run_with_hooks(x, fwd_hooks=hooks)
        ablated = dec.run_components(x, ablate=[c])
        kept = dec.run_components(x, keep=[c])
        reference_ablated = functional_output(model, x, {k: v.sum(0) - v[c] for k, v in P.items()})
        reference_kept = functional_output(model, x, {k: v[c] for k, v in P.items()})
    torch.testing.assert_close(hooked, reference_ablated)
    torch.testing.assert_close(ablated, reference_ablated)
    torch.testing.assert_close(kept, reference_kept)
    mask = dec.component_mask(x, keep=[0, 1, 3], ablate=[1])
    assert mask.shape == (16, 4) and mask[0].tolist() == [1.0, 0.0, 0.0, 1.0]
    with pytest.raises(IndexError, match=r"component indices \[4\] out of range for C=4"):
        dec.run_components(x, keep=[4])
    with pytest.raises(ValueError, match='mask must be a Tensor, None or "topk"'):
        dec(x, mask="all")


def test_component_weights_and_active_components():
    dec, _, x = two_layer_decomposition()
    for c in range(4):
        got = dec.component(c)
        for name, comp in dec.components.items():
            torch.testing.assert_close(got[name], comp.A[c].detach() @ comp.B[c].detach())
    with pytest.raises(IndexError):
        dec.component(-1)
    attributions = dec.attributions(x)
    top1 = dec.active_components(x, k=1)
    assert top1.dtype == torch.bool and top1.shape == (16, 4)
    assert torch.equal(top1.float().argmax(-1), attributions.argmax(-1))
    assert (top1.sum(-1) == 1).all()
    active = dec.active_components(x)
    # batch top-k: the int(k * n) largest (point, component) scores of the whole batch
    threshold = attributions.flatten().sort(descending=True).values[int(2.0 * 16) - 1]
    assert torch.equal(active, attributions >= threshold)


@pytest.mark.parametrize("method", ["apd", "spd"])
def test_a_checkpoint_loads_as_the_decomposition_at_its_step(tmp_path, method):
    """``apd_lens.load(<checkpoint file>)`` gives what a run stopped at that step gives: with a constant
    learning rate, a 3-step run is the first 3 steps of a 6-step one."""
    if method == "apd":
        config = small_config(n_components=5, attribution_source="components", lr_schedule="constant")
    else:
        config = apd_lens.SPDConfig(n_subcomponents=6, batch_size=32, lr_schedule="constant", progress=False)
    run = tmp_path / "run"
    apd_lens.decompose(
        TMS(5, 2, seed=0), TMSData(5, 32, p=0.3, seed=1), config.replace(steps=6), run_dir=run, checkpoint_every=3
    )
    short = apd_lens.decompose(TMS(5, 2, seed=0), TMSData(5, 32, p=0.3, seed=1), config.replace(steps=3))
    middle = run / "checkpoints" / "step_000000003.ckpt"
    loaded = apd_lens.load(middle, TMS(5, 2, seed=0))
    assert type(loaded) is type(short) and loaded.config.steps == 6
    mine, theirs = loaded.state_tensors(), short.state_tensors()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert loaded.loss_history and all(row["step"] < 3 for row in loaded.loss_history)
    final = apd_lens.load(run / "checkpoints" / "step_000000006.ckpt", TMS(5, 2, seed=0))
    assert not torch.equal(final.state_tensors()[next(iter(mine))], mine[next(iter(mine))])

    with pytest.raises(ValueError, match=r"the checkpoint .*step_000000003.ckpt does not fit"):
        apd_lens.load(middle, TMS(5, 2, seed=1))
    apd_lens.load(middle, TMS(5, 2, seed=1), check_values=False)
    # a run that has not finished points at its newest checkpoint
    (run / "cfg.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no finished decomposition .*step_000000006.ckpt"):
        apd_lens.load(run, TMS(5, 2, seed=0))
    with pytest.raises(ValueError, match=r"is a file but not a checkpoint .*apd_lens.load\('.*run'"):
        apd_lens.load(run / "metrics.jsonl", TMS(5, 2, seed=0))
