"""Evaluation of an SPD / VPD decomposition of a language model on held-out token sequences.

What VPD reports for its 67M-parameter model (``../shared/reference/vpd-method.md``), in one typed
result: next-token cross-entropy (CE) of the target and of the decomposed model with every
subcomponent on, with stochastic masks, with the causal importances (CI) as masks and with the CI
rounded (> 0, > 0.5); the KL divergence to the target under fresh adversarial masks (one source per
subcomponent, shared across the batch and positions, chosen by sign-gradient ascent); the alive
subcomponents (mean CI > 1e-6) and the mean L0 per token (CI > 0), per decomposed matrix.

In every masked forward the delta component (``W - Σ`` subcomponents) is on in full, except under the
adversarial masks, where it has an adversarial source of its own as in training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from apd_lens.analysis.json_result import JsonResult
from apd_lens.engine.losses import output_loss
from apd_lens.methods.spd.decomposition import SPDDecomposition
from apd_lens.methods.spd.losses import masks_from_sources, pgd_ascent
from apd_lens.models.lm.training import next_token_ce

ALIVE_THRESHOLD = 1e-6
"""A subcomponent is alive when its mean CI over the held-out tokens is above this."""
ADV_STEP_BUDGET = 2.0
"""The adversary's steps times its step size (VPD: steps × step ≈ 2)."""
LM_EVAL_FILE = "lm_eval.json"


@dataclass
class LMEvaluation(JsonResult):
    """CE (nats per token) of the target and of the decomposed model under each kind of mask, the
    adversarial KL per number of ascent steps, and per site (decomposed matrix use) the alive
    subcomponents, their number and the mean L0 per token."""

    FILE: ClassVar[str] = LM_EVAL_FILE

    ce_target: float
    ce_all_on: float
    ce_stochastic: float
    ce_ci: float
    ce_ci_above_0: float
    ce_ci_above_half: float
    adversarial_kl: dict[int, float]
    alive: dict[str, int]
    n_subcomponents: dict[str, int]
    l0_per_token: dict[str, float]
    n_tokens: int
    n_sequences: int
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def l0_total(self) -> float:
        """Mean number of subcomponents with CI > 0 per token, over all sites."""
        return sum(self.l0_per_token.values())

    @property
    def alive_total(self) -> int:
        return sum(self.alive.values())

    @property
    def subcomponents_total(self) -> int:
        return sum(self.n_subcomponents.values())

    def table(self) -> str:
        """The evaluation as a plain-text table (CE rows with their change against the target)."""
        rows = [("target", self.ce_target)]
        rows += [
            ("all subcomponents on", self.ce_all_on),
            ("stochastic masks", self.ce_stochastic),
            ("CI rounded (CI > 0)", self.ce_ci_above_0),
            ("CI values as masks", self.ce_ci),
            ("CI rounded (CI > 0.5)", self.ce_ci_above_half),
        ]
        lines = [f"held-out: {self.n_sequences} sequences, {self.n_tokens} predicted tokens", ""]
        lines.append(f"{'forward':<24} {'CE (nats)':>10} {'vs target':>18}")
        for name, ce in rows:
            change = "" if name == "target" else f"{ce - self.ce_target:+.4f} ({100 * (ce / self.ce_target - 1):+.1f}%)"
            lines.append(f"{name:<24} {ce:>10.4f} {change:>18}")
        lines.append("")
        for steps, kl in sorted(self.adversarial_kl.items()):
            lines.append(f"adversarial KL to the target, {steps} sign-PGD steps (shared sources): {kl:.4f}")
        lines.append("")
        lines.append(f"{'site':<28} {'alive':>12} {'L0/token':>9}")
        for site, n in self.n_subcomponents.items():
            lines.append(f"{site:<28} {self.alive[site]:>5} / {n:<5} {self.l0_per_token[site]:>9.2f}")
        share = 100 * self.l0_total / max(self.alive_total, 1)
        lines.append(
            f"{'all':<28} {self.alive_total:>5} / {self.subcomponents_total:<5} {self.l0_total:>9.2f}"
            f"  (L0 = {share:.2f}% of the alive)"
        )
        return "\n".join(lines)

    def summary_line(self) -> str:
        """``CE_TARGET=… CE_CI=… CE_STOCH=… ADV_KL20=… L0=… ALIVE=n/total`` (the example's last line)."""
        first = min(self.adversarial_kl) if self.adversarial_kl else None
        adv = f" ADV_KL{first}={self.adversarial_kl[first]:.4f}" if first is not None else ""
        return (
            f"CE_TARGET={self.ce_target:.4f} CE_CI={self.ce_ci:.4f} CE_STOCH={self.ce_stochastic:.4f}{adv} "
            f"L0={self.l0_total:.2f} ALIVE={self.alive_total}/{self.subcomponents_total}"
        )

    def to_dict(self) -> dict:
        out = asdict(self)
        out["adversarial_kl"] = {str(k): v for k, v in self.adversarial_kl.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict) -> LMEvaluation:
        data = dict(data)
        data["adversarial_kl"] = {int(k): v for k, v in data["adversarial_kl"].items()}
        return cls(**data)


def _check_tokens(decomposition: SPDDecomposition, tokens: Tensor) -> None:
    if not isinstance(decomposition, SPDDecomposition):
        raise TypeError(f"evaluate_lm needs an SPD decomposition, got {type(decomposition).__name__}")
    if not isinstance(tokens, Tensor) or tokens.ndim != 2 or torch.is_floating_point(tokens):
        got = f"{tuple(tokens.shape)} {tokens.dtype}" if isinstance(tokens, Tensor) else type(tokens).__name__
        raise ValueError(f"evaluate_lm needs integer token sequences of shape [n_sequences, n_ctx], got {got}")
    if tokens.shape[1] < 2:
        raise ValueError(f"sequences need at least 2 tokens to predict one, got length {tokens.shape[1]}")


