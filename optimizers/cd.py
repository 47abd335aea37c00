"""CD: cubic damping."""
from __future__ import annotations

from ._base import (
    DampedOptimizer,
    decay_factor,
    cubic_damping,
    drift,
    foreach_cubic_damping,
    foreach_drift,
    foreach_kick,
    foreach_scale,
    kick,
    scale,
)

__all__ = ["CD"]


class CD(DampedOptimizer):
    r"""Cubic damping: momentum dynamics with friction ``-gamma p - c p^3``.

    The cubic term is negligible for small momentum components and dominant for
    large ones, so it suppresses oscillation without slowing progress on flat
    stretches of the loss.

    Continuous dynamics, elementwise, with ``g = grad f(q)``::

        q' = p,    p' = -g - gamma p - c p^3

    One step of time ``h`` (state ``p``, starting at zero)::

        q <- exp(-lambda h) q              (decoupled weight decay; skipped when lambda = 0)
        p <- p - h g                       (kick)
        q <- q + h p                       (drift)
        p <- p / sqrt(1 + 2 c h p^2)       (exact flow of p' = -c p^3)
        p <- exp(-gamma h) p               (exact flow of p' = -gamma p)

    With ``c = 0`` this is exactly ``torch.optim.SGD(lr=h**2, momentum=exp(-gamma*h))``.
    The paper's CD0 ablation is ``gamma = 0``.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        h: time step (> 0). Not a learning rate: ``h**2`` plays that role.
        gamma: linear friction coefficient, per unit time (>= 0).
        c: cubic friction coefficient (>= 0), units 1/(time * momentum^2).
        weight_decay: rate lambda (>= 0) of the decoupled decay q' = -lambda q.
        foreach: ``True`` multi-tensor path, ``False`` single-tensor loop,
            ``None`` (default) as ``torch.optim`` chooses.
        fused: ``True`` the single-pass kernel (native C on the CPU,
            ``torch.compile`` on CUDA), ``False`` an eager path, ``None``
            (default, when ``foreach`` is None) the kernel on the CPU at any size
            and on CUDA from 4M elements on (see optimizers/README.md, "Code paths").

    The authors' release starts the momentum at ``+g0``; here it starts at zero.
    """

    state_names = ("momentum",)
    native_kernel = "cd"

    def __init__(self, params, h=1e-3, gamma=1.0, c=1.0, weight_decay=0.0, foreach=None, fused=None):
        super().__init__(params, dict(h=h, gamma=gamma, c=c, weight_decay=weight_decay), foreach, fused)

    @staticmethod
    def _coefficients(group):
        h = group["h"]
        return h, decay_factor(group["weight_decay"], h), group["c"], decay_factor(group["gamma"], h)

    @staticmethod
    def _update(q, g, p, k):
        h, decay, c, friction = k
        scale(q, decay)
        kick(p, g, h)
        drift(q, p, h)
        cubic_damping(p, c, h)
        scale(p, friction)

    @staticmethod
    def _multi_tensor(params, grads, states, group):
        h, decay, c, friction = CD._coefficients(group)
        ps = states[0]
        foreach_scale(params, decay)
        foreach_kick(ps, grads, h)
        foreach_drift(params, ps, h)
        foreach_cubic_damping(ps, c, h)
        foreach_scale(ps, friction)
