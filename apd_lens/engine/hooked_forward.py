"""Forward passes through the model's own hooks: the engine every method runs on.

One mechanism serves every pass of a step, whatever the method: hooks on the entering hook of each
weight use record the live (flattened) activation; hooks on the leaving hook either record it
(target pass) or replace it by what a method's :data:`Replacement` computes from the live
entering activation, plus the frozen bias (masked passes). Recorded leaving activations become
autograd leaves where they carry no graph yet, so gradients of the output with respect to every
leaving activation can be taken afterwards.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from apd_lens.engine.spec import WeightSpec, get_parameter

UseKey = tuple[str, int]
"""(weight name, index of the use)"""

Replacement = Callable[[UseKey, Tensor, Tensor, tuple[int, ...]], Tensor | None]
"""A method's replacement of one use's leaving activation:
``(use, entering activation [n_points, d_in] read live, the leaving activation as the model made it,
batch shape) -> [n_points, d_out]`` (or the leaving hook's own shape), without the frozen bias, which
the engine adds; ``None`` keeps the model's own activation."""


@dataclass
class PassRecord:
    """What one hooked forward saw."""

    output: Tensor
    enters: dict[UseKey, Tensor] = field(default_factory=dict)
    """Entering activations, flattened to [n_points, d_in]."""
    leaves: dict[UseKey, Tensor] = field(default_factory=dict)
    """Leaving activations, in the hook's own shape (bias included)."""
    acts: dict[str, Tensor] = field(default_factory=dict)
    """Activations at extra hooks requested by name."""
    batch_shape: tuple[int, ...] = ()


@dataclass
class HookPlan:
    """For each hook name, the uses that enter or leave there."""

    specs: list[WeightSpec]
    enter_at: dict[str, list[UseKey]]
    leave_at: dict[str, list[UseKey]]

    @classmethod
    def from_specs(cls, specs: Iterable[WeightSpec]) -> HookPlan:
        specs = list(specs)
        enter_at: dict[str, list[UseKey]] = defaultdict(list)
        leave_at: dict[str, list[UseKey]] = defaultdict(list)
        for spec in specs:
            for i, use in enumerate(spec.uses):
                enter_at[use.enter].append((spec.name, i))
                leave_at[use.leave].append((spec.name, i))
        for hook, keys in leave_at.items():
            if len(keys) > 1:
                raise ValueError(
                    f"hook {hook!r} is the leaving hook of several uses {keys}; each "
                    "leaving activation must come from exactly one decomposed matmul"
                )
        return cls(specs, dict(enter_at), dict(leave_at))

    def use_keys(self) -> list[UseKey]:
        return [(s.name, i) for s in self.specs for i in range(len(s.uses))]


def hooked_forward(
    model: nn.Module,
    x: Tensor,
    plan: HookPlan,
    n_batch_dims: int,
    replace: Replacement | None = None,
    make_leaves: bool = False,
    act_hooks: Iterable[str] = (),
    extra_hooks: Iterable[tuple[str, Callable]] = (),
) -> PassRecord:
    """Run ``model(x)`` under the plan's hooks.

    With ``replace`` given, each leaving activation is replaced by ``replace(...) + bias`` (see
    :data:`Replacement`); without it the model runs unchanged and the pass only records.
    """
    record = PassRecord(output=torch.empty(0))
    act_hooks = set(act_hooks)
    specs = {s.name: s for s in plan.specs}
    biases = {
        (s.name, i): (get_parameter(model, u.bias) if u.bias else None)
        for s in plan.specs
        for i, u in enumerate(s.uses)
    }

    def flatten(t: Tensor, hook_name: str, key: UseKey | None = None) -> Tensor:
        shape = tuple(t.shape[:n_batch_dims])
        if not record.batch_shape:
            record.batch_shape = shape
        elif shape != record.batch_shape:
            raise RuntimeError(
                f"hook {hook_name!r} has batch shape {shape}, other hooks {record.batch_shape}: check n_batch_dims"
            )
        if key is not None and not (t.is_floating_point() or t.is_complex()):
            return one_hot_ids(t, n_batch_dims, specs[key[0]], model, hook_name)
        return t.reshape(math.prod(shape), -1)

    def replaced(key: UseKey, t: Tensor, hook_name: str) -> Tensor:
        name, i = key
        use = specs[name].uses[i]
        if key not in record.enters:
            raise RuntimeError(
                f"weight {name!r}: leaving hook {hook_name!r} fired before its entering hook {use.enter!r}"
            )
        out = replace(key, record.enters[key], t, record.batch_shape)
        if out is None:
            return t
        width = math.prod(t.shape[n_batch_dims:])
        if out.numel() != t.numel():
            got = out.shape[-1] if out.ndim == 2 else tuple(out.shape)
            raise RuntimeError(
                f"weight {name!r}: replacement output width {got} does not "
                f"match leaving hook {hook_name!r} of shape {tuple(t.shape)} (width {width})"
            )
        out = out.reshape(t.shape)
        bias = biases[key]
        if bias is None:
            return out
        # the bias is laid out like d_out (e.g. a Linear's [h*e] bias at a [*, h, e] hook)
        return out + bias.reshape(t.shape[n_batch_dims:])

    def hook_fn(t: Tensor, hook, name: str) -> Tensor:
        for key in plan.leave_at.get(name, ()):
            if replace is not None:
                t = replaced(key, t, name)
            if make_leaves and not t.requires_grad:
                t = t.detach().requires_grad_(True)
            record.leaves[key] = t
        for key in plan.enter_at.get(name, ()):
            record.enters[key] = flatten(t, name, key)
        if name in act_hooks:
            record.acts[name] = t
        return t

    names = set(plan.enter_at) | set(plan.leave_at) | act_hooks
    fwd_hooks = [(n, functools.partial(hook_fn, name=n)) for n in sorted(names)] + list(extra_hooks)
    with model.hooks(fwd_hooks=fwd_hooks):
        record.output = model(x)
    missing = [k for k in plan.use_keys() if k not in record.leaves]
    if missing:
        name, i = missing[0]
        use = specs[name].uses[i]
        raise RuntimeError(
            f"weight {name!r}: hook {use.leave!r} never fired during the forward "
            f"(entering hook {use.enter!r} fired: {(name, i) in record.enters})"
        )
    silent = sorted(act_hooks - set(record.acts))
    if silent:
        raise RuntimeError(f"activation hooks never fired during the forward: {silent}")
    return record


def one_hot_ids(ids: Tensor, n_batch_dims: int, spec: WeightSpec, model: nn.Module, hook_name: str) -> Tensor:
    """An integer entering activation (token or position ids, e.g. an embedding's input) as the
    one-hot rows ``[n_points, d_in]`` that select rows of the weight's matrix."""
    if ids.ndim != n_batch_dims:
        raise RuntimeError(
            f"weight {spec.name!r}: integer entering activation at {hook_name!r} has shape {tuple(ids.shape)}; "
            f"ids must have exactly the {n_batch_dims} batch dims (no feature dims)"
        )
    matrix = spec.to_matrix(get_parameter(model, spec.name))
    d_in = matrix.shape[0]
    flat = ids.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= d_in):
        raise RuntimeError(f"weight {spec.name!r}: ids at {hook_name!r} fall outside [0, {d_in}) (its d_in)")
    return torch.nn.functional.one_hot(flat, d_in).to(matrix.dtype)
