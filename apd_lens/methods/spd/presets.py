"""SPD presets for language models: ``vpd_config(model)``, the VPD recipe (Bushnaq, Braun et al.
2026; ``shared/reference/vpd-method.md``) sized to a TransformerLens model, and ``lm_toy_recipe(model)``,
the toy models' SPD recipe on the same matrices with the same C, to compare against.

Reference facts and how they carry over (the 67M run: 4 layers, d_model 768, d_mlp 3072):

- C per matrix: c_fc 3072, down 3584, q 512, k 512, v 1024, o 1024, i.e. ``min(d_in, d_out)`` times
  4, 14/3, 2/3, 2/3, 4/3, 4/3 (:data:`C_PER_SMALLER_DIM`); here the same ratios of each matrix's
  smaller dim (times ``c_scale``), so a d_model 128 / d_mlp 512 model gets 512 / 597 / 85 / 85 / 171 / 171.
- Faithfulness: the reference's loss is ours (``Σ ||W - V U||² / N`` over the decomposed
  parameters) with coefficient 1e7 at N = 28.3M; the pull on each parameter is ``coeff / N``, so
  here ``coeff = 1e7 × N / 28.3M`` (:data:`FAITHFULNESS_PER_PARAMETER`), the same per-parameter pull.
  Warm-up: 400 steps of AdamW on faithfulness alone, lr 1e-3, no weight decay.
- Persistent PGD: per data point and position, Adam lr 0.01, betas (0.5, 0.99), 2 + 1 updates per
  step, clamped to [0, 1], coefficient 0.5 next to 0.5 for the subset-routed stochastic term (here
  1 and 1). The reference's 67M run masks every matrix in its adversarial pass; the spec's recipe
  (and this preset) routes it like the stochastic term (``pgd_subset_routing``).
- Importance minimality 2e-4 with the frequency term 1e-4 (``importance_beta`` 0.5: the term is
  ``coeff × β × mean × log2(1 + sum)``), p annealed 2 → 0.4 over the whole run.
- KL output distance; V, U gradients clipped to global norm 0.01; the reference's lr 5e-5 cosine
  (to 0.1×) is for 400k steps: here 5e-4 cosine (to 0) over a run thousands of steps long.
- CI: VPD's global function is a transformer over positions (width 2048, 8 blocks); here its MLP form
  (one MLP over all sites' RMS-normed inputs at a position), hidden width 2 × d_model.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from apd_lens.engine.spec import get_parameter
from apd_lens.methods.spd.config import SPDConfig

C_PER_SMALLER_DIM = {
    "W_Q": 2 / 3,
    "W_K": 2 / 3,
    "W_V": 4 / 3,
    "W_O": 4 / 3,
    "W_in": 4.0,
    "W_gate": 4.0,
    "W_out": 14 / 3,
}
"""C of a matrix over its smaller dimension, by kind: the VPD 67M run's (d_model 768, d_mlp 3072)."""
REFERENCE_DECOMPOSED_PARAMS = 28_311_552
"""Decomposed parameters of the VPD 67M run: 4 layers × (4 × 768² + 2 × 768 × 3072)."""
FAITHFULNESS_PER_PARAMETER = 1e7 / REFERENCE_DECOMPOSED_PARAMS
"""The reference's faithfulness coefficient over its number of decomposed parameters."""


def _kind(tl_name: str) -> str | None:
    """``blocks.0.attn.W_Q`` -> ``W_Q``; None for a weight VPD does not decompose (embeddings, unembedding)."""
    last = tl_name.rsplit(".", 1)[-1]
    in_block = ".attn." in tl_name or ".mlp." in tl_name
    return last if in_block and last in C_PER_SMALLER_DIM else None


