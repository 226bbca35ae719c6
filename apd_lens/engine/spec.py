"""Descriptions of decomposed weights: which parameter, and where it is used in the forward.

A :class:`WeightSpec` names a parameter of the model and lists its :class:`WeightUse`s. Each use
says which hook carries the activation entering the matmul, which hook carries the activation
leaving it, whether the weight is used transposed, and which frozen bias is added before the
leaving hook. Convention: the parameter is viewed as a matrix ``[d_in, d_out]`` (after the
optional einops ``matrix_pattern``); the entering activation's feature dims flatten (C order)
to ``d_in`` and ``d_out`` unflattens into the leaving activation's feature dims, so that

    leave = flatten(enter) @ matrix (+ bias)              # or @ matrix.T when transposed
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import einops
import torch
from torch import nn


@dataclass(frozen=True)
class WeightUse:
    """One matmul in the forward pass that uses a decomposed weight."""

    enter: str
    """Name of the hook whose activation enters the matmul."""
    leave: str
    """Name of the hook whose activation leaves the matmul (bias included, if any)."""
    transposed: bool = False
    """Whether this use multiplies by the transpose of the weight matrix (tied weights)."""
    bias: str | None = None
    """Name of the frozen bias parameter added before the leaving hook, if any."""
    feeds: tuple[str, ...] = ()
    """Optional, for speed: names of later (single-use) decomposed weights whose entering activation
    receives this use's leaving activation added unchanged, e.g. an MLP output added to a residual
    stream that later MLPs read, given that every other path from this leaving activation to the
    output is linear and the same for every example (no nonlinearity, no normalization). Exact
    attributions then contract this use's per-example gradient through those weights' (narrower)
    gradients instead of at its own width. Checked on every attribution: a wrong declaration raises."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "feeds", tuple(self.feeds))


@dataclass(frozen=True)
class WeightSpec:
    """A decomposed weight: a model parameter and its uses in the forward pass."""

    name: str
    """Name of the parameter in ``model.named_parameters()``, e.g. ``"blocks.0.mlp.W_in"``."""
    uses: tuple[WeightUse, ...]
    matrix_pattern: str | None = None
    """einops pattern from the parameter to its ``[d_in, d_out]`` matrix, e.g. ``"o i -> i o"``."""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("WeightSpec.name must be a parameter name, got an empty string")
        uses = tuple(self.uses)
        if not uses:
            raise ValueError(f"WeightSpec {self.name!r} has no uses")
        if not all(isinstance(u, WeightUse) for u in uses):
            raise TypeError(f"WeightSpec {self.name!r}: every use must be a WeightUse")
        object.__setattr__(self, "uses", uses)

    def to_matrix(self, param: torch.Tensor) -> torch.Tensor:
        """View the parameter as its ``[d_in, d_out]`` matrix."""
        if self.matrix_pattern is None:
            return param
        return einops.rearrange(param, self.matrix_pattern)

    def from_matrix(self, matrix: torch.Tensor, param_shape: torch.Size) -> torch.Tensor:
        """Inverse of :meth:`to_matrix` for a (possibly batched, leading dims) matrix."""
        if self.matrix_pattern is None:
            return matrix
        left, right = (s.strip() for s in self.matrix_pattern.split("->"))
        lead = matrix.shape[:-2]
        flat = matrix.reshape(-1, *matrix.shape[-2:])
        sizes = _axis_sizes(left, param_shape)
        out = einops.rearrange(flat, f"n {right} -> n {left}", **sizes)
        return out.reshape(*lead, *param_shape)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> WeightSpec:
        uses = tuple(WeightUse(**{**u, "feeds": tuple(u.get("feeds", ()))}) for u in d["uses"])
        return cls(d["name"], uses, d.get("matrix_pattern"))


def _axis_sizes(pattern: str, shape: torch.Size) -> dict[str, int]:
    names = pattern.replace("(", " ").replace(")", " ").split()
    if "..." in names or len(names) != len(shape):
        raise ValueError(f"matrix_pattern side {pattern!r} must name each of {len(shape)} dims")
    return dict(zip(names, shape, strict=True))


def get_parameter(model: nn.Module, name: str) -> torch.Tensor:
    """The model's parameter (or buffer) called ``name``, with a clear error if missing.

    Looked up by its dotted path (no walk over the whole model: this runs on every forward)."""
    for lookup in (model.get_parameter, model.get_buffer):
        try:
            return lookup(name)
        except AttributeError:
            continue
    named = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    close = [n for n in named if n.split(".")[-1] == name.split(".")[-1]][:5]
    hint = f" Similar names: {close}." if close else ""
    raise KeyError(f"The model has no parameter named {name!r}.{hint}")


def validate_specs(model: nn.Module, specs: list[WeightSpec]) -> None:
    """Check that every parameter and hook named by ``specs`` exists in ``model``."""
    hook_dict = getattr(model, "hook_dict", None)
    if hook_dict is None:
        raise TypeError(
            f"{type(model).__name__} has no hook_dict: apd_lens needs a HookedRootModule "
            "(call self.setup() at the end of __init__) or a TransformerBridge"
        )
    seen: set[str] = set()
    single_use = {s.name for s in specs if len(s.uses) == 1}
    for spec in specs:
        for use in spec.uses:
            for fed in use.feeds:
                if fed not in single_use:
                    raise ValueError(
                        f"Weight {spec.name!r}: feeds names {fed!r}, which is not a declared weight with one use"
                    )
        if spec.name in seen:
            raise ValueError(f"Weight {spec.name!r} is declared twice")
        seen.add(spec.name)
        param = get_parameter(model, spec.name)
        matrix = spec.to_matrix(param.detach())
        if matrix.ndim != 2:
            raise ValueError(
                f"Weight {spec.name!r} of shape {tuple(param.shape)} is not a matrix; give a "
                "matrix_pattern that maps it to [d_in, d_out]"
            )
        for use in spec.uses:
            for role, hook in (("enter", use.enter), ("leave", use.leave)):
                if hook not in hook_dict:
                    raise KeyError(
                        f"Weight {spec.name!r}: {role} hook {hook!r} does not exist in {type(model).__name__}"
                    )
            if use.enter == use.leave:
                raise ValueError(f"Weight {spec.name!r}: enter and leave hook are both {use.enter!r}")
            if use.bias is not None:
                get_parameter(model, use.bias)
