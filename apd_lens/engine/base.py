"""DecompositionBase: what a decomposition is, whatever the method (the seam between the engine
and the methods).

A decomposition is a ``HookedRootModule`` holding the frozen target (submodule ``model``) and,
at each decomposed weight's own module path (``blocks.0.mlp.W_in``), the method's trainable module
for that weight, so that the hooks and parameters of those modules are named after the weight. This
class owns everything that does not depend on the method: building and naming those modules,
checking inputs and that the target stays frozen, the hooked passes through the engine, the
trainable state, and saving. A method subclasses it and supplies its weight modules
(:meth:`make_weight_module`), its loss terms (:meth:`losses`), and optionally what happens before
training (:meth:`before_training`), after each update (:meth:`after_update`) and between steps
(:meth:`training_callbacks`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from jaxtyping import Float
from torch import Tensor, nn

from apd_lens._compat import HookedRootModule, HookPoint
from apd_lens.engine.config import DecompositionConfig
from apd_lens.engine.hooked_forward import HookPlan, PassRecord, Replacement, hooked_forward
from apd_lens.engine.spec import WeightSpec, get_parameter, validate_specs
from apd_lens.io import COMPONENTS_FILE, check_target, read_cfg, read_tensors, save_decomposition, saved_method


@runtime_checkable
class TrainingCallback(Protocol):
    """Something a method runs between the steps of training, with state a checkpoint keeps."""

    def after_step(self, step: int, x: Tensor) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class DecompositionBase(HookedRootModule):
    """The frozen target model (``model``) and one trainable module per decomposed weight."""

    method: ClassVar[str] = ""
    """The method's name, saved with the decomposition (``"apd"``, ``"spd"``)."""
    config_class: ClassVar[type[DecompositionConfig]] = DecompositionConfig

    def __init__(self, model: nn.Module, specs: list[WeightSpec], config: DecompositionConfig):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        validate_specs(model, specs)
        self.config = config
        self.specs = list(specs)
        self.specs_by_name = {s.name: s for s in self.specs}
        self.plan = HookPlan.from_specs(self.specs)
        self.model = model
        for p in model.parameters():
            p.requires_grad_(False)
        generator = torch.Generator().manual_seed(config.seed)
        self._weight_modules: dict[str, nn.Module] = {}
        for spec in self.specs:
            matrix = spec.to_matrix(get_parameter(model, spec.name)).detach()
            module = self.make_weight_module(spec, matrix, generator).to(device=matrix.device, dtype=matrix.dtype)
            self._attach(spec.name, module)
            self._weight_modules[spec.name] = module
        names = [s.name for s in self.specs] + [u.bias for s in self.specs for u in s.uses if u.bias]
        self._target_snapshot = {n: get_parameter(model, n).detach().clone() for n in dict.fromkeys(names)}
        self.loss_history: list[dict[str, int | float]] = []
        self.section_timer = None
        """Optional callable(name) -> context manager, wrapped around each part of a step (benchmarks)."""

    # ------------------------------------------------------------------ what a method supplies
    def make_weight_module(
        self, spec: WeightSpec, matrix: Float[Tensor, "d_in d_out"], generator: torch.Generator
    ) -> nn.Module:
        """The trainable module of one weight (its ``[d_in, d_out]`` target ``matrix`` given)."""
        raise NotImplementedError

    def losses(self, x: Tensor, generator: torch.Generator | None = None, step: int | None = None) -> dict[str, Tensor]:
        """The loss terms of one training step on ``x`` and their weighted ``"total"``."""
        raise NotImplementedError

    def weight_parts(self) -> dict[str, Float[Tensor, "_n_parts ..."]]:
        """Weight name -> the learned parts of that weight in the parameter's own shape, ``[n_parts, *shape]``
        (APD's components, SPD's subcomponents)."""
        raise NotImplementedError

    def before_training(self) -> None:
        """Called once before the first step of a fresh (not resumed) run."""

    def after_update(self) -> None:
        """Called after every optimizer step."""

    def training_callbacks(self, optimizer: torch.optim.Optimizer) -> dict[str, TrainingCallback]:
        """Objects run after every step, by the name their state has in checkpoints."""
        return {}

    def log_values(self, terms: dict[str, Tensor]) -> dict[str, Tensor]:
        """What a logged step records besides the loss terms (e.g. CI L0); default nothing."""
        return {}

    # ------------------------------------------------------------------ structure
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

    def _attach(self, dotted: str, module: nn.Module) -> None:
        """Register ``module`` at the module path ``dotted`` so its hooks are named after the weight."""
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
        parent.add_module(last, module)

    @property
    def weight_names(self) -> list[str]:
        return [s.name for s in self.specs]

    @property
    def n_params(self) -> int:
        """Number of decomposed parameters."""
        return sum(get_parameter(self.model, s.name).numel() for s in self.specs)

    def target_matrices(self) -> dict[str, Float[Tensor, "_d_in _d_out"]]:
        """Weight name -> the target's ``[d_in, d_out]`` matrix."""
        return {s.name: s.to_matrix(get_parameter(self.model, s.name)).detach() for s in self.specs}

    @torch.no_grad()
    def in_parameter_shapes(
        self, matrices: dict[str, Float[Tensor, "_n _d_in _d_out"]]
    ) -> dict[str, Float[Tensor, "_n ..."]]:
        """Weight name -> ``[n, d_in, d_out]`` matrices viewed in the parameter's own shape, ``[n, *shape]``."""
        out = {}
        for spec in self.specs:
            shape = get_parameter(self.model, spec.name).shape
            out[spec.name] = spec.from_matrix(matrices[spec.name], shape)
        return out

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every parameter of the decomposition that is not the target's."""
        return [p for name, p in self.named_parameters() if not name.startswith("model.")]

    def n_batch_dims(self, x: Tensor) -> int:
        if self.config.n_batch_dims is not None:
            return self.config.n_batch_dims
        return x.ndim if not torch.is_floating_point(x) else max(x.ndim - 1, 1)

    # ------------------------------------------------------------------ checks
    def _reference_parameter(self) -> Tensor:
        return self.trainable_parameters()[0]

    def check_input(self, x: Tensor) -> None:
        """Refuse inputs that would give silently wrong results."""
        if not isinstance(x, Tensor):
            raise TypeError(f"expected a torch.Tensor batch, got {type(x).__name__}")
        if x.numel() == 0:
            raise ValueError(f"empty batch of shape {tuple(x.shape)}")
        reference = self._reference_parameter()
        if x.device != reference.device:
            raise ValueError(f"the batch is on {x.device} but the model and components are on {reference.device}")
        from apd_lens.adapters.tokens import check_tokens  # local: the engine does not depend on the adapters

        check_tokens(self.model, x)  # token ids of a transformer: dtype, range, length
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

    # ------------------------------------------------------------------ passes
    def hooked_pass(self, x: Tensor, replace: Replacement | None = None, **kw) -> PassRecord:
        """``model(x)`` through the engine (see :func:`~apd_lens.engine.hooked_forward.hooked_forward`),
        with the model's name and the batch in any error."""
        try:
            return hooked_forward(self.model, x, self.plan, self.n_batch_dims(x), replace=replace, **kw)
        except RuntimeError as err:
            raise RuntimeError(
                f"forward of {type(self.model).__name__} failed on a batch of shape {tuple(x.shape)} "
                f"and dtype {x.dtype}: {err}"
            ) from err

    # ------------------------------------------------------------------ state and saving
    def state_tensors(self) -> dict[str, Tensor]:
        """The trainable state by parameter name (``<weight>.<param>``), detached, on the CPU."""
        return {n: p.detach().cpu().clone() for n, p in self.named_parameters() if not n.startswith("model.")}

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, Tensor], source: str) -> None:
        """Copy saved trainable state (see :meth:`state_tensors`) into this decomposition."""
        for name, param in self.named_parameters():
            if name.startswith("model."):
                continue
            saved = tensors.get(name)
            if saved is None:
                raise ValueError(f"{source} holds no {name!r} (this {self.method.upper()} decomposition's parameter)")
            if saved.shape != param.shape:
                raise ValueError(
                    f"{source}: {name!r} has shape {tuple(saved.shape)}, this decomposition {tuple(param.shape)}"
                )
            param.copy_(saved)

    def save(self, path: str | Path) -> Path:
        """Save to the directory ``path``: ``cfg.json`` and ``components.safetensors``."""
        return save_decomposition(self, path)

    @classmethod
    def load(cls, path: str | Path, model: nn.Module, *, check_values: bool = True):
        """Load a decomposition of this method saved in ``path`` onto ``model``, checking that it fits
        (names, shapes, hooks and, with ``check_values``, the decomposed weights' values)."""
        path = Path(path)
        cfg = read_cfg(path)
        method = saved_method(cfg)
        if method != cls.method:
            raise ValueError(
                f"{path} holds an {method.upper()} decomposition, not {cls.method.upper()}: load it with "
                f"apd_lens.load(path, model) (which reads the method from cfg.json)"
            )
        tensors = read_tensors(path / COMPONENTS_FILE)
        saved = {d["name"]: tensors.get(f"target.{d['name']}") for d in cfg["weights"]} if check_values else None
        return cls.from_record(cfg, tensors, saved, model, f"the decomposition in {path}", path / COMPONENTS_FILE)

    @classmethod
    def from_record(
        cls,
        record: dict[str, Any],
        tensors: dict[str, Tensor],
        saved_matrices: dict[str, Tensor] | None,
        model: nn.Module,
        what: str,
        source: str | Path,
    ):
        """Rebuild a decomposition from a saved record (a ``cfg.json`` or a checkpoint: its ``config``,
        ``weights``, ``target`` and ``loss_history``) and its trainable ``tensors``, on ``model``, after
        checking that ``model`` is the target ``what`` was made of (values too, given ``saved_matrices``)."""
        specs = [WeightSpec.from_dict(d) for d in record["weights"]]
        check_target(what, model, specs, record["target"], saved_matrices)
        decomposition = cls(model, specs, cls.config_class.from_dict(record["config"]))
        decomposition.load_state_tensors(tensors, str(source))
        decomposition.loss_history = list(record.get("loss_history", []))
        return decomposition
