"""Component splitting: during training, move an over-used component's second job into an unused one.

APD's typical failure on the toy models is two mechanisms merged in one component while other
components stay unused (the merged one is then active about twice as often as the others).
Top-k never selects an unused component again, so the run cannot repair itself. Every
``split_every`` steps (until ``split_until`` of the run) the splitter counts how often each
component was kept by the top-k mask since the last check (read at ``hook_mask``). Each component
active at least ``split_ratio`` times as often as a reference rate is paired with an unused one
(active at most ``split_unused`` times as often as the reference). The reference
(``split_reference``) is the median live component (``"live"``), or the median of the busiest
components that together carry ``CARRYING_SHARE`` of all activity (``"carrying"``): with many
more components than mechanisms, most components are rarely-picked fillers, and the live median
then says more about C than about one mechanism's rate. The data points of the last
batches on which it was active are grouped in two by the direction of their entering
activations, and the component is split by a projector onto the input directions the second
group uses more (:func:`split_by_input_subspace`; the sum of all components, hence faithfulness,
is unchanged). The same idea as splitting clusters in k-means or re-seeding dead codes from busy
ones in vector quantization.

A run can also end with no unused component: one mechanism halved between two near-identical
components (kept by top-k on the same points) while two others share one component. With
``merge_coactive``, each check first merges such duplicates (:func:`choose_merges`: their Jaccard
overlap of top-k activity at least ``merge_coactive``) into one component when their sum fits its
rank (:func:`merge_components`, sum unchanged), and the freed one is a split target in the same check.
With ``adopt_orphans``, components still unused after the check's splits are offered to mechanisms no
component owns (:mod:`apd_lens.methods.apd.adoption`).

Two options matter when components are also kept as batch top-k's fillers and the model has
several layers (the 2-layer residual MLP): ``split_points="top"`` uses only the data points on which
the component has the largest attribution (a busy component is also kept on many points where it is
a second choice: 224 of 313 points of a 4-feature component were led by other features), and
``split_group_by="first"`` groups the points by the inputs of the first declared weight only (later
weights read post-ReLU activations, in which one feature's positive and negative values point in
different directions, so grouping on them split features by sign).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from apd_lens.methods.apd.adoption import Adoption, adopt_orphans
from apd_lens.methods.apd.component_ops import (
    copy_moments,
    factor_to_rank,
    optimizer_moments,
    reading_uses,
    two_line_clusters,
    unit_norm_A_keeping_P,
)
from apd_lens.training import distributed

logger = logging.getLogger(__name__)

SPLIT_POINTS = 8192
"""About this many data points (the last batches before a split) show how a component is used."""
CARRYING_SHARE = 0.8
"""``split_reference="carrying"``: the reference is the median rate of the busiest components that
together carry this share of all top-k activity."""
SPLIT_NOISE = 0.1
"""Relative size of the multiplicative noise put on the copy's A and B."""


@dataclass(frozen=True)
class Split:
    step: int
    source: int
    target: int
    source_rate: float
    median_rate: float
    """The reference rate of that round (the median live rate with ``split_reference="live"``)."""


def reference_rate(rate: Float[Tensor, " C"], reference: str = "live") -> float:
    """The rate over-used and unused components are measured against (see module doc)."""
    live = rate[rate > 0]
    if live.numel() == 0:
        return 0.0
    if reference == "live":
        return float(live.median())
    if reference == "carrying":
        busiest = live.sort(descending=True).values
        share = busiest.cumsum(0) / busiest.sum()
        n_carrying = int((share < CARRYING_SHARE).sum()) + 1
        return float(busiest[:n_carrying].median())
    raise ValueError(f"split reference must be 'live' or 'carrying', got {reference!r}")


