"""LDHD: linearly damped Hamiltonian dynamics (the momentum-SGD baseline)."""
from __future__ import annotations

from ._base import DampedOptimizer, decay_factor, drift, foreach_drift, foreach_kick, foreach_scale, kick, scale

__all__ = ["LDHD"]


class LDHD(DampedOptimizer):
    r"""Linearly damped Hamiltonian dynamics, integrated by splitting.

    Continuous dynamics, elementwise, with ``g = grad f(q)``::

        q' = p,    p' = -g - gamma p

    One step of time ``h`` (state ``p``, starting at zero)::

        q <- exp(-lambda h) q          (decoupled weight decay; skipped when lambda = 0)
        p <- p - h g                   (kick)
        p <- exp(-gamma h) p           (linear friction, exact)
        q <- q + h p                   (drift)

    From zero momentum this is exactly ``torch.optim.SGD(lr=h**2 * exp(-gamma*h),
    momentum=exp(-gamma*h))`` (no dampening, no Nesterov), which is why
    momentum SGD reads as a discretisation of linearly damped dynamics.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        h: time step (> 0). Not a learning rate: ``h**2`` plays that role.
        gamma: linear friction coefficient, per unit time (>= 0).
        weight_decay: rate lambda (>= 0) of the decoupled decay q' = -lambda q.
        foreach: ``True`` uses the ``torch._foreach_*`` multi-tensor path,
            ``False`` the single-tensor loop, ``None`` (default) chooses as
            ``torch.optim`` does (multi-tensor when all tensors are on CUDA).
        fused: ``True`` the single-pass kernel (native C on the CPU,
            ``torch.compile`` on CUDA), ``False`` an eager path, ``None``
            (default, when ``foreach`` is None) the kernel on the CPU at any size
            and on CUDA from 4M elements on (see optimizers/README.md, "Code paths").

    The authors' release starts the momentum at ``+g0``; here it starts at zero.
    """

    state_names = ("momentum",)
    native_kernel = "ldhd"

    def __init__(self, params, h=1e-3, gamma=0.1, weight_decay=0.0, foreach=None, fused=None):
        super().__init__(params, dict(h=h, gamma=gamma, weight_decay=weight_decay), foreach, fused)

    @staticmethod
    def _coefficients(group):
        h = group["h"]
        return h, decay_factor(group["weight_decay"], h), decay_factor(group["gamma"], h)

    @staticmethod
    def _update(q, g, p, k):
        h, decay, friction = k
        scale(q, decay)
        kick(p, g, h)
        scale(p, friction)
        drift(q, p, h)

    @staticmethod
    def _multi_tensor(params, grads, states, group):
        h, decay, friction = LDHD._coefficients(group)
        ps = states[0]
        foreach_scale(params, decay)
        foreach_kick(ps, grads, h)
        foreach_scale(ps, friction)
        foreach_drift(params, ps, h)
