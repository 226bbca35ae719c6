"""Open a run folder for browsing: its decomposition on its target, data to harvest on, and the
vocabulary. Two layouts are recognised:

- a toy run written by ``apd-lens decompose`` (``RUN/cfg.json`` + ``RUN/target/target.json``): the
  target is rebuilt by ``load_toy_target`` (the CLI passes its own :func:`apd_lens.cli.load_target`,
  which knows the toy target kinds; this package does not import the CLI), data drawn from the
  model's data class (as ``apd-lens report`` does);
- a language-model run (``RUN/cfg.json``, the target a folder saved by
  :func:`apd_lens.models.lm.load_or_train_lm_target`): given as ``target``, else found as
  ``RUN/target``, ``RUN/../lm_target`` or ``RUN/../../lm_target`` (examples/lm.py writes
  ``runs/lm/<run>`` and ``runs/lm_target``); data are the target's held-out token windows.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor, nn

from apd_lens.io import CONFIG_FILE
from apd_lens.methods.spd.decomposition import SPDDecomposition

TOY_TARGET_FILE = "target.json"
LM_RECORD_KIND = "apd_lens.lm_target"


class BrowseError(ValueError):
    """A run folder, prompt or harvest that cannot be browsed (the message says why)."""


@dataclass
class OpenedRun:
    """A run ready to harvest and browse."""

    run_dir: Path
    decomposition: SPDDecomposition
    kind: str
    """``"lm"`` or ``"toy"``."""
    data: Tensor
    """Held-out token windows ``[n, n_ctx]`` (LM) or feature vectors ``[n, n_features]`` (toy)."""
    token_strings: list[str] | None
    tokenizer: object | None = None

    @property
    def model(self) -> nn.Module:
        return self.decomposition.model

    def encode_prompt(self, text: str) -> Int[Tensor, "1 pos"]:
        """The prompt's token ids ``[1, pos]``; a clear error for an empty prompt, one longer than the
        context, or ids outside the model's vocabulary (a byte-level BPE tokenizer has no unknown
        token, so these are what "out of vocabulary" means here)."""
        if self.kind != "lm" or self.tokenizer is None:
            raise BrowseError("--prompt needs a language-model run; this is a toy model's run (its inputs are vectors)")
        ids = self.tokenizer.encode(text).ids
        cfg = self.model.cfg
        if not ids:
            raise BrowseError(f"the prompt {text!r} tokenizes to nothing; give some text")
        if len(ids) > cfg.n_ctx:
            raise BrowseError(f"the prompt is {len(ids)} tokens long, more than the model's context n_ctx={cfg.n_ctx}")
        bad = sorted({i for i in ids if not 0 <= i < cfg.d_vocab})
        if bad:
            raise BrowseError(
                f"the prompt maps to token ids {bad} outside the model's vocabulary [0, d_vocab={cfg.d_vocab}): "
                "the tokenizer does not belong to this model"
            )
        return torch.tensor([ids], dtype=torch.long, device=self.data.device)


def _is_lm_target(folder: Path) -> bool:
    try:
        return json.loads((folder / "cfg.json").read_text()).get("kind") == LM_RECORD_KIND
    except (OSError, ValueError, AttributeError):
        return False


def lm_target_folder(run_dir: Path, target: Path | None) -> Path | None:
    """The LM target of a run: ``target`` if given (checked), else the first of the usual places."""
    if target is not None:
        if not _is_lm_target(target):
            raise BrowseError(f"{target} holds no saved language-model target (cfg.json of kind {LM_RECORD_KIND!r})")
        return target
    for candidate in (run_dir / "target", run_dir.parent / "lm_target", run_dir.parent.parent / "lm_target"):
        if _is_lm_target(candidate):
            return candidate
    return None


def _load_decomposition(run_dir: Path, model: nn.Module, where: str) -> SPDDecomposition:
    from apd_lens.loading import load

    try:
        decomposition = load(run_dir, model)
    except (ValueError, RuntimeError, KeyError) as err:
        raise BrowseError(f"the run in {run_dir} is not a decomposition of the target in {where}: {err}") from err
    if not isinstance(decomposition, SPDDecomposition):
        raise BrowseError(
            f"{run_dir} holds an {decomposition.method.upper()} run; browsing needs SPD (causal importances)"
        )
    return decomposition


ToyTargetLoader = Callable[[Path], tuple[nn.Module, Any, Any]]
"""folder -> (model, metadata, kind with ``kind.data(model, batch_size, seed)``): :func:`apd_lens.cli.load_target`."""


def open_run(
    run_dir: str | Path,
    *,
    target: str | Path | None = None,
    n_sequences: int = 256,
    seed: int = 12345,
    load_toy_target: ToyTargetLoader | None = None,
) -> OpenedRun:
    """Load the run in ``run_dir`` (see the module docstring) with ``n_sequences`` held-out inputs
    (toy: data points drawn with ``seed``; ``load_toy_target`` rebuilds a toy target from its folder)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise BrowseError(f"{run_dir} is not a folder")
    if not (run_dir / CONFIG_FILE).is_file():
        raise BrowseError(
            f"{run_dir} holds no run: no {CONFIG_FILE} (a finished decomposition written by `apd-lens decompose` "
            "or examples/lm.py); an unfinished run has only checkpoints"
        )
    if (run_dir / "target" / TOY_TARGET_FILE).is_file() and target is None:
        if load_toy_target is None:
            raise BrowseError(
                f"{run_dir} is a toy run: pass load_toy_target=apd_lens.cli.load_target (apd-lens browse does)"
            )
        try:
            model, _, kind = load_toy_target(run_dir / "target")
        except SystemExit as err:
            raise BrowseError(str(err)) from err
        decomposition = _load_decomposition(run_dir, model, str(run_dir / "target"))
        data = next(iter(kind.data(model, n_sequences, seed)))
        return OpenedRun(run_dir, decomposition, "toy", data, None)
    folder = lm_target_folder(run_dir, Path(target) if target is not None else None)
    if folder is None:
        raise BrowseError(
            f"cannot find the target of {run_dir}: no {run_dir / 'target' / TOY_TARGET_FILE} (a toy run) and no "
            "language-model target in RUN/target, RUN/../lm_target or RUN/../../lm_target; pass --target"
        )
    from apd_lens.models.lm import load_or_train_lm_target

    source = json.loads((folder / "cfg.json").read_text()).get("corpus", {}).get("source", "stdlib")
    lm = load_or_train_lm_target(folder, None if source == "stdlib" else source, progress=False)
    decomposition = _load_decomposition(run_dir, lm.model, str(folder))
    strings = [lm.tokenizer.decode([i]) for i in range(lm.model.cfg.d_vocab)]
    return OpenedRun(run_dir, decomposition, "lm", lm.held_out_tokens[:n_sequences], strings, lm.tokenizer)
