"""The decomposition methods, by name. Each is a config class and a decomposition class (a
:class:`~apd_lens.engine.base.DecompositionBase`) over the one hook-based engine; the training
loop, checkpoints, saving and the CLI find a method here. A new method is a new subpackage and
one :func:`register_method` call."""

from __future__ import annotations

from dataclasses import dataclass

from apd_lens.engine.base import DecompositionBase
from apd_lens.engine.config import DecompositionConfig
from apd_lens.methods.apd.config import APDConfig
from apd_lens.methods.apd.decomposition import Decomposition
from apd_lens.methods.spd.config import SPDConfig
from apd_lens.methods.spd.decomposition import SPDDecomposition


@dataclass(frozen=True)
class Method:
    name: str
    config_class: type[DecompositionConfig]
    decomposition_class: type[DecompositionBase]


METHODS: dict[str, Method] = {}


def register_method(name: str, config_class: type[DecompositionConfig], decomposition_class: type) -> Method:
    """Make a method known to ``decompose``, ``apd_lens.load``, checkpoints and the CLI."""
    if config_class.method != name or decomposition_class.method != name:
        raise ValueError(
            f"method {name!r}: {config_class.__name__}.method and "
            f"{decomposition_class.__name__}.method must both be {name!r}"
        )
    METHODS[name] = Method(name, config_class, decomposition_class)
    return METHODS[name]


def get_method(name: str) -> Method:
    """The method called ``name``, with a clear error naming the known ones."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {sorted(METHODS)}")
    return METHODS[name]


def method_of_config(config: DecompositionConfig) -> Method:
    """The method a config trains (from its class)."""
    for method in METHODS.values():
        if type(config) is method.config_class:
            return method
    known = ", ".join(m.config_class.__name__ for m in METHODS.values())
    raise TypeError(f"config must be one of the methods' configs ({known}), got {type(config).__name__}")


register_method("apd", APDConfig, Decomposition)
register_method("spd", SPDConfig, SPDDecomposition)

__all__ = ["METHODS", "Method", "get_method", "method_of_config", "register_method"]
