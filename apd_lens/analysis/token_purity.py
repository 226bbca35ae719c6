"""Token purity: how much of a unit's firing is on one token. For subcomponents from a
:class:`~apd_lens.analysis.harvest.Harvest`, for a HookedTransformer's MLP neurons from its own hooks,
so the two can be compared on the same text."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor, nn

from apd_lens.adapters.tokens import check_tokens
from apd_lens.analysis.harvest import Harvest, NothingFiresError, _Counter


@dataclass
class TokenPurity:
    """Per unit (alive subcomponent, or MLP neuron that fires): the share of its firing positions
    whose current token is its most common one (``current``), and likewise of its firing positions
    that have a next token, for the next token (``next``; NaN where none has one)."""

    units: list[str]
    current: list[float]
    next: list[float]
    n_firing: list[int]

    def summary(self) -> dict[str, float | int]:
        """Number of units, mean and quartiles of both purities."""
        out: dict[str, float | int] = {"n_units": len(self.units)}
        for name in ("current", "next"):
            values = torch.tensor(getattr(self, name), dtype=torch.float64)
            values = values[~values.isnan()]
            if values.numel() == 0:
                continue
            out[f"{name}_mean"] = float(values.mean())
            for q in (0.25, 0.5, 0.75):
                out[f"{name}_q{int(q * 100)}"] = float(values.quantile(q))
        return out


def _purity(n_firing: int, n_with_next: int, current: list[tuple[int, int]], following: list[tuple[int, int]]):
    cur = current[0][1] / n_firing
    nxt = following[0][1] / n_with_next if n_with_next > 0 and following else math.nan
    return cur, nxt


def token_purity(harvest_result: Harvest) -> TokenPurity:
    """:class:`TokenPurity` of every alive subcomponent of a language-model harvest."""
    if harvest_result.kind != "tokens":
        raise ValueError("token purity needs a language-model harvest (tokens), not a toy model's (features)")
    cards = harvest_result.alive_cards()
    if not cards:
        raise NothingFiresError("no subcomponent fires in this harvest: no token purity to measure")
    pairs = [_purity(c.n_firing, c.n_firing_with_next, c.current_tokens, c.next_tokens) for c in cards]
    return TokenPurity(
        [f"{c.site}:{c.index}" for c in cards],
        [p[0] for p in pairs],
        [p[1] for p in pairs],
        [c.n_firing for c in cards],
    )


def neuron_token_purity(model: nn.Module, tokens: Int[Tensor, "n pos"], *, batch_size: int = 32) -> TokenPurity:
    """:class:`TokenPurity` of the MLP neurons of a HookedTransformer (firing: ``blocks.L.mlp.hook_post``
    > 0) on ``tokens``, for comparison with :func:`token_purity` on the same text."""
    if not isinstance(tokens, Tensor) or tokens.ndim != 2 or torch.is_floating_point(tokens) or tokens.numel() == 0:
        raise ValueError("neuron_token_purity needs non-empty integer token ids [n, pos]")
    check_tokens(model, tokens)
    n_layers, d_vocab = model.cfg.n_layers, model.cfg.d_vocab
    names = [f"blocks.{layer}.mlp.hook_post" for layer in range(n_layers)]
    missing = [n for n in names if n not in model.hook_dict]
    if missing:
        raise ValueError(f"the model has no MLP post-activation hooks {missing} (attention-only?)")
    current = [_Counter(d_vocab) for _ in names]
    following = [_Counter(d_vocab) for _ in names]
    fired = [0] * len(names)
    fired_next = [0] * len(names)
    device = next(model.parameters()).device
    n_pos = tokens.shape[1]
    with torch.no_grad():
        for start in range(0, tokens.shape[0], batch_size):
            x = tokens[start : start + batch_size].to(device)
            _, cache = model.run_with_cache(x, names_filter=lambda n: n in names)
            flat = x.reshape(-1)
            for i, name in enumerate(names):
                fires = cache[name].reshape(flat.shape[0], -1) > 0
                fired[i] = fired[i] + fires.sum(0).cpu()
                fired_next[i] = fired_next[i] + fires.reshape(x.shape[0], n_pos, -1)[:, :-1].sum((0, 1)).cpu()
                point, unit = fires.nonzero(as_tuple=True)
                current[i].add(unit, flat[point])
                has_next = point % n_pos < n_pos - 1
                following[i].add(unit[has_next], flat[point[has_next] + 1])
    units, cur, nxt, counts = [], [], [], []
    for i, name in enumerate(names):
        d_mlp = fired[i].shape[0]
        tops, next_tops = current[i].most_common(d_mlp, 1), following[i].most_common(d_mlp, 1)
        for n in range(d_mlp):
            if int(fired[i][n]) == 0:
                continue
            c, f = _purity(int(fired[i][n]), int(fired_next[i][n]), tops[n], next_tops[n])
            units.append(f"{name.removesuffix('.hook_post')}:{n}")
            cur.append(c)
            nxt.append(f)
            counts.append(int(fired[i][n]))
    return TokenPurity(units, cur, nxt, counts)