def choose_splits(
    active_counts: Float[Tensor, " C"],
    n_points: int,
    split_ratio: float,
    unused: float = 0.01,
    reference: str = "live",
) -> tuple[list[tuple[int, int]], float]:
    """``(over-used, unused)`` pairs to split, most over-used first (least used first among the
    unused), and the reference rate (:func:`reference_rate`). Over-used: active at least
    ``split_ratio`` times as often as the reference; unused: at most ``unused`` times as often."""
    rate = active_counts.double() / max(n_points, 1)
    ref = reference_rate(rate, reference)
    if ref == 0.0:
        return [], 0.0
    over = [int(c) for c in torch.argsort(rate, descending=True, stable=True) if rate[c] >= split_ratio * ref]
    return list(zip(over, unused_components(active_counts, n_points, ref, unused), strict=False)), ref


def unused_components(active_counts: Float[Tensor, " C"], n_points: int, reference: float, unused: float) -> list[int]:
    """Components active at most ``unused`` times as often as the ``reference`` rate, least used first."""
    rate = active_counts.double() / max(n_points, 1)
    return [int(c) for c in torch.argsort(rate, stable=True) if rate[c] <= unused * reference]


@dataclass(frozen=True)
class Merge:
    step: int
    keep: int
    freed: int
    overlap: float
    """Jaccard overlap of the two components' top-k activity in that window."""


def choose_merges(
    coactive: Float[Tensor, "C C"], counts: Float[Tensor, " C"], threshold: float
) -> list[tuple[int, int, float]]:
    """``(keep, freed, overlap)`` for pairs of live components whose top-k activity overlaps by at least
    ``threshold`` (Jaccard: points where both are kept / points where either is), most overlapping first,
    each component in one pair at most; the busier one keeps the sum (the lower index on a tie).
    ``coactive[a, b]``: points where both ``a`` and ``b`` were kept; ``counts``: points where each was."""
    counts = counts.double()
    union = counts[:, None] + counts[None, :] - coactive.double()
    overlap = coactive.double() / union.clamp_min(1e-300)
    live = counts > 0
    candidate = torch.triu(live[:, None] & live[None, :] & (overlap >= threshold), diagonal=1)
    pairs = sorted(((float(overlap[a, b]), int(a), int(b)) for a, b in candidate.nonzero().tolist()), reverse=True)
    used, merges = set(), []
    for value, a, b in pairs:
        if a in used or b in used:
            continue
        used.update((a, b))
        keep, freed = (a, b) if counts[a] >= counts[b] else (b, a)
        merges.append((keep, freed, value))
    return merges


@torch.no_grad()
def merge_components(decomposition, optimizer: torch.optim.Optimizer, keep: int, freed: int, tol: float = 1e-5) -> bool:
    """Put ``P_keep + P_freed`` into ``keep`` and zero ``freed``, in every decomposed weight, when each sum has
    rank at most the components' rank (singular values beyond it below ``tol`` of the largest); otherwise
    change nothing and return False. The sum of all components is unchanged; ``freed``'s optimizer
    moments are reset."""
    factors = {}
    for name, comp in decomposition.components.items():
        total = comp.A[keep] @ comp.B[keep] + comp.A[freed] @ comp.B[freed]
        factors[name] = factor_to_rank(total, comp.A.shape[-1], tol)
        if factors[name] is None:
            return False
    for name, comp in decomposition.components.items():
        a, b = factors[name]
        comp.A[keep].copy_(a.to(comp.A.dtype))
        comp.B[keep].copy_(b.to(comp.B.dtype))
        comp.A[freed].zero_()
        comp.B[freed].zero_()
        if decomposition.config.unit_norm_A:
            unit_norm_A_keeping_P(comp, (keep,))
        for moment in optimizer_moments(optimizer, comp):
            moment[freed].zero_()
    return True


