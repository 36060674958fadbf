r"""Batch Renormalization (Ioffe, 2017): ``BatchRenorm1d/2d/3d`` and ``batch_renorm``.

Ioffe (2017), "Batch Renormalization: Towards Reducing Minibatch Dependence
in Batch-Normalized Models". In training, batch norm's output is corrected
towards what the population statistics would give::

    sigma_B = sqrt(var_B + eps)                 sigma = sqrt(running_var + eps)
    r = clip(sigma_B / sigma, 1/rmax, rmax)     d = clip((mu_B - running_mean) / sigma, -dmax, dmax)
    y = gamma * ((x - mu_B) / sigma_B * r + d) + beta

``r`` and ``d`` are constants in the backward (the paper's stop-gradient), so
with them fixed the layer *is* batch norm with ``weight' = gamma * r`` and
``bias' = beta + gamma * d`` — exactly how it is computed here
(:func:`renorm_affine`, then :func:`batchnorm.functional.batch_norm`), so the
kernels, the fused activation and residual, and the backward are batch norm's.
The batch statistics are computed once more beforehand for ``r`` and ``d`` (one
extra read of the input per training step).

**Running statistics** are PyTorch's: ``running_mean`` and ``running_var``
(the *unbiased* batch variance) updated with ``momentum`` after every training
batch, using the values from *before* the update for ``r`` and ``d``. The
paper keeps a moving average of ``sigma_B`` itself; with ``running_var`` the
layer's ``state_dict`` is batch norm's and **inference is batch norm's**
(Algorithm 2 with the running statistics), the paper's inference rule.

**The warm-up schedule** (the paper, Section 4: plain batch norm for the first
5000 steps, then ``rmax`` relaxed to 3 by step 40k and ``dmax`` to 5 by step
25k): at training step ``t`` (the batches seen before this one,
``num_batches_tracked`` — a buffer, so it is saved with the ``state_dict``)::

    f_r = clip((t - warmup_steps) / relax_steps_r, 0, 1)
    rmax_t = 1 + (rmax - 1) * f_r               dmax_t = dmax * f_d

with ``relax_steps`` one number for both or a pair ``(r, d)``; a relax of 0
steps switches to the final limits right after the warm-up. ``rmax=1, dmax=0``
(or any step inside the warm-up) is plain batch norm. The defaults are the
paper's schedule; ``reset_running_stats()`` restarts it, which is right:
the warm-up exists because fresh running statistics are poor.

Differences from Keras 2's ``renorm=True``: Keras keeps separate moving
statistics for ``r`` and ``d`` with their own ``renorm_momentum`` and leaves
the schedule to the user (``renorm_clipping`` values it updates itself).
"""

from __future__ import annotations

import math
from functools import partial

import torch

from .._backend import resolve_backend
from ..functional import _validate, batch_norm
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = [
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "batch_renorm",
    "renorm_affine",
    "renorm_corrections",
    "renorm_limits",
]


def _check_limits(rmax, dmax) -> None:
    for name, value, low in (("rmax", rmax, 1.0), ("dmax", dmax, 0.0)):
        if isinstance(value, torch.Tensor):
            continue  # a schedule's value, computed on the device; checked where it came from
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number, got {value!r}")
        if not (math.isfinite(value) and value >= low):
            raise ValueError(f"{name} must be a finite number >= {low:g}, got {value}")


def _check_schedule(warmup_steps, relax_steps) -> tuple[int, int]:
    pair = relax_steps if isinstance(relax_steps, (tuple, list)) else (relax_steps, relax_steps)
    if len(pair) != 2:
        raise ValueError(f"relax_steps must be a number of steps or a pair (r, d), "
                         f"got {relax_steps!r}")
    for name, value in (("warmup_steps", warmup_steps), ("relax_steps", pair[0]),
                        ("relax_steps", pair[1])):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    return int(pair[0]), int(pair[1])


