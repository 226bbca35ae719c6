"""Bad input gives a clear error naming the problem."""

from __future__ import annotations

import pytest
import torch

import apd_lens
from apd_lens import APDConfig, WeightSpec, WeightUse
from apd_lens.models.tms import TMS


def small(**kw) -> APDConfig:
    return APDConfig(**{"n_components": 3, "steps": 2, "batch_size": 8, "progress": False, **kw})


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"topk": 4.0}, "topk (4.0) cannot be larger than n_components C (3)"),
        ({"n_components": 0}, "n_components (C) must be an integer >= 1"),
        ({"schatten_p": 0.0}, "schatten_p must be > 0"),
        ({"schatten_p": -1.0}, "schatten_p must be > 0"),
        ({"topk": 0}, "topk must be > 0"),
        ({"lr_schedule": "step"}, "lr_schedule must be one of"),
        ({"act_recon_coeff": 1.0}, "act_recon_coeff > 0 needs act_recon_hooks"),
    ],
)
def test_impossible_config_values(kwargs, needle):
    with pytest.raises(ValueError) as err:
        small(**kwargs)
    assert needle in str(err.value)


def test_wrong_batch_width_names_shapes():
    model = TMS(5, 2)
    with pytest.raises(Exception) as err:
        apd_lens.decompose(model, torch.rand(32, 7), small())
    assert "width n_features=5" in str(err.value) and "(8, 7)" in str(err.value)


def test_nan_in_data():
    data = torch.rand(32, 5)
    data[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        apd_lens.decompose(TMS(5, 2), data, small(batch_size=32))


def test_unknown_weight_name():
    spec = WeightSpec("W_missing", (WeightUse("hook_in", "hook_hidden"),))
    with pytest.raises(KeyError, match="no parameter named 'W_missing'"):
        apd_lens.decompose(TMS(5, 2), torch.rand(32, 5), small(), weights=[spec])


def test_unknown_hook_name():
    spec = WeightSpec("W", (WeightUse("hook_in", "hook_nowhere"),))
    with pytest.raises(KeyError, match="leave hook 'hook_nowhere' does not exist"):
        apd_lens.decompose(TMS(5, 2), torch.rand(32, 5), small(), weights=[spec])


def test_weight_pattern_matching_nothing():
    with pytest.raises(KeyError, match="matches none"):
        apd_lens.decompose(TMS(5, 2), torch.rand(32, 5), small(weights=("blocks.*",)))


def test_model_without_declared_weights():
    with pytest.raises(TypeError, match="does not know which weights"):
        apd_lens.decompose(torch.nn.Linear(3, 3), torch.rand(8, 3), small())


def test_exact_attributions_too_large_for_memory_say_what_to_set(monkeypatch):
    """An exact attribution takes one probe per output dim; when their gradients cannot fit, the error
    names probes and chunks (before any work), and a chunk that fits gives the unchunked result."""
    import apd_lens.methods.apd.attributions as attributions
    from apd_lens.methods.apd.decomposition import Decomposition

    model = TMS(5, 2)
    x = torch.rand(16, 5)
    dec = Decomposition(model, model.apd_weight_specs(), small(batch_size=16, attribution_backend="batched"))
    want = dec.attributions(x)
    # gradients per probe: leaves [16, 2] and [16, 5] in float32 = 448 bytes; 5 probes = 2240 bytes
    monkeypatch.setattr(attributions, "MAX_PROBE_GRADIENT_BYTES", 1000)
    with pytest.raises(ValueError) as err:
        apd_lens.decompose(model, x, small(batch_size=16))
    message = str(err.value)
    assert "one output probe per output dim (5 for output shape (5,)" in message
    assert "attribution_probes=k" in message and "at most 2 per chunk" in message
    dec.config = dec.config.replace(attribution_chunk=2)
    torch.testing.assert_close(dec.attributions(x), want, rtol=1e-6, atol=1e-9)


def test_zero_steps_warns_that_the_result_is_untrained():
    from apd_lens.training.loop import UntrainedWarning

    model = TMS(5, 2)
    x = torch.rand(64, 5)
    with pytest.warns(UntrainedWarning, match="untrained"):
        dec = apd_lens.decompose(model, x, small(steps=0))
    assert dec.loss_history == []
