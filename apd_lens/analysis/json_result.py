"""A result saved as one JSON file in a run folder: what the LM evaluation, attribution graphs and
clusterings share."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

from apd_lens.io import atomic_write_bytes


class JsonResult:
    """Mixin for a result with ``to_dict`` / ``from_dict``: ``save(folder)`` writes ``folder/FILE``
    atomically, ``load(folder or file)`` reads it back with a clear error when it is missing."""

    FILE: ClassVar[str] = ""

    def to_dict(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_dict(cls, data: dict) -> JsonResult:
        raise NotImplementedError

    def save(self, directory: str | Path) -> Path:
        """Write ``directory/FILE`` atomically; returns its path."""
        return atomic_write_bytes(Path(directory) / self.FILE, json.dumps(self.to_dict(), indent=1).encode())

    @classmethod
    def load(cls, path: str | Path) -> JsonResult:
        """Read a saved result: its file, or the folder holding it."""
        path = Path(path)
        file = path / cls.FILE if path.is_dir() or path.suffix != ".json" else path
        if not file.is_file():
            raise FileNotFoundError(f"no {cls.FILE} in {path} (save one with {cls.__name__}.save)")
        return cls.from_dict(json.loads(file.read_text()))
