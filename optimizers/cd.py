"""CD: cubic damping."""
from __future__ import annotations

from ._base import DampedOptimizer, coefficient_tuple, cubic_damping, drift, kick, named, scale, sgd_time_step

__all__ = ["CD", "CDCoefficients"]

# ``MOTION``'s four, then cubic damping's 2 c h (``CD._coefficients``).
CDCoefficients = coefficient_tuple("CDCoefficients", "two_c_h", module=__name__)


class CD(DampedOptimizer):
    r"""Cubic damping: momentum dynamics with friction ``-gamma p - c p^3``.

    The cubic term is negligible for small momentum components and dominant for
    large ones, so it suppresses oscillation without slowing progress on flat
    stretches of the loss.

    Continuous dynamics, elementwise, with ``g = grad f(q)``::

        q' = p,    p' = -g - gamma p - c p^3

    One step of time ``h`` (state ``p``, starting at zero)::

        q <- exp(-lambda lr h) q           (decoupled weight decay; skipped when lambda = 0)
        p <- p - h g                       (kick)
        q <- q + lr h p                    (drift)
        p <- p / sqrt(1 + 2 c h p^2)       (exact flow of p' = -c p^3)
        p <- exp(-gamma h) p               (exact flow of p' = -gamma p)

    With ``c = 0`` this is exactly ``torch.optim.SGD(lr=lr h**2, momentum=exp(-gamma*h))``
    (``CD.from_sgd``). The paper's CD0 ablation is ``gamma = 0``.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        h: time step (> 0). Not a learning rate: ``h**2`` plays that role.
        gamma: linear friction coefficient, per unit time (>= 0).
        c: cubic friction coefficient (>= 0), units 1/(time * momentum^2).
{common_args}
    The authors' release starts the momentum at ``+g0``; here it starts at zero.
    """

    state_names = ("momentum",)
    native_kernel = "cd"
    Coefficients = CDCoefficients

    def __init__(self, params, h=1e-3, gamma=1.0, c=1.0, lr=1.0, weight_decay=0.0, maximize=False,
                 foreach=None, fused=None):
        super().__init__(params, dict(h=h, gamma=gamma, c=c, weight_decay=weight_decay), lr, maximize,
                         foreach, fused)

    @classmethod
    def from_sgd(cls, params, lr: float, momentum: float, c: float = 0.0, **kwargs) -> "CD":
        """The CD that, at ``c = 0``, takes exactly the steps of
        ``torch.optim.SGD(params, lr, momentum)`` (no dampening, no Nesterov):
        ``h = sqrt(lr)`` and ``exp(-gamma h) = momentum``. A ``c > 0`` then switches on
        cubic damping on top of that tuned configuration. ``momentum`` must be in (0, 1];
        other keywords go to the constructor."""
        h, gamma = sgd_time_step(lr, momentum, h_squared_factor=1.0)
        return cls(params, h=h, gamma=gamma, c=c, **kwargs)

    @staticmethod
    def _coefficients(group) -> CDCoefficients:
        """The motion's four (``DampedOptimizer._motion``) and ``two_c_h = 2 c h``."""
        return CDCoefficients(*DampedOptimizer._motion(group), two_c_h=2.0 * group["c"] * group["h"])

    @staticmethod
    def _update(q, g, p, k):
        k = named(k, CDCoefficients)
        scale(q, k.decay)
        kick(p, g, k.kick_step)
        drift(q, p, k.drift_step)
        cubic_damping(p, k.two_c_h)
        scale(p, k.linear)
