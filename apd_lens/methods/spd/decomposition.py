"""SPDDecomposition: stochastic parameter decomposition through the model's own hooks.

Every decomposed weight gets C rank-one subcomponents (:class:`Subcomponents`); every use of it
(a "site": a tied weight such as TMS's ``W`` has two) gets a causal-importance function and its own
masks. One training step:

1. target pass through the hooks, recording each use's entering activation (no graph);
2. causal importances ``g = σ_lower(γ(h))`` per site from those activations (``h = a V`` for the
   per-subcomponent MLPs), and ``σ_upper`` of the same for the penalty;
3. ``S`` times: masks ``m = g + (1 - g) r``; one masked pass with every site masked (stochastic
   recon), one per site with only that site masked, the others at the target (layerwise), and,
   if asked, one with a random subset of the weights masked per data point (subset);
   with PGD, masks ``g + (1 - g) s`` whose sources ``s`` are chosen adversarially (fresh each step,
   or VPD's persistent sources, kept across steps: :mod:`~apd_lens.methods.spd.persistent_pgd`);
   masked passes replace each leaving activation by ``((a V) ⊙ m) U (+ r_Δ a Δ) + bias`` with the
   entering activation ``a`` read live;
4. faithfulness ``Σ ||W - V U||² / N`` and importance minimality ``Σ_sites Σ_c mean_n (g_upper + ε)^p``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import ClassVar

import torch
from jaxtyping import Float, Shaped
from torch import Tensor, nn

from apd_lens.engine.base import DecompositionBase, TrainingCallback
from apd_lens.engine.hooked_forward import PassRecord, Replacement, UseKey
from apd_lens.engine.losses import activation_recon_loss, output_loss
from apd_lens.engine.spec import WeightSpec
from apd_lens.methods.spd.causal_importance import GLOBAL_CI_FN_KINDS, GlobalMLPCI
from apd_lens.methods.spd.config import SPDConfig
from apd_lens.methods.spd.losses import (
    delta_masks,
    faithfulness_loss,
    importance_minimality_loss,
    masks_from_sources,
    pgd_ascent,
    pgd_sources,
    stochastic_masks,
    subset_routes,
)
from apd_lens.methods.spd.persistent_pgd import PersistentPGDUpdate, PersistentSources, SubcomponentGradClip
from apd_lens.methods.spd.sigmoids import leaky_hard_sigmoids, lower_leaky_hard_sigmoid
from apd_lens.methods.spd.subcomponents import Subcomponents
from apd_lens.training.distributed import world_size

GLOBAL_CI_SEED_OFFSET = 7919
"""The global CI function's initialization draws from a generator seeded ``config.seed + this``."""
CI_L0_THRESHOLD = 0.1
"""A subcomponent counts as active on a data point (CI L0, logged per site) above this CI."""


def site_name(key: UseKey) -> str:
    """The name of one use of a weight: the weight's name for its first use, ``"<weight>:use<i>"``
    for the further uses of a tied weight."""
    name, i = key
    return name if i == 0 else f"{name}:use{i}"


