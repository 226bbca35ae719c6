"""apd_lens: parameter decomposition (APD and SPD) for TransformerLens-style hooked models."""

from apd_lens.engine.spec import WeightSpec, WeightUse
from apd_lens.loading import load
from apd_lens.methods.apd.config import APDConfig
from apd_lens.methods.apd.decomposition import Decomposition
from apd_lens.methods.spd.config import SPDConfig
from apd_lens.methods.spd.decomposition import SPDDecomposition
from apd_lens.training.loop import decompose

APDDecomposition = Decomposition
"""APD's decomposition class (also ``apd_lens.Decomposition``)."""

__version__ = "0.2.0"

__all__ = [
    "APDConfig",
    "APDDecomposition",
    "Decomposition",
    "SPDConfig",
    "SPDDecomposition",
    "WeightSpec",
    "WeightUse",
    "decompose",
    "load",
    "__version__",
]
