"""APDConfig: every setting of a decomposition, validated, serializable."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from apd_lens.engine.config import OUTPUT_LOSSES, DecompositionConfig

_CHOICES = {
    "attribution": ("gradient", "activation"),
    "attribution_source": ("target", "components"),
    "attribution_backend": ("auto", "vmap", "batched", "jvp"),
    "topk_mode": ("batch", "per_example"),
    "output_loss": OUTPUT_LOSSES,
}


@dataclass
class APDConfig(DecompositionConfig):
    """Settings of an APD decomposition. Defaults are generic; the toy models carry the
    paper's settings in ``model.apd_default_config()``, which ``decompose`` uses when no
    config is given. The shared fields (weights, steps, batch_size, lr, seed, ...) are
    keyword-only, from :class:`~apd_lens.engine.config.DecompositionConfig`."""

    method: ClassVar[str] = "apd"

    n_components: int = 10
    """C, the number of parameter components (shared by all decomposed weights)."""
    rank: int | None = None
    """Inner rank m of every component; None: min(d_in, d_out) of each weight."""
    topk: int | float = 1.0
    """Mean number of components kept per data point (batch top-k), or per data point exactly."""
    topk_mode: str = "batch"
    attribution: str = "gradient"
    attribution_source: str = "target"
    """Gradients of the target model, or of the component model with all components on."""
    attribution_probes: int | None = None
    """None: exact attributions; k: unbiased estimate from k random output probes."""
    attribution_chunk: int | None = None
    """At most this many output probes per batched backward (bounds memory); None: all at once."""
    attribution_backend: str = "auto"
    """How gradient attributions are computed (equal results): "vmap" (functorch; a gradient that
    is the same for every example is computed once), "batched" (one batched autograd backward),
    "jvp" (forward mode, one Jacobian-vector product per component: cheaper when C is close to
    the output width, as in TMS; exact, target attributions, one batch dim), "auto": vmap,
    falling back to batched with a warning if the model's forward cannot be vmapped."""
    faithfulness_coeff: int | float = 1.0
    minimality_coeff: int | float = 1.0
    simplicity_coeff: int | float = 1.0
    act_recon_coeff: int | float = 0.0
    act_recon_hooks: tuple[str, ...] = ()
    schatten_p: int | float = 1.0
    output_loss: str = "mse"
    unit_norm_A: bool = False
    """Renormalize every column of every A to unit norm over d_in after each step."""
    init_scale: int | float = 1.0
    split_every: int | None = None
    """Every this many steps, split each over-used component into an unused one (see
    :mod:`apd_lens.methods.apd.splitting`; not in the paper); None: never."""
    split_ratio: int | float = 1.5
    """Over-used: active at least this many times as often as the reference rate."""
    split_until: int | float = 0.5
    """Split only during this fraction of the run."""
    split_unused: int | float = 0.01
    """Unused (a split's target): active at most this fraction as often as the reference rate."""
    split_points: str = "active"
    """Data points that show how a component is used when it is split: ``"active"`` those where the
    top-k mask keeps it, ``"top"`` those where it has the largest attribution."""
    split_group_by: str = "all"
    """Group those points by the entering activations of ``"all"`` decomposed weights side by side, or of
    the ``"first"`` declared weight only."""
    split_reference: str = "live"
    """The reference rate: ``"live"`` the median live component, ``"carrying"`` the median of the
    busiest components carrying 80% of all activity (for C much larger than the number of mechanisms)."""
    merge_coactive: int | float | None = None
    """At each split check, first merge two live components kept together by top-k on at least this
    fraction of the points where either is kept (Jaccard), when their sum fits one component's rank: the
    freed one becomes a split target (a mechanism halved between two duplicates leaves no unused
    component for a merged pair; TMS 5-2 seed 2). None: never. Needs ``split_every``."""
    adopt_orphans: int | float | None = None
    """At each split check that leaves an unused component, look at this share of the kept data points
    the top-k forward reconstructs worst; if the input direction they share, moved out of every other
    component into the unused one, lowers the top-k error, keep that move (a mechanism smeared over many
    components that none owns; TMS 40-10; :mod:`apd_lens.methods.apd.adoption`). None: never. Needs
    ``split_every``."""

    def problems(self) -> list[str]:
        problems = super().problems()
        if not isinstance(self.n_components, int) or self.n_components < 1:
            problems.append(f"n_components (C) must be an integer >= 1, got {self.n_components!r}")
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            problems.append(f"rank must be None or an integer >= 1, got {self.rank!r}")
        if not self.topk > 0:
            problems.append(f"topk must be > 0, got {self.topk}")
        elif isinstance(self.n_components, int) and self.topk > self.n_components:
            problems.append(f"topk ({self.topk}) cannot be larger than n_components C ({self.n_components})")
        if self.topk_mode == "per_example" and float(self.topk) != int(self.topk):
            problems.append(f"per_example top-k must be a whole number, got {self.topk}")
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                problems.append(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not self.schatten_p > 0:
            problems.append(f"schatten_p must be > 0, got {self.schatten_p}")
        for name in ("faithfulness_coeff", "minimality_coeff", "simplicity_coeff", "act_recon_coeff"):
            if not getattr(self, name) >= 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.act_recon_coeff > 0 and not self.act_recon_hooks:
            problems.append("act_recon_coeff > 0 needs act_recon_hooks (the hooks to reconstruct)")
        if self.attribution_probes is not None and self.attribution_probes < 1:
            problems.append(f"attribution_probes must be None or >= 1, got {self.attribution_probes}")
        if self.attribution_backend == "jvp" and (
            self.attribution_probes is not None or self.attribution_source != "target"
        ):
            problems.append(
                "attribution_backend 'jvp' computes exact target attributions: it needs attribution_probes=None "
                f"and attribution_source='target', got {self.attribution_probes!r} and {self.attribution_source!r}"
            )
        if self.attribution_chunk is not None and self.attribution_chunk < 1:
            problems.append(f"attribution_chunk must be None or >= 1, got {self.attribution_chunk}")
        if not self.init_scale > 0:
            problems.append(f"init_scale must be > 0, got {self.init_scale}")
        if self.split_every is not None and (not isinstance(self.split_every, int) or self.split_every < 1):
            problems.append(f"split_every must be None or an integer >= 1, got {self.split_every!r}")
        if not self.split_ratio > 1:
            problems.append(f"split_ratio must be > 1, got {self.split_ratio}")
        if not 0 <= self.split_unused < 1:
            problems.append(f"split_unused must be in [0, 1), got {self.split_unused}")
        if self.split_points not in ("active", "top"):
            problems.append(f"split_points must be 'active' or 'top', got {self.split_points!r}")
        if self.split_group_by not in ("all", "first"):
            problems.append(f"split_group_by must be 'all' or 'first', got {self.split_group_by!r}")
        if self.split_reference not in ("live", "carrying"):
            problems.append(f"split_reference must be 'live' or 'carrying', got {self.split_reference!r}")
        if not 0 <= self.split_until <= 1:
            problems.append(f"split_until must be in [0, 1], got {self.split_until}")
        if self.merge_coactive is not None:
            if not 0 < self.merge_coactive <= 1:
                problems.append(f"merge_coactive must be None or in (0, 1], got {self.merge_coactive}")
            if self.split_every is None:
                problems.append("merge_coactive needs split_every (merges happen at the split checks)")
        if self.adopt_orphans is not None:
            if not 0 < self.adopt_orphans <= 0.5:
                problems.append(f"adopt_orphans must be None or in (0, 0.5], got {self.adopt_orphans}")
            if self.split_every is None:
                problems.append("adopt_orphans needs split_every (adoptions happen at the split checks)")
        return problems
