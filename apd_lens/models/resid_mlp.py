"""Residual MLPs doing compressed computation: 100 features, y = x + ReLU(x), in a 1000-dim residual.

The embedding ``W_E`` [n_features, d_resid] is fixed and random with unit-norm rows and the
unembedding is ``W_U = W_E^T`` (both frozen buffers). Each of ``n_layers`` blocks adds an MLP:

    pre  = resid @ W_in + b_in          # blocks.L.mlp.hook_pre
    post = ReLU(pre)                    # blocks.L.mlp.hook_post
    resid = resid + post @ W_out + b_out  # blocks.L.hook_mlp_out (added to the residual)

and the output is ``resid @ W_U``. With fewer neurons than features (50 for 100), the MLPs must
compute the 100 ReLUs in superposition ("compressed computation").
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn

from apd_lens._compat import HookedRootModule, HookPoint
from apd_lens.engine.spec import WeightSpec, WeightUse
from apd_lens.methods.apd.config import APDConfig
from apd_lens.methods.spd.config import SPDConfig
from apd_lens.models.presets import is_paper
from apd_lens.models.sparse_data import SparseFeatureData
from apd_lens.models.target_training import train_target

PAPER_SIZES = {1: (100, 50), 2: (100, 25), 3: (102, 17)}
"""(features, neurons per layer) of the papers' residual MLPs per number of layers."""
PAPER_N_COMPONENTS = {1: 130, 2: 200}
"""The paper's C per number of layers."""
PAPER_COEFFS = {1: (1.0, 1.0, 10.0, 1.0), 2: (1.0, 2.0, 7.0, 1.0)}
"""(faithfulness, minimality, simplicity, act recon) per number of layers."""


class MLP(nn.Module):
    """``ReLU(resid @ W_in + b_in) @ W_out + b_out`` with hooks on the pre- and post-ReLU activations."""

    def __init__(self, d_resid: int, d_mlp: int, bias: bool, generator: torch.Generator):
        super().__init__()
        self.W_in = nn.Parameter((torch.rand(d_resid, d_mlp, generator=generator) * 2 - 1) * d_resid**-0.5)
        self.W_out = nn.Parameter((torch.rand(d_mlp, d_resid, generator=generator) * 2 - 1) * d_mlp**-0.5)
        self.b_in = nn.Parameter(torch.zeros(d_mlp)) if bias else None
        self.b_out = nn.Parameter(torch.zeros(d_resid)) if bias else None
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()

    def forward(self, resid: Float[Tensor, "*batch d_resid"]) -> Float[Tensor, "*batch d_resid"]:
        pre = resid @ self.W_in
        pre = self.hook_pre(pre if self.b_in is None else pre + self.b_in)
        out = self.hook_post(torch.relu(pre)) @ self.W_out
        return out if self.b_out is None else out + self.b_out


class ResidualMLPBlock(nn.Module):
    """One residual block: ``resid + mlp(resid)``."""

    def __init__(self, d_resid: int, d_mlp: int, bias: bool, generator: torch.Generator):
        super().__init__()
        self.mlp = MLP(d_resid, d_mlp, bias, generator)
        self.hook_resid_pre = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(self, resid: Float[Tensor, "*batch d_resid"]) -> Float[Tensor, "*batch d_resid"]:
        resid = self.hook_resid_pre(resid)
        return self.hook_resid_post(resid + self.hook_mlp_out(self.mlp(resid)))