def renorm_limits(step, rmax=3.0, dmax=5.0, warmup_steps=5000, relax_steps=(35000, 20000)):
    """``(rmax_t, dmax_t)`` at training step ``step`` under the warm-up schedule.

    Args:
        step: batches trained on before this one (an ``int``, or a 0-dim
            tensor such as ``num_batches_tracked``: then the limits are
            computed on its device as float64 tensors, with no host sync).
        rmax, dmax: the final limits.
        warmup_steps: steps of plain batch norm (``rmax_t = 1``, ``dmax_t = 0``).
        relax_steps: steps over which the limits then grow linearly to
            ``rmax`` and ``dmax``; one number, or a pair ``(r_steps, d_steps)``.

    Example:
        >>> from batchnorm.nn.renorm import renorm_limits
        >>> [renorm_limits(t, 3.0, 5.0, 100, (200, 100)) for t in (0, 100, 200, 300)]
        [(1.0, 0.0), (1.0, 0.0), (2.0, 5.0), (3.0, 5.0)]
    """
    _check_limits(rmax, dmax)
    r_steps, d_steps = _check_schedule(warmup_steps, relax_steps)
    if isinstance(step, torch.Tensor):
        # float64 where the device has it, so float64 layers clip at exactly rmax.
        dtype = torch.float32 if step.device.type == "mps" else torch.float64
        t = step.detach().to(dtype) - warmup_steps

        def fraction(n):
            return (t / n).clamp(0.0, 1.0) if n else (t >= 0).to(dtype)
    else:
        def fraction(n):
            t = step - warmup_steps
            return min(max(t / n, 0.0), 1.0) if n else float(t >= 0)
    return 1.0 + (rmax - 1.0) * fraction(r_steps), dmax * fraction(d_steps)


def renorm_corrections(mean, var, running_mean, running_var, rmax, dmax, eps=1e-5):
    """The per-channel ``(r, d)`` of Batch Renormalization, in ``var``'s dtype.

    Args:
        mean, var: the batch mean and biased variance ``(C,)``.
        running_mean, running_var: the population estimates ``(C,)``.
        rmax, dmax: the limits (numbers or 0-dim tensors).
        eps: added to both variances.
    """
    cdtype = var.dtype
    sigma_B = torch.sqrt(var + eps)                                       # (C,)
    sigma = torch.sqrt(running_var.to(cdtype) + eps)                      # (C,)
    rmax = torch.as_tensor(rmax, dtype=cdtype, device=var.device)
    dmax = torch.as_tensor(dmax, dtype=cdtype, device=var.device)
    r = torch.clamp(sigma_B / sigma, 1.0 / rmax, rmax)                    # (C,)
    # mean may carry float64 precision (see kernels.torch_ops.batch_stats).
    shift = (mean - running_mean.to(mean.dtype)) / sigma.to(mean.dtype)  # (C,)
    d = torch.clamp(shift.to(cdtype), -dmax, dmax)                        # (C,)
    return r, d


def renorm_affine(weight, bias, r, d):
    """``(gamma * r, beta + gamma * d)``: renorm as batch norm's affine, ``r``, ``d`` fixed.

    ``None`` for ``weight``/``bias`` means 1/0. Gradients flow to ``weight``
    and ``bias`` (``r`` and ``d`` are constants).
    """
    if weight is None:
        return r, d if bias is None else bias + d.to(bias.dtype)
    w = weight * r.to(weight.dtype)
    shift = weight * d.to(weight.dtype)
    return w, shift if bias is None else bias + shift


