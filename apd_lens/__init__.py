"""apd_lens: Attribution-based Parameter Decomposition for TransformerLens-style hooked models."""

from apd_lens.engine.spec import WeightSpec, WeightUse
from apd_lens.methods.apd.config import APDConfig
from apd_lens.methods.apd.decomposition import Decomposition
from apd_lens.training.loop import decompose

__version__ = "0.1.0"

__all__ = ["APDConfig", "Decomposition", "WeightSpec", "WeightUse", "decompose", "__version__"]
