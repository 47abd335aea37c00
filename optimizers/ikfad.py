"""iKFAD: individual kinetic friction-adaptive descent."""
from __future__ import annotations

from ._base import (
    DampedOptimizer,
    decay_factor,
    drift,
    foreach_drift,
    foreach_friction,
    foreach_kick,
    foreach_relax,
    foreach_scale,
    friction,
    kick,
    relax,
    relax_weight,
    scale,
)

__all__ = ["iKFAD"]


class iKFAD(DampedOptimizer):
    r"""Individual kinetic friction-adaptive descent.

    Every parameter element carries its own friction ``xi``, pushed up by that
    element's kinetic energy ``p^2`` and relaxing at rate ``alpha``.

    Continuous dynamics, elementwise, with ``g = grad f(q)``::

        q' = p,    p' = -g - gamma p - xi p,    xi' = p^2 / mu - alpha xi

    One step of time ``h`` (state ``p`` and ``xi``, both starting at zero)::

        q  <- exp(-lambda h) q                                   (weight decay; skipped when lambda = 0)
        p  <- p - h g                                            (kick)
        q  <- q + h p                                            (drift)
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
        weight_decay: rate lambda (>= 0) of the decoupled decay q' = -lambda q.
        foreach: ``True`` multi-tensor path, ``False`` single-tensor loop,
            ``None`` (default) as ``torch.optim`` chooses.
        fused: ``True`` the single-pass kernel (native C on the CPU,
            ``torch.compile`` on CUDA), ``False`` an eager path, ``None``
            (default, when ``foreach`` is None) the kernel on the CPU at any size
            and on CUDA from 4M elements on (see optimizers/README.md, "Code paths").
    """

    state_names = ("momentum", "xi")
    native_kernel = "ikfad"

    def __init__(
        self, params, h=1e-3, alpha=1.0, mu=1.0, gamma=1.0, weight_decay=0.0, foreach=None, fused=None
    ):
        super().__init__(
            params, dict(h=h, alpha=alpha, mu=mu, gamma=gamma, weight_decay=weight_decay), foreach, fused
        )

    @staticmethod
    def _coefficients(group):
        h, alpha = group["h"], group["alpha"]
        return (
            h,
            decay_factor(group["weight_decay"], h),
            decay_factor(alpha, h),
            relax_weight(alpha, h) / group["mu"],  # the source is p^2 / mu
            decay_factor(group["gamma"], h),
        )

    @staticmethod
    def _update(q, g, p, xi, k):
        h, decay, relax_decay, source_weight, linear = k
        scale(q, decay)
        kick(p, g, h)
        drift(q, p, h)
        friction(p, xi, h / 2)
        relax(xi, p, relax_decay, source_weight)
        friction(p, xi, h / 2)
        scale(p, linear)

    @staticmethod
    def _multi_tensor(params, grads, states, group):
        h, decay, relax_decay, source_weight, linear = iKFAD._coefficients(group)
        ps, xis = states
        foreach_scale(params, decay)
        foreach_kick(ps, grads, h)
        foreach_drift(params, ps, h)
        foreach_friction(ps, xis, h / 2)
        foreach_relax(xis, ps, relax_decay, source_weight)
        foreach_friction(ps, xis, h / 2)
        foreach_scale(ps, linear)