def lm_matrices(model: nn.Module, c_scale: float = 1.0) -> dict[str, int]:
    """Every attention and MLP matrix of a HookedTransformer or TransformerBridge (W_Q, W_K, W_V, W_O,
    W_in, W_gate, W_out of each block; not the embeddings or unembedding), by parameter name, with its
    C: ``round(c_scale × factor × min(d_in, d_out))`` (see :data:`C_PER_SMALLER_DIM`)."""
    from apd_lens.adapters import weight_catalog

    if not c_scale > 0:
        raise ValueError(f"c_scale must be > 0, got {c_scale}")
    chosen: dict[str, int] = {}
    for tl_name, spec in weight_catalog(model).specs.items():
        kind = _kind(tl_name)
        if kind is None:
            continue
        d_in, d_out = spec.to_matrix(get_parameter(model, spec.name)).shape
        chosen[spec.name] = max(1, round(c_scale * C_PER_SMALLER_DIM[kind] * min(d_in, d_out)))
    if not chosen:
        raise ValueError(
            f"found no attention or MLP matrices in {type(model).__name__} "
            "(it is for HookedTransformer / TransformerBridge language models)"
        )
    return chosen


def vpd_config(model: nn.Module, *, c_scale: float = 1.0, **changes: Any) -> SPDConfig:
    """The VPD recipe for a HookedTransformer or TransformerBridge: every attention and MLP matrix with
    C per matrix from :func:`lm_matrices`, and the settings in this module's docstring. ``changes``: any
    :class:`SPDConfig` fields to override."""
    chosen = lm_matrices(model, c_scale)
    n_params = sum(get_parameter(model, name).numel() for name in chosen)
    d_model = getattr(getattr(model, "cfg", None), "d_model", None) or 128
    settings: dict[str, Any] = dict(
        weights=tuple(chosen),
        n_subcomponents=chosen,
        output_loss="kl",
        stochastic_recon_coeff=0.0,
        stochastic_recon_layerwise_coeff=0.0,
        stochastic_recon_subset_coeff=1.0,
        pgd_recon_coeff=1.0,
        pgd_scope="persistent",
        pgd_warmup_updates=2,
        pgd_adam_lr=0.01,
        pgd_adam_betas=(0.5, 0.99),
        pgd_init="random",
        pgd_subset_routing=True,
        ci_fn="global_mlp",
        ci_global_hidden=(2 * d_model,),
        importance_minimality_coeff=2e-4,
        importance_beta=0.5,
        importance_p=2.0,
        p_anneal_final=0.4,
        p_anneal_start_frac=0.0,
        p_anneal_end_frac=1.0,
        faithfulness_coeff=FAITHFULNESS_PER_PARAMETER * n_params,
        faithfulness_warmup_steps=400,
        faithfulness_warmup_lr=1e-3,
        faithfulness_warmup_weight_decay=0.0,
        grad_clip_subcomponents=0.01,
        lr=5e-4,
        lr_schedule="cosine",
        batch_size=32,
        steps=10_000,
        extra={"preset": "vpd"},
    )
    settings.update(changes)
    return SPDConfig(**settings)


def lm_toy_recipe(model: nn.Module, *, c_scale: float = 1.0, **changes: Any) -> SPDConfig:
    """The toy models' SPD recipe (the paper's: one scalar CI MLP per subcomponent, stochastic and
    layerwise reconstruction, importance minimality 1e-4 at p 2, faithfulness coefficient 1 with 200
    warm-up steps) on the same matrices, C, batch, steps and lr schedule as :func:`vpd_config`, with
    the KL output distance: VPD's additions are what differs."""
    vpd = vpd_config(model, c_scale=c_scale)
    settings: dict[str, Any] = dict(
        weights=vpd.weights,
        n_subcomponents=vpd.n_subcomponents,
        output_loss="kl",
        lr=vpd.lr,
        lr_schedule=vpd.lr_schedule,
        batch_size=vpd.batch_size,
        steps=vpd.steps,
        extra={"preset": "lm_toy"},
    )
    settings.update(changes)
    return SPDConfig(**settings)


SPD_PRESETS = {"vpd": vpd_config, "lm_toy": lm_toy_recipe}
"""SPD presets for models that carry no ``spd_default_config`` of their own (language models), by name."""
