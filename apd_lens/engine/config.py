"""The settings every decomposition method shares: which weights, the data's batch dims, the
optimization and the run. A method's config (``APDConfig``, ``SPDConfig``) subclasses
:class:`DecompositionConfig`, adds its own fields and checks, and names its method."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

LR_SCHEDULES = ("constant", "cosine", "linear")
OUTPUT_LOSSES = ("mse", "kl")


@dataclass(kw_only=True)
class DecompositionConfig:
    """Shared settings (keyword-only). Subclasses set ``method`` and extend :meth:`problems`."""

    method: ClassVar[str] = ""
    """Name of the method this config trains (``"apd"``, ``"spd"``); saved with every run."""

    weights: tuple[str, ...] | None = None
    """fnmatch patterns selecting which of the model's declared weights to decompose."""
    n_batch_dims: int | None = None
    """Leading dims of an input that index data points; None: all dims of integer (token)
    inputs, all but the last of float inputs."""
    steps: int = 10_000
    batch_size: int = 2048
    lr: int | float = 1e-3
    lr_schedule: str = "constant"
    lr_warmup_frac: int | float = 0.0
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    log_every: int = 100
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form metadata kept with the config (e.g. the experiment's name)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list) and f.name != "extra":
                setattr(self, f.name, tuple(value))
        self.validate()

    def problems(self) -> list[str]:
        """Every impossible setting, in words (empty when the config is valid)."""
        problems = []
        if self.n_batch_dims is not None and self.n_batch_dims < 1:
            problems.append(f"n_batch_dims must be None or >= 1, got {self.n_batch_dims}")
        if not isinstance(self.steps, int) or self.steps < 0:
            problems.append(f"steps must be an integer >= 0, got {self.steps!r}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if self.lr_schedule not in LR_SCHEDULES:
            problems.append(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if not 0 <= self.lr_warmup_frac <= 1:
            problems.append(f"lr_warmup_frac must be in [0, 1], got {self.lr_warmup_frac}")
        if self.log_every < 1:
            problems.append(f"log_every must be >= 1, got {self.log_every}")
        return problems

    def validate(self) -> None:
        """Raise ValueError naming every impossible setting."""
        problems = self.problems()
        if problems:
            raise ValueError(f"Invalid {type(self).__name__}:\n  - " + "\n  - ".join(problems))

    def replace(self, **changes: Any) -> DecompositionConfig:
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (tuples as lists)."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DecompositionConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {unknown}")
        # JSON has no tuples: the tuple fields come back as the tuples their type hints name
        return cls(**{k: tuple(v) if isinstance(v, list) and k != "extra" else v for k, v in d.items()})
