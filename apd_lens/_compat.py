"""TransformerLens imports that work on 3.9 and 4.x."""

from transformer_lens.hook_points import HookPoint

try:  # TL >= 3.3
    from transformer_lens import HookedRootModule
except ImportError:  # pragma: no cover - older TL
    from transformer_lens.hook_points import HookedRootModule

__all__ = ["HookPoint", "HookedRootModule"]
