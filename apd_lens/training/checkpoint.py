"""Training checkpoints: everything needed to continue a run to the same result.

A checkpoint is one file ``<run_dir>/checkpoints/step_<N>.ckpt`` holding the components, the
optimizer state, the number of completed steps, the RNG states (torch's global ones, the probe
generator's) and the data stream's state, plus the config, the weight descriptions and the
target's decomposed matrices (to refuse resuming against another model). The file is a magic
line, the SHA-256 of the payload, and the payload (``torch.save``); it is written atomically
(temporary file, fsync, ``os.replace``), so a crash mid-write leaves the previous checkpoints
intact, and a truncated or corrupted file is refused with :class:`CheckpointError`.
"""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path
from typing import Any

import torch

from apd_lens.io import apd_lens_version, atomic_write_bytes

MAGIC = b"APD-LENS-CHECKPOINT v1\n"
_DIGEST_LEN = 64
CHECKPOINT_SUFFIX = ".ckpt"
_NAME = re.compile(r"^step_(\d+)\.ckpt$")
CHECKPOINT_DIR = "checkpoints"


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupted or does not fit the run."""


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{step:09d}{CHECKPOINT_SUFFIX}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's checkpoint files, oldest first (temporary files of unfinished writes excluded)."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (tensors, numbers, strings, lists and dicts) atomically with a checksum."""
    buf = io.BytesIO()
    torch.save({"apd_lens_version": apd_lens_version(), **state}, buf)
    payload = buf.getvalue()
    digest = hashlib.sha256(payload).hexdigest().encode()
    return atomic_write_bytes(path, MAGIC + digest + b"\n" + payload)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; refuse damaged files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    raw = path.read_bytes()
    head = len(MAGIC) + _DIGEST_LEN + 1
    if not raw.startswith(MAGIC):
        raise CheckpointError(f"{path} is not an apd_lens checkpoint (or its header is damaged)")
    if len(raw) <= head:
        raise CheckpointError(f"{path} is truncated: only {len(raw)} bytes")
    expected = raw[len(MAGIC) : head - 1].decode("ascii", "replace")
    payload = raw[head:]
    if hashlib.sha256(payload).hexdigest() != expected:
        raise CheckpointError(
            f"{path} is truncated or corrupted: its checksum does not match ({len(raw)} bytes); "
            "resume from an earlier checkpoint"
        )
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as err:  # checksum passed, so this is a format problem
        raise CheckpointError(f"{path} cannot be read: {err}") from err


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (``keep`` < 1 keeps all)."""
    if keep < 1:
        return
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)


def resolve_resume(resume: str | Path | bool, run_dir: str | Path | None) -> Path:
    """The checkpoint file that ``resume`` points to: a file, a run directory (its newest
    checkpoint) or ``True`` (the newest checkpoint of ``run_dir``)."""
    if resume is True:
        if run_dir is None:
            raise ValueError("resume=True needs run_dir (the run whose newest checkpoint to continue)")
        resume = run_dir
    path = Path(resume)
    if path.is_file():
        return path
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"{path} holds no checkpoints (looked in {path / CHECKPOINT_DIR})")
        return found
    raise CheckpointError(f"nothing to resume at {path}: no such checkpoint file or run directory")


def rng_state() -> dict[str, Any]:
    """torch's global CPU (and, where present, CUDA) RNG states."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
