"""CADAM: Adam's dynamics plus cubic damping of the momentum."""
from __future__ import annotations

from ._base import (
    DampedOptimizer,
    decay_factor,
    cubic_damping,
    foreach_cubic_damping,
    foreach_kick,
    foreach_preconditioned_drift,
    foreach_relax,
    foreach_scale,
    kick,
    preconditioned_drift,
    relax,
    relax_weight,
    scale,
)

__all__ = ["CADAM"]


class CADAM(DampedOptimizer):
    r"""Cubically damped Adam dynamics.

    Continuous dynamics, elementwise, with ``g = grad f(q)``::

        q' = p / (sqrt(zeta) + eps),    p' = -g - gamma p - c p^3,    zeta' = g^2 - alpha zeta

    One step of time ``h`` (state ``p`` and ``zeta``, both starting at zero)::

        q    <- exp(-lambda h) q                                   (weight decay; skipped when lambda = 0)
        p    <- p - h g                                            (kick)
        zeta <- exp(-alpha h) zeta + (1 - exp(-alpha h)) g^2 / alpha   (exact, g frozen)
        q    <- q + h p / (sqrt(zeta) + eps)                       (preconditioned drift)
        p    <- p / sqrt(1 + 2 c h p^2)                            (exact cubic damping)
        p    <- exp(-gamma h) p                                    (linear friction)

    There is no bias correction. With ``c = 0`` this is exactly Adam without
    bias correction with ``beta1 = exp(-gamma h)``, ``beta2 = exp(-alpha h)``,
    ``lr = h^2 sqrt(alpha) / (1 - exp(-gamma h))`` and ``eps_adam = eps sqrt(alpha)``.
    The paper's CADAM0 ablation is ``gamma = 0``.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        h: time step (> 0). Not a learning rate: ``h**2`` plays that role.
        gamma: linear friction coefficient, per unit time (>= 0).
        c: cubic friction coefficient (>= 0).
        alpha: relaxation rate of the squared-gradient average zeta, per unit time (> 0).
        eps: added to sqrt(zeta) in the preconditioner (>= 0).
        weight_decay: rate lambda (>= 0) of the decoupled decay q' = -lambda q.
        foreach: ``True`` multi-tensor path, ``False`` single-tensor loop,
            ``None`` (default) as ``torch.optim`` chooses.
        fused: ``True`` the single-pass kernel (native C on the CPU,
            ``torch.compile`` on CUDA), ``False`` an eager path, ``None``
            (default, when ``foreach`` is None) the kernel on the CPU at any size
            and on CUDA from 4M elements on (see optimizers/README.md, "Code paths").
    """

    state_names = ("momentum", "zeta")
    native_kernel = "cadam"

    def __init__(
        self,
        params,
        h=1e-3,
        gamma=1.0,
        c=1.0,
        alpha=1.0,
        eps=1e-8,
        weight_decay=0.0,
        foreach=None,
        fused=None,
    ):
        super().__init__(
            params,
            dict(h=h, gamma=gamma, c=c, alpha=alpha, eps=eps, weight_decay=weight_decay),
            foreach,
            fused,
        )

    @staticmethod
    def _coefficients(group):
        h, alpha = group["h"], group["alpha"]
        return (
            h,
            decay_factor(group["weight_decay"], h),
            decay_factor(alpha, h),
            relax_weight(alpha, h),  # the source is g^2
            decay_factor(group["gamma"], h),
            group["c"],
            group["eps"],
        )

    @staticmethod
    def _update(q, g, p, zeta, k):
        h, decay, relax_decay, source_weight, linear, c, eps = k
        scale(q, decay)
        kick(p, g, h)
        relax(zeta, g, relax_decay, source_weight)
        preconditioned_drift(q, p, zeta, h, eps)
        cubic_damping(p, c, h)
        scale(p, linear)

    @staticmethod
    def _multi_tensor(params, grads, states, group):
        h, decay, relax_decay, source_weight, linear, c, eps = CADAM._coefficients(group)
        ps, zetas = states
        foreach_scale(params, decay)
        foreach_kick(ps, grads, h)
        foreach_relax(zetas, grads, relax_decay, source_weight)
        foreach_preconditioned_drift(params, ps, zetas, h, eps)
        foreach_cubic_damping(ps, c, h)
        foreach_scale(ps, linear)
