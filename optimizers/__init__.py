"""Optimizers from "Adaptive Momentum and Nonlinear Damping for Neural Network
Training" (Karoni, Rajpal, Leimkuhler, Stoltz; ICML 2026).

``CD``, ``iKFAD``, ``CADAM`` and the ``LDHD`` baseline are ``torch.optim``
optimizers; ``build(name, params, **hyperparameters)`` constructs any optimizer
of the paper's comparison by name (``NAMES``).
"""
from .cadam import CADAM
from .cd import CD
from .ikfad import iKFAD
from .ldhd import LDHD
from .registry import NAMES, build, hyperparameter_names

__all__ = ["CD", "iKFAD", "CADAM", "LDHD", "build", "NAMES", "hyperparameter_names"]
__version__ = "0.1.0"
