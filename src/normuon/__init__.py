"""NorMuon: Muon with neuron-wise normalization, as one PyTorch optimizer from one CPU to FSDP2.

>>> from normuon import NorMuon, param_groups
>>> opt = NorMuon(param_groups(model), lr=0.02)  # doctest: +SKIP
"""

from .grouping import param_groups
from .newton_schulz import newton_schulz, polar_express_coefficients
from .optimizer import Muon, NorMuon

__all__ = ["NorMuon", "Muon", "param_groups", "newton_schulz", "polar_express_coefficients"]
__version__ = "0.1.0"
