"""An induction-head target: a 2-layer attention-only transformer trained on repeated random tokens.

Each sequence is ``[BOS, random tokens, t_1 .. t_n, t_1 .. t_n, random tokens]`` with every token uniform
over the non-BOS tokens, and where the copies start and their length ``n`` varying between sequences. The
first copy cannot be predicted (best loss ``log(d_vocab - 1)``); the second can, by copying in context: the
textbook circuit is a previous-token head (layer 0) writing each token's predecessor into its position,
and an induction head (layer 1) attending from ``t_i`` (second copy) to the position after ``t_i``'s first
occurrence and copying that token. Built from a config (no downloads) as a TransformerLens
HookedTransformer (TL 3.x).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from apd_lens.methods.apd.config import APDConfig
from apd_lens.methods.spd.config import SPDConfig
from apd_lens.models.hooked_transformer_target import build_hooked_transformer
from apd_lens.models.target_training import train_target


@dataclass(frozen=True)
class InductionTask:
    """Token 0 is BOS; a sequence is BOS, ``r`` random tokens, ``n`` random tokens (the first copy), the same
    ``n`` tokens again (the second copy), then random tokens up to ``n_ctx = 1 + max_prefix + 2 * max_len``.
    ``n`` is drawn per sequence from ``[min_len, max_len]`` (default ``max_len // 2``) and ``r`` from
    ``[0, max_prefix]`` (default ``max_len``), so neither where the copies sit nor how far apart they are
    is fixed: copying needs the tokens' content (an induction circuit), not a positional offset."""

    d_vocab: int = 64
    max_len: int = 8
    min_len: int | None = None
    max_prefix: int | None = None

    def __post_init__(self) -> None:
        if self.d_vocab < 3 or self.max_len < 2:
            raise ValueError(f"need d_vocab >= 3 and max_len >= 2, got {self.d_vocab}, {self.max_len}")
        if not 2 <= self.shortest <= self.max_len:
            raise ValueError(f"min_len must be in [2, max_len], got {self.min_len}")
        if self.prefix < 0:
            raise ValueError(f"max_prefix must be >= 0, got {self.max_prefix}")

    @property
    def shortest(self) -> int:
        return self.min_len if self.min_len is not None else max(2, self.max_len // 2)

    @property
    def prefix(self) -> int:
        return self.max_prefix if self.max_prefix is not None else self.max_len

    @property
    def n_ctx(self) -> int:
        return 1 + self.prefix + 2 * self.max_len

    def sequences(self, n: int, generator: torch.Generator) -> tuple[Int[Tensor, "n n_ctx"], Int[Tensor, "n 2"]]:
        """``n`` sequences and, per sequence, (start of the first copy, length of a copy)."""
        tokens = torch.randint(1, self.d_vocab, (n, self.n_ctx), generator=generator)
        lengths = torch.randint(self.shortest, self.max_len + 1, (n,), generator=generator)
        starts = 1 + torch.randint(0, self.prefix + 1, (n,), generator=generator)
        tokens[:, 0] = 0
        pos = torch.arange(self.n_ctx)[None]
        second = (pos >= (starts + lengths)[:, None]) & (pos < (starts + 2 * lengths)[:, None])
        source = (pos - lengths[:, None]).clamp(min=0)
        tokens = torch.where(second, tokens.gather(1, source), tokens)
        return tokens, torch.stack([starts, lengths], dim=1)

    def first_half_mask(self, copies: Int[Tensor, "n 2"]) -> Bool[Tensor, "n n_ctx_minus_1"]:
        """Positions whose next token is in the first copy (unpredictable)."""
        pos = torch.arange(self.n_ctx - 1)[None]
        starts, lengths = copies[:, :1], copies[:, 1:]
        return (pos >= starts - 1) & (pos < starts + lengths - 1)

    def repeat_mask(self, copies: Int[Tensor, "n 2"]) -> Bool[Tensor, "n n_ctx_minus_1"]:
        """Positions inside the second copy whose next token is also in it: predictable by copying (the
        position before the second copy, whose next token starts it, is in neither mask)."""
        pos = torch.arange(self.n_ctx - 1)[None]
        starts, lengths = copies[:, :1], copies[:, 1:]
        return (pos >= starts + lengths) & (pos < starts + 2 * lengths - 1)

    def chance_loss(self) -> float:
        """The best loss on the first copy: uniform over the ``d_vocab - 1`` non-BOS tokens."""
        return math.log(self.d_vocab - 1)


def make_induction_model(
    task: InductionTask, d_model: int = 32, n_heads: int = 2, seed: int = 0, positional: str = "rotary"
):
    """A 2-layer attention-only HookedTransformer (LNPre) for ``task``, with rotary positions by default:
    with learned absolute positions (``positional="standard"``) the model settles, within 6000 steps, for
    heads that look back a fixed number of positions (second-copy loss 0.48 instead of ~0)."""
    return build_hooked_transformer(
        "induction",
        n_layers=2,
        d_model=d_model,
        n_heads=n_heads,
        d_vocab=task.d_vocab,
        n_ctx=task.n_ctx,
        attn_only=True,
        positional_embedding_type=positional,
        rotary_dim=d_model // n_heads if positional == "rotary" else None,
        seed=seed,
    )


def next_token_losses(
    logits: Float[Tensor, "batch pos vocab"], tokens: Int[Tensor, "batch pos"]
) -> Float[Tensor, "batch pos_minus_1"]:
    """Cross-entropy of each position's prediction of the next token."""
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")


def half_losses(
    logits: Float[Tensor, "batch pos vocab"],
    tokens: Int[Tensor, "batch pos"],
    copies: Int[Tensor, "batch 2"],
    task: InductionTask,
) -> tuple[float, float]:
    """(first-copy loss, second-copy loss): mean next-token losses over the two sets of positions."""
    losses = next_token_losses(logits, tokens)
    return losses[task.first_half_mask(copies)].mean().item(), losses[task.repeat_mask(copies)].mean().item()


def train_induction(
    model,
    task: InductionTask,
    steps: int = 6000,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Next-token cross-entropy on every position (AdamW, wd 0.01, cosine with 2% warmup)."""
    gen = torch.Generator().manual_seed(seed)

    def batches():
        while True:
            x, _ = task.sequences(batch_size, gen)
            yield x, x

    def loss_fn(logits: Tensor, tokens: Tensor) -> Tensor:
        return next_token_losses(logits, tokens).mean()

    return train_target(model, batches(), loss_fn, steps, lr, schedule="cosine", warmup_frac=0.02, progress=progress)


ATTENTION_WEIGHTS = ("blocks.*.attn.W_[QKVO]",)


def induction_spd_config(**changes) -> SPDConfig:
    """SPD settings for W_Q, W_K, W_V and W_O of both layers: KL output distance, token positions as data
    points, C 32 per matrix, CI functions that read the whole input (``vector_mlp``; with the paper's
    per-subcomponent ``mlp`` ablating the copying units left 14-20% of the way to no copying), importance
    1e-3 with p 1 (as for the fact-lookup model), batch 32 sequences. With the reference's C 100 per matrix
    the copying units are a smaller share (58 / 800 on seed 0) but remove less of the copying (docs/results.md)."""
    base = dict(
        weights=ATTENTION_WEIGHTS,
        n_subcomponents=32,
        importance_minimality_coeff=1e-3,
        importance_p=1.0,
        ci_fn="vector_mlp",
        ci_hidden=16,
        output_loss="kl",
        lr=1e-3,
        lr_schedule="constant",
        batch_size=32,
        steps=4000,
    )
    return SPDConfig(**{**base, **changes})


def induction_apd_config(**changes) -> APDConfig:
    """APD settings for the same weights: KL output, attributions estimated with 16 random output probes
    (exact ones need one backward per vocabulary entry and position), C 32 of rank 8, batch top-k 2."""
    base = dict(
        weights=ATTENTION_WEIGHTS,
        n_components=32,
        rank=8,
        topk=2.0,
        output_loss="kl",
        attribution_probes=16,
        faithfulness_coeff=100.0,
        minimality_coeff=1.0,
        simplicity_coeff=1.0,
        lr=1e-3,
        lr_schedule="cosine",
        batch_size=32,
        steps=4000,
    )
    return APDConfig(**{**base, **changes})
