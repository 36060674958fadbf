"""``BatchNormalization``: our batch norm under Keras's names and defaults.

One implementation, a different spelling. The mapping (Keras -> PyTorch):

=====================  ===============================================
Keras                  PyTorch / ``batchnorm``
=====================  ===============================================
``axis=-1``            channel axis (PyTorch layers use axis 1)
``momentum=0.99``      ``momentum=0.01`` (Keras weighs the *old* value)
``epsilon=1e-3``       ``eps=1e-3`` (PyTorch's default is ``1e-5``)
``center``             learn ``bias`` (Keras ``beta``)
``scale``              learn ``weight`` (Keras ``gamma``)
``moving_mean``        ``running_mean``
``moving_variance``    ``running_var`` (unbiased here, as PyTorch; Keras 3
                       stores the biased variance)
=====================  ===============================================
"""

from __future__ import annotations

import torch
from torch.nn.parameter import is_lazy

from .batchnorm import BatchNorm

__all__ = ["BatchNormalization"]


class BatchNormalization(BatchNorm):
    """Batch Normalization with Keras's argument names and defaults.

    So the course's ``model.add(BatchNormalization())`` reads the same on
    PyTorch. ``axis=-1`` is Keras's default and means the *last* axis, the
    channel axis of channels-last data ``(N, ..., C)`` and of ``(N, C)``
    features; for PyTorch's ``(N, C, H, W)`` pass ``axis=1``. The number of
    channels is inferred on the first call. Parameters and buffers keep
    PyTorch's names (``weight``, ``bias``, ``running_mean``, ``running_var``),
    so ``state_dict`` is the same as :class:`batchnorm.BatchNorm`'s.

    **Training**: batch statistics; the moving statistics are updated as
    ``moving = momentum * moving + (1 - momentum) * batch``.
    **Inference**: the moving statistics.

    Args:
        axis: the channel axis. Default: ``-1``.
        momentum: Keras's momentum, the weight of the *old* moving value;
            PyTorch's ``momentum`` is ``1 - momentum``. Default: ``0.99``.
        epsilon: added to the variance. Default: ``1e-3``.
        center: learn an offset ``beta`` (``bias``). Default: ``True``.
        scale: learn a factor ``gamma`` (``weight``). Default: ``True``.
        activation, negative_slope, backend, check_finite: as in
            :class:`batchnorm.BatchNorm2d`.

    Example:
        >>> import torch
        >>> from batchnorm import BatchNormalization
        >>> bn = BatchNormalization()          # (N, features) input
        >>> bn(torch.randn(32, 10)).shape
        torch.Size([32, 10])
        >>> round(bn.momentum, 4), bn.eps
        (0.01, 0.001)
    """

    def __init__(self, axis=-1, momentum=0.99, epsilon=1e-3, center=True, scale=True, *,
                 activation=None, negative_slope=0.01, backend="auto", check_finite=False,
                 device=None, dtype=None):
        if not isinstance(axis, int):
            raise TypeError(f"axis must be an int, got {axis!r}")
        if axis == 0:
            raise ValueError("axis 0 is the batch axis; the channel axis must be another one")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self._keras_scale, self._keras_center = bool(scale), bool(center)
        super().__init__(None, eps=epsilon, momentum=1.0 - momentum,
                         affine=bool(center or scale), device=device, dtype=dtype,
                         bias=bool(center), activation=activation,
                         negative_slope=negative_slope, backend=backend,
                         check_finite=check_finite)
        if not scale and self.weight is not None:
            self.register_parameter("weight", None)
        self.axis = axis

    def reset_parameters(self) -> None:
        if self.has_uninitialized_params() or self.num_features == 0:
            return
        self.reset_running_stats()
        with torch.no_grad():
            if self.weight is not None:
                self.weight.fill_(1.0)
            if self.bias is not None:
                self.bias.zero_()

    def initialize_parameters(self, input, residual=None) -> None:  # noqa: ARG002
        # Not torch's: with scale=False there is a bias but no weight.
        if not self.has_uninitialized_params():
            return
        self.num_features = self._to_channel_first(input).shape[1]
        for t in (self.weight, self.bias, self.running_mean, self.running_var):
            if t is not None and is_lazy(t):
                t.materialize((self.num_features,))
        self.reset_parameters()

    def _to_channel_first(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")
        if not -x.dim() <= self.axis < x.dim():
            raise ValueError(f"axis {self.axis} is out of range for a {x.dim()}D input")
        if self.axis % x.dim() == 0:
            raise ValueError("axis 0 is the batch axis; the channel axis must be another one")
        return x.movedim(self.axis, 1)

    def forward(self, input, residual=None):
        x = self._to_channel_first(input)
        r = None if residual is None else residual.movedim(self.axis, 1)
        return self._batch_norm(x, r).movedim(1, self.axis)

    def extra_repr(self) -> str:
        return (f"axis={self.axis}, momentum={1.0 - self.momentum:g}, epsilon={self.eps}, "
                f"center={self.bias is not None}, scale={self.weight is not None}"
                + (f", activation={self.activation!r}" if self.activation else ""))
