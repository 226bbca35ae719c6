"""The two ways of taking leaving-activation gradients (vmap, batched backward): equal to a
per-(example, output) autograd loop, the vmap one computing example-independent gradients once,
and the fall-back when a model's forward cannot be vmapped."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from apd_lens import APDConfig, WeightSpec, WeightUse
from apd_lens._compat import HookedRootModule, HookPoint
from apd_lens.methods.apd.decomposition import Decomposition
from apd_lens.methods.apd.leave_gradients import batched_leave_gradients, shared_over_examples, vmap_leave_gradients


class ResidualBlock(HookedRootModule):
    """A residual MLP in miniature: embed, ReLU MLP added to the stream, linear read-out.
    The gradient at the MLP's output does not depend on the example; at its input it does."""

    def __init__(self, n_feat=5, d_resid=7, d_mlp=3, item_in_forward=False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.W_E = nn.Parameter(torch.randn(n_feat, d_resid, generator=g, dtype=torch.float64))
        self.W_in = nn.Parameter(torch.randn(d_resid, d_mlp, generator=g, dtype=torch.float64))
        self.W_out = nn.Parameter(torch.randn(d_mlp, d_resid, generator=g, dtype=torch.float64))
        self.b_in = nn.Parameter(torch.randn(d_mlp, generator=g, dtype=torch.float64) * 0.3)
        self.item_in_forward = item_in_forward
        self.hook_resid = HookPoint()
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.setup()

    def forward(self, x):
        resid = self.hook_resid(x @ self.W_E)
        if self.item_in_forward and float(resid.abs().max()) > 1e6:  # data-dependent Python: not vmappable
            raise ValueError("too large")
        post = self.hook_post(torch.relu(self.hook_pre(resid @ self.W_in + self.b_in)))
        resid = resid + self.hook_mlp_out(post @ self.W_out)
        return resid @ self.W_E.T

    def apd_weight_specs(self):
        return [
            WeightSpec("W_in", (WeightUse("hook_resid", "hook_pre", bias="b_in"),)),
            WeightSpec("W_out", (WeightUse("hook_post", "hook_mlp_out"),)),
        ]


def setup(item_in_forward=False, **cfg):
    model = ResidualBlock(item_in_forward=item_in_forward)
    config = APDConfig(n_components=4, rank=2, topk=1.0, **cfg)
    dec = Decomposition(model, model.apd_weight_specs(), config)
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return dec, x


def loop_gradients(model, x, hook_name):
    """d f_o(x_n) / d act_at_hook[n] by one backward per (example, output)."""
    rows, store = [], {}

    def keep(t, hook):
        store["t"] = t.detach().requires_grad_(True)
        return store["t"]

    for n in range(x.shape[0]):
        with model.hooks(fwd_hooks=[(hook_name, keep)]):
            f = model(x[n : n + 1])[0]
        grads = [torch.autograd.grad(f[o], store["t"], retain_graph=True)[0][0] for o in range(f.shape[0])]
        rows.append(torch.stack(grads))
    return torch.stack(rows, 1)  # [K, n, d]


@pytest.mark.parametrize("way", ["vmap", "batched"])
def test_leave_gradients_match_per_output_loop(way):
    dec, x = setup()
    keys = dec.plan.use_keys()
    record = dec.target_pass(x, make_leaves=True)
    probes = torch.eye(5, dtype=torch.float64).reshape(5, 1, 5)
    if way == "vmap":
        grads = vmap_leave_gradients(dec.model, x, dec.plan, record, keys)(probes)
    else:
        grads = batched_leave_gradients(record, keys)(probes)
    for key, grad in zip(keys, grads, strict=True):
        hook = "hook_pre" if key[0] == "W_in" else "hook_mlp_out"
        torch.testing.assert_close(grad[:, :, 0], loop_gradients(dec.model, x, hook), rtol=1e-10, atol=1e-12)
    shared = [shared_over_examples(g) for g in grads]
    assert shared == [False, True]  # W_in's gradient passes a ReLU; W_out's is the read-out only
    if way == "vmap":  # computed once: a stride-0 view over examples, not a copy per example
        assert grads[1].stride(1) == 0 and grads[0].stride(1) != 0


def test_vmap_and_batched_attributions_agree_with_probes():
    dec, x = setup(attribution_probes=3)
    gens = [torch.Generator().manual_seed(5) for _ in range(2)]
    got = dec.attributions(x, generator=gens[0])
    dec.config = dec.config.replace(attribution_backend="batched")
    want = dec.attributions(x, generator=gens[1])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_unvmappable_forward_falls_back_with_a_warning():
    dec, x = setup(item_in_forward=True)
    reference, _ = setup()
    with pytest.warns(UserWarning, match="cannot be vmapped"):
        got = dec.attributions(x)
    assert dec.vmap_failure is not None and not dec.uses_vmap()
    torch.testing.assert_close(got, reference.attributions(x), rtol=1e-10, atol=1e-12)
    dec.attributions(x)  # no second warning: the choice sticks


def test_forced_vmap_on_unvmappable_forward_is_an_error():
    dec, x = setup(item_in_forward=True, attribution_backend="vmap")
    with pytest.raises(RuntimeError, match="attribution_backend='vmap'.*cannot be vmapped"):
        dec.attributions(x)


def test_jvp_backend_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="attribution_backend 'jvp'"):
        APDConfig(attribution_backend="jvp", attribution_probes=4)
    with pytest.raises(ValueError, match="attribution_backend 'jvp'"):
        APDConfig(attribution_backend="jvp", attribution_source="components")
    with pytest.raises(ValueError, match="attribution_backend must be one of"):
        APDConfig(attribution_backend="fast")
    model = ResidualBlock()
    config = APDConfig(n_components=4, rank=2, attribution_backend="jvp", n_batch_dims=2)
    dec = Decomposition(model, model.apd_weight_specs(), config)
    x = torch.randn(3, 2, 5, dtype=torch.float64)  # two batch dims: a tangent at one point moves others
    with pytest.raises(ValueError, match="one batch dim"):
        dec.attributions(x)
