"""The two presets of the toy models' default configs.

``"default"``: the best recipe this library knows for the model, measured on seeds nobody tuned on
(docs/results.md); it may add what is not in the paper (e.g. APD's component splitting).
``"paper"``: the paper's (or its reference code's) exact settings, for reproducing its numbers.
"""

from __future__ import annotations

PRESETS = ("default", "paper")


def is_paper(preset: str) -> bool:
    """Whether ``preset`` asks for the paper's settings; a clear error for an unknown preset."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    return preset == "paper"