@torch.no_grad()
def split_component(decomposition, optimizer: torch.optim.Optimizer, source: int, target: int, generator) -> None:
    """Fallback split: ``target`` becomes a noisy copy of ``source`` sharing its weight: every
    decomposed weight's ``B[source]`` is halved and copied to ``B[target]``, ``A[source]`` copied to
    ``A[target]`` (multiplicative noise of ``SPLIT_NOISE`` on the copy)."""
    for comp in decomposition.components.values():
        comp.B[source].mul_(0.5)
        for param in (comp.A, comp.B):
            noise = torch.randn(param[source].shape, generator=generator, dtype=param.dtype)
            param[target].copy_(param[source] * (1 + SPLIT_NOISE * noise.to(param.device)))
        copy_moments(optimizer, comp, source, target)
        if decomposition.config.unit_norm_A:
            unit_norm_A_keeping_P(comp, (source, target))


@torch.no_grad()
def split_by_input_subspace(
    decomposition,
    optimizer: torch.optim.Optimizer,
    source: int,
    target: int,
    inputs: dict[str, tuple[Tensor, bool]],
    group_by: tuple[str, ...] | None = None,
) -> bool:
    """Split ``source`` along the input directions its two groups of data points use.

    ``inputs``: weight name -> (the activations entering it ``[n, d]`` on the data points where
    ``source`` is active, whether that use is transposed). The points are grouped in two by
    direction (sign-blind; the inputs of the weights in ``group_by``, default all, side by side).
    Per weight, the input directions used more by the second group than by the first (positive
    eigenvectors of ``S2 - S1``, ``S = sum x^T x``) span a projector ``R``: the target gets ``R A``
    (``B R`` for a transposed use), the source keeps the rest, so ``P_source + P_target`` is
    unchanged. Clustering the inputs rather than the component's inner activations also separates
    mechanisms that the component reads through one direction with opposite signs (TMS's antipodal
    feature pairs). Returns False (nothing changed) if the points do not fall in two groups.
    """
    if min(x.shape[0] for x, _ in inputs.values()) < 4:
        return False
    names = list(inputs) if group_by is None else [n for n in inputs if n in group_by]
    scaled = [inputs[n][0] / inputs[n][0].norm(dim=1).mean().clamp_min(1e-12) for n in names]
    group = two_line_clusters(torch.cat(scaled, dim=1).double())
    if group.sum() < 2 or (~group).sum() < 2:
        return False
    for name, (x, transposed) in inputs.items():
        x = x.double()
        values, vectors = torch.linalg.eigh(x[group].T @ x[group] - x[~group].T @ x[~group])
        keep = vectors[:, values > 0]
        comp = decomposition.components[name]
        projector = (keep @ keep.T).to(comp.A.dtype)
        if transposed:
            b = comp.B[source].clone()
            comp.B[target].copy_(b @ projector)
            comp.B[source].copy_(b - comp.B[target])
            comp.A[target].copy_(comp.A[source])
        else:
            a = comp.A[source].clone()
            comp.A[target].copy_(projector @ a)
            comp.A[source].copy_(a - comp.A[target])
            comp.B[target].copy_(comp.B[source])
        if decomposition.config.unit_norm_A:
            unit_norm_A_keeping_P(comp, (source, target))
        copy_moments(optimizer, comp, source, target)
    return True