def batch_renorm(input, running_mean, running_var, weight=None, bias=None, training=False,
                 momentum=0.1, eps=1e-5, *, rmax=3.0, dmax=5.0, activation=None,
                 negative_slope=0.01, residual=None, backend="auto", check_finite=False):
    """Batch Renormalization: :func:`~batchnorm.functional.batch_norm` with ``r``, ``d``.

    Same arguments and result as :func:`batchnorm.functional.batch_norm`,
    plus the limits ``rmax >= 1`` and ``dmax >= 0``. In training with running
    statistics, the output is corrected by ``r`` and ``d`` computed from the
    running statistics as they were before this batch (which then updates
    them, as batch norm does). Without running statistics, or in inference,
    it is batch norm. A call that raises changes nothing.

    Raises:
        ValueError: ``rmax < 1``, ``dmax < 0`` or not finite, and every error
            of :func:`~batchnorm.functional.batch_norm`.

    Example:
        >>> import torch
        >>> from batchnorm.nn.renorm import batch_renorm
        >>> x = torch.tensor([[0.0], [2.0], [4.0], [6.0]])
        >>> rm, rv = torch.zeros(1), torch.ones(1)
        >>> # r and d within their limits: normalized as by the running statistics
        >>> batch_renorm(x, rm, rv, training=True, rmax=3.0, dmax=5.0).flatten().round(decimals=4)
        tensor([0., 2., 4., 6.])
        >>> rm, rv  # then updated as batch norm updates them
        (tensor([0.3000]), tensor([1.5667]))
    """
    _check_limits(rmax, dmax)
    kw = dict(activation=activation, negative_slope=negative_slope, residual=residual,
              backend=backend, check_finite=check_finite)
    if not training or running_mean is None:
        return batch_norm(input, running_mean, running_var, weight, bias, training, momentum,
                          eps, **kw)
    _validate(input, running_mean, running_var, weight, bias, True, momentum, eps, activation,
              negative_slope, residual)
    if input.numel() == 0:
        return batch_norm(input, running_mean, running_var, weight, bias, True, momentum, eps,
                          **kw)
    ops = resolve_backend(backend, input)
    with torch.no_grad():
        mean, var = ops.batch_stats(input.detach())
        r, d = renorm_corrections(mean, var, running_mean, running_var, rmax, dmax, eps)
    weight, bias = renorm_affine(weight, bias, r, d)
    return batch_norm(input, running_mean, running_var, weight, bias, True, momentum, eps, **kw)


_TEMPLATE = r"""Batch Renormalization over a {input_desc} (Ioffe, 2017).

    .. math::
        y = \gamma \left(\frac{{x - \mu_B}}{{\sigma_B}} r + d\right) + \beta, \quad
        r = \mathrm{{clip}}_{{[1/r_{{max}}, r_{{max}}]}}\frac{{\sigma_B}}{{\sigma}}, \quad
        d = \mathrm{{clip}}_{{[-d_{{max}}, d_{{max}}]}}\frac{{\mu_B - \mu}}{{\sigma}}

    with :math:`\mu, \sigma` the running mean and ``sqrt(running_var + eps)``;
    ``r`` and ``d`` are constants in the backward.

    **Training**: batch statistics corrected by ``r`` and ``d``, then the
    running statistics are updated as in batch norm
    (``running = (1 - momentum) * running + momentum * batch``, the unbiased
    variance for ``running_var``). During the first ``warmup_steps`` batches
    ``r = 1`` and ``d = 0`` (plain batch norm); the limits then grow linearly
    to ``rmax`` and ``dmax`` over ``relax_steps`` (see
    :mod:`batchnorm.nn.renorm`). The step is ``num_batches_tracked``, saved
    in the ``state_dict``. Without running statistics
    (``track_running_stats=False``) it is plain batch norm.
    **Inference**: batch norm with the running statistics, unchanged.

    Parameters, buffers and ``state_dict`` are those of
    ``torch.nn.{torch_name}`` (a subclass of it and of our
    :class:`batchnorm.{base}`), so batch norm checkpoints load as they are.

    Args:
        num_features: ``C``, the number of channels.
        eps, momentum, affine, track_running_stats, device, dtype: as in
            ``torch.nn.{torch_name}``.
        rmax: final limit of ``r``, at least 1. Default: ``3.0`` (the paper).
        dmax: final limit of ``|d|``, at least 0. Default: ``5.0`` (the paper).
        warmup_steps: training batches of plain batch norm. Default: ``5000``.
        relax_steps: batches over which the limits then reach ``rmax`` and
            ``dmax``: one int, or a pair ``(r_steps, d_steps)``.
            Default: ``(35000, 20000)`` (the paper: ``rmax`` at 40k steps,
            ``dmax`` at 25k).
        bias, activation, negative_slope, backend, check_finite: as in
            :class:`batchnorm.{base}`.

    Shape:
        - Input: {shape}
        - Residual (``forward(x, residual)``): same as input
        - Output: same shape, dtype and memory format as input

    Example:
        >>> import torch
        >>> import batchnorm
        >>> m = batchnorm.{name}({example_shape[1]}, warmup_steps=10, relax_steps=100)
        >>> y = m(torch.randn({example}))
        >>> m.limits()  # after one batch: still warming up
        (1.0, 0.0)
    """


