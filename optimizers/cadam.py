"""CADAM: Adam's dynamics plus cubic damping of the momentum."""
from __future__ import annotations

import math

from ._base import (DampedOptimizer, check_positive_lr, coefficient_tuple, cubic_damping, decay_factor, kick, named,
                    preconditioned_drift, relax, relax_weight, scale)

__all__ = ["CADAM", "CADAMCoefficients"]

# ``MOTION``'s four, then the relaxation's decay and source weight, cubic damping's 2 c h and
# the preconditioner's eps (``CADAM._coefficients``).
CADAMCoefficients = coefficient_tuple("CADAMCoefficients", "relax_decay", "source_weight", "two_c_h", "eps",
                                      module=__name__)


class CADAM(DampedOptimizer):
    r"""Cubically damped Adam dynamics.

    Continuous dynamics, elementwise, with ``g = grad f(q)``::

        q' = p / (sqrt(zeta) + eps),    p' = -g - gamma p - c p^3,    zeta' = g^2 - alpha zeta

    One step of time ``h`` (state ``p`` and ``zeta``, both starting at zero)::

        q    <- exp(-lambda lr h) q                                (weight decay; skipped when lambda = 0)
        p    <- p - h g                                            (kick)
        zeta <- exp(-alpha h) zeta + (1 - exp(-alpha h)) g^2 / alpha   (exact, g frozen)
        q    <- q + lr h p / (sqrt(zeta) + eps)                    (preconditioned drift)
        p    <- p / sqrt(1 + 2 c h p^2)                            (exact cubic damping)
        p    <- exp(-gamma h) p                                    (linear friction)

    There is no bias correction. With ``c = 0`` this is exactly Adam without
    bias correction with ``beta1 = exp(-gamma h)``, ``beta2 = exp(-alpha h)``,
    ``lr_adam = lr h^2 sqrt(alpha) / (1 - exp(-gamma h))`` and ``eps_adam = eps sqrt(alpha)``
    (``CADAM.from_adam`` goes the other way).
    The paper's CADAM0 ablation is ``gamma = 0``.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        h: time step (> 0). Not a learning rate: ``h**2`` plays that role.
        gamma: linear friction coefficient, per unit time (>= 0).
        c: cubic friction coefficient (>= 0).
        alpha: relaxation rate of the squared-gradient average zeta, per unit time (> 0).
        eps: added to sqrt(zeta) in the preconditioner (>= 0).
{common_args}
    """

    state_names = ("momentum", "zeta")
    native_kernel = "cadam"
    Coefficients = CADAMCoefficients

    def __init__(self, params, h=1e-3, gamma=1.0, c=1.0, alpha=1.0, eps=1e-8, lr=1.0, weight_decay=0.0,
                 maximize=False, foreach=None, fused=None):
        super().__init__(params, dict(h=h, gamma=gamma, c=c, alpha=alpha, eps=eps, weight_decay=weight_decay),
                         lr, maximize, foreach, fused)

    @classmethod
    def from_adam(cls, params, lr: float = 1e-3, betas: tuple = (0.9, 0.999), eps: float = 1e-8,
                  c: float = 0.0, **kwargs) -> "CADAM":
        """The CADAM that, at ``c = 0``, takes exactly the steps of Adam without bias
        correction with these ``lr``, ``betas`` and ``eps`` (``torch.optim.Adam`` from
        its first few hundred steps on, once ``beta^t`` is negligible): solving
        ``beta1 = exp(-gamma h)``, ``beta2 = exp(-alpha h)``,
        ``lr = h^2 sqrt(alpha) / (1 - beta1)`` and ``eps_adam = eps sqrt(alpha)``,

            h = (lr (1 - beta1) / sqrt(-log beta2)) ** (2/3),
            gamma = -log(beta1) / h,  alpha = -log(beta2) / h,  eps = eps_adam / sqrt(alpha).

        A ``c > 0`` then switches on cubic damping on top of that tuned Adam.
        ``betas`` must lie in (0, 1); other keywords go to the constructor."""
        beta1, beta2 = betas
        for name, beta in (("beta1", beta1), ("beta2", beta2)):
            if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 < beta < 1:
                raise ValueError(f"Invalid {name}: {beta!r}; expected a number in (0, 1)")
        check_positive_lr(lr)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < math.inf:
            raise ValueError(f"Invalid eps: {eps!r}; expected a finite number >= 0")
        h = (lr * (1 - beta1) / math.sqrt(-math.log(beta2))) ** (2 / 3)
        alpha = -math.log(beta2) / h
        return cls(params, h=h, gamma=-math.log(beta1) / h, c=c, alpha=alpha, eps=eps / math.sqrt(alpha), **kwargs)

    @staticmethod
    def _coefficients(group) -> CADAMCoefficients:
        """The motion's four (``DampedOptimizer._motion``), ``relax_decay = exp(-alpha h)``,
        ``source_weight = (1 - exp(-alpha h)) / alpha``, ``two_c_h = 2 c h`` and ``eps``."""
        h, alpha = group["h"], group["alpha"]
        return CADAMCoefficients(
            *DampedOptimizer._motion(group),
            relax_decay=decay_factor(alpha, h),
            source_weight=relax_weight(alpha, h),  # the source is g^2
            two_c_h=2.0 * group["c"] * h,
            eps=group["eps"],
        )

    @staticmethod
    def _update(q, g, p, zeta, k):
        k = named(k, CADAMCoefficients)
        scale(q, k.decay)
        kick(p, g, k.kick_step)
        relax(zeta, g, k.relax_decay, k.source_weight)
        preconditioned_drift(q, p, zeta, k.drift_step, k.eps)
        cubic_damping(p, k.two_c_h)
        scale(p, k.linear)
