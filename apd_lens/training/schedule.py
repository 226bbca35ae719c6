"""Learning-rate schedule: linear warmup, then constant, cosine or linear decay."""

from __future__ import annotations

import math


def lr_factor(step: int, total_steps: int, schedule: str, warmup_frac: float) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based)."""
    warmup = int(warmup_frac * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(total_steps - warmup, 1)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    raise ValueError(f"unknown lr schedule {schedule!r}")
