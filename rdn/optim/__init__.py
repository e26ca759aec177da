"""Optimizers and schedules: MuonAdamW (Muon + NorMuon + cautious WD, AdamW) and Polar Express;
its variants (8-bit states, Lion, AdamW and GaLore on matrices) and their state accounting."""

from rdn.optim.muon_adamw import POLAR_EXPRESS_COEFFS, MuonAdamW, polar_express
from rdn.optim.schedules import lr_multiplier, muon_momentum, weight_decay_multiplier
from rdn.optim.variants import OptimVariant, state_bytes

__all__ = [
    "POLAR_EXPRESS_COEFFS",
    "MuonAdamW",
    "OptimVariant",
    "lr_multiplier",
    "muon_momentum",
    "polar_express",
    "state_bytes",
    "weight_decay_multiplier",
]
