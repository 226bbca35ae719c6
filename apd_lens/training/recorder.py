"""RunRecorder: what a run writes to its run directory (metrics.jsonl, checkpoints, final save, wandb)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from apd_lens.engine.base import DecompositionBase
from apd_lens.io import atomic_write_bytes, describe_target, save_decomposition
from apd_lens.training.checkpoint import checkpoint_path, prune_checkpoints, rng_state, save_checkpoint
from apd_lens.training.data import BatchStream
from apd_lens.training.distributed import is_main_process

METRICS_FILE = "metrics.jsonl"


class RunRecorder:
    """Writes a run's ``metrics.jsonl``, checkpoints, final save and optional wandb log."""

    def __init__(
        self,
        run_dir: str | Path | None,
        decomposition: DecompositionBase,
        optimizer: torch.optim.Optimizer,
        batches: BatchStream,
        step_gen: torch.Generator,
        checkpoint_every: int | None,
        keep_checkpoints: int,
        start_step: int,
        extra_state: dict[str, Callable[[], Any]] | None = None,
    ):
        self.run_dir = Path(run_dir) if run_dir is not None and is_main_process() else None
        self.decomposition, self.optimizer, self.batches, self.step_gen = decomposition, optimizer, batches, step_gen
        self.checkpoint_every, self.keep = checkpoint_every, keep_checkpoints
        self.last_checkpoint = start_step
        self.extra_state = dict(extra_state or {})
        self.wandb_run = None
        self._metrics = None
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._metrics = self._open_metrics()

    def _open_metrics(self):
        """Open ``metrics.jsonl`` for appending, first writing the rows logged before the run's
        start (a resumed run's checkpointed history; rows an interrupted run wrote after its last
        checkpoint are dropped)."""
        path = self.run_dir / METRICS_FILE
        rows = "".join(json.dumps(row) + "\n" for row in self.decomposition.loss_history)
        atomic_write_bytes(path, rows.encode())
        return open(path, "a")

    def start_wandb(self, project: str, kwargs: dict[str, Any]) -> None:
        if not is_main_process():
            return
        try:
            import wandb
        except ImportError as err:
            raise ImportError("wandb_project is set but wandb is not installed: pip install wandb") from err
        kwargs = dict(kwargs)
        id_file = self.run_dir / "wandb_run_id" if self.run_dir is not None else None
        if id_file is not None and id_file.exists():
            kwargs.setdefault("id", id_file.read_text().strip())
            kwargs.setdefault("resume", "allow")
        if self.run_dir is not None:
            kwargs.setdefault("dir", str(self.run_dir))
        self.wandb_run = wandb.init(project=project, config=self.decomposition.config.to_dict(), **kwargs)
        if id_file is not None and getattr(self.wandb_run, "id", None):
            id_file.write_text(str(self.wandb_run.id))

    def after_step(self, step: int, row: dict[str, int | float] | None) -> None:
        if row is not None:
            if self._metrics is not None:
                self._metrics.write(json.dumps(row) + "\n")
                self._metrics.flush()
            if self.wandb_run is not None:
                self.wandb_run.log({k: v for k, v in row.items() if k != "step"}, step=step)
        done = step + 1
        if self.checkpoint_every and done % self.checkpoint_every == 0:
            self.save_checkpoint(done)

    def save_checkpoint(self, done: int) -> Path | None:
        """Checkpoint the state after ``done`` completed steps."""
        if self.run_dir is None:
            return None
        d = self.decomposition
        state = {
            "step": done,
            "method": d.method,
            "config": d.config.to_dict(),
            "weights": [s.to_dict() for s in d.specs],
            "target": describe_target(d.model, d.specs),
            "target_matrices": {k: v.cpu() for k, v in d.target_matrices().items()},
            "components": d.state_tensors(),
            "optimizer": self.optimizer.state_dict(),
            "rng": rng_state(),
            "probe_generator": self.step_gen.get_state(),  # the step generator (the key predates SPD)
            "data": self.batches.state_dict(),
            "loss_history": list(d.loss_history),
            **{key: get() for key, get in self.extra_state.items()},
        }
        path = save_checkpoint(checkpoint_path(self.run_dir, done), state)
        prune_checkpoints(self.run_dir, self.keep)
        self.last_checkpoint = done
        return path

    def finish(self) -> None:
        """After the last step: final checkpoint (if checkpointing) and the saved decomposition."""
        if self.run_dir is None:
            return
        steps = self.decomposition.config.steps
        if self.checkpoint_every and self.last_checkpoint != steps:
            self.save_checkpoint(steps)
        save_decomposition(self.decomposition, self.run_dir)

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
