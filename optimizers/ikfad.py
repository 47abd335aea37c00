"""iKFAD: individual kinetic friction-adaptive descent."""
from __future__ import annotations

from ._base import (DampedOptimizer, coefficient_tuple, decay_factor, drift, friction, kick, named, relax,
                    relax_weight, scale)

__all__ = ["iKFAD", "iKFADCoefficients"]

# ``MOTION``'s four, then the half friction step's -h/2 and the relaxation's decay and
# source weight (``iKFAD._coefficients``).
iKFADCoefficients = coefficient_tuple("iKFADCoefficients", "minus_half_h", "relax_decay", "source_weight",
                                      module=__name__)


class iKFAD(DampedOptimizer):
    r"""Individual kinetic friction-adaptive descent.

    Every parameter element carries its own friction ``xi``, pushed up by that
    element's kinetic energy ``p^2`` and relaxing at rate ``alpha``.

    Continuous dynamics, elementwise, with ``g = grad f(q)``::

        q' = p,    p' = -g - gamma p - xi p,    xi' = p^2 / mu - alpha xi

    One step of time ``h`` (state ``p`` and ``xi``, both starting at zero)::

        q  <- exp(-lambda lr h) q                                (weight decay; skipped when lambda = 0)
        p  <- p - h g                                            (kick)
        q  <- q + lr h p                                         (drift)
        p  <- exp(-h xi / 2) p                                   (half friction step)
        xi <- exp(-alpha h) xi + (1 - exp(-alpha h)) p^2 / (mu alpha)   (exact, p frozen)
        p  <- exp(-h xi / 2) p                                   (half friction step)
        p  <- exp(-gamma h) p                                    (linear friction)

    When ``xi`` relaxes fast it tracks ``p^2 / (mu alpha)`` and iKFAD becomes
    CD with ``c = 1 / (mu alpha)``; the paper's iKFAD0 ablation is ``gamma = 0``.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        h: time step (> 0). Not a learning rate: ``h**2`` plays that role.
        alpha: relaxation rate of the friction variables, per unit time (> 0).
        mu: thermal mass of the friction variables (> 0); smaller mu, stronger feedback.
        gamma: constant linear friction, per unit time (>= 0).
{common_args}
    """

    state_names = ("momentum", "xi")
    native_kernel = "ikfad"
    Coefficients = iKFADCoefficients

    def __init__(self, params, h=1e-3, alpha=1.0, mu=1.0, gamma=1.0, lr=1.0, weight_decay=0.0, maximize=False,
                 foreach=None, fused=None):
        super().__init__(params, dict(h=h, alpha=alpha, mu=mu, gamma=gamma, weight_decay=weight_decay), lr,
                         maximize, foreach, fused)

    @staticmethod
    def _coefficients(group) -> iKFADCoefficients:
        """The motion's four (``DampedOptimizer._motion``), ``minus_half_h = -h/2`` (each
        half friction step's), ``relax_decay = exp(-alpha h)`` and
        ``source_weight = (1 - exp(-alpha h)) / (alpha mu)``."""
        h, alpha = group["h"], group["alpha"]
        return iKFADCoefficients(
            *DampedOptimizer._motion(group),
            minus_half_h=-(h / 2),
            relax_decay=decay_factor(alpha, h),
            source_weight=relax_weight(alpha, h) / group["mu"],  # the source is p^2 / mu
        )

    @staticmethod
    def _update(q, g, p, xi, k):
        k = named(k, iKFADCoefficients)
        scale(q, k.decay)
        kick(p, g, k.kick_step)
        drift(q, p, k.drift_step)
        friction(p, xi, k.minus_half_h)
        relax(xi, p, k.relax_decay, k.source_weight)
        friction(p, xi, k.minus_half_h)
        scale(p, k.linear)
