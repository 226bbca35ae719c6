"""Running an example script's ``main(argv)`` in the test process."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def run_example(script: str, argv: list[str]):
    """``examples/<script>``'s ``main(argv)``: its return value (SystemExit propagates)."""
    path = Path(__file__).resolve().parents[1] / "examples" / script
    spec = importlib.util.spec_from_file_location(f"example_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)
