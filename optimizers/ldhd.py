"""LDHD: linearly damped Hamiltonian dynamics (the momentum-SGD baseline)."""
from __future__ import annotations

from ._base import DampedOptimizer, coefficient_tuple, drift, kick, named, scale, sgd_time_step

__all__ = ["LDHD", "LDHDCoefficients"]

# ``MOTION``'s four alone (``LDHD._coefficients``).
LDHDCoefficients = coefficient_tuple("LDHDCoefficients", module=__name__)


class LDHD(DampedOptimizer):
    r"""Linearly damped Hamiltonian dynamics, integrated by splitting.

    Continuous dynamics, elementwise, with ``g = grad f(q)``::

        q' = p,    p' = -g - gamma p

    One step of time ``h`` (state ``p``, starting at zero)::

        q <- exp(-lambda lr h) q       (decoupled weight decay; skipped when lambda = 0)
        p <- p - h g                   (kick)
        p <- exp(-gamma h) p           (linear friction, exact)
        q <- q + lr h p                (drift)

    From zero state this is exactly momentum SGD,
    ``torch.optim.SGD(lr=lr h**2 exp(-gamma h), momentum=exp(-gamma h))`` (``LDHD.from_sgd``).

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        h: time step (> 0). Not a learning rate: ``h**2`` plays that role.
        gamma: linear friction coefficient, per unit time (>= 0).
{common_args}
    The authors' release starts the momentum at ``+g0``; here it starts at zero.
    """

    state_names = ("momentum",)
    native_kernel = "ldhd"
    Coefficients = LDHDCoefficients

    def __init__(self, params, h=1e-3, gamma=0.1, lr=1.0, weight_decay=0.0, maximize=False, foreach=None,
                 fused=None):
        super().__init__(params, dict(h=h, gamma=gamma, weight_decay=weight_decay), lr, maximize, foreach, fused)

    @classmethod
    def from_sgd(cls, params, lr: float, momentum: float, **kwargs) -> "LDHD":
        """The LDHD whose steps from zero state are exactly those of
        ``torch.optim.SGD(params, lr, momentum)`` (no dampening, no Nesterov):
        ``exp(-gamma h) = momentum`` and ``h^2 exp(-gamma h) = lr``, so
        ``h = sqrt(lr / momentum)`` and ``gamma = -log(momentum) / h``.
        ``momentum`` must be in (0, 1]; other keywords go to the constructor (a
        ``weight_decay`` there is the decoupled rate lambda, not SGD's L2 term)."""
        h, gamma = sgd_time_step(lr, momentum, h_squared_factor=momentum)
        return cls(params, h=h, gamma=gamma, **kwargs)

    @staticmethod
    def _coefficients(group) -> LDHDCoefficients:
        """The motion's four (``DampedOptimizer._motion``)."""
        return LDHDCoefficients(*DampedOptimizer._motion(group))

    @staticmethod
    def _update(q, g, p, k):
        k = named(k, LDHDCoefficients)
        scale(q, k.decay)
        kick(p, g, k.kick_step)
        scale(p, k.linear)
        drift(q, p, k.drift_step)

