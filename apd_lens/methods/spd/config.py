"""SPDConfig: every setting of a stochastic parameter decomposition, validated, serializable."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import ClassVar

from apd_lens.engine.config import OUTPUT_LOSSES, DecompositionConfig
from apd_lens.methods.spd.causal_importance import CI_FN_KINDS

SAMPLINGS = ("continuous", "binomial")
PGD_INITS = ("random", "ones", "zeros")
PGD_SCOPES = ("shared", "per_point", "persistent")
LOSS_COEFFS = (
    "faithfulness_coeff",
    "stochastic_recon_coeff",
    "stochastic_recon_layerwise_coeff",
    "stochastic_recon_subset_coeff",
    "pgd_recon_coeff",
    "importance_minimality_coeff",
    "act_recon_coeff",
)


@dataclass
class SPDConfig(DecompositionConfig):
    """Settings of an SPD decomposition (Bushnaq, Braun, Sharkey et al. 2025). Defaults are the
    paper's generic ones; the toy models carry their own in ``model.spd_default_config()``. The
    shared fields (weights, steps, batch_size, lr, seed, ...) are keyword-only, from
    :class:`~apd_lens.engine.config.DecompositionConfig`."""

    method: ClassVar[str] = "spd"

    n_subcomponents: int | dict[str, int] = 100
    """C, rank-one subcomponents per decomposed weight: one number for all, or a dict from fnmatch
    pattern of the weight's name to C (the first matching pattern wins; every weight must match)."""
    use_delta_component: bool = True
    """Add the residual ``W - V U`` with its own uniform random mask per data point to every masked
    weight (the reference code's default), so the masked model can equal the target exactly."""
    ci_fn: str = "mlp"
    """Causal-importance function: ``"mlp"`` (one tiny MLP per subcomponent on its inner activation,
    the paper's), ``"vector_mlp"`` (one MLP per subcomponent on the whole input), ``"shared_mlp"``
    (one MLP per weight use mapping the input to all C), ``"global_mlp"`` (ONE MLP for the whole
    decomposition reading every site's RMS-normed entering activation at a data point together and
    giving every site's C scores: VPD's global causal-importance function, as its ``shared_mlp``
    global variant; see :class:`~apd_lens.methods.spd.causal_importance.GlobalMLPCI`)."""
    ci_hidden: int = 16
    """Hidden GELU units of the CI functions (d_gate)."""
    ci_global_hidden: tuple[int, ...] = ()
    """Hidden GELU layer widths of ``ci_fn="global_mlp"`` (empty: one layer of ``ci_hidden``)."""
    sampling: str = "continuous"
    """Mask sources r: ``"continuous"`` U(0, 1), ``"binomial"`` Bernoulli(1/2)."""
    n_mask_samples: int = 1
    """S, the number of mask samples per step for the stochastic losses."""
    faithfulness_coeff: int | float = 1.0
    stochastic_recon_coeff: int | float = 1.0
    stochastic_recon_layerwise_coeff: int | float = 1.0
    stochastic_recon_subset_coeff: int | float = 0.0
    """One masked pass per mask sample in which each data point has a random subset of the weights
    masked (k uniform in 1..n_weights, a uniformly random k-subset; the others at the target's
    weight): the reference's ``StochasticReconSubsetLoss`` for language models. One pass where the
    layerwise term needs one per weight use, so with many weights set this > 0 and
    ``stochastic_recon_layerwise_coeff=0`` for a lean step."""
    pgd_recon_coeff: int | float = 0.0
    """Reconstruction with adversarial masks (the reference's ``PGDReconLoss``; 0: off): every weight
    masked with ``m = g + (1 - g) s``, the sources ``s`` (and the delta component's weight) chosen by
    ``pgd_steps`` signed-gradient ascent steps on the output distance, clipped to [0, 1]. Each step
    costs one forward and backward more than the masked pass."""
    pgd_steps: int = 1
    pgd_step_size: int | float = 1.0
    pgd_init: str = "random"
    """Sources before the first ascent step: ``"random"`` U(0, 1), ``"ones"`` or ``"zeros"``."""
    pgd_scope: str = "shared"
    """``"shared"``: one source per subcomponent for the whole batch (all ranks of a distributed run;
    the reference's ``shared_across_batch``); ``"per_point"``: one per data point and subcomponent;
    ``"persistent"``: VPD's persistent sources (the reference's ``PersistentPGDReconLoss`` with scope
    ``per_batch_per_position``): one source per data point (each row of the flattened batch: per
    sequence and position for tokens) and subcomponent, plus one for the delta component, KEPT across
    steps (and in checkpoints), updated by Adam ascent ``pgd_warmup_updates`` times before the loss
    and once after it (from the loss's own gradient), clamped to [0, 1]; ``pgd_steps``,
    ``pgd_step_size`` are unused. The batch shape must stay the same over the run; under torchrun each
    rank keeps its own rows."""
    pgd_warmup_updates: int = 2
    """Persistent PGD: Adam ascent updates of the sources before the loss (with the CI and V, U held
    fixed); one more follows from the loss's gradient after the backward (reference: 2 + 1)."""
    pgd_adam_lr: int | float = 0.01
    """Persistent PGD: Adam's step size for the sources (reference 0.01)."""
    pgd_adam_betas: tuple[float, float] = (0.5, 0.99)
    """Persistent PGD: Adam's betas for the sources (reference 0.5, 0.99)."""
    pgd_adam_eps: int | float = 1e-8
    pgd_subset_routing: bool = False
    """Route the adversarial passes (PGD ascent and loss) like ``stochastic_recon_subset_coeff``: per
    data point a uniform-k random subset of the weights masked, the others at the target's weight
    (one draw per step, shared by the ascent updates and the loss). False: every weight masked."""
    importance_minimality_coeff: int | float = 1e-4
    importance_p: int | float = 2.0
    """p of the importance-minimality penalty ``sum |g_upper|^p``."""
    p_anneal_final: int | float | None = None
    """Anneal p linearly to this value (None: no annealing) ..."""
    p_anneal_start_frac: int | float = 1.0
    """... from this fraction of training ..."""
    p_anneal_end_frac: int | float = 1.0
    """... to this one."""
    importance_eps: int | float = 1e-12
    """Added to the CI before the power p."""
    importance_beta: int | float = 0.0
    """Frequency term of the importance penalty (the reference's ``beta``; 0: off): each subcomponent's
    mean ``(g + eps)^p`` is multiplied by ``1 + beta log2(1 + its sum over the batch)``, so that one
    subcomponent serving many inputs costs more than several serving them apart. Depends on the
    batch size."""
    act_recon_coeff: int | float = 0.0
    """Stochastic reconstruction of the activations at ``act_recon_hooks`` (0: off)."""
    act_recon_hooks: tuple[str, ...] = ()
    output_loss: str = "mse"
    """Distance of the masked model's output to the target's: ``"mse"`` or ``"kl"`` (logits)."""
    faithfulness_warmup_steps: int = 200
    """Steps of faithfulness alone (AdamW over V and U) before the main run; 0: none."""
    faithfulness_warmup_lr: int | float = 0.01
    faithfulness_warmup_weight_decay: int | float = 0.1
    grad_clip_subcomponents: int | float | None = None
    """Clip the global norm of the gradients of every V and U (together) to this before each optimizer
    step (VPD: 0.01); None: no clipping. The CI functions' gradients are not clipped (as VPD)."""

    def problems(self) -> list[str]:
        problems = super().problems()
        counts = self.n_subcomponents.values() if isinstance(self.n_subcomponents, dict) else [self.n_subcomponents]
        if isinstance(self.n_subcomponents, dict) and not self.n_subcomponents:
            problems.append("n_subcomponents (C) is an empty dict: give one C or at least one pattern -> C")
        for c in counts:
            if isinstance(c, bool) or not isinstance(c, int) or c < 1:
                problems.append(f"n_subcomponents (C) must be integers >= 1, got {self.n_subcomponents!r}")
                break
        if self.ci_fn not in CI_FN_KINDS:
            problems.append(f"ci_fn must be one of {CI_FN_KINDS}, got {self.ci_fn!r}")
        if isinstance(self.ci_hidden, bool) or not isinstance(self.ci_hidden, int) or self.ci_hidden < 1:
            problems.append(f"ci_hidden must be an integer >= 1, got {self.ci_hidden!r}")
        if self.sampling not in SAMPLINGS:
            problems.append(f"sampling must be one of {SAMPLINGS}, got {self.sampling!r}")
        if not isinstance(self.n_mask_samples, int) or self.n_mask_samples < 1:
            problems.append(f"n_mask_samples (S) must be an integer >= 1, got {self.n_mask_samples!r}")
        for name in LOSS_COEFFS:
            if not getattr(self, name) >= 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if isinstance(self.pgd_steps, bool) or not isinstance(self.pgd_steps, int) or self.pgd_steps < 0:
            problems.append(f"pgd_steps must be an integer >= 0, got {self.pgd_steps!r}")
        if not self.pgd_step_size > 0:
            problems.append(f"pgd_step_size must be > 0, got {self.pgd_step_size}")
        if self.pgd_init not in PGD_INITS:
            problems.append(f"pgd_init must be one of {PGD_INITS}, got {self.pgd_init!r}")
        if isinstance(self.pgd_warmup_updates, bool) or not isinstance(self.pgd_warmup_updates, int):
            problems.append(f"pgd_warmup_updates must be an integer >= 0, got {self.pgd_warmup_updates!r}")
        elif self.pgd_warmup_updates < 0:
            problems.append(f"pgd_warmup_updates must be an integer >= 0, got {self.pgd_warmup_updates!r}")
        if not self.pgd_adam_lr > 0:
            problems.append(f"pgd_adam_lr must be > 0, got {self.pgd_adam_lr}")
        betas = tuple(self.pgd_adam_betas)
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            problems.append(f"pgd_adam_betas must be two numbers in [0, 1), got {self.pgd_adam_betas!r}")
        if not self.pgd_adam_eps > 0:
            problems.append(f"pgd_adam_eps must be > 0, got {self.pgd_adam_eps}")
        if self.grad_clip_subcomponents is not None and not self.grad_clip_subcomponents > 0:
            problems.append(f"grad_clip_subcomponents must be None or > 0, got {self.grad_clip_subcomponents}")
        hidden = self.ci_global_hidden
        if not isinstance(hidden, tuple) or not all(
            isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden
        ):
            problems.append(f"ci_global_hidden must be integers >= 1, got {self.ci_global_hidden!r}")
        if self.pgd_scope not in PGD_SCOPES:
            problems.append(f"pgd_scope must be one of {PGD_SCOPES}, got {self.pgd_scope!r}")
        if not self.importance_p > 0:
            problems.append(f"importance_p must be > 0, got {self.importance_p}")
        if self.p_anneal_final is not None and not self.p_anneal_final > 0:
            problems.append(f"p_anneal_final must be None or > 0, got {self.p_anneal_final}")
        if not 0 <= self.p_anneal_start_frac <= self.p_anneal_end_frac <= 1:
            problems.append(
                "p annealing needs 0 <= p_anneal_start_frac <= p_anneal_end_frac <= 1, got "
                f"{self.p_anneal_start_frac} and {self.p_anneal_end_frac}"
            )
        if not self.importance_beta >= 0:
            problems.append(f"importance_beta must be >= 0, got {self.importance_beta}")
        if not self.importance_eps >= 0:
            problems.append(f"importance_eps must be >= 0, got {self.importance_eps}")
        if self.act_recon_coeff > 0 and not self.act_recon_hooks:
            problems.append("act_recon_coeff > 0 needs act_recon_hooks (the hooks to reconstruct)")
        if self.output_loss not in OUTPUT_LOSSES:
            problems.append(f"output_loss must be one of {OUTPUT_LOSSES}, got {self.output_loss!r}")
        if not isinstance(self.faithfulness_warmup_steps, int) or self.faithfulness_warmup_steps < 0:
            problems.append(
                f"faithfulness_warmup_steps must be an integer >= 0, got {self.faithfulness_warmup_steps!r}"
            )
        if not self.faithfulness_warmup_lr > 0:
            problems.append(f"faithfulness_warmup_lr must be > 0, got {self.faithfulness_warmup_lr}")
        if not self.faithfulness_warmup_weight_decay >= 0:
            problems.append(
                f"faithfulness_warmup_weight_decay must be >= 0, got {self.faithfulness_warmup_weight_decay}"
            )
        return problems

    def subcomponents_for(self, weight: str) -> int:
        """C of the weight called ``weight``."""
        if not isinstance(self.n_subcomponents, dict):
            return self.n_subcomponents
        for pattern, c in self.n_subcomponents.items():
            if fnmatch.fnmatchcase(weight, pattern):
                return c
        raise KeyError(
            f"n_subcomponents gives no C for weight {weight!r}: none of the patterns {list(self.n_subcomponents)} "
            "matches it (add one, e.g. '*': C)"
        )

    def importance_p_at(self, progress: float) -> float:
        """p of the importance penalty at ``progress`` (fraction of training done)."""
        if self.p_anneal_final is None or progress < self.p_anneal_start_frac:
            return self.importance_p
        if progress >= self.p_anneal_end_frac:
            return self.p_anneal_final
        span = self.p_anneal_end_frac - self.p_anneal_start_frac
        return (
            self.importance_p + (self.p_anneal_final - self.importance_p) * (progress - self.p_anneal_start_frac) / span
        )
