"""Decomposition: APD's decomposition, a HookedRootModule holding a frozen target model and its
parameter components (C rank-m components per decomposed weight)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable
from typing import ClassVar

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from apd_lens._compat import HookPoint
from apd_lens.engine.base import DecompositionBase, TrainingCallback
from apd_lens.engine.hooked_forward import PassRecord, UseKey
from apd_lens.engine.losses import activation_recon_loss, output_loss
from apd_lens.engine.spec import WeightSpec, get_parameter
from apd_lens.methods.apd.attributions import (
    FeedsMismatch,
    ProbeMemoryError,
    activation_attributions,
    gradient_attributions,
    jvp_attributions,
)
from apd_lens.methods.apd.components import ComponentWeight
from apd_lens.methods.apd.config import APDConfig
from apd_lens.methods.apd.leave_gradients import vmap_leave_gradients
from apd_lens.methods.apd.losses import parameter_losses
from apd_lens.methods.apd.masks import batch_topk_mask, global_batch_topk_mask, per_example_topk_mask
from apd_lens.methods.apd.splitting import ComponentSplitter

FEED_CHECK_EXAMPLES = 8
"""After the first batch (all examples), declared ``feeds`` are checked on this many examples per batch."""
SPARSE_DENSITY = 0.25
"""Masks keeping less than this fraction of (data point, component) pairs take the sparse path..."""
SPARSE_MIN_WORK = 2**22
"""...when the dense computation would cost more than this many multiply-adds."""


class Decomposition(DecompositionBase):
    """APD: the target model (frozen, submodule ``model``) and C components of each decomposed weight.

    ``forward(x, mask=None)`` runs the model with every decomposed weight replaced by the sum of
    its (masked) components. Hooks: ``<weight>.hook_component_acts`` ([*batch, C, m]),
    ``<weight>.hook_component_out``, ``hook_attributions`` and ``hook_mask`` ([*batch, C]), and
    the target model's own hooks under ``model.``.
    """

    method: ClassVar[str] = "apd"
    config_class: ClassVar[type] = APDConfig

    def __init__(self, model: nn.Module, specs: list[WeightSpec], config: APDConfig):
        super().__init__(model, specs, config)
        self._components: dict[str, ComponentWeight] = dict(self._weight_modules)
        self._feeds_of = self._feeds()
        self._fed_checks = 0
        self.hook_attributions = HookPoint()
        self.hook_mask = HookPoint()
        self.split_history: list = []
        """The component splits of training (:class:`apd_lens.methods.apd.splitting.Split`), if any."""
        self.merge_history: list = []
        """The merges of duplicate components (:class:`apd_lens.methods.apd.splitting.Merge`), if any."""
        self.adoption_history: list = []
        """The orphans given to unused components (:class:`apd_lens.methods.apd.adoption.Adoption`), if any."""
        self.vmap_failure: str | None = None
        """Why the model's forward could not be vmapped (then attributions use batched backward)."""
        self.setup()

    def make_weight_module(
        self, spec: WeightSpec, matrix: Float[Tensor, "d_in d_out"], generator: torch.Generator
    ) -> ComponentWeight:
        d_in, d_out = matrix.shape
        cfg = self.config
        rank = cfg.rank if cfg.rank is not None else min(d_in, d_out)
        return ComponentWeight(cfg.n_components, d_in, d_out, rank, len(spec.uses), cfg.init_scale, generator)

    def after_update(self) -> None:
        """``unit_norm_A``: every column of every A back to unit norm after each update."""
        if self.config.unit_norm_A:
            for comp in self._components.values():
                comp.normalize_A()

    def training_callbacks(self, optimizer: torch.optim.Optimizer) -> dict[str, TrainingCallback]:
        """The component splitter (active when ``split_every`` is set; not in the paper)."""
        return {"splitter": ComponentSplitter(self, optimizer)}

    def _feeds(self) -> dict[tuple[str, int], list[str]]:
        """Per use that declares ``feeds``: the fed weights, checked to read the use's leaving width."""
        out = {}
        for spec in self.specs:
            for i, use in enumerate(spec.uses):
                if not use.feeds:
                    continue
                comp = self._components[spec.name]
                width = comp.d_in if use.transposed else comp.d_out
                for name in use.feeds:
                    fed_width = self._fed_matrix(name).shape[0]
                    if fed_width != width:
                        raise ValueError(
                            f"weight {spec.name!r} feeds {name!r}, but its leaving width {width} is not "
                            f"{name!r}'s entering width {fed_width}"
                        )
                out[(spec.name, i)] = list(use.feeds)
        return out

    def _fed_matrix(self, name: str) -> Tensor:
        """A fed (single-use) weight's target matrix ``[d, d']`` as its use applies it, read from the model
        now (so it follows the model across devices)."""
        spec = next(s for s in self.specs if s.name == name)
        matrix = spec.to_matrix(get_parameter(self.model, name)).detach()
        return matrix.T if spec.uses[0].transposed else matrix

    # ----------------------------------------------------------------- accessors
    @property
    def components(self) -> dict[str, ComponentWeight]:
        """Weight name -> its ComponentWeight module."""
        return dict(self._components)

    @property
    def n_components(self) -> int:
        return self.config.n_components

    def component_parameters(self) -> list[nn.Parameter]:
        return [p for c in self._components.values() for p in (c.A, c.B)]

    def weight_parts(self) -> dict[str, Float[Tensor, "C={self.n_components} ..."]]:
        """The components ``P_c`` of every weight (see :meth:`component_weights`)."""
        return self.component_weights()

    @torch.no_grad()
    def component_weights(self) -> dict[str, Float[Tensor, "C={self.n_components} ..."]]:
        """Weight name -> the components ``P_c`` in the parameter's own shape: [C, *shape]."""
        return self.in_parameter_shapes({n: c.component_matrices() for n, c in self._components.items()})

    # ----------------------------------------------------------------- passes
    def _forward(self, x: Tensor, **kw) -> PassRecord:
        return self.hooked_pass(x, **kw)

    def _replacement(self, mask: Tensor | None, detach: bool = False, sparse: bool | None = None):
        """The engine's replacement for the component pass: each leaving activation becomes
        ``sum_c mask[n, c] * (enter[n] @ P_c)`` (mask None: all components on). ``sparse``:
        compute only the kept (data point, component) pairs (None: decide from the mask)."""
        flat_mask = None if mask is None else mask.reshape(-1, mask.shape[-1])
        density: list[float] = []  # computed on first need, once per forward

        def use_sparse(comp: ComponentWeight, n_points: int, acts_hook) -> bool:
            """Sparse path when asked, or (auto) when the mask is sparse, the dense work is large and
            nobody hooks the inner activations (hooks need the dense [*, C, m] tensor)."""
            if acts_hook._forward_hooks or acts_hook._backward_hooks:
                return False
            if sparse is not None:
                return sparse
            dense_work = n_points * comp.n_components * comp.rank * (comp.d_in + comp.d_out)
            if dense_work <= SPARSE_MIN_WORK:
                return False
            if not density:
                density.append(float((flat_mask != 0).float().mean()))
            return density[0] < SPARSE_DENSITY

        def replace(key: UseKey, enter: Tensor, leave: Tensor, batch_shape: tuple[int, ...]) -> Tensor:
            name, i = key
            transposed = self.specs_by_name[name].uses[i].transposed
            comp = self._components[name]
            acts_hook = comp.acts_hook(i)
            if flat_mask is not None and use_sparse(comp, enter.shape[0], acts_hook):
                out = comp.sparse_masked_output(enter, flat_mask, transposed, detach)
            else:
                inner = comp.inner_acts(enter, transposed, detach)
                if flat_mask is not None:
                    inner = inner * flat_mask[:, :, None].to(inner.dtype)
                inner = acts_hook(inner.reshape(*batch_shape, *inner.shape[1:]))
                inner = inner.reshape(-1, *inner.shape[len(batch_shape) :])
                out = comp.summed_outer(inner, transposed, detach)
            if out.shape[-1] != leave[(0,) * len(batch_shape)].numel():
                return out  # the engine names the mismatch
            out = out.reshape(leave.shape)
            return comp.hook_component_out(out) if i == 0 else out

        return replace

    def target_pass(self, x: Tensor, make_leaves: bool = True) -> PassRecord:
        """Forward of the unchanged target, recording entering and leaving activations."""
        with torch.enable_grad():
            return self._forward(x, make_leaves=make_leaves, act_hooks=self.config.act_recon_hooks)

    def attributions(
        self, x: Tensor, record: PassRecord | None = None, generator: torch.Generator | None = None
    ) -> Float[Tensor, "*batch C={self.n_components}"]:
        """Attribution of every component on every data point of ``x``."""
        cfg = self.config
        if record is None and cfg.attribution_source == "target":
            self.check_input(x)
            record = self.target_pass(x, make_leaves=self._needs_leaves())
        if cfg.attribution_source == "components":
            if record is None:
                self.check_input(x)
            with torch.enable_grad():
                record = self._forward(x, replace=self._replacement(None, detach=True), make_leaves=True)
        flat = self.attribution_values(record, generator, x)
        return self.hook_attributions(flat.detach().reshape(*record.batch_shape, -1))

    def uses_vmap(self) -> bool:
        """Whether target gradient attributions go through ``torch.func.vmap`` (see
        :mod:`apd_lens.methods.apd.leave_gradients`)."""
        cfg = self.config
        return (
            cfg.attribution == "gradient"
            and cfg.attribution_source == "target"
            and cfg.attribution_backend in ("auto", "vmap")
            and self.vmap_failure is None
        )

    def _needs_leaves(self) -> bool:
        """Whether the target pass must record leaving activations with a graph (batched backward)."""
        cfg = self.config
        return (
            cfg.attribution == "gradient"
            and cfg.attribution_source == "target"
            and cfg.attribution_backend != "jvp"
            and not self.uses_vmap()
        )

    def attribution_values(
        self, record: PassRecord, generator: torch.Generator | None = None, x: Tensor | None = None
    ) -> Float[Tensor, "n_points C={self.n_components}"]:
        """Attributions ``[n_points, C]`` from a recorded pass (of ``x``, needed for vmap)."""
        cfg = self.config
        if cfg.attribution == "activation":
            return activation_attributions(record, self.plan, self._components)
        if cfg.attribution_backend == "jvp" and x is not None:
            return jvp_attributions(self.model, x, record, self.plan, self._components)
        probes = (cfg.attribution_probes, cfg.attribution_chunk, generator)
        fed = None
        if cfg.attribution_source == "target" and self._feeds_of:
            fed = {key: [((n, 0), self._fed_matrix(n)) for n in names] for key, names in self._feeds_of.items()}
        fed_check = self._next_fed_check(record) if fed else None
        if x is not None and self.uses_vmap():
            state = None if generator is None else generator.get_state()
            grads = vmap_leave_gradients(self.model, x, self.plan, record, self.plan.use_keys())
            try:
                with torch.enable_grad():
                    return gradient_attributions(
                        record,
                        self.plan,
                        self._components,
                        *probes,
                        leave_gradients=grads,
                        fed_weights=fed,
                        fed_check=fed_check,
                    )
            except (FeedsMismatch, ProbeMemoryError):
                raise  # the model's own errors, not vmap's: the fall-back would meet them again
            except Exception as err:  # noqa: BLE001 -- any functorch failure: fall back, loudly
                self._vmap_failed(err)
            if generator is not None:
                generator.set_state(state)  # the fall-back draws the same probes
            if not any(t.requires_grad for t in record.leaves.values()):
                with torch.enable_grad():
                    record = self._forward(x, make_leaves=True)
        return gradient_attributions(record, self.plan, self._components, *probes, fed_weights=fed, fed_check=fed_check)

    def _next_fed_check(self, record: PassRecord) -> Tensor | None:
        """Examples on which declared ``feeds`` are checked: all of them the first time, then
        FEED_CHECK_EXAMPLES spread over the batch, shifted by one every call."""
        calls = self._fed_checks
        self._fed_checks += 1
        if calls == 0:
            return None
        n_examples = record.batch_shape[0]
        step = max(1, n_examples // FEED_CHECK_EXAMPLES)
        return (torch.arange(0, n_examples, step)[:FEED_CHECK_EXAMPLES] + calls) % n_examples

    def _vmap_failed(self, err: Exception) -> None:
        if self.config.attribution_backend == "vmap":
            raise RuntimeError(
                f"attribution_backend='vmap': the forward of {type(self.model).__name__} cannot be vmapped: {err}"
            ) from err
        self.vmap_failure = f"{type(err).__name__}: {err}"
        warnings.warn(
            f"the forward of {type(self.model).__name__} cannot be vmapped ({self.vmap_failure}); "
            "attributions fall back to one batched backward (equal results, slower)",
            stacklevel=3,
        )

    def mask_from_attributions(
        self, attributions: Float[Tensor, "*batch C={self.n_components}"], across_ranks: bool = False
    ) -> Float[Tensor, "*batch C={self.n_components}"]:
        """Top-k mask; ``across_ranks``: batch top-k over the global batch of a distributed step."""
        if self.config.topk_mode == "batch":
            topk = global_batch_topk_mask if across_ranks else batch_topk_mask
            mask = topk(attributions, self.config.topk)
        else:
            mask = per_example_topk_mask(attributions, self.config.topk)
        return self.hook_mask(mask)

    def topk_mask(self, x: Tensor) -> Float[Tensor, "*batch C={self.n_components}"]:
        """The top-k mask of ``x`` (batch top-k over all of ``x``, or per example)."""
        return self.mask_from_attributions(self.attributions(x))

    def forward_with_mask(
        self,
        x: Tensor,
        mask: Float[Tensor, "*batch C={self.n_components}"] | None = None,
        act_hooks: Iterable[str] = (),
    ) -> PassRecord:
        """Forward with each decomposed weight replaced by ``sum_c mask[n, c] P_c`` per data point."""
        self.check_input(x)
        if mask is not None:
            expected = (*tuple(x.shape[: self.n_batch_dims(x)]), self.n_components)
            if tuple(mask.shape) != expected:
                raise ValueError(f"mask must have shape {expected}, got {tuple(mask.shape)}")
        return self._forward(x, replace=self._replacement(mask), act_hooks=act_hooks)

    def forward(self, x: Tensor, mask: Float[Tensor, "*batch C={self.n_components}"] | str | None = None) -> Tensor:
        """Output of the component model (all components on when ``mask`` is None).

        ``mask="topk"`` uses the top-k mask of ``x``, so that ``run_with_cache(x, mask="topk")``
        also sees ``hook_attributions`` and ``hook_mask`` (the target's hooks under ``model.``
        then fire twice: the target pass, then the masked pass, which a cache keeps).
        """
        if isinstance(mask, str):
            if mask != "topk":
                raise ValueError(f'mask must be a Tensor, None or "topk", got {mask!r}')
            mask = self.topk_mask(x)
        return self.forward_with_mask(x, mask).output

    # ----------------------------------------------------------------- inspection
    def _component_ids(self, ids: Iterable[int]) -> list[int]:
        ids = [int(c) for c in ids]
        bad = [c for c in ids if not 0 <= c < self.n_components]
        if bad:
            raise IndexError(f"component indices {bad} out of range for C={self.n_components}")
        return ids

    @torch.no_grad()
    def component(self, c: int) -> dict[str, Float[Tensor, "..."]]:
        """Weight name -> component ``P_c`` in the parameter's own shape."""
        (c,) = self._component_ids([c])
        return {name: weights[c] for name, weights in self.component_weights().items()}

    def component_mask(
        self, x: Tensor, keep: Iterable[int] | None = None, ablate: Iterable[int] | None = None
    ) -> Float[Tensor, "*batch C={self.n_components}"]:
        """A mask for every data point of ``x``: only the components in ``keep`` on (all when
        None), minus those in ``ablate``."""
        on = torch.ones(self.n_components, dtype=torch.bool)
        if keep is not None:
            on.zero_()
            on[self._component_ids(keep)] = True
        if ablate is not None:
            on[self._component_ids(ablate)] = False
        first = next(iter(self._components.values())).A
        batch_shape = tuple(x.shape[: self.n_batch_dims(x)])
        return on.to(device=first.device, dtype=first.dtype).expand(*batch_shape, -1)

    def run_components(
        self, x: Tensor, keep: Iterable[int] | None = None, ablate: Iterable[int] | None = None
    ) -> Tensor:
        """Output with only the components in ``keep`` (all when None), minus those in ``ablate``."""
        return self.forward(x, self.component_mask(x, keep, ablate))

    def active_components(self, x: Tensor, k: int | None = None) -> Bool[Tensor, "*batch C={self.n_components}"]:
        """Which components are active on each data point of ``x``: the decomposition's own top-k
        rule (batch top-k depends on the whole batch), or the ``k`` components of largest
        attribution per data point."""
        if k is None:
            return self.topk_mask(x) > 0
        return per_example_topk_mask(self.attributions(x), k) > 0

    # ----------------------------------------------------------------- losses
    def losses(self, x: Tensor, generator: torch.Generator | None = None, step: int | None = None) -> dict[str, Tensor]:
        """All loss terms of one APD step on batch ``x`` and their weighted ``total``."""
        cfg = self.config
        self.check_input(x)
        section = self.section_timer or (lambda name: contextlib.nullcontext())
        with section("target_forward"):
            target = self.target_pass(x, make_leaves=self._needs_leaves())
        with section("attribution"):
            attributions = self.attributions(x, record=target, generator=generator)
            mask = self.mask_from_attributions(attributions, across_ranks=True)
        with section("masked_forward"):
            masked = self.forward_with_mask(x, mask, act_hooks=cfg.act_recon_hooks)
        with section("losses"):
            return self._loss_terms(target, masked, mask)

    def _loss_terms(self, target: PassRecord, masked: PassRecord, mask: Tensor) -> dict[str, Tensor]:
        cfg = self.config
        target_out = target.output.detach()
        faithfulness, simplicity = parameter_losses(self.target_matrices(), self._components, mask, cfg.schatten_p)
        terms = {
            "faithfulness": faithfulness,
            "minimality": output_loss(masked.output, target_out, cfg.output_loss),
            "simplicity": simplicity,
        }
        total = (
            cfg.faithfulness_coeff * terms["faithfulness"]
            + cfg.minimality_coeff * terms["minimality"]
            + cfg.simplicity_coeff * terms["simplicity"]
        )
        if cfg.act_recon_hooks:
            targets = {k: v.detach() for k, v in target.acts.items()}
            terms["act_recon"] = activation_recon_loss(masked.acts, targets, len(target.batch_shape))
            total = total + cfg.act_recon_coeff * terms["act_recon"]
        terms["total"] = total
        return terms
