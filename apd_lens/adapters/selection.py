"""Choosing weights by name pattern.

Adapters describe a model's weights under TransformerLens-style names (``blocks.0.attn.W_Q``),
which may differ from the parameter names the specs carry (a TransformerBridge keeps its weights
in the wrapped model, GQA stores ``_W_K``). Patterns are fnmatch patterns matched against either.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass, field

from apd_lens.engine.spec import WeightSpec


@dataclass
class WeightCatalog:
    """The weights an adapter can describe (TL-style name -> spec), and those it refuses (name -> why)."""

    specs: dict[str, WeightSpec] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, spec: WeightSpec) -> None:
        if name in self.specs or name in self.refused:
            raise ValueError(f"weight {name!r} is described twice")
        self.specs[name] = spec

    def refuse(self, name: str, reason: str) -> None:
        self.specs.pop(name, None)
        self.refused[name] = reason

    def select(self, patterns: Iterable[str] | None = None) -> list[WeightSpec]:
        """The specs whose TL-style name or parameter name matches any pattern (all when None).

        A pattern that matches no weight raises, naming the known weights; a pattern that matches
        only refused weights raises with the reason they were refused.
        """
        if isinstance(patterns, str):
            patterns = [patterns]
        if patterns is None:
            chosen = list(self.specs.values())
        else:
            patterns = list(patterns)
            chosen = []
            for pat in patterns:
                hits = [s for n, s in self.specs.items() if _matches(pat, n, s.name)]
                refused = [n for n in self.refused if fnmatch.fnmatchcase(n, pat)]
                if not hits and refused:
                    raise ValueError(
                        f"weight pattern {pat!r} only matches weights apd_lens cannot pair exactly: "
                        + "; ".join(f"{n}: {self.refused[n]}" for n in refused[:3])
                    )
                if not hits:
                    raise KeyError(f"weight pattern {pat!r} matches none of the model's weights {list(self.specs)}")
                chosen += [s for s in hits if s not in chosen]
        if not chosen:
            raise ValueError("no weights to decompose" + (f"; refused: {self.refused}" if self.refused else ""))
        return chosen


def _matches(pattern: str, *names: str) -> bool:
    return any(fnmatch.fnmatchcase(n, pattern) for n in names)
