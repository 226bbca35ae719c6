"""Forward passes through the model's own hooks.

One mechanism serves every pass of a step: hooks on the entering hook of each weight use record
the live (flattened) activation; hooks on the leaving hook either record it (target pass) or
replace it by the masked component output plus the frozen bias (component pass). Recorded
leaving activations become autograd leaves where they carry no graph yet, so gradients of the
output with respect to every leaving activation can be taken afterwards.
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
from apd_lens.methods.apd.components import ComponentWeight

SPARSE_DENSITY = 0.25
"""Masks keeping less than this fraction of (data point, component) pairs take the sparse path..."""
SPARSE_MIN_WORK = 2**22
"""...when the dense computation would cost more than this many multiply-adds."""

UseKey = tuple[str, int]
"""(weight name, index of the use)"""


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
    components: dict[str, ComponentWeight] | None = None,
    mask: Tensor | None = None,
    make_leaves: bool = False,
    detach_components: bool = False,
    act_hooks: Iterable[str] = (),
    extra_hooks: Iterable[tuple[str, Callable]] = (),
    sparse: bool | None = None,
) -> PassRecord:
    """Run ``model(x)`` under the plan's hooks.

    With ``components`` given, each leaving activation is replaced by
    ``sum_c mask[n, c] * (enter[n] @ P_c) + bias`` (mask ``None``: all components on).
    ``sparse``: compute only the kept (data point, component) pairs (None: decide from the mask).
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

    def replace(key: UseKey, t: Tensor, hook_name: str) -> Tensor:
        name, i = key
        use = specs[name].uses[i]
        if key not in record.enters:
            raise RuntimeError(
                f"weight {name!r}: leaving hook {hook_name!r} fired before its entering hook {use.enter!r}"
            )
        comp = components[name]
        enter = record.enters[key]
        acts_hook = comp.acts_hook(i)
        if flat_mask is not None and use_sparse(comp, enter.shape[0], acts_hook):
            out = comp.sparse_masked_output(enter, flat_mask, use.transposed, detach_components)
        else:
            inner = comp.inner_acts(enter, use.transposed, detach_components)
            if flat_mask is not None:
                inner = inner * flat_mask[:, :, None].to(inner.dtype)
            inner = acts_hook(inner.reshape(*record.batch_shape, *inner.shape[1:]))
            inner = inner.reshape(-1, *inner.shape[n_batch_dims:])
            out = comp.summed_outer(inner, use.transposed, detach_components)
        if out.shape[-1] != math.prod(t.shape[n_batch_dims:]):
            raise RuntimeError(
                f"weight {name!r}: component output width {out.shape[-1]} does not "
                f"match leaving hook {hook_name!r} of shape {tuple(t.shape)}"
            )
        out = out.reshape(t.shape)
        if i == 0:
            out = comp.hook_component_out(out)
        bias = biases[key]
        if bias is None:
            return out
        # the bias is laid out like d_out (e.g. a Linear's [h*e] bias at a [*, h, e] hook)
        return out + bias.reshape(t.shape[n_batch_dims:])

    def hook_fn(t: Tensor, hook, name: str) -> Tensor:
        for key in plan.leave_at.get(name, ()):
            if components is not None:
                t = replace(key, t, name)
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
