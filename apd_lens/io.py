"""Saving and loading decompositions.

A saved decomposition is a directory with

- ``cfg.json``: the apd_lens version, the config, the weight descriptions (``WeightSpec.to_dict``),
  a description of the target (class, shapes of the decomposed weights and biases, hooks used)
  and the loss history;
- ``components.safetensors``: ``<weight>.A`` [C, d_in, m] and ``<weight>.B`` [C, m, d_out] of
  every decomposed weight, and ``target.<weight>``, the target's own ``[d_in, d_out]`` matrix.

Loading checks the directory against the model it is applied to (parameter names, shapes,
hooks, and by default the decomposed weights' values) and names every mismatch.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from apd_lens.engine.spec import WeightSpec, get_parameter
from apd_lens.methods.apd.config import APDConfig

if TYPE_CHECKING:
    from apd_lens.methods.apd.decomposition import Decomposition

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_FILE = "cfg.json"
COMPONENTS_FILE = "components.safetensors"


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


def save_decomposition(decomposition: Decomposition, path: str | Path) -> Path:
    """Save ``decomposition`` to the directory ``path`` (created; existing files replaced)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, comp in decomposition.components.items():
        tensors[f"{name}.A"] = comp.A.detach().cpu().contiguous()
        tensors[f"{name}.B"] = comp.B.detach().cpu().contiguous()
    for name, matrix in decomposition.target_matrices().items():
        tensors[f"target.{name}"] = matrix.cpu().contiguous()
    meta = {"format": "apd_lens.methods.apd.components", "format_version": str(FORMAT_VERSION)}
    atomic_write_bytes(path / COMPONENTS_FILE, st_save(tensors, metadata=meta))
    cfg = {
        "format_version": FORMAT_VERSION,
        "apd_lens_version": apd_lens_version(),
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


def load_decomposition(path: str | Path, model: nn.Module, *, check_values: bool = True) -> Decomposition:
    """Load the decomposition saved in ``path`` onto ``model``.

    Raises ValueError naming every mismatch between the saved target and ``model`` (missing or
    differently shaped parameters, missing hooks; with ``check_values`` also decomposed weights
    whose values differ from those the decomposition was made of).
    """
    from apd_lens.methods.apd.decomposition import Decomposition

    path = Path(path)
    cfg = read_cfg(path)
    config = APDConfig.from_dict(cfg["config"])
    specs = [WeightSpec.from_dict(d) for d in cfg["weights"]]
    tensors = read_tensors(path / COMPONENTS_FILE)
    saved = {s.name: tensors.get(f"target.{s.name}") for s in specs} if check_values else None
    check_target(f"the decomposition in {path}", model, specs, cfg["target"], saved)
    decomposition = Decomposition(model, specs, config)
    set_components(decomposition, tensors, str(path / COMPONENTS_FILE))
    decomposition.loss_history = list(cfg.get("loss_history", []))
    return decomposition


def set_components(decomposition: Decomposition, tensors: dict[str, Tensor], source: str) -> None:
    """Copy ``<weight>.A`` / ``<weight>.B`` from ``tensors`` into the decomposition's components."""
    for name, comp in decomposition.components.items():
        a, b = tensors.get(f"{name}.A"), tensors.get(f"{name}.B")
        if a is None or b is None:
            raise ValueError(f"{source} holds no components for weight {name!r}")
        try:
            comp.set_from_matrices(a, b)
        except ValueError as err:
            raise ValueError(f"{source}, weight {name!r}: {err}") from err