def adversarial_kl(
    decomposition: SPDDecomposition,
    tokens: Int[Tensor, "b pos"],
    ci: dict[str, Float[Tensor, "b pos _C"]],
    target_logits: Float[Tensor, "b pos vocab"],
    steps: int,
    generator: torch.Generator,
) -> float:
    """KL(target || masked) per token after ``steps`` sign-gradient ascent steps (step size
    ``ADV_STEP_BUDGET / steps``) on fresh sources shared across the batch and positions: one per
    subcomponent of each site and one for each site's delta component, starting at U(0, 1)."""
    step_size = ADV_STEP_BUDGET / steps
    batch_shape = tuple(tokens.shape)
    use_delta = decomposition.config.use_delta_component
    sources = {("ci", site): torch.rand(g.shape[-1], generator=generator).to(g) for site, g in ci.items()}
    if use_delta:
        sources.update({("delta", site): torch.rand((), generator=generator).to(g) for site, g in ci.items()})

    def kl(src: dict[tuple[str, str], Tensor]) -> Tensor:
        masks = masks_from_sources(ci, {site: src[("ci", site)] for site in ci})
        dmasks = {site: src[("delta", site)].expand(batch_shape) for site in ci} if use_delta else None
        out = decomposition.forward_with_masks(tokens, masks, delta_masks=dmasks).output
        return output_loss(out, target_logits, "kl")

    for _ in range(steps):
        leaves = {key: s.clone().requires_grad_(True) for key, s in sources.items()}
        with torch.enable_grad():
            grads = torch.autograd.grad(kl(leaves), list(leaves.values()))
        sources = pgd_ascent(sources, dict(zip(leaves, grads, strict=True)), step_size)
    with torch.no_grad():
        return float(kl(sources))


@torch.no_grad()
def evaluate_lm(
    decomposition: SPDDecomposition,
    tokens: Int[Tensor, "n_seq n_ctx"],
    batch_size: int = 16,
    adversarial_steps: tuple[int, ...] = (20, 80),
    adversarial_batches: int | None = 4,
    seed: int = 0,
    progress: bool = True,
) -> LMEvaluation:
    """Evaluate ``decomposition`` (of a language model: token sequences in, logits out) on held-out
    ``tokens``, in batches of ``batch_size`` sequences. The adversarial KL, which costs ``steps``
    forwards and backwards per batch, is averaged over the first ``adversarial_batches`` batches
    (None: all). ``seed`` fixes the stochastic masks and the adversary's starting sources."""
    _check_tokens(decomposition, tokens)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if any(not isinstance(s, int) or s < 1 for s in adversarial_steps):
        raise ValueError(f"adversarial_steps must be integers >= 1, got {adversarial_steps}")
    generator = torch.Generator().manual_seed(seed)
    device = next(decomposition.parameters()).device
    sums = dict.fromkeys(("target", "all_on", "stochastic", "ci", "ci_above_0", "ci_above_half"), 0.0)
    sites = decomposition.sites
    ci_sum = {s: torch.zeros(decomposition.n_subcomponents(s), dtype=torch.float64) for s in sites}
    l0_sum = dict.fromkeys(sites, 0.0)
    adv_sum = dict.fromkeys(adversarial_steps, 0.0)
    adv_batches = 0
    n_predicted, n_positions = 0, 0
    starts = range(0, tokens.shape[0], batch_size)
    for i, start in enumerate(tqdm(starts, disable=not progress, desc="LM evaluation", dynamic_ncols=True)):
        batch = tokens[start : start + batch_size].to(device)
        target_logits = decomposition.model(batch)
        ci = decomposition.causal_importances(batch)
        forwards = {
            "target": target_logits,
            "all_on": decomposition(batch),
            "stochastic": decomposition(batch, decomposition.sample_masks(ci, generator)),
            "ci": decomposition(batch, ci),
            "ci_above_0": decomposition(batch, {s: (g > 0).to(g.dtype) for s, g in ci.items()}),
            "ci_above_half": decomposition(batch, {s: (g > 0.5).to(g.dtype) for s, g in ci.items()}),
        }
        for name, logits in forwards.items():
            sums[name] += float(next_token_ce(logits, batch, "sum"))
        for site, g in ci.items():
            ci_sum[site] += g.reshape(-1, g.shape[-1]).double().sum(0).cpu()
            l0_sum[site] += float((g > 0).sum())
        n_predicted += batch.shape[0] * (batch.shape[1] - 1)
        n_positions += batch.numel()
        if adversarial_batches is None or i < adversarial_batches:
            adv_batches += 1
            for steps in adversarial_steps:
                adv_sum[steps] += adversarial_kl(decomposition, batch, ci, target_logits, steps, generator)
    ce = {name: total / n_predicted for name, total in sums.items()}
    return LMEvaluation(
        ce_target=ce["target"],
        ce_all_on=ce["all_on"],
        ce_stochastic=ce["stochastic"],
        ce_ci=ce["ci"],
        ce_ci_above_0=ce["ci_above_0"],
        ce_ci_above_half=ce["ci_above_half"],
        adversarial_kl={s: v / adv_batches for s, v in adv_sum.items()} if adv_batches else {},
        alive={s: int((ci_sum[s] / n_positions > ALIVE_THRESHOLD).sum()) for s in sites},
        n_subcomponents={s: decomposition.n_subcomponents(s) for s in sites},
        l0_per_token={s: l0_sum[s] / n_positions for s in sites},
        n_tokens=n_predicted,
        n_sequences=int(tokens.shape[0]),
    )
