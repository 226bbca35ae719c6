"""Harvest: what each subcomponent of an SPD decomposition does, from one pass over held-out data.

Per site (decomposed weight use) and subcomponent ``c``, with "firing" meaning CI > FIRING_THRESHOLD:

- ``density``: the share of positions (tokens; data points for toy models) where it fires;
  ``mean_ci``: its mean CI over all positions;
- ``top_contexts``: the ``n_top`` firing positions of highest CI, each as a window of tokens with
  this subcomponent's CI at every token; ``sample_contexts``: a uniform sample (without
  replacement) of ``n_samples`` firing positions, likewise;
- ``current_tokens`` / ``next_tokens``: the tokens at (and after) its firing positions, most common
  first, with counts;
- for a weight that writes to the residual stream (a site ending in ``attn.W_O`` or ``mlp.W_out``)
  of a model with an unembedding ``W_U``: ``promoted`` / ``suppressed``, the tokens of highest and
  lowest ``U[c] @ W_U`` (its write vector read by the unembedding, with no norm in between);
- ``ablation``: for the ``n_ablate`` densest subcomponents, on the first ``ablation_sequences``
  inputs, ``KL(target || model with every subcomponent on except this one)`` (masks all ones on
  every site but 0 for ``c``; the delta component on where the config has it), per token, averaged
  over the tokens where ``c`` fires. For toy models (outputs are not logits) the mean squared error
  to the target's output instead, averaged over the data points where ``c`` fires.

For a toy model (float inputs ``[batch, n_features]``) the "context" of a firing data point is the
input itself: its active features (nonzero entries) as "tokens" with their values; the current
"tokens" are the active features; there are no next tokens.

:func:`token_purity`: per alive subcomponent, the share of its firing positions whose current (next)
token is its most common one; :func:`neuron_token_purity`: the same for the target's MLP neurons
(post-activation > 0) on the same text.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from apd_lens.adapters.tokens import check_tokens
from apd_lens.io import atomic_write_bytes
from apd_lens.methods.spd.decomposition import CI_L0_THRESHOLD, SPDDecomposition, site_name

FIRING_THRESHOLD = CI_L0_THRESHOLD
"""A subcomponent fires at a position where its CI is above this (0.1)."""
HARVEST_DIR = "harvest"
INDEX_FILE = "index.json"
RESIDUAL_WRITERS = ("attn.W_O", "mlp.W_out")
"""Sites whose name ends with one of these write to the residual stream: their U rows are d_model vectors."""


class NothingFiresError(ValueError):
    """No subcomponent fired (CI > FIRING_THRESHOLD) anywhere on the harvested data."""


# ------------------------------------------------------------------------------ results
@dataclass
class Context:
    """One firing position in its surroundings: ``tokens`` (token ids; feature indices for a toy
    model), this subcomponent's CI at each (``ci``; for a toy model the data point's CI for every
    feature), the index of the firing token in ``tokens``
    (``focus``; None for a toy model, whose context is one data point) and, for a toy model, the
    features' values."""

    tokens: list[int]
    ci: list[float]
    focus: int | None
    score: float
    """This subcomponent's CI at the firing position (data point)."""
    values: list[float] | None = None
    sequence: int = 0
    """Which input (row of the harvested data) it comes from."""


