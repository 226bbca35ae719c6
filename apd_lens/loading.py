"""``apd_lens.load``: load any saved decomposition, whatever its method, or a run's checkpoint."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from apd_lens.engine.base import DecompositionBase
from apd_lens.io import CONFIG_FILE, read_cfg, saved_method
from apd_lens.methods import get_method
from apd_lens.training.checkpoint import CHECKPOINT_SUFFIX, latest_checkpoint, load_checkpoint


def load(path: str | Path, model: nn.Module, *, check_values: bool = True) -> DecompositionBase:
    """Load the decomposition saved in ``path`` (by ``save`` or a finished run's directory) onto ``model``,
    with the class of its method (read from ``cfg.json``), checking that it fits the model. ``path`` may also
    be a checkpoint file (``<run>/checkpoints/step_*.ckpt``): the decomposition as it stood at that step, e.g.
    to look at a long run before it ends (:func:`load_checkpoint_decomposition`)."""
    path = Path(path)
    if path.is_file():
        if path.suffix != CHECKPOINT_SUFFIX:
            raise ValueError(
                f"{path} is a file but not a checkpoint (*{CHECKPOINT_SUFFIX}); a saved decomposition is loaded "
                f"from its folder: apd_lens.load('{path.parent}', model)"
            )
        return load_checkpoint_decomposition(path, model, check_values=check_values)
    if path.is_dir() and not (path / CONFIG_FILE).is_file():
        newest = latest_checkpoint(path)
        if newest is not None:
            raise FileNotFoundError(
                f"{path} holds no finished decomposition (no {CONFIG_FILE}); to look at the run as it stands, "
                f"load its newest checkpoint: apd_lens.load('{newest}', model)"
            )
    method = get_method(saved_method(read_cfg(path)))
    return method.decomposition_class.load(path, model, check_values=check_values)


def load_checkpoint_decomposition(
    path: str | Path, model: nn.Module, *, check_values: bool = True
) -> DecompositionBase:
    """The decomposition held by the checkpoint file ``path`` (its components, config and loss history up to
    the checkpoint's step), on ``model``, checked against the target it was made of. It is for looking at,
    not for training on: to continue the run, pass the checkpoint as ``decompose(..., resume=path)``."""
    path = Path(path)
    ckpt = load_checkpoint(path)
    saved = ckpt["target_matrices"] if check_values else None
    cls = get_method(saved_method(ckpt)).decomposition_class
    return cls.from_record(ckpt, ckpt["components"], saved, model, f"the checkpoint {path}", path)
