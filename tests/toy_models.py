"""Small models for the tests: a user's own HookedRootModule declaring its weights itself."""

from __future__ import annotations

import torch
from torch import nn

from apd_lens import WeightSpec, WeightUse
from apd_lens._compat import HookedRootModule, HookPoint


class TwoLayerMLP(HookedRootModule):
    """x -> ReLU(x W1 + b1) -> (.) W2 + b2, plus a residual W3 path from the hidden layer."""

    def __init__(self, d_in=4, d_hidden=6, d_out=3, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W1 = nn.Parameter(torch.randn(d_in, d_hidden, generator=g) / d_in**0.5)
        self.b1 = nn.Parameter(torch.randn(d_hidden, generator=g) * 0.1)
        self.W2 = nn.Parameter(torch.randn(d_hidden, d_out, generator=g) / d_hidden**0.5)
        self.b2 = nn.Parameter(torch.randn(d_out, generator=g) * 0.1)
        self.hook_in = HookPoint()
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()
        self.hook_out = HookPoint()
        self.hook_unused = HookPoint()  # exists but never fires, like TL hooks of disabled flags
        self.setup()

    def forward(self, x):
        pre = self.hook_pre(self.hook_in(x) @ self.W1 + self.b1)
        post = self.hook_post(torch.tanh(pre) * pre)
        return self.hook_out(post @ self.W2 + self.b2)


def two_layer_specs() -> list[WeightSpec]:
    return [
        WeightSpec("W1", (WeightUse("hook_in", "hook_pre", bias="b1"),)),
        WeightSpec("W2", (WeightUse("hook_post", "hook_out", bias="b2"),)),
    ]


def tms_with_bias(n_features: int = 5, n_hidden: int = 3) -> tuple:
    """A float64 TMS with a random output bias (TL-style zero biases would hide bias bugs) and a batch of
    7 sparse inputs: ``(model, specs, x)``."""
    from apd_lens.models.tms import TMS

    model = TMS(n_features, n_hidden, seed=1).double()
    with torch.no_grad():
        model.b_final.normal_(0, 0.1)
    x = torch.rand(7, n_features) * (torch.rand(7, n_features) < 0.6)
    return model, model.apd_weight_specs(), x
