"""One call for a long run that may be interrupted: train it, continue it, or load it once finished."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

from torch import Tensor, nn

from apd_lens.engine.base import DecompositionBase
from apd_lens.engine.config import DecompositionConfig
from apd_lens.io import CONFIG_FILE
from apd_lens.training.checkpoint import latest_checkpoint

SECONDS_FILE = "decomposition_seconds.json"
IGNORED_FIELDS = frozenset({"progress"})
"""Config fields that may differ between a saved run and the call that continues or loads it."""


def config_differences(saved: DecompositionConfig, wanted: DecompositionConfig) -> list[str]:
    """``"field: saved …, asked …"`` for every setting (but ``progress``) in which two configs differ."""
    mine, theirs = wanted.to_dict(), saved.to_dict()
    return [
        f"{k}: saved {theirs.get(k)!r}, asked {v!r}"
        for k, v in mine.items()
        if k not in IGNORED_FIELDS and theirs.get(k) != v
    ]


def train_or_continue(
    model: nn.Module,
    data: Tensor | Iterable,
    config: DecompositionConfig,
    run_dir: str | Path,
    *,
    checkpoint_every: int = 500,
) -> tuple[DecompositionBase, float, str]:
    """The decomposition of ``model`` in ``run_dir``: loaded when the run there is finished, continued
    from its newest checkpoint when it was interrupted, else trained from the start (checkpointing
    every ``checkpoint_every`` steps). A run saved with other settings than ``config`` is refused,
    and nothing in ``run_dir`` is changed then. Returns the decomposition, its training seconds over
    all sessions, and what was done (``"loaded"``, ``"continued"``, ``"trained"``)."""
    import apd_lens  # the package's load and decompose (the loop imports this module's package)

    run_dir = Path(run_dir)
    timing = run_dir / SECONDS_FILE
    earlier = json.loads(timing.read_text())["seconds"] if timing.is_file() else 0.0
    if (run_dir / CONFIG_FILE).is_file():
        decomposition = apd_lens.load(run_dir, model)
        _refuse_other_settings(decomposition.config, config, run_dir)
        return decomposition, earlier, "loaded"
    resume = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if resume is not None:
        _refuse_other_settings(apd_lens.load(resume, model, check_values=False).config, config, resume)
    start = time.perf_counter()
    try:
        decomposition = apd_lens.decompose(
            model, data, config, run_dir=run_dir, checkpoint_every=checkpoint_every, resume=resume
        )
    finally:  # also on Ctrl-C, so that a continued run reports its whole time
        if run_dir.is_dir():
            timing.write_text(json.dumps({"seconds": earlier + time.perf_counter() - start}))
    seconds = json.loads(timing.read_text())["seconds"]
    return decomposition, seconds, "trained" if resume is None else "continued"


def _refuse_other_settings(saved: DecompositionConfig, wanted: DecompositionConfig, where: Path) -> None:
    differ = config_differences(saved, wanted)
    if differ:
        raise ValueError(f"{where} holds a run with other settings ({'; '.join(differ)}): use another run folder")