@dataclass
class SubcomponentCard:
    """Everything the harvest found about one subcomponent (see the module docstring)."""

    site: str
    index: int
    n_firing: int
    density: float
    mean_ci: float
    top_contexts: list[Context]
    sample_contexts: list[Context]
    current_tokens: list[tuple[int, int]]
    next_tokens: list[tuple[int, int]]
    n_firing_with_next: int
    """Firing positions that have a next token (not the last of their sequence)."""
    promoted: list[tuple[int, float]] | None = None
    suppressed: list[tuple[int, float]] | None = None
    ablation: float | None = None
    """KL (LM) or MSE (toy) to the target with only this subcomponent off; None where not computed."""
    ablation_metric: str = "kl"
    token_strings: list[str] | None = field(default=None, repr=False, compare=False)
    """The vocabulary for display (not saved with the card; :meth:`Harvest.card` sets it)."""

    @property
    def alive(self) -> bool:
        return self.n_firing > 0

    def label(self, token: int) -> str:
        if self.token_strings is not None and 0 <= token < len(self.token_strings):
            return self.token_strings[token]
        return f"f{token}" if self.ablation_metric == "mse" else f"#{token}"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("token_strings")
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SubcomponentCard:
        data = dict(data)
        for key in ("top_contexts", "sample_contexts"):
            data[key] = [Context(**c) for c in data[key]]
        for key in ("current_tokens", "next_tokens", "promoted", "suppressed"):
            if data.get(key) is not None:
                data[key] = [tuple(pair) for pair in data[key]]
        return cls(**data)

    def _repr_html_(self) -> str:
        esc = html.escape
        head = (
            f"<b>{esc(self.site)} #{self.index}</b>: density {self.density:.4g}, mean CI {self.mean_ci:.4g}, "
            f"fires {self.n_firing}x"
        )
        if self.ablation is not None:
            head += f", ablation {self.ablation_metric.upper()} {self.ablation:.4g}"
        parts = [f"<div>{head}</div>"]

        def token_table(title: str, pairs: list | None, fmt: str) -> None:
            if pairs:
                cells = "".join(f"<tr><td>{esc(self.label(t))}</td><td>{v:{fmt}}</td></tr>" for t, v in pairs)
                parts.append(f"<table><tr><th colspan=2>{title}</th></tr>{cells}</table>")

        token_table("current token", self.current_tokens, "d")
        token_table("next token", self.next_tokens, "d")
        token_table("promotes", self.promoted, ".3g")
        token_table("suppresses", self.suppressed, ".3g")
        for title, contexts in (("top contexts", self.top_contexts), ("random firing contexts", self.sample_contexts)):
            rows = []
            for ctx in contexts:
                spans = []
                for i, (t, g) in enumerate(zip(ctx.tokens, ctx.ci, strict=True)):
                    text = esc(self.label(t)) + (f"={ctx.values[i]:.2g}" if ctx.values is not None else "")
                    border = "outline:1px solid black;" if i == ctx.focus else ""
                    spans.append(f'<span style="background:rgba(255,80,0,{g:.3f});{border}">{text}</span>')
                rows.append(f"<tr><td>{''.join(spans)}</td></tr>")
            if rows:
                parts.append(f"<table><tr><th>{title}</th></tr>{''.join(rows)}</table>")
        return "".join(parts)