class ComponentSplitter:
    """Counts top-k activity through ``hook_mask`` and splits over-used components (see module doc).

    The last batches before each split (about ``SPLIT_POINTS`` data points) are kept to find, per
    over-used component, the data points it is active on and how they use its inner space.
    """

    def __init__(self, decomposition, optimizer: torch.optim.Optimizer):
        cfg = decomposition.config
        self.decomposition, self.optimizer = decomposition, optimizer
        self.every, self.ratio, self.unused = cfg.split_every, cfg.split_ratio, cfg.split_unused
        self.reference = cfg.split_reference
        self.top_points = cfg.split_points == "top"
        self.group_by = None if cfg.split_group_by == "all" else (decomposition.specs[0].name,)
        self.last_step = int(cfg.split_until * cfg.steps)
        self.seed = cfg.seed
        self.counts = torch.zeros(cfg.n_components, dtype=torch.float64)
        self.merge = cfg.merge_coactive
        self.coactive = torch.zeros(cfg.n_components, cfg.n_components, dtype=torch.float64)
        self.n_points = 0
        self.recent: list[Tensor] = []
        self.history: list[Split] = []
        self.merges: list[Merge] = []
        self.adopt = cfg.adopt_orphans
        self.adoptions: list[Adoption] = []
        self._counting = True
        self._handle = None
        if self.every is not None:
            self._handle = decomposition.hook_mask.register_forward_hook(self._count)

    def _count(self, module, inputs, mask: Tensor) -> None:
        if not self._counting:
            return
        kept = mask.detach().reshape(-1, mask.shape[-1]) > 0
        self.counts += kept.sum(0).to(device="cpu", dtype=torch.float64)
        if self.merge is not None:
            both = kept.to(torch.float64)
            self.coactive += (both.T @ both).cpu()
        self.n_points += kept.shape[0]

    def after_step(self, step: int, batch: Tensor | None = None) -> list[Split]:
        """Split after step ``step`` (0-based) if it ends a counting window; returns the splits.
        ``batch``: the step's batch (the last ones before a split are kept)."""
        done = step + 1
        if self.every is None or done > self.last_step:
            self.close()  # no split is left: stop counting on every step
            return []
        if batch is not None:
            self._keep(batch, done)
        if done % self.every:
            return []
        counts = distributed.sum_over_ranks(self.counts)
        n_points = int(distributed.sum_over_ranks(torch.tensor([float(self.n_points)])).item())
        merges = self._merge(done, counts) if self.merge is not None else []
        pairs, median = choose_splits(counts, n_points, self.ratio, self.unused, self.reference)
        logger.debug("step %d: component activity rates %s", done, (counts / max(n_points, 1)).tolist())
        splits = []
        if pairs:
            inputs = self._inputs([s for s, _ in pairs])
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + done)
            for source, target in pairs:
                split = split_by_input_subspace(
                    self.decomposition, self.optimizer, source, target, inputs[source], self.group_by
                )
                if not split:
                    split_component(self.decomposition, self.optimizer, source, target, generator)
                splits.append(Split(done, source, target, float(counts[source]) / max(n_points, 1), median))
        adoptions = []
        if self.adopt is not None and median > 0:
            taken = {target for _, target in pairs}
            spare = [c for c in unused_components(counts, n_points, median, self.unused) if c not in taken]
            adoptions = self._adopt(done, spare)
        if pairs or merges or adoptions:
            for comp in self.decomposition.components.values():
                distributed.broadcast_module(comp)  # every rank continues from rank 0's split
        for split in splits:
            logger.info(
                "step %d: split component %d (active on %.3g of points, reference rate %.3g) into unused %d",
                split.step,
                split.source,
                split.source_rate,
                split.median_rate,
                split.target,
            )
        self.history.extend(splits)
        self.decomposition.split_history = list(self.history)
        self.counts.zero_()
        self.coactive.zero_()
        self.n_points = 0
        self.recent = []
        return splits

    def _merge(self, done: int, counts: Tensor) -> list[Merge]:
        """Merge duplicate components (``merge_coactive``); ``counts`` is updated in place: the kept one
        active wherever either was, the freed one never."""
        coactive = distributed.sum_over_ranks(self.coactive)
        merges = []
        for keep, freed, overlap in choose_merges(coactive, counts, self.merge):
            if merge_components(self.decomposition, self.optimizer, keep, freed):
                counts[keep] = counts[keep] + counts[freed] - coactive[keep, freed]
                counts[freed] = 0.0
                merges.append(Merge(done, keep, freed, overlap))
                logger.info("step %d: merged component %d into %d (overlap %.3f)", done, freed, keep, overlap)
        self.merges.extend(merges)
        self.decomposition.merge_history = list(self.merges)
        return merges

    def _adopt(self, done: int, spare: list[int]) -> list[Adoption]:
        """Give orphaned mechanisms to the ``spare`` components (``adopt_orphans``, :mod:`.adoption`)."""
        with self._not_counting():
            adoptions = adopt_orphans(self.decomposition, self.optimizer, spare, self.recent, self.adopt, done)
        for a in adoptions:
            logger.info(
                "step %d: orphan adopted by component %d (top-k error %.3g -> %.3g)",
                done,
                a.target,
                a.error_before,
                a.error_after,
            )
        self.adoptions.extend(adoptions)
        self.decomposition.adoption_history = list(self.adoptions)
        return adoptions

    @contextlib.contextmanager
    def _not_counting(self):
        """The splitter's own passes (which fire ``hook_mask`` too) are not training activity."""
        self._counting = False
        try:
            yield
        finally:
            self._counting = True

    def _keep(self, batch: Tensor, done: int) -> None:
        points = max(int(batch.shape[: self.decomposition.n_batch_dims(batch)].numel()), 1)
        n_keep = -(-SPLIT_POINTS // points)
        if self.every - done % self.every < n_keep or done % self.every == 0:
            self.recent.append(batch.detach())
            self.recent = self.recent[-n_keep:]

    @torch.no_grad()
    def _inputs(self, sources: list[int]) -> dict[int, dict[str, tuple[Tensor, bool]]]:
        """Per source, weight name -> (the activations entering the weight on the kept batches'
        data points where the top-k mask keeps the source (``split_points="top"``: where the source
        has the largest attribution), whether that use is transposed).
        A tied weight contributes its first use that reads through A (its other uses see the
        model's outputs, interference included)."""
        dec = self.decomposition
        reading = reading_uses(dec)
        found: dict[int, dict[str, list[Tensor]]] = {c: {name: [] for name in reading} for c in sources}
        with self._not_counting():
            for x in self.recent:
                record = dec.target_pass(x, make_leaves=dec._needs_leaves())  # one pass: enters and attributions
                attributions = dec.attributions(x, record=record)
                if self.top_points:  # points where the component has the largest attribution
                    flat = attributions.reshape(-1, dec.n_components)
                    mask = torch.nn.functional.one_hot(flat.argmax(-1), dec.n_components)
                else:  # points where the top-k mask keeps it
                    mask = dec.mask_from_attributions(attributions).reshape(-1, dec.n_components)
                for name, (i, _) in reading.items():
                    enter = record.enters[(name, i)].detach()
                    for c in sources:
                        found[c][name].append(enter[mask[:, c] > 0])
        return {
            c: {name: (torch.cat(parts), reading[name][1]) for name, parts in per.items()} for c, per in found.items()
        }

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def state_dict(self) -> dict:
        return {
            "counts": self.counts.clone(),
            "n_points": self.n_points,
            "recent": [x.cpu() for x in self.recent],
            "history": [vars(s) for s in self.history],
            "coactive": self.coactive.clone(),
            "merges": [vars(m) for m in self.merges],
            "adoptions": [vars(a) for a in self.adoptions],
        }

    def load_state_dict(self, state: dict) -> None:
        self.counts = state["counts"].clone().double()
        self.n_points = int(state["n_points"])
        device = next(iter(self.decomposition.components.values())).A.device
        self.recent = [x.to(device) for x in state.get("recent", [])]
        self.history = [Split(**s) for s in state["history"]]
        self.decomposition.split_history = list(self.history)
        if "coactive" in state:  # checkpoints from before merging have neither
            self.coactive = state["coactive"].clone().double()
        self.merges = [Merge(**m) for m in state.get("merges", [])]
        self.decomposition.merge_history = list(self.merges)
        self.adoptions = [Adoption(**a) for a in state.get("adoptions", [])]
        self.decomposition.adoption_history = list(self.adoptions)
