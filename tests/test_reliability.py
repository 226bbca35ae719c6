"""Bad input, faults and long runs: every failure is an error naming the problem, and no work is lost."""

from __future__ import annotations

import pytest
import torch

import apd_lens
from apd_lens import APDConfig, WeightSpec, WeightUse
from apd_lens.models.tms import TMS
from apd_lens.training.checkpoint import list_checkpoints, load_checkpoint
from apd_lens.training.loop import check_gradients
from tests.toy_models import TwoLayerMLP, two_layer_specs


def small(**kw) -> APDConfig:
    return APDConfig(**{"n_components": 3, "steps": 4, "batch_size": 8, "progress": False, "log_every": 1, **kw})


def data(n=32, width=5, seed=0):
    return torch.rand(n, width, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "batch,error,needle",
    [
        (data().double(), TypeError, "dtype torch.float64 but the model's weights are torch.float32"),
        (torch.full((32, 5), float("inf")), ValueError, "NaN or Inf"),
        (torch.empty(0, 5), ValueError, "holds no examples"),
        ([], ValueError, "yielded no batches"),
        (torch.randint(0, 3, (32, 5)), RuntimeError, "dtype torch.int64"),
    ],
    ids=["dtype", "inf", "empty-tensor", "empty-list", "integer-data"],
)
def test_bad_data(batch, error, needle):
    with pytest.raises(error) as err:
        apd_lens.decompose(TMS(5, 2), batch, small())
    assert needle in str(err.value)


def test_batch_on_another_device():
    """decompose moves data to config.device; the analysis API refuses a batch elsewhere."""
    dec = apd_lens.decompose(TMS(5, 2), data(), small(steps=1))
    with pytest.raises(ValueError, match="the batch is on meta but the model and components are on cpu"):
        dec.attributions(torch.rand(4, 5, device="meta"))


def test_hook_that_never_fires():
    specs = [two_layer_specs()[0], WeightSpec("W2", (WeightUse("hook_post", "hook_unused", bias="b2"),))]
    with pytest.raises(RuntimeError, match="hook 'hook_unused' never fired"):
        apd_lens.decompose(TwoLayerMLP(), torch.randn(32, 4), small(), weights=specs)


def test_target_changed_during_run():
    model = TMS(5, 2)

    def batches():
        for step in range(10):
            if step == 2:
                with torch.no_grad():
                    model.W.add_(0.1)
            yield data(8, seed=step)

    with pytest.raises(RuntimeError, match="parameter 'W' of the target model changed during the decomposition"):
        apd_lens.decompose(model, batches(), small(steps=6))


def test_nonfinite_loss_names_step_and_term_and_keeps_last_checkpoint(tmp_path):
    batches = [data(8, seed=i) for i in range(12)]
    batches[5] = batches[5] * 1e30  # finite input whose outputs overflow float32
    with pytest.raises(FloatingPointError, match=r"step 5: non-finite loss term\(s\) \['minimality'"):
        apd_lens.decompose(TMS(5, 2), batches, small(steps=12), run_dir=tmp_path, checkpoint_every=2)
    saved = list_checkpoints(tmp_path)
    assert [p.name for p in saved][-1].endswith("4.ckpt")
    state = load_checkpoint(saved[-1])
    assert state["step"] == 4
    assert all(torch.isfinite(t).all() for t in state["components"].values())


def test_nonfinite_gradient_stops_before_update():
    model = TMS(5, 2)
    dec = apd_lens.decompose(model, data(), small(steps=1))
    comp = dec.components["W"]
    comp.A.grad = torch.zeros_like(comp.A)
    comp.B.grad = torch.full_like(comp.B, float("nan"))
    with pytest.raises(FloatingPointError, match=r"step 7: non-finite gradient of \['W.B'\]"):
        check_gradients(dec, 7)


def test_same_seed_same_result_different_seed_different():
    def run(seed):
        dec = apd_lens.decompose(TMS(5, 2, seed=0), data(64), small(steps=20, seed=seed))
        return dec.components["W"].A.detach().clone(), dec.components["W"].B.detach().clone()

    a1, b1 = run(0)
    a2, b2 = run(0)
    a3, _ = run(1)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert not torch.equal(a1, a3)
