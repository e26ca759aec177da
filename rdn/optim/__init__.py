"""Optimizers and schedules: MuonAdamW (Muon + NorMuon + cautious WD, AdamW) and Polar Express."""

from rdn.optim.muon_adamw import POLAR_EXPRESS_COEFFS, MuonAdamW, polar_express
from rdn.optim.schedules import lr_multiplier, muon_momentum, weight_decay_multiplier

__all__ = [
    "POLAR_EXPRESS_COEFFS",
    "MuonAdamW",
    "lr_multiplier",
    "muon_momentum",
    "polar_express",
    "weight_decay_multiplier",
]
