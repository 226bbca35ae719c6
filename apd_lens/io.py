"""Saving and loading decompositions.

A saved decomposition is a directory with

- ``cfg.json``: the apd_lens version, the method (``"apd"``, ``"spd"``; absent in saves older than
  SPD, which are APD), the config, the weight descriptions (``WeightSpec.to_dict``), a description
  of the target (class, shapes of the decomposed weights and biases, hooks used) and the loss history;
- ``components.safetensors``: the decomposition's trainable tensors by parameter name (APD:
  ``<weight>.A`` [C, d_in, m] and ``<weight>.B`` [C, m, d_out]; SPD: ``<weight>.V`` [d_in, C],
  ``<weight>.U`` [C, d_out] and the causal-importance functions' parameters), and ``target.<weight>``,
  the target's own ``[d_in, d_out]`` matrix.

This module only reads and writes that format and checks a target against it; it imports no
decomposition class. Loading is the decomposition classes' ``load`` (and :func:`apd_lens.load`,
which picks the class from the saved method), and checks the directory against the model it is
applied to (parameter names, shapes, hooks, and by default the decomposed weights' values),
naming every mismatch.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from apd_lens.engine.config import DecompositionConfig
from apd_lens.engine.spec import WeightSpec, get_parameter

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_FILE = "cfg.json"
COMPONENTS_FILE = "components.safetensors"


@runtime_checkable
class SavableDecomposition(Protocol):
    """What :func:`save_decomposition` reads of a decomposition (``DecompositionBase`` has it all); a
    protocol, so that this module depends on no decomposition class."""

    @property
    def method(self) -> str: ...
    @property
    def config(self) -> DecompositionConfig: ...
    @property
    def specs(self) -> list[WeightSpec]: ...
    @property
    def model(self) -> nn.Module: ...
    @property
    def loss_history(self) -> list[dict[str, int | float]]: ...

    def state_tensors(self) -> dict[str, Tensor]: ...
    def target_matrices(self) -> dict[str, Tensor]: ...


def apd_lens_version() -> str:
    from apd_lens import __version__

    return __version__


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one, never a
    partial file: write a temporary file next to it, flush it to disk, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable (not possible on every platform)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path


def describe_target(model: nn.Module, specs: list[WeightSpec]) -> dict[str, Any]:
    """What a decomposition needs from its target: class name, shapes of the decomposed weights
    and their biases, and the hooks the weight descriptions use."""
    params = {}
    for spec in specs:
        names = [spec.name] + [u.bias for u in spec.uses if u.bias]
        for name in names:
            params[name] = list(get_parameter(model, name).shape)
    hooks = sorted({h for s in specs for u in s.uses for h in (u.enter, u.leave)})
    return {"class": type(model).__name__, "parameters": params, "hooks": hooks}


def target_mismatches(
    model: nn.Module,
    specs: list[WeightSpec],
    described: dict[str, Any],
    saved_matrices: dict[str, Tensor] | None = None,
) -> list[str]:
    """Every way ``model`` differs from the ``described`` target (see :func:`describe_target`);
    with ``saved_matrices`` also the decomposed weights whose values differ."""
    problems = []
    named = dict(model.named_parameters())
    named.update(dict(model.named_buffers()))
    for name, shape in described.get("parameters", {}).items():
        if name not in named:
            problems.append(f"parameter {name!r} (shape {tuple(shape)}) does not exist in {type(model).__name__}")
        elif tuple(named[name].shape) != tuple(shape):
            problems.append(f"parameter {name!r}: saved shape {tuple(shape)}, model has {tuple(named[name].shape)}")
    hook_dict = getattr(model, "hook_dict", None) or {}
    for hook in described.get("hooks", []):
        if hook not in hook_dict:
            problems.append(f"hook {hook!r} does not exist in {type(model).__name__}")
    if problems or saved_matrices is None:
        return problems
    for spec in specs:
        saved = saved_matrices.get(spec.name)
        if saved is None:
            problems.append(f"no saved target values for weight {spec.name!r}")
            continue
        current = spec.to_matrix(get_parameter(model, spec.name)).detach().to("cpu", saved.dtype)
        if not torch.equal(current, saved):
            diff = (current.double() - saved.double()).abs().max().item()
            problems.append(
                f"weight {spec.name!r} has other values than the target the decomposition was made of "
                f"(max |difference| {diff:.3g})"
            )
    return problems


def check_target(
    source: str,
    model: nn.Module,
    specs: list[WeightSpec],
    described: dict[str, Any],
    saved_matrices: dict[str, Tensor] | None = None,
) -> None:
    """Raise ValueError naming every mismatch found by :func:`target_mismatches`."""
    problems = target_mismatches(model, specs, described, saved_matrices)
    if not problems:
        return
    cls = described.get("class")
    made_of = f" (made of a {cls})" if cls and cls != type(model).__name__ else ""
    raise ValueError(f"{source}{made_of} does not fit this {type(model).__name__}:\n  - " + "\n  - ".join(problems))


def save_decomposition(decomposition: SavableDecomposition, path: str | Path) -> Path:
    """Save ``decomposition`` to the directory ``path`` (created; existing files replaced)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.contiguous() for name, t in decomposition.state_tensors().items()}
    for name, matrix in decomposition.target_matrices().items():
        tensors[f"target.{name}"] = matrix.cpu().contiguous()
    meta = {"format": "apd_lens.methods.apd.components", "format_version": str(FORMAT_VERSION)}
    atomic_write_bytes(path / COMPONENTS_FILE, st_save(tensors, metadata=meta))
    cfg = {
        "format_version": FORMAT_VERSION,
        "apd_lens_version": apd_lens_version(),
        "method": decomposition.method,
        "config": decomposition.config.to_dict(),
        "weights": [s.to_dict() for s in decomposition.specs],
        "target": describe_target(decomposition.model, decomposition.specs),
        "loss_history": decomposition.loss_history,
    }
    atomic_write_bytes(path / CONFIG_FILE, (json.dumps(cfg, indent=2) + "\n").encode())
    return path


def read_cfg(path: str | Path) -> dict[str, Any]:
    """The parsed ``cfg.json`` of a saved decomposition directory."""
    path = Path(path)
    file = path / CONFIG_FILE
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory holding a saved decomposition")
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a saved decomposition: it has no {CONFIG_FILE}")
    try:
        cfg = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from err
    missing = [k for k in ("format_version", "config", "weights", "target") if k not in cfg]
    if missing:
        raise ValueError(f"{file} lacks the fields {missing}; it was not written by apd_lens.io")
    if cfg["format_version"] > FORMAT_VERSION:
        raise ValueError(
            f"{file} has format version {cfg['format_version']}, written by apd_lens "
            f"{cfg.get('apd_lens_version')}; this apd_lens ({apd_lens_version()}) reads up to {FORMAT_VERSION}"
        )
    return cfg


def read_tensors(file: Path) -> dict[str, Tensor]:
    """The tensors of a safetensors file, with a clear error if it is missing or damaged."""
    if not file.is_file():
        raise FileNotFoundError(f"missing {file}")
    try:
        return st_load(file.read_bytes())
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise ValueError(f"{file} is truncated or corrupted and cannot be read: {err}") from err


def saved_method(cfg: dict[str, Any]) -> str:
    """The method of a saved decomposition or checkpoint (saves older than SPD are APD)."""
    return cfg.get("method", "apd")