class _RenormMixin:
    """Renorm on top of our batch norm modules: the op and the schedule."""

    rmax, dmax, warmup_steps, relax_steps = 3.0, 5.0, 5000, (35000, 20000)

    def _init_renorm(self, rmax, dmax, warmup_steps, relax_steps):
        _check_limits(rmax, dmax)
        _check_schedule(warmup_steps, relax_steps)
        self.rmax, self.dmax = float(rmax), float(dmax)
        self.warmup_steps = warmup_steps
        self.relax_steps = tuple(relax_steps) if isinstance(relax_steps, list) else relax_steps

    def _step(self):
        return 0 if self.num_batches_tracked is None else self.num_batches_tracked

    def limits(self) -> tuple[float, float]:
        """``(rmax_t, dmax_t)`` for the next training batch."""
        step = self._step()
        step = step if isinstance(step, int) else int(step)
        return renorm_limits(step, self.rmax, self.dmax, self.warmup_steps, self.relax_steps)

    def _functional(self):
        if not self.training:
            return batch_norm
        rmax, dmax = renorm_limits(self._step(), self.rmax, self.dmax, self.warmup_steps,
                                   self.relax_steps)
        return partial(batch_renorm, rmax=rmax, dmax=dmax)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", rmax={self.rmax}, dmax={self.dmax}, "
                f"warmup_steps={self.warmup_steps}, relax_steps={self.relax_steps}")


def _doc(name, base, input_desc, shape, example):
    return _TEMPLATE.format(name=name, base=base, torch_name=base, input_desc=input_desc,
                            shape=shape, example_shape=example,
                            example=", ".join(map(str, example)))


class BatchRenorm1d(_RenormMixin, BatchNorm1d):
    __doc__ = _doc("BatchRenorm1d", "BatchNorm1d", "2D or 3D input",
                   ":math:`(N, C)` or :math:`(N, C, L)`", (4, 3, 5))

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None, *, rmax=3.0, dmax=5.0,
                 warmup_steps=5000, relax_steps=(35000, 20000), bias=True, activation=None,
                 negative_slope=0.01, backend="auto", check_finite=False):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias, activation=activation, negative_slope=negative_slope,
                         backend=backend, check_finite=check_finite)
        self._init_renorm(rmax, dmax, warmup_steps, relax_steps)


class BatchRenorm2d(_RenormMixin, BatchNorm2d):
    __doc__ = _doc("BatchRenorm2d", "BatchNorm2d", "4D input", ":math:`(N, C, H, W)`",
                   (4, 3, 5, 5))

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None, *, rmax=3.0, dmax=5.0,
                 warmup_steps=5000, relax_steps=(35000, 20000), bias=True, activation=None,
                 negative_slope=0.01, backend="auto", check_finite=False):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias, activation=activation, negative_slope=negative_slope,
                         backend=backend, check_finite=check_finite)
        self._init_renorm(rmax, dmax, warmup_steps, relax_steps)


class BatchRenorm3d(_RenormMixin, BatchNorm3d):
    __doc__ = _doc("BatchRenorm3d", "BatchNorm3d", "5D input", ":math:`(N, C, D, H, W)`",
                   (2, 3, 4, 4, 4))

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None, *, rmax=3.0, dmax=5.0,
                 warmup_steps=5000, relax_steps=(35000, 20000), bias=True, activation=None,
                 negative_slope=0.01, backend="auto", check_finite=False):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias, activation=activation, negative_slope=negative_slope,
                         backend=backend, check_finite=check_finite)
        self._init_renorm(rmax, dmax, warmup_steps, relax_steps)