class SPDDecomposition(DecompositionBase):
    """SPD: the target model (frozen, submodule ``model``) and C rank-one subcomponents per decomposed
    weight, each use of a weight with its own causal-importance function.

    ``forward(x, masks=None)``: the model with every decomposed weight replaced by its (masked)
    subcomponents; ``masks`` a dict site -> [*batch, C], ``"ci"`` (the causal importances as masks)
    or ``"stochastic"`` (sampled masks). Hooks: ``<weight>.hook_ci`` and
    ``<weight>.hook_subcomponent_acts`` ([*batch, C]; ``_use<i>`` for a tied weight's further uses),
    and the target model's own hooks under ``model.``. With ``ci_fn="global_mlp"`` one CI function for
    all sites, the submodule ``global_ci``, saved and loaded with the subcomponents.
    """

    method: ClassVar[str] = "spd"
    config_class: ClassVar[type] = SPDConfig

    def __init__(self, model: nn.Module, specs: list[WeightSpec], config: SPDConfig):
        super().__init__(model, specs, config)
        self._subcomponents: dict[str, Subcomponents] = dict(self._weight_modules)
        self.site_keys: list[UseKey] = [(s.name, i) for s in self.specs for i in range(len(s.uses))]
        self._key_of = {site_name(k): k for k in self.site_keys}
        self._last_ci_l0: dict[str, Tensor] = {}
        if config.ci_fn in GLOBAL_CI_FN_KINDS:
            self.global_ci = self._make_global_ci()
        self.persistent_sources = (
            PersistentSources(config.pgd_adam_lr, config.pgd_adam_betas, config.pgd_adam_eps)
            if config.pgd_scope == "persistent"
            else None
        )
        """VPD's adversarial sources kept across steps (``pgd_scope="persistent"``), else None."""
        self.setup()

    def _make_global_ci(self) -> GlobalMLPCI:
        cfg = self.config
        widths = [self._entering_width(key) for key in self.site_keys]
        counts = [self._subcomponents[key[0]].n_subcomponents for key in self.site_keys]
        hidden = tuple(cfg.ci_global_hidden) or (cfg.ci_hidden,)
        generator = torch.Generator().manual_seed(cfg.seed + GLOBAL_CI_SEED_OFFSET)
        like = next(iter(self._subcomponents.values())).V
        return GlobalMLPCI(widths, counts, hidden, generator).to(device=like.device, dtype=like.dtype)

    def _entering_width(self, key: UseKey) -> int:
        sub = self._subcomponents[key[0]]
        return sub.d_out if self._transposed(key) else sub.d_in

    def make_weight_module(
        self, spec: WeightSpec, matrix: Float[Tensor, "d_in d_out"], generator: torch.Generator
    ) -> Subcomponents:
        cfg = self.config
        d_in, d_out = matrix.shape
        transposed = tuple(u.transposed for u in spec.uses)
        n = cfg.subcomponents_for(spec.name)
        return Subcomponents(n, d_in, d_out, transposed, cfg.ci_fn, cfg.ci_hidden, generator)

    # ------------------------------------------------------------------ accessors
    @property
    def subcomponents(self) -> dict[str, Subcomponents]:
        """Weight name -> its Subcomponents module."""
        return dict(self._subcomponents)

    @property
    def sites(self) -> list[str]:
        """The names under which masks and causal importances are given: one per use of each weight."""
        return [site_name(k) for k in self.site_keys]

    def n_subcomponents(self, name: str) -> int:
        """C of a weight or site."""
        weight = self._key_of[name][0] if name in self._key_of else name
        return self._subcomponents[weight].n_subcomponents

    def _transposed(self, key: UseKey) -> bool:
        return self.specs_by_name[key[0]].uses[key[1]].transposed

    @torch.no_grad()
    def subcomponent_weights(self) -> dict[str, Float[Tensor, "_C ..."]]:
        """Weight name -> every subcomponent ``V[:, c] ⊗ U[c, :]`` in the parameter's own shape: [C, *shape]."""
        return self.in_parameter_shapes({n: s.subcomponent_matrices() for n, s in self._subcomponents.items()})

    def weight_parts(self) -> dict[str, Float[Tensor, "_C ..."]]:
        """The rank-one subcomponents of every weight (see :meth:`subcomponent_weights`)."""
        return self.subcomponent_weights()

    def summed_matrices(self) -> dict[str, Float[Tensor, "_d_in _d_out"]]:
        """Weight name -> ``V @ U`` (with gradients)."""
        return {name: sub.weight() for name, sub in self._subcomponents.items()}

    # ------------------------------------------------------------------ causal importance
    def _ci_pre_sigmoid(self, enters: Mapping[UseKey, Tensor]) -> dict[UseKey, Float[Tensor, "n _C"]]:
        if self.config.ci_fn in GLOBAL_CI_FN_KINDS:
            scores = self.global_ci([enters[key] for key in self.site_keys])
            return dict(zip(self.site_keys, scores, strict=True))
        out = {}
        for key in self.site_keys:
            sub = self._subcomponents[key[0]]
            fn = sub.ci_fns[key[1]]
            enter = enters[key]
            out[key] = fn(sub.inner_acts(enter, self._transposed(key)) if fn.reads == "inner" else enter)
        return out

    def _hooked_ci(self, ci: dict[UseKey, Tensor], batch_shape: tuple[int, ...]) -> dict[UseKey, Tensor]:
        """The lower-leaky CI of each site through its ``hook_ci`` (shaped [*batch, C] there)."""
        out = {}
        for key, g in ci.items():
            hook = self._subcomponents[key[0]].hook("hook_ci", key[1])
            out[key] = hook(g.reshape(*batch_shape, g.shape[-1])).reshape(g.shape)
        return out

    def causal_importances(self, x: Tensor) -> dict[str, Float[Tensor, "*batch _C"]]:
        """Site -> the causal importances (lower-leaky hard sigmoid, in [0, 1]) of every subcomponent on
        every data point of ``x``."""
        self.check_input(x)
        with torch.no_grad():
            record = self.hooked_pass(x)
            pre = self._ci_pre_sigmoid(record.enters)
            ci = self._hooked_ci({k: lower_leaky_hard_sigmoid(z) for k, z in pre.items()}, record.batch_shape)
        return {site_name(k): g.reshape(*record.batch_shape, -1) for k, g in ci.items()}

    # ------------------------------------------------------------------ masked passes
    def _replacement(
        self,
        masks: Mapping[UseKey, Tensor] | None,
        deltas: Mapping[str, Tensor] | None,
        delta_mask: Mapping[UseKey, Tensor] | None,
        others_at_target: bool,
        route: Mapping[str, Tensor] | None = None,
        targets: Mapping[str, Tensor] | None = None,
    ) -> Replacement:
        """The engine's replacement for a masked pass. Sites in ``masks`` ([n, C] each) are masked;
        the others (all of them when ``masks`` is None) have every subcomponent on, or, with
        ``others_at_target``, keep the model's own weight. ``deltas`` (weight -> ``W - V U``): add
        the delta component, times ``delta_mask[site]`` ([n]) where given, else fully. ``route``
        (weight -> [n] bool): the data points where the weight is replaced; elsewhere it is the
        target's own (``targets``, weight -> matrix, as :meth:`target_matrices` gives them)."""

        def replace(key: UseKey, enter: Tensor, leave: Tensor, batch_shape: tuple[int, ...]) -> Tensor | None:
            mask = None if masks is None else masks.get(key)
            if mask is None and masks is not None and others_at_target:
                return None
            sub = self._subcomponents[key[0]]
            transposed = self._transposed(key)
            inner = sub.inner_acts(enter, transposed)
            if mask is not None:
                inner = inner * mask
            hook = sub.hook("hook_subcomponent_acts", key[1])
            inner = hook(inner.reshape(*batch_shape, inner.shape[-1])).reshape(inner.shape)
            out = sub.outer(inner, transposed)
            if deltas is not None:
                delta = deltas[key[0]]
                delta_out = enter @ (delta.T if transposed else delta)
                weight = None if delta_mask is None else delta_mask.get(key)
                out = out + (delta_out if weight is None else weight[:, None] * delta_out)
            if route is not None:
                target = targets[key[0]]
                out = torch.where(route[key[0]][:, None], out, enter @ (target.T if transposed else target))
            return out

        return replace

    def _deltas(self) -> dict[str, Tensor] | None:
        if not self.config.use_delta_component:
            return None
        targets = self.target_matrices()
        return {name: targets[name] - sub.weight() for name, sub in self._subcomponents.items()}

    def _site_masks(self, masks: Mapping[str, Tensor], batch_shape: tuple[int, ...]) -> dict[UseKey, Tensor]:
        """User masks (site name -> [*batch, C]) checked and flattened to [n, C]."""
        if not isinstance(masks, Mapping):
            raise TypeError(f"masks must be a dict of site name -> [*batch, C] tensor, got {type(masks).__name__}")
        points = torch.empty(batch_shape, device="meta")  # the batch's shape, for the annotations of _flat_site_mask
        out = {}
        for name, mask in masks.items():
            if name not in self._key_of:
                raise KeyError(
                    f"masks names {name!r}, which is not a decomposed weight use; the sites are {self.sites}"
                )
            out[self._key_of[name]] = self._flat_site_mask(name, points, mask)
        return out

    def _flat_site_mask(
        self, site: str, points: Shaped[Tensor, "*batch"], mask: Float[Tensor, "*batch C={self.n_subcomponents(site)}"]
    ) -> Float[Tensor, "n C"]:
        """One site's mask, checked to be ``[*batch, C]`` (``points``: the batch's shape), as ``[n, C]``."""
        expected = (*points.shape, self.n_subcomponents(site))
        if not isinstance(mask, Tensor) or tuple(mask.shape) != expected:
            got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"mask of {site!r} must have shape {expected} ([*batch, C]), got {got}")
        return mask.reshape(-1, expected[-1])

    def forward_with_masks(
        self,
        x: Tensor,
        masks: Mapping[str, Float[Tensor, "*batch _C"]] | None = None,
        *,
        delta_masks: Mapping[str, Float[Tensor, "*batch"]] | None = None,
        act_hooks=(),
    ) -> PassRecord:
        """Forward with each named site's weight replaced by ``Σ_c m[n, c] V[:, c] ⊗ U[c, :]`` per data
        point; sites not named (all, when ``masks`` is None) have every subcomponent on. With the delta
        component, ``W - V U`` is added fully, or times ``delta_masks[site]`` ([*batch]) where given.
        Returns the pass (``.output``, entering and leaving activations)."""
        self.check_input(x)
        batch_shape = tuple(x.shape[: self.n_batch_dims(x)])
        site_masks = None if masks is None else self._site_masks(masks, batch_shape)
        flat_delta = None
        if delta_masks is not None:
            flat_delta = {}
            for name, m in delta_masks.items():
                if name not in self._key_of:
                    raise KeyError(f"delta_masks names {name!r}, not a site; the sites are {self.sites}")
                if tuple(m.shape) != batch_shape:
                    raise ValueError(f"delta mask of {name!r} must have shape {batch_shape}, got {tuple(m.shape)}")
                flat_delta[self._key_of[name]] = m.reshape(-1)
        replace = self._replacement(site_masks, self._deltas(), flat_delta, others_at_target=False)
        return self.hooked_pass(x, replace=replace, act_hooks=act_hooks)

    def forward(self, x: Tensor, masks: Mapping[str, Float[Tensor, "*batch _C"]] | str | None = None) -> Tensor:
        """Output with masked subcomponents: ``masks`` a dict site -> [*batch, C], None (every
        subcomponent on), ``"ci"`` (the causal importances of ``x`` as masks) or ``"stochastic"``
        (``g + (1 - g) r``, one sample)."""
        if isinstance(masks, str):
            if masks not in ("ci", "stochastic"):
                raise ValueError(f'masks must be a dict, None, "ci" or "stochastic", got {masks!r}')
            ci = self.causal_importances(x)
            masks = self.sample_masks(ci) if masks == "stochastic" else ci
        return self.forward_with_masks(x, masks).output

    def sample_masks(
        self, ci: Mapping[str, Float[Tensor, "*batch _C"]], generator: torch.Generator | None = None
    ) -> dict[str, Float[Tensor, "*batch _C"]]:
        """One draw of the stochastic masks ``g + (1 - g) r`` from causal importances (site -> [*batch, C]),
        with the config's sampling; reuse one ``causal_importances(x)`` for many draws."""
        return stochastic_masks(dict(ci), self.config.sampling, generator)

    # ------------------------------------------------------------------ training
    def before_training(self) -> None:
        """The faithfulness warm-up: ``faithfulness_warmup_steps`` of ``Σ ||W - V U||² / N`` alone
        (AdamW over V and U, its own lr and weight decay)."""
        cfg = self.config
        if cfg.faithfulness_warmup_steps == 0:
            return
        params = [p for sub in self._subcomponents.values() for p in (sub.V, sub.U)]
        optimizer = torch.optim.AdamW(
            params, lr=cfg.faithfulness_warmup_lr, weight_decay=cfg.faithfulness_warmup_weight_decay
        )
        targets = self.target_matrices()
        for _ in range(cfg.faithfulness_warmup_steps):
            optimizer.zero_grad(set_to_none=True)
            faithfulness_loss(targets, self.summed_matrices()).backward()
            optimizer.step()

    def losses(self, x: Tensor, generator: torch.Generator | None = None, step: int | None = None) -> dict[str, Tensor]:
        """All loss terms of one SPD step on batch ``x`` and their weighted ``total``. ``generator``:
        the mask sources' random draws; ``step``: the step (for p annealing; None: the end of training)."""
        cfg = self.config
        self.check_input(x)
        section = self.section_timer or (lambda name: contextlib.nullcontext())
        with section("target_forward"), torch.no_grad():
            target = self.hooked_pass(x, act_hooks=cfg.act_recon_hooks)
        target_out = target.output.detach()
        with section("causal_importance"):
            both = {k: leaky_hard_sigmoids(z) for k, z in self._ci_pre_sigmoid(target.enters).items()}
            ci = self._hooked_ci({k: lower for k, (lower, _) in both.items()}, target.batch_shape)
            ci_upper = {k: upper for k, (_, upper) in both.items()}
        with section("faithfulness"):
            targets = self.target_matrices()
            sums = self.summed_matrices()
            deltas = {n: targets[n] - sums[n] for n in targets} if cfg.use_delta_component else None
            terms = {"faithfulness": faithfulness_loss(targets, sums)}
        n_points = next(iter(ci.values())).shape[0]
        recon, layerwise, subset, act_recon = [], [], [], []
        for _ in range(cfg.n_mask_samples):
            with section("masks"):
                masks = stochastic_masks(ci, cfg.sampling, generator)
                like = next(iter(ci.values()))
                dmasks = delta_masks(self.site_keys, n_points, like, generator) if deltas else None
            if cfg.stochastic_recon_coeff > 0 or cfg.act_recon_coeff > 0:
                with section("masked_forward"):
                    rec = self.hooked_pass(
                        x, replace=self._replacement(masks, deltas, dmasks, False), act_hooks=cfg.act_recon_hooks
                    )
                    recon.append(output_loss(rec.output, target_out, cfg.output_loss))
                    if cfg.act_recon_hooks:
                        targets_acts = {k: v.detach() for k, v in target.acts.items()}
                        act_recon.append(activation_recon_loss(rec.acts, targets_acts, len(target.batch_shape)))
            if cfg.stochastic_recon_subset_coeff > 0:
                with section("subset_forward"):
                    route = subset_routes([s.name for s in self.specs], n_points, like, generator)
                    rec = self.hooked_pass(x, replace=self._replacement(masks, deltas, dmasks, False, route, targets))
                    subset.append(output_loss(rec.output, target_out, cfg.output_loss))
            if cfg.stochastic_recon_layerwise_coeff > 0:
                with section("layerwise_forward"):
                    for key in self.site_keys:
                        one = {key: masks[key]}
                        rec = self.hooked_pass(x, replace=self._replacement(one, deltas, dmasks, True))
                        layerwise.append(output_loss(rec.output, target_out, cfg.output_loss))
        if cfg.pgd_recon_coeff > 0:
            with section("pgd_forward"):
                like = next(iter(ci.values()))
                names = [s.name for s in self.specs]
                route = subset_routes(names, n_points, like, generator) if cfg.pgd_subset_routing else None
                adversarial = self._persistent_pgd_recon if self.persistent_sources is not None else self._pgd_recon
                terms["pgd_recon"] = adversarial(x, ci, deltas, target_out, generator, route, targets)
        with section("losses"):
            zero = terms["faithfulness"] * 0
            terms["stochastic_recon"] = torch.stack(recon).mean() if recon else zero
            terms["stochastic_recon_layerwise"] = torch.stack(layerwise).mean() if layerwise else zero
            progress = 1.0 if step is None else step / max(cfg.steps, 1)
            p = cfg.importance_p_at(progress)
            terms["importance_minimality"] = importance_minimality_loss(
                ci_upper, p, cfg.importance_eps, cfg.importance_beta
            )
            total = (
                cfg.faithfulness_coeff * terms["faithfulness"]
                + cfg.stochastic_recon_coeff * terms["stochastic_recon"]
                + cfg.stochastic_recon_layerwise_coeff * terms["stochastic_recon_layerwise"]
                + cfg.importance_minimality_coeff * terms["importance_minimality"]
            )
            if cfg.stochastic_recon_subset_coeff > 0:
                terms["stochastic_recon_subset"] = torch.stack(subset).mean()
                total = total + cfg.stochastic_recon_subset_coeff * terms["stochastic_recon_subset"]
            if cfg.pgd_recon_coeff > 0:
                total = total + cfg.pgd_recon_coeff * terms["pgd_recon"]
            if cfg.act_recon_hooks:
                terms["act_recon"] = torch.stack(act_recon).mean() if act_recon else zero
                total = total + cfg.act_recon_coeff * terms["act_recon"]
            terms["total"] = total
            self._last_ci_l0 = {
                f"ci_l0/{site_name(k)}": (g.detach() > CI_L0_THRESHOLD).sum(-1).float().mean() for k, g in ci.items()
            }
        return terms

    def _pgd_recon(
        self,
        x: Tensor,
        ci: dict[UseKey, Tensor],
        deltas: dict[str, Tensor] | None,
        target_out: Tensor,
        generator: torch.Generator | None,
        route: Mapping[str, Tensor] | None = None,
        targets: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """The output distance with every site masked by ``g + (1 - g) s`` (and each delta component
        times its own source), after ``pgd_steps`` signed-gradient ascent steps on the sources
        (with the CI and V, U held fixed); the returned distance has gradients to the CI and V, U.
        ``route`` (weight -> [n] bool): only those data points' weights masked (``targets`` elsewhere)."""
        cfg = self.config
        like = next(iter(ci.values()))
        n_points = like.shape[0]
        shared = cfg.pgd_scope == "shared"
        rows = 1 if shared else n_points
        shapes = {("ci", key): (rows, g.shape[1]) for key, g in ci.items()}
        if deltas is not None:
            shapes.update({("delta", key): (rows,) for key in self.site_keys})
        sources = pgd_sources(shapes, cfg.pgd_init, like, generator, shared)

        def distance(src, ci, deltas) -> Tensor:
            masks = masks_from_sources(ci, {key: src[("ci", key)] for key in ci})
            dmasks = None if deltas is None else {key: src[("delta", key)].expand(n_points) for key in self.site_keys}
            out = self.hooked_pass(x, replace=self._replacement(masks, deltas, dmasks, False, route, targets)).output
            return output_loss(out, target_out, cfg.output_loss)

        for _ in range(cfg.pgd_steps):
            grads = _source_gradients(distance, sources, ci, deltas)
            sources = pgd_ascent(sources, grads, cfg.pgd_step_size, shared)
        return distance(sources, ci, deltas)

    def _persistent_pgd_recon(
        self,
        x: Tensor,
        ci: dict[UseKey, Tensor],
        deltas: dict[str, Tensor] | None,
        target_out: Tensor,
        generator: torch.Generator | None,
        route: Mapping[str, Tensor] | None = None,
        targets: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """VPD's adversarial term: the persistent sources (one row per data point, ``[n, C (+1)]`` per
        site, the last column the delta component's mask) take ``pgd_warmup_updates`` Adam ascent
        updates on the output distance (CI and V, U held fixed); then the distance with masks
        ``g + (1 - g) s``, with gradients to the CI, V, U and (for the update after the backward, see
        :class:`~apd_lens.methods.spd.persistent_pgd.PersistentPGDUpdate`) the sources. Source
        gradients are those of the global batch's mean (a rank's local mean over the number of ranks)."""
        cfg = self.config
        state = self.persistent_sources
        like = next(iter(ci.values()))
        extra = 0 if deltas is None else 1
        state.ensure(
            {site_name(k): (like.shape[0], g.shape[1] + extra) for k, g in ci.items()}, cfg.pgd_init, like, generator
        )

        def distance(src: dict[str, Tensor], ci: dict[UseKey, Tensor], deltas) -> Tensor:
            rows = {key: src[site_name(key)] for key in ci}
            masks = masks_from_sources(ci, {key: r[:, : ci[key].shape[1]] for key, r in rows.items()})
            dmasks = None if deltas is None else {key: r[:, -1] for key, r in rows.items()}
            out = self.hooked_pass(x, replace=self._replacement(masks, deltas, dmasks, False, route, targets)).output
            return output_loss(out, target_out, cfg.output_loss)

        scale = 1.0 / world_size()
        for _ in range(cfg.pgd_warmup_updates):
            grads = _source_gradients(distance, state.sources, ci, deltas)
            state.ascend({k: g * scale for k, g in grads.items()})
        return distance(state.leaves(), ci, deltas)

    def training_callbacks(self, optimizer: torch.optim.Optimizer) -> dict[str, TrainingCallback]:
        """Persistent PGD's update after each backward (its sources and Adam state checkpointed as
        ``"persistent_pgd"``) and the V, U gradient clip (``grad_clip_subcomponents``)."""
        cfg = self.config
        out: dict[str, TrainingCallback] = {}
        if self.persistent_sources is not None and cfg.pgd_recon_coeff > 0:
            scale = 1.0 / (cfg.pgd_recon_coeff * world_size())
            out["persistent_pgd"] = PersistentPGDUpdate(self.persistent_sources, scale)
        if cfg.grad_clip_subcomponents is not None:
            params = [p for sub in self._subcomponents.values() for p in (sub.V, sub.U)]
            out["grad_clip_subcomponents"] = SubcomponentGradClip(optimizer, params, cfg.grad_clip_subcomponents)
        return out

    def log_values(self, terms: dict[str, Tensor]) -> dict[str, Tensor]:
        """CI L0 per site (mean number of subcomponents with CI > 0.1 per data point) of the last step."""
        return dict(self._last_ci_l0)


def _source_gradients(
    distance: Callable[[dict, dict, dict | None], Tensor],
    sources: dict,
    ci: dict[UseKey, Tensor],
    deltas: dict[str, Tensor] | None,
) -> dict:
    """Gradients of ``distance(sources, ci, deltas)`` with respect to the mask sources, with the CI and
    the delta components (so V, U) held fixed: one ascent step's direction for PGD."""
    fixed_ci = {key: g.detach() for key, g in ci.items()}
    fixed_deltas = None if deltas is None else {name: d.detach() for name, d in deltas.items()}
    leaves = {key: s.detach().requires_grad_(True) for key, s in sources.items()}
    with torch.enable_grad():
        grads = torch.autograd.grad(distance(leaves, fixed_ci, fixed_deltas), list(leaves.values()))
    return dict(zip(leaves, grads, strict=True))
