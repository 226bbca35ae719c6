"""VPD's persistent adversarial mask sources, and the between-steps work of an SPD run.

With ``pgd_scope="persistent"`` the adversarial sources are not drawn afresh each step: every site
keeps one source per data point (each row of the flattened batch, i.e. per sequence and position
for tokens; the reference's ``per_batch_per_position`` scope) and subcomponent, plus a last column
for the delta component, ``[n, C (+1)]``, across steps. Each step they take ``pgd_warmup_updates``
Adam ascent updates before the loss and one after it, from the gradient of the loss itself (the
reference's ``n_warmup_steps + 1``; all through one Adam state, bias-corrected by the count of all
updates so far), each clamped to [0, 1]. The sources and Adam's moments are checkpointed, so a
resumed run continues exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from apd_lens.methods.spd.losses import pgd_sources


class PersistentSources:
    """Per site name, sources ``[n, C (+1)]`` in [0, 1] and their Adam moments, kept across steps."""

    def __init__(self, lr: float, betas: tuple[float, float], eps: float):
        self.lr, self.betas, self.eps = lr, tuple(betas), eps
        self.sources: dict[str, Tensor] = {}
        self.exp_avg: dict[str, Tensor] = {}
        self.exp_avg_sq: dict[str, Tensor] = {}
        self.updates = 0
        self.pending: dict[str, Tensor] | None = None
        """The sources as the last loss pass used them (leaves whose ``.grad`` the backward fills)."""

    def ensure(
        self, shapes: dict[str, tuple[int, int]], init: str, like: Tensor, generator: torch.Generator | None
    ) -> None:
        """Draw the sources on the first step (``init`` as :func:`pgd_sources`; this rank's rows of the
        global batch's draws); later, check that the batch still has the same shape."""
        if not self.sources:
            self.sources = pgd_sources(shapes, init, like, generator)
            self.exp_avg = {k: torch.zeros_like(s) for k, s in self.sources.items()}
            self.exp_avg_sq = {k: torch.zeros_like(s) for k, s in self.sources.items()}
            return
        have = {k: tuple(s.shape) for k, s in self.sources.items()}
        if have != {k: tuple(v) for k, v in shapes.items()}:
            raise ValueError(
                f"persistent PGD keeps one source per data point, shaped {have}, but this batch needs {shapes}: "
                "every batch of a run with pgd_scope='persistent' must have the same shape (drop a ragged last batch)"
            )
        for store in (self.sources, self.exp_avg, self.exp_avg_sq):
            for k, t in store.items():
                if t.device != like.device or t.dtype != like.dtype:
                    store[k] = t.to(device=like.device, dtype=like.dtype)

    @torch.no_grad()
    def ascend(self, grads: dict[str, Float[Tensor, "n _C"]]) -> None:
        """One Adam ascent update ``s + lr m̂ / (sqrt(v̂) + eps)``, clamped to [0, 1]."""
        self.updates += 1
        beta1, beta2 = self.betas
        correction1, correction2 = 1 - beta1**self.updates, 1 - beta2**self.updates
        for key, source in self.sources.items():
            grad = grads[key]
            m = self.exp_avg[key].mul_(beta1).add_(grad, alpha=1 - beta1)
            v = self.exp_avg_sq[key].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            step = (m / correction1) / ((v / correction2).sqrt() + self.eps)
            self.sources[key] = (source + self.lr * step).clamp_(0.0, 1.0)

    def leaves(self) -> dict[str, Tensor]:
        """The sources as fresh leaves requiring grad, remembered for :meth:`apply_pending`."""
        self.pending = {k: s.detach().requires_grad_(True) for k, s in self.sources.items()}
        return self.pending

    def apply_pending(self, grad_scale: float) -> None:
        """The update after the backward: ascent along the gradient the backward left on the last loss
        pass's sources, times ``grad_scale``; nothing when there is none."""
        pending, self.pending = self.pending, None
        if pending is None or any(leaf.grad is None for leaf in pending.values()):
            return
        self.ascend({k: leaf.grad * grad_scale for k, leaf in pending.items()})

    def state_dict(self) -> dict[str, Any]:
        cpu = lambda d: {k: t.detach().cpu().clone() for k, t in d.items()}  # noqa: E731
        return {
            "sources": cpu(self.sources),
            "exp_avg": cpu(self.exp_avg),
            "exp_avg_sq": cpu(self.exp_avg_sq),
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sources = {k: t.clone() for k, t in state["sources"].items()}
        self.exp_avg = {k: t.clone() for k, t in state["exp_avg"].items()}
        self.exp_avg_sq = {k: t.clone() for k, t in state["exp_avg_sq"].items()}
        self.updates = int(state["updates"])
        self.pending = None


class PersistentPGDUpdate:
    """The training callback of persistent PGD: after each step, the update from the loss's gradient
    (``grad_scale`` undoes the loss coefficient and the ranks' local means); its state is the sources'."""

    def __init__(self, sources: PersistentSources, grad_scale: float):
        self.sources, self.grad_scale = sources, grad_scale

    def after_step(self, step: int, x: Tensor) -> None:
        self.sources.apply_pending(self.grad_scale)

    def state_dict(self) -> dict[str, Any]:
        return self.sources.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sources.load_state_dict(state)

    def close(self) -> None:
        """Nothing to release."""


class SubcomponentGradClip:
    """Clip the global gradient norm of ``params`` (every V and U) before each optimizer step, through
    an optimizer step pre-hook (after the gradients are averaged over ranks); stateless."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter], max_norm: float):
        self.params, self.max_norm = params, max_norm
        self._handle = optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.clip())

    def clip(self) -> None:
        torch.nn.utils.clip_grad_norm_([p for p in self.params if p.grad is not None], self.max_norm)

    def after_step(self, step: int, x: Tensor) -> None:
        """Nothing between steps: the clip runs inside the optimizer step."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Stateless."""

    def close(self) -> None:
        self._handle.remove()
