"""Decomposition: a HookedRootModule holding a frozen target model and its parameter components."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from apd_lens._compat import HookedRootModule, HookPoint
from apd_lens.engine.hooked_forward import HookPlan, PassRecord, hooked_forward
from apd_lens.engine.spec import WeightSpec, get_parameter, validate_specs
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
from apd_lens.methods.apd.losses import activation_recon_loss, output_loss, parameter_losses
from apd_lens.methods.apd.masks import batch_topk_mask, per_example_topk_mask
from apd_lens.training.distributed import global_batch_topk_mask

FEED_CHECK_EXAMPLES = 8
"""After the first batch (all examples), declared ``feeds`` are checked on this many examples per batch."""


class Decomposition(HookedRootModule):
    """The target model (frozen, submodule ``model``) and C components of each decomposed weight.

    ``forward(x, mask=None)`` runs the model with every decomposed weight replaced by the sum of
    its (masked) components. Hooks: ``<weight>.hook_component_acts`` ([*batch, C, m]),
    ``<weight>.hook_component_out``, ``hook_attributions`` and ``hook_mask`` ([*batch, C]), and
    the target model's own hooks under ``model.``.
    """

    def __init__(self, model: nn.Module, specs: list[WeightSpec], config: APDConfig):
        super().__init__()
        validate_specs(model, specs)
        self.config = config
        self.specs = list(specs)
        self.plan = HookPlan.from_specs(self.specs)
        self.model = model
        for p in model.parameters():
            p.requires_grad_(False)
        generator = torch.Generator().manual_seed(config.seed)
        self._components: dict[str, ComponentWeight] = {}
        for spec in self.specs:
            matrix = spec.to_matrix(get_parameter(model, spec.name))
            d_in, d_out = matrix.shape
            rank = config.rank if config.rank is not None else min(d_in, d_out)
            comp = ComponentWeight(
                config.n_components, d_in, d_out, rank, len(spec.uses), config.init_scale, generator
            ).to(device=matrix.device, dtype=matrix.dtype)
            self._attach(spec.name, comp)
            self._components[spec.name] = comp
        names = [s.name for s in self.specs] + [u.bias for s in self.specs for u in s.uses if u.bias]
        self._target_snapshot = {n: get_parameter(model, n).detach().clone() for n in dict.fromkeys(names)}
        self._feeds_of = self._feeds()
        self._fed_checks = 0
        self.hook_attributions = HookPoint()
        self.hook_mask = HookPoint()
        self.loss_history: list[dict[str, float]] = []
        self.split_history: list = []
        """The component splits of training (:class:`apd_lens.methods.apd.splitting.Split`), if any."""
        self.vmap_failure: str | None = None
        """Why the model's forward could not be vmapped (then attributions use batched backward)."""
        self.section_timer = None
        """Optional callable(name) -> context manager, wrapped around each part of a step (benchmarks)."""
        self.setup()

    def setup(self) -> None:
        """Like HookedRootModule.setup, but the target's modules keep their own names (so the
        target's caches and hooks still work on its own); they are listed under ``model.``."""
        self.mod_dict, self.hook_dict = {}, {}
        for name, module in self.named_modules():
            if not name:
                continue
            if name != "model" and not name.startswith("model."):
                module.name = name
            self.mod_dict[name] = module
            if isinstance(module, HookPoint):
                self.hook_dict[name] = module

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

    def _attach(self, dotted: str, comp: ComponentWeight) -> None:
        """Register ``comp`` at the module path ``dotted`` so its hooks are named after the weight."""
        parent: nn.Module = self
        *path, last = dotted.split(".")
        for part in path:
            child = parent._modules.get(part)
            if child is None:
                if hasattr(parent, part):
                    raise ValueError(f"weight name {dotted!r} clashes with attribute {part!r}")
                child = nn.Module()
                parent.add_module(part, child)
            parent = child
        if hasattr(parent, last):
            raise ValueError(f"weight name {dotted!r} clashes with an existing attribute")
        parent.add_module(last, comp)

    # ----------------------------------------------------------------- accessors
    @property
    def components(self) -> dict[str, ComponentWeight]:
        """Weight name -> its ComponentWeight module."""
        return dict(self._components)

    @property
    def n_components(self) -> int:
        return self.config.n_components

    @property
    def n_params(self) -> int:
        """Number of decomposed parameters."""
        return sum(get_parameter(self.model, s.name).numel() for s in self.specs)

    def component_parameters(self) -> list[nn.Parameter]:
        return [p for c in self._components.values() for p in (c.A, c.B)]

    def target_matrices(self) -> dict[str, Tensor]:
        """Weight name -> the target's ``[d_in, d_out]`` matrix."""
        return {s.name: s.to_matrix(get_parameter(self.model, s.name)).detach() for s in self.specs}

    @torch.no_grad()
    def component_weights(self) -> dict[str, Float[Tensor, "C ..."]]:
        """Weight name -> the components ``P_c`` in the parameter's own shape: [C, *shape]."""
        out = {}
        for spec in self.specs:
            shape = get_parameter(self.model, spec.name).shape
            out[spec.name] = spec.from_matrix(self._components[spec.name].component_matrices(), shape)
        return out

    def n_batch_dims(self, x: Tensor) -> int:
        if self.config.n_batch_dims is not None:
            return self.config.n_batch_dims
        return x.ndim if not torch.is_floating_point(x) else max(x.ndim - 1, 1)

    # ----------------------------------------------------------------- passes
    def check_input(self, x: Tensor) -> None:
        """Refuse inputs that would give silently wrong results."""
        if not isinstance(x, Tensor):
            raise TypeError(f"expected a torch.Tensor batch, got {type(x).__name__}")
        if x.numel() == 0:
            raise ValueError(f"empty batch of shape {tuple(x.shape)}")
        reference = next(iter(self._components.values())).A
        if x.device != reference.device:
            raise ValueError(f"the batch is on {x.device} but the model and components are on {reference.device}")
        if torch.is_floating_point(x) and not torch.isfinite(x).all():
            raise ValueError("the batch contains NaN or Inf values")
        if torch.is_floating_point(x) and x.dtype != reference.dtype:
            raise TypeError(f"the batch has dtype {x.dtype} but the model's weights are {reference.dtype}")

    def check_target_unchanged(self, when: str = "") -> None:
        """Raise if a decomposed weight or its bias changed since the decomposition was built."""
        for name, saved in self._target_snapshot.items():
            current = get_parameter(self.model, name).detach()
            if current.shape != saved.shape or not torch.equal(current.to(saved.device), saved):
                raise RuntimeError(
                    f"parameter {name!r} of the target model changed during the decomposition{when}; "
                    "the target must stay frozen (train or edit a copy)"
                )

    def _forward(self, x: Tensor, **kw) -> PassRecord:
        try:
            return hooked_forward(self.model, x, self.plan, self.n_batch_dims(x), **kw)
        except RuntimeError as err:
            raise RuntimeError(
                f"forward of {type(self.model).__name__} failed on a batch of shape {tuple(x.shape)} "
                f"and dtype {x.dtype}: {err}"
            ) from err

    def target_pass(self, x: Tensor, make_leaves: bool = True) -> PassRecord:
        """Forward of the unchanged target, recording entering and leaving activations."""
        with torch.enable_grad():
            return self._forward(x, make_leaves=make_leaves, act_hooks=self.config.act_recon_hooks)

    def attributions(
        self, x: Tensor, record: PassRecord | None = None, generator: torch.Generator | None = None
    ) -> Float[Tensor, "*batch C"]:
        """Attribution of every component on every data point of ``x``."""
        cfg = self.config
        if record is None and cfg.attribution_source == "target":
            self.check_input(x)
            record = self.target_pass(x, make_leaves=self._needs_leaves())
        if cfg.attribution_source == "components":
            if record is None:
                self.check_input(x)
            with torch.enable_grad():
                record = self._forward(x, components=self._components, make_leaves=True, detach_components=True)
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
    ) -> Float[Tensor, "n_points C"]:
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
        self, attributions: Float[Tensor, "*batch C"], across_ranks: bool = False
    ) -> Float[Tensor, "*batch C"]:
        """Top-k mask; ``across_ranks``: batch top-k over the global batch of a distributed step."""
        if self.config.topk_mode == "batch":
            topk = global_batch_topk_mask if across_ranks else batch_topk_mask
            mask = topk(attributions, self.config.topk)
        else:
            mask = per_example_topk_mask(attributions, self.config.topk)
        return self.hook_mask(mask)

    def topk_mask(self, x: Tensor) -> Float[Tensor, "*batch C"]:
        """The top-k mask of ``x`` (batch top-k over all of ``x``, or per example)."""
        return self.mask_from_attributions(self.attributions(x))

    def forward_with_mask(self, x: Tensor, mask: Tensor | None = None, act_hooks=()) -> PassRecord:
        """Forward with each decomposed weight replaced by ``sum_c mask[n, c] P_c`` per data point."""
        self.check_input(x)
        if mask is not None:
            expected = (*tuple(x.shape[: self.n_batch_dims(x)]), self.n_components)
            if tuple(mask.shape) != expected:
                raise ValueError(f"mask must have shape {expected}, got {tuple(mask.shape)}")
        return self._forward(x, components=self._components, mask=mask, act_hooks=act_hooks)

    def forward(self, x: Tensor, mask: Tensor | str | None = None) -> Tensor:
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
    def component(self, c: int) -> dict[str, Tensor]:
        """Weight name -> component ``P_c`` in the parameter's own shape."""
        (c,) = self._component_ids([c])
        return {name: weights[c] for name, weights in self.component_weights().items()}

    def component_mask(
        self, x: Tensor, keep: Iterable[int] | None = None, ablate: Iterable[int] | None = None
    ) -> Float[Tensor, "*batch C"]:
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

    def active_components(self, x: Tensor, k: int | None = None) -> Bool[Tensor, "*batch C"]:
        """Which components are active on each data point of ``x``: the decomposition's own top-k
        rule (batch top-k depends on the whole batch), or the ``k`` components of largest
        attribution per data point."""
        if k is None:
            return self.topk_mask(x) > 0
        return per_example_topk_mask(self.attributions(x), k) > 0

    # ----------------------------------------------------------------- save / load
    def save(self, path: str | Path) -> Path:
        """Save to the directory ``path``: ``cfg.json`` and ``components.safetensors``."""
        from apd_lens.io import save_decomposition

        return save_decomposition(self, path)

    @classmethod
    def load(cls, path: str | Path, model: nn.Module, *, check_values: bool = True) -> Decomposition:
        """Load a saved decomposition onto ``model``, checking that it fits (see ``apd_lens.io``)."""
        from apd_lens.io import load_decomposition

        return load_decomposition(path, model, check_values=check_values)

    # ----------------------------------------------------------------- losses
    def losses(self, x: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
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
