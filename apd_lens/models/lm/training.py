"""Training a language model on a token stream and measuring its next-token cross-entropy."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from apd_lens.models.target_training import train_target


def next_token_ce(
    logits: Float[Tensor, "batch pos vocab"], tokens: Int[Tensor, "batch pos"], reduction: str = "mean"
) -> Tensor:
    """Cross-entropy of predicting ``tokens[:, 1:]`` from the logits at the positions before: their
    mean, or with ``reduction="sum"`` their sum."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction=reduction)


def random_windows(
    stream: Int[Tensor, " n_tokens"], n_ctx: int, batch_size: int, generator: torch.Generator
) -> Int[Tensor, "batch_size n_ctx"]:
    """``batch_size`` windows of ``n_ctx`` consecutive tokens starting at uniformly drawn positions."""
    if stream.shape[0] < n_ctx:
        raise ValueError(f"a stream of {stream.shape[0]} tokens is shorter than one window of n_ctx={n_ctx}")
    starts = torch.randint(0, stream.shape[0] - n_ctx + 1, (batch_size,), generator=generator)
    return stream[starts[:, None] + torch.arange(n_ctx)]


def train_lm(
    model: nn.Module,
    stream: Int[Tensor, " n_tokens"],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    warmup_frac: float,
    seed: int,
    progress: bool = True,
) -> list[float]:
    """Train ``model`` (tokens -> logits) on random windows of ``stream`` with AdamW, linear warm-up
    and cosine decay; returns the training loss every 100 steps."""
    n_ctx = model.cfg.n_ctx
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            window = random_windows(stream, n_ctx, batch_size, generator).to(device)
            yield window, window

    return train_target(
        model,
        batches(),
        next_token_ce,
        steps,
        lr,
        weight_decay=weight_decay,
        schedule="cosine",
        warmup_frac=warmup_frac,
        progress=progress,
    )


@torch.no_grad()
def held_out_ce(model: nn.Module, windows: Int[Tensor, "n n_ctx"], batch_size: int = 64) -> float:
    """Mean next-token cross-entropy (nats) over all predicted positions of ``windows``."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        tokens = windows[start : start + batch_size].to(device)
        logits = model(tokens)
        total += next_token_ce(logits, tokens, "sum").item()
        count += tokens[:, 1:].numel()
    return total / count
