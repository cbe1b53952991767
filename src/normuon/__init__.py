"""normuon: NorMuon (neuron-wise normalized Muon) for PyTorch.

``NorMuon`` and ``Muon`` are torch.optim optimizers that also run AdamW on the parameter groups
marked ``algorithm="adamw"``; ``param_groups`` splits a model that way. ``normuon.newton_schulz``
holds the orthogonalization (coefficients, iterations, the ``orthogonalizer`` option's default).
"""

from importlib import metadata as _metadata

from . import newton_schulz
from .grouping import describe_groups, param_groups
from .newton_schulz import polar_express_coefficients
from .optimizer import Muon, NorMuon

__all__ = [
    "Muon",
    "NorMuon",
    "describe_groups",
    "newton_schulz",
    "param_groups",
    "polar_express_coefficients",
]

try:  # one source of the version: pyproject.toml, through the installed package's metadata
    __version__ = _metadata.version("normuon")
except _metadata.PackageNotFoundError:  # pragma: no cover - imported from a source tree
    __version__ = "0+unknown"