@dataclass
class Harvest:
    """A harvest of every subcomponent of a decomposition (``cards[site][c]``)."""

    kind: str
    """``"tokens"`` (a language model) or ``"features"`` (a toy model with float inputs)."""
    sites: list[str]
    n_points: int
    """Positions seen: tokens (batch x pos), or data points for a toy model."""
    n_sequences: int
    threshold: float
    cards: dict[str, list[SubcomponentCard]]
    token_strings: list[str] | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def ablation_metric(self) -> str:
        return "kl" if self.kind == "tokens" else "mse"

    def card(self, site: str, index: int) -> SubcomponentCard:
        """The card of subcomponent ``index`` of ``site``, able to show its tokens."""
        if site not in self.cards:
            raise KeyError(f"no site {site!r} in this harvest; sites: {self.sites}")
        if not 0 <= index < len(self.cards[site]):
            raise IndexError(f"{site} has {len(self.cards[site])} subcomponents, not index {index}")
        card = self.cards[site][index]
        card.token_strings = self.token_strings
        return card

    def all_cards(self) -> list[SubcomponentCard]:
        return [self.card(site, c) for site in self.sites for c in range(len(self.cards[site]))]

    def alive_cards(self) -> list[SubcomponentCard]:
        return [card for card in self.all_cards() if card.alive]

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "sites": self.sites,
            "n_points": self.n_points,
            "n_sequences": self.n_sequences,
            "threshold": self.threshold,
            "token_strings": self.token_strings,
            "settings": self.settings,
            "cards": {site: [c.to_dict() for c in cards] for site, cards in self.cards.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Harvest:
        data = dict(data)
        data["cards"] = {s: [SubcomponentCard.from_dict(c) for c in cards] for s, cards in data["cards"].items()}
        return cls(**data)

    def save(self, run_dir: str | Path) -> Path:
        """Write ``run_dir/harvest/``: ``index.json`` (settings, vocabulary, sites) and one
        ``site_<i>.json`` of cards per site. Returns the folder."""
        folder = Path(run_dir) / HARVEST_DIR
        data = self.to_dict()
        cards = data.pop("cards")
        data["card_files"] = {}
        for i, site in enumerate(self.sites):
            name = f"site_{i}.json"
            atomic_write_bytes(folder / name, json.dumps(cards[site]).encode())
            data["card_files"][site] = name
        atomic_write_bytes(folder / INDEX_FILE, json.dumps(data).encode())
        return folder

    @classmethod
    def load(cls, path: str | Path) -> Harvest:
        """Read a harvest saved by :meth:`save` (``path``: the run folder or its ``harvest/``)."""
        path = Path(path)
        folder = path if (path / INDEX_FILE).is_file() else path / HARVEST_DIR
        if not (folder / INDEX_FILE).is_file():
            raise FileNotFoundError(f"{path} holds no harvest ({HARVEST_DIR}/{INDEX_FILE}); run harvest() first")
        data = json.loads((folder / INDEX_FILE).read_text())
        files = data.pop("card_files")
        data["cards"] = {site: json.loads((folder / files[site]).read_text()) for site in data["sites"]}
        return cls.from_dict(data)

    @staticmethod
    def exists(run_dir: str | Path) -> bool:
        return (Path(run_dir) / HARVEST_DIR / INDEX_FILE).is_file()

    def _repr_html_(self, max_rows: int = 50) -> str:
        cards = sorted(self.alive_cards(), key=lambda c: -c.density)
        n_all = sum(len(c) for c in self.cards.values())
        rows = []
        for card in cards[:max_rows]:
            tokens = ", ".join(html.escape(card.label(t)) for t, _ in card.current_tokens[:5])
            abl = "" if card.ablation is None else f"{card.ablation:.3g}"
            rows.append(
                f"<tr><td>{html.escape(card.site)}</td><td>{card.index}</td><td>{card.density:.4g}</td>"
                f"<td>{card.mean_ci:.4g}</td><td>{tokens}</td><td>{abl}</td></tr>"
            )
        head = (
            f"<div>harvest of {self.n_points} {'tokens' if self.kind == 'tokens' else 'data points'}: "
            f"{len(cards)} of {n_all} subcomponents fire (CI &gt; {self.threshold:g}); "
            f"densest {min(max_rows, len(cards))}"
            "</div>"
        )
        header = "<tr><th>site</th><th>c</th><th>density</th><th>mean CI</th><th>top tokens</th>"
        header += f"<th>ablation {self.ablation_metric.upper()}</th></tr>"
        return head + f"<table>{header}{''.join(rows)}</table>"


# ------------------------------------------------------------------------------ accumulators
class _TopK:
    """Per subcomponent, the k points of highest score seen so far, with a window of values each."""

    def __init__(self, n_units: int, k: int, width: int):
        self.k = k
        self.scores = torch.full((n_units, 0), -math.inf, dtype=torch.float64)
        self.points = torch.zeros((n_units, 0), dtype=torch.long)
        self.windows = torch.zeros((n_units, 0, width), dtype=torch.float64)

    def add(self, scores: Float[Tensor, "n C"], points: Int[Tensor, " n"], windows_of) -> None:
        """``scores`` per point and unit (-inf: not a candidate); ``windows_of(flat_idx [C, k])``
        gives the windows ``[C, k, width]`` of the chosen points."""
        k = min(self.k, scores.shape[0])
        vals, idx = scores.T.topk(k, dim=1)
        wins = windows_of(idx)
        cat_scores = torch.cat([self.scores, vals.double().cpu()], 1)
        cat_points = torch.cat([self.points, points[idx.cpu()]], 1)
        cat_windows = torch.cat([self.windows, wins.double().cpu()], 1)
        keep = cat_scores.topk(min(self.k, cat_scores.shape[1]), dim=1).indices
        self.scores = cat_scores.gather(1, keep)
        self.points = cat_points.gather(1, keep)
        self.windows = cat_windows.gather(1, keep[:, :, None].expand(-1, -1, cat_windows.shape[2]))

    def entries(self, unit: int) -> list[tuple[int, list[float]]]:
        """(point, window) of the unit's entries, best first, candidates only."""
        ok = torch.isfinite(self.scores[unit])
        return [(int(p), w.tolist()) for p, w in zip(self.points[unit][ok], self.windows[unit][ok], strict=True)]


class _Counter:
    """Sparse counts of (unit, token) pairs."""

    def __init__(self, n_tokens: int):
        self.n_tokens = n_tokens
        self.keys = torch.zeros(0, dtype=torch.long)
        self.counts = torch.zeros(0, dtype=torch.long)

    def add(self, units: Int[Tensor, " n"], tokens: Int[Tensor, " n"]) -> None:
        if units.numel() == 0:
            return
        keys = torch.cat([self.keys, units.cpu() * self.n_tokens + tokens.cpu()])
        counts = torch.cat([self.counts, torch.ones(units.numel(), dtype=torch.long)])
        self.keys, inverse = torch.unique(keys, return_inverse=True)
        self.counts = torch.zeros(len(self.keys), dtype=torch.long).scatter_add_(0, inverse, counts)

    def most_common(self, n_units: int, k: int) -> list[list[tuple[int, int]]]:
        """Per unit, up to k (token, count) pairs, most common first (ties: smaller token first)."""
        out: list[list[tuple[int, int]]] = [[] for _ in range(n_units)]
        by_count = self.counts.argsort(descending=True, stable=True)
        units = self.keys[by_count] // self.n_tokens
        order = by_count[units.argsort(stable=True)]
        for key, count in zip(self.keys[order].tolist(), self.counts[order].tolist(), strict=True):
            unit, token = divmod(key, self.n_tokens)
            if len(out[unit]) < k:
                out[unit].append((token, count))
        return out


# ------------------------------------------------------------------------------ the harvest
def _check_inputs(decomposition: SPDDecomposition, inputs: Tensor) -> str:
    if not isinstance(decomposition, SPDDecomposition):
        raise TypeError(f"harvest needs an SPD decomposition (causal importances), got {type(decomposition).__name__}")
    if not isinstance(inputs, Tensor) or inputs.ndim != 2 or inputs.shape[0] == 0 or inputs.shape[1] == 0:
        got = tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__
        raise ValueError(f"harvest needs a non-empty 2-d batch (token ids [n, pos] or features [n, F]), got {got}")
    if torch.is_floating_point(inputs):
        return "features"
    check_tokens(decomposition.model, inputs)
    return "tokens"


def _site_weights(decomposition: SPDDecomposition) -> dict[str, str]:
    return {site_name(key): key[0] for key in decomposition.site_keys}


def _logit_effects(decomposition: SPDDecomposition, site: str, weight: str, k: int):
    """(promoted, suppressed) per subcomponent of a residual-writing site, else None."""
    unembed = getattr(decomposition.model, "W_U", None)
    if not site.endswith(RESIDUAL_WRITERS) or not isinstance(unembed, Tensor):
        return None
    sub = decomposition.subcomponents[weight]
    if sub.U.shape[1] != unembed.shape[0] or any(u.transposed for u in decomposition.specs_by_name[weight].uses):
        return None
    with torch.no_grad():
        logits = (sub.U @ unembed).double().cpu()
    k = min(k, logits.shape[1])
    top, bottom = logits.topk(k, dim=1), logits.topk(k, dim=1, largest=False)
    return [
        (
            list(zip(top.indices[c].tolist(), top.values[c].tolist(), strict=True)),
            list(zip(bottom.indices[c].tolist(), bottom.values[c].tolist(), strict=True)),
        )
        for c in range(logits.shape[0])
    ]


def _per_point_effect(target: Tensor, out: Tensor, kind: str) -> Float[Tensor, "*batch"]:
    if kind == "tokens":
        logp = torch.log_softmax(target.double(), -1)
        return (logp.exp() * (logp - torch.log_softmax(out.double(), -1))).sum(-1)
    return (target.double() - out.double()).square().mean(-1)


def _ablations(
    decomposition: SPDDecomposition,
    inputs: Tensor,
    chosen: list[tuple[str, int]],
    kind: str,
    threshold: float,
    batch_size: int,
    progress: bool,
) -> dict[tuple[str, int], float]:
    """Mean effect (KL or MSE, :func:`_per_point_effect`) of switching off each chosen subcomponent,
    over the points of ``inputs`` where it fires."""
    sums = dict.fromkeys(chosen, 0.0)
    counts = dict.fromkeys(chosen, 0)
    device = next(iter(decomposition.subcomponents.values())).V.device
    starts = range(0, inputs.shape[0], batch_size)
    with torch.no_grad():
        for start in tqdm(starts, desc="ablations", disable=not progress or not chosen):
            x = inputs[start : start + batch_size].to(device)
            target = decomposition.model(x)
            ci = decomposition.causal_importances(x)
            for site, c in chosen:
                fires = ci[site][..., c] > threshold
                if not fires.any():
                    continue
                mask = torch.ones_like(ci[site])
                mask[..., c] = 0
                effect = _per_point_effect(target, decomposition(x, {site: mask}), kind)
                sums[(site, c)] += float(effect[fires].sum())
                counts[(site, c)] += int(fires.sum())
    return {key: sums[key] / counts[key] for key in chosen if counts[key] > 0}


class _SiteHarvest:
    """The running statistics of one site's C subcomponents over the batches."""

    def __init__(self, n_units: int, n_vocab: int, n_top: int, n_samples: int, before: int, after: int):
        self.n_units, self.before, self.after = n_units, before, after
        width = before + after + 1
        self.fired = torch.zeros(n_units, dtype=torch.long)
        self.fired_next = torch.zeros(n_units, dtype=torch.long)
        self.ci_sum = torch.zeros(n_units, dtype=torch.float64)
        self.top = _TopK(n_units, n_top, width)
        self.sample = _TopK(n_units, n_samples, width)
        self.current = _Counter(n_vocab)
        self.following = _Counter(n_vocab)

    def add(self, g: Float[Tensor, "b pos C"], x: Tensor, first_point: int, threshold: float, generator) -> None:
        """One batch: CI ``g`` of inputs ``x`` (token ids [b, pos]; toy features [b, F] with pos 1),
        whose first position is point number ``first_point``."""
        b, n_pos, _ = g.shape
        flat = g.reshape(b * n_pos, -1)
        fires = flat > threshold
        self.fired += fires.sum(0).cpu()
        self.fired_next += fires.reshape(b, n_pos, -1)[:, :-1].sum((0, 1)).cpu()
        self.ci_sum += flat.sum(0).cpu()
        padded = torch.nn.functional.pad(g, (0, 0, self.before, self.after), value=math.nan)
        offsets = torch.arange(self.before + self.after + 1, device=g.device)

        def windows_of(idx: Tensor) -> Tensor:  # [C, k] flat indices -> CI windows [C, k, width]
            seq, pos = idx // n_pos, idx % n_pos
            units = torch.arange(idx.shape[0], device=idx.device)[:, None, None]
            return padded[seq[..., None], pos[..., None] + offsets, units]

        points = first_point + torch.arange(b * n_pos)
        self.top.add(torch.where(fires, flat, -math.inf), points, windows_of)
        keys = torch.rand(flat.shape, generator=generator, dtype=torch.float64).to(flat.device)
        self.sample.add(torch.where(fires, keys, -math.inf), points, windows_of)
        point, unit = fires.nonzero(as_tuple=True)
        if torch.is_floating_point(x):  # toy model: the "tokens" are the active features
            event, feature = (x[point] != 0).nonzero(as_tuple=True)
            self.current.add(unit[event], feature)
            return
        tokens = x.reshape(-1)
        self.current.add(unit, tokens[point])
        has_next = point % n_pos < n_pos - 1
        self.following.add(unit[has_next], tokens[point[has_next] + 1])

    def cards(self, site: str, context, n_points: int, n_tokens: int, effects, metric: str) -> list[SubcomponentCard]:
        """The cards; ``context(point, window)`` makes a :class:`Context`, ``effects`` the logit effects or None."""
        cur = self.current.most_common(self.n_units, n_tokens)
        nxt = self.following.most_common(self.n_units, n_tokens)
        return [
            SubcomponentCard(
                site=site,
                index=c,
                n_firing=int(self.fired[c]),
                density=int(self.fired[c]) / n_points,
                mean_ci=float(self.ci_sum[c]) / n_points,
                top_contexts=[context(p, w) for p, w in self.top.entries(c)],
                sample_contexts=[context(p, w) for p, w in self.sample.entries(c)],
                current_tokens=cur[c],
                next_tokens=nxt[c],
                n_firing_with_next=int(self.fired_next[c]),
                promoted=effects[c][0] if effects else None,
                suppressed=effects[c][1] if effects else None,
                ablation_metric=metric,
            )
            for c in range(self.n_units)
        ]


def _context_maker(inputs: Tensor, kind: str, before: int, after: int):
    """``(point, CI window) -> Context`` for the harvested ``inputs``."""
    n_pos = inputs.shape[1] if kind == "tokens" else 1
    width = before + after + 1

    def context(point: int, win: list[float]) -> Context:
        seq, pos = divmod(point, n_pos)
        if kind == "features":
            active = inputs[seq].nonzero().flatten()
            values = inputs[seq][active].double().tolist()
            return Context(active.tolist(), [win[0]] * len(values), None, win[0], values, seq)
        lo, hi = max(0, pos - before), min(n_pos, pos + after + 1)
        shown = win[lo - (pos - before) : width - ((pos + after + 1) - hi)]
        return Context(inputs[seq, lo:hi].tolist(), shown, pos - lo, win[before], None, seq)

    return context


def harvest(
    decomposition: SPDDecomposition,
    inputs: Int[Tensor, "n pos"] | Float[Tensor, "n n_features"],
    *,
    batch_size: int = 32,
    n_top: int = 10,
    n_samples: int = 10,
    window: tuple[int, int] = (10, 3),
    n_tokens: int = 10,
    n_ablate: int = 32,
    ablation_sequences: int = 64,
    token_strings: list[str] | None = None,
    threshold: float = FIRING_THRESHOLD,
    seed: int = 0,
    progress: bool = True,
) -> Harvest:
    """One pass over ``inputs`` (token ids of a language model, or float feature vectors of a toy
    model) collecting every subcomponent's statistics (module docstring). ``window``: tokens shown
    (before, after) the firing one; ``n_tokens``: most common / promoted tokens kept; ``n_ablate``:
    the densest subcomponents whose ablation effect is measured, on the first ``ablation_sequences``
    inputs; ``token_strings``: the vocabulary (token id -> text) for display; ``seed``: the uniform
    sample's draws. Raises :class:`NothingFiresError` when no subcomponent fires anywhere."""
    kind = _check_inputs(decomposition, inputs)
    if batch_size < 1 or n_top < 0 or n_samples < 0 or min(window) < 0:
        raise ValueError(f"bad settings: batch_size={batch_size}, n_top={n_top}, n_samples={n_samples}, {window=}")
    before, after = window if kind == "tokens" else (0, 0)
    n_seq, n_pos = inputs.shape[0], inputs.shape[1] if kind == "tokens" else 1
    n_vocab = int(inputs.shape[1]) if kind == "features" else int(decomposition.model.cfg.d_vocab)
    sites = decomposition.sites
    stats = {s: _SiteHarvest(decomposition.n_subcomponents(s), n_vocab, n_top, n_samples, before, after) for s in sites}
    generator = torch.Generator().manual_seed(seed)
    device = next(iter(decomposition.subcomponents.values())).V.device
    for start in tqdm(range(0, n_seq, batch_size), desc="harvest", disable=not progress):
        x = inputs[start : start + batch_size].to(device)
        ci = decomposition.causal_importances(x)
        for site in sites:
            g = ci[site].reshape(x.shape[0], n_pos, -1).double()
            stats[site].add(g, x, start * n_pos, threshold, generator)

    n_points = n_seq * n_pos
    if all(int(stats[s].fired.sum()) == 0 for s in sites):
        raise NothingFiresError(
            f"no subcomponent fires (CI > {threshold:g}) anywhere on the {n_points} "
            f"{'tokens' if kind == 'tokens' else 'data points'} harvested: the decomposition's causal "
            "importances are all low (an untrained or collapsed decomposition, or data unlike its training data)"
        )
    context = _context_maker(inputs, kind, before, after)
    weights = _site_weights(decomposition)
    metric = "kl" if kind == "tokens" else "mse"
    cards = {
        site: stats[site].cards(
            site, context, n_points, n_tokens, _logit_effects(decomposition, site, weights[site], n_tokens), metric
        )
        for site in sites
    }
    alive = sorted(
        ((card.n_firing, site, card.index) for site in sites for card in cards[site] if card.n_firing > 0),
        reverse=True,
    )
    chosen = [(site, c) for _, site, c in alive[:n_ablate]]
    effects = _ablations(
        decomposition, inputs[:ablation_sequences], chosen, kind, threshold, batch_size, progress and bool(chosen)
    )
    for (site, c), value in effects.items():
        cards[site][c].ablation = value
    settings = {
        "batch_size": batch_size,
        "n_top": n_top,
        "n_samples": n_samples,
        "window": list(window),
        "n_tokens": n_tokens,
        "n_ablate": n_ablate,
        "ablation_sequences": min(ablation_sequences, n_seq),
        "seed": seed,
    }
    return Harvest(kind, sites, n_points, n_seq, threshold, cards, token_strings, settings)
