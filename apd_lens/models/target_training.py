"""Training a toy target model on its synthetic data (AdamW, warmup/cosine schedule)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from apd_lens.training.schedule import lr_factor


def train_target(
    model: nn.Module,
    batches: Iterator[tuple[Tensor, Tensor]],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    steps: int,
    lr: float,
    weight_decay: float = 0.01,
    schedule: str = "constant",
    warmup_frac: float = 0.0,
    progress: bool = True,
) -> list[float]:
    """Train ``model`` on (input, label) batches; returns the loss every 100 steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    history = []
    for step in tqdm(range(steps), disable=not progress, desc="target", dynamic_ncols=True):
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_factor(step, steps, schedule, warmup_frac)
        x, y = next(batches)
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            history.append(loss.item())
    model.requires_grad_(False)
    return history
