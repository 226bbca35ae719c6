"""Toy target models, as HookedRootModules that declare their decomposed weights."""

from apd_lens.models.resid_mlp import ResidMLPData, ResidualMLP
from apd_lens.models.tms import TMS, TMSData

__all__ = ["ResidMLPData", "ResidualMLP", "TMS", "TMSData"]