class ResidualMLP(HookedRootModule):
    """``n_layers`` residual MLP blocks between a fixed random embedding and its transpose.

    Hooks: ``hook_embed``, ``blocks.L.hook_resid_pre``, ``blocks.L.mlp.hook_pre``,
    ``blocks.L.mlp.hook_post``, ``blocks.L.hook_mlp_out``, ``blocks.L.hook_resid_post``, ``hook_out``.
    Parameters: ``blocks.L.mlp.W_in`` [d_resid, d_mlp], ``blocks.L.mlp.W_out`` [d_mlp, d_resid] and
    (with ``bias=True``) ``blocks.L.mlp.b_in``, ``blocks.L.mlp.b_out``. ``d_mlp=None`` gives the
    paper's sizes: 50 neurons in total, split evenly over the layers.
    """

    def __init__(
        self,
        n_features: int = 100,
        d_resid: int = 1000,
        d_mlp: int | None = None,
        n_layers: int = 1,
        bias: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        d_mlp = 50 // n_layers if d_mlp is None else d_mlp
        if min(n_features, d_resid, d_mlp) < 1:
            raise ValueError(f"n_features, d_resid and d_mlp must be >= 1, got {n_features}, {d_resid}, {d_mlp}")
        self.n_features, self.d_resid, self.d_mlp, self.n_layers = n_features, d_resid, d_mlp, n_layers
        self.bias = bias
        generator = torch.Generator().manual_seed(seed)
        W_E = torch.randn(n_features, d_resid, generator=generator)
        self.register_buffer("W_E", W_E / W_E.norm(dim=1, keepdim=True))
        self.blocks = nn.ModuleList(ResidualMLPBlock(d_resid, d_mlp, bias, generator) for _ in range(n_layers))
        self.hook_embed = HookPoint()
        self.hook_out = HookPoint()
        self.setup()

    @classmethod
    def paper(cls, n_layers: int, seed: int = 0) -> ResidualMLP:
        """The papers' model with ``n_layers`` layers: 100 features and 50 neurons in total for 1 or
        2 layers, 102 features and 17 neurons per layer for 3 (SPD's); 1000-dim residual, no biases."""
        if n_layers not in PAPER_SIZES:
            raise ValueError(f"the papers' residual MLPs have 1, 2 or 3 layers, got {n_layers}")
        n_features, d_mlp = PAPER_SIZES[n_layers]
        return cls(n_features=n_features, d_mlp=d_mlp, n_layers=n_layers, seed=seed)

    @property
    def W_U(self) -> Float[Tensor, "d_resid n_features"]:
        return self.W_E.T

    def forward(
        self, x: Float[Tensor, "*batch n_features={self.n_features}"]
    ) -> Float[Tensor, "*batch n_features={self.n_features}"]:
        if x.shape[-1] != self.n_features:
            raise ValueError(
                f"ResidualMLP expects inputs of width n_features={self.n_features}, got shape {tuple(x.shape)}"
            )
        resid = self.hook_embed(x @ self.W_E)
        for block in self.blocks:
            resid = block(resid)
        return self.hook_out(resid @ self.W_U)

    def mlp_weights(self, layer: int) -> tuple[Float[Tensor, "d_resid d_mlp"], Float[Tensor, "d_mlp d_resid"]]:
        """``(W_in, W_out)`` of one layer."""
        mlp = self.blocks[layer].mlp
        return mlp.W_in, mlp.W_out

    def apd_weight_specs(self) -> list[WeightSpec]:
        """W_in (residual -> pre-activations) and W_out (post-ReLU -> MLP output) of every layer."""
        specs = []
        for L in range(self.n_layers):
            b_in = f"blocks.{L}.mlp.b_in" if self.bias else None
            b_out = f"blocks.{L}.mlp.b_out" if self.bias else None
            specs.append(
                WeightSpec(
                    f"blocks.{L}.mlp.W_in",
                    (WeightUse(f"blocks.{L}.hook_resid_pre", f"blocks.{L}.mlp.hook_pre", bias=b_in),),
                )
            )
            # the MLP output is added to the residual stream, which every later W_in reads and W_U reads out
            later_inputs = tuple(f"blocks.{later}.mlp.W_in" for later in range(L + 1, self.n_layers))
            specs.append(
                WeightSpec(
                    f"blocks.{L}.mlp.W_out",
                    (
                        WeightUse(
                            f"blocks.{L}.mlp.hook_post", f"blocks.{L}.hook_mlp_out", bias=b_out, feeds=later_inputs
                        ),
                    ),
                )
            )
        return specs

    def post_relu_hooks(self) -> tuple[str, ...]:
        return tuple(f"blocks.{L}.mlp.hook_post" for L in range(self.n_layers))

    def apd_default_config(self, preset: str = "default") -> APDConfig:
        """APD settings (C 130 for 1 layer, 200 for 2; other depths get the 2-layer recipe).

        ``preset="paper"``: the paper's, except lr 5e-4 for 2 layers: with the paper's 1e-3 the 2-layer
        decomposition diverged right after warm-up (faithfulness 0.0065 -> 0.05-0.5, twice, seed 0); 5e-4
        was stable over 1000 steps. ``"default"``: the same plus component splitting every 500 steps
        during the first half (not in the paper; 96/100 features with their own component on 1 layer
        instead of 64/100, see docs/results.md), and lr 3e-4 for 2 layers (at 5e-4 seed 1 diverged from
        step 400 and ended at 26/100; at 3e-4 seeds 0 / 1 / 2 give 96 / 100 / 98)."""
        paper = is_paper(preset)
        n = min(self.n_layers, 2)
        faith, minimality, simp, act = PAPER_COEFFS[n]
        return APDConfig(
            n_components=PAPER_N_COMPONENTS[n],
            topk=1.28,
            topk_mode="batch",
            attribution="gradient",
            attribution_source="target",
            faithfulness_coeff=faith,
            minimality_coeff=minimality,
            simplicity_coeff=simp,
            act_recon_coeff=act,
            act_recon_hooks=self.post_relu_hooks(),
            schatten_p=0.9,
            unit_norm_A=True,
            lr=1e-3 if n == 1 else (5e-4 if paper else 3e-4),
            lr_schedule="cosine",
            lr_warmup_frac=0.01,
            steps=10_000,
            batch_size=256,
            split_every=None if paper else 500,
            # resid components are rarely fully unused
            split_unused=0.25,
            # 2 layers: C 200 for 100 features leaves ~100 rarely-picked fillers, so the live median
            # says little about one feature's rate (lr 5e-4 run: no component was idle enough to be a
            # target while 28 components served 2-4 features each)
            split_reference="live" if n == 1 else "carrying",
            # 2 layers: the points each busy component leads, grouped by the first weight's input (the
            # residual stream); with all weights' inputs the groups were the signs of one feature
            split_points="active" if n == 1 else "top",
            split_group_by="all" if n == 1 else "first",
            extra={"experiment": f"resid-mlp-{self.n_layers}-layer"},
        )

    def spd_default_config(self, preset: str = "default") -> SPDConfig:
        """SPD settings per depth (importance coefficient 1e-5 / 1e-5 / 0.5e-5 with p 2, Adam 2e-3 for 1 layer
        and 1e-3 deeper, constant; CI MLPs with 16 hidden units, 128 for 3 layers).

        ``preset="paper"``: the SPD paper's / reference code's C per matrix 100 / 400 / 500, batch 2048,
        20k / 50k / 70k steps. ``"default"``: batch 256 and, for 2 layers, C 200 and 15k steps, chosen by
        measurement on this CPU (docs/results.md): 1 layer (20k steps) 100/100 features with their own W_in
        subcomponent on seeds 0 and 1 in ~17-20 min; 2 layers 100/100 on seeds 0 and 1. 3 layers:
        the reference's C and steps at batch 256, not yet run to the end here."""
        paper = is_paper(preset)
        n = min(self.n_layers, 3)
        return SPDConfig(
            n_subcomponents={1: 100, 2: 400 if paper else 200, 3: 500}[n],
            importance_minimality_coeff=1e-5 if n < 3 else 0.5e-5,
            importance_p=2.0,
            ci_fn="mlp",
            ci_hidden=16 if n < 3 else 128,
            lr=2e-3 if n == 1 else 1e-3,
            lr_schedule="constant",
            steps={1: 20_000, 2: 50_000 if paper else 15_000, 3: 70_000}[n],
            batch_size=2048 if paper else 256,
            extra={"experiment": f"resid-mlp-{self.n_layers}-layer"},
        )

    @torch.no_grad()
    def monosemantic_baseline(self) -> ResidualMLP:
        """A 1-layer model with one neuron per feature for the first ``n_layers * d_mlp`` features:
        neuron n reads and writes feature n's embedding, so it computes ReLU(x_n) (up to the
        embedding's interference) and ignores the remaining features."""
        width = self.n_layers * self.d_mlp
        n_mono = min(width, self.n_features)
        mono = ResidualMLP(self.n_features, self.d_resid, width, 1, bias=False).to(self.W_E)
        mono.W_E.copy_(self.W_E)
        W_in, W_out = mono.mlp_weights(0)
        W_in.zero_()
        W_out.zero_()
        W_in[:, :n_mono] = self.W_E[:n_mono].T
        W_out[:n_mono] = self.W_E[:n_mono]
        mono.requires_grad_(False)
        return mono


def resid_mlp_labels(x: Float[Tensor, "*batch n_features"]) -> Float[Tensor, "*batch n_features"]:
    """The task: ``y = x + ReLU(x)`` per feature."""
    return x + torch.relu(x)


class ResidMLPData(SparseFeatureData):
    """Endless batches of sparse features: each on with probability ``p``, value U[-1, 1]."""

    def __init__(
        self,
        n_features: int,
        batch_size: int = 2048,
        p: float = 0.01,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ):
        super().__init__(n_features, batch_size, p, -1.0, 1.0, seed, device)


def train_resid_mlp(
    model: ResidualMLP,
    steps: int = 10_000,
    batch_size: int = 2048,
    lr: float = 3e-3,
    p: float = 0.01,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """The paper's target training: AdamW (wd 0.01), lr 3e-3 cosine, MSE to ``x + ReLU(x)``."""
    data = ResidMLPData(model.n_features, batch_size, p=p, seed=seed, device=model.W_E.device)
    batches = ((x, resid_mlp_labels(x)) for x in data)
    return train_target(
        model, batches, lambda out, y: (out - y).square().mean(), steps, lr, schedule="cosine", progress=progress
    )
