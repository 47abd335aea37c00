"""Optimizers from "Adaptive Momentum and Nonlinear Damping for Neural Network
Training" (Karoni, Rajpal, Leimkuhler, Stoltz; ICML 2026).

``CD``, ``iKFAD``, ``CADAM`` and the ``LDHD`` baseline are ``torch.optim``
optimizers; ``build(name, params, **hyperparameters)`` constructs any optimizer
of the paper's comparison by name (``NAMES``), and ``info(name)`` states its facts
(hyperparameters, switches, step-size name, display label).
"""
from .cadam import CADAM
from .cd import CD
from .ikfad import iKFAD
from .ldhd import LDHD
from .registry import NAMES, OptimInfo, build, hyperparameter_names, info, sort_key

__all__ = ["CD", "iKFAD", "CADAM", "LDHD", "build", "NAMES", "OptimInfo", "hyperparameter_names", "info", "sort_key"]
__version__ = "0.1.0"
