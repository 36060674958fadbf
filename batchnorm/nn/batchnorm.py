"""Drop-in ``BatchNorm1d/2d/3d`` and their lazy forms, computed by our op.

Each class subclasses its ``torch.nn`` counterpart, so parameters, buffers,
``state_dict`` (old checkpoints without ``num_batches_tracked`` included),
``reset_parameters``, ``repr`` and ``isinstance(m, nn.BatchNorm2d)`` checks in
user code behave exactly as with PyTorch; ``forward`` is replaced by ours,
which calls :func:`batchnorm.functional.batch_norm` and never PyTorch's
batch-norm op.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _LazyNormBase

from .._backend import BACKENDS
from ..functional import ACTIVATIONS, batch_norm
from .ghost import check_virtual_batch_size, ghost_batch_norm

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
]

_TEMPLATE = r"""Batch Normalization over a {input_desc} (Ioffe & Szegedy, 2015).

    .. math::
        y = \frac{{x - \mathrm{{E}}[x]}}{{\sqrt{{\mathrm{{Var}}[x] + \epsilon}}}} * \gamma + \beta

    The mean and standard deviation are computed per channel over the
    mini-batch (every axis but axis 1); :math:`\gamma` (``weight``) and
    :math:`\beta` (``bias``) are learnable ``(C,)`` vectors, initialised to 1
    and 0.

    **Training** (``model.train()``): the layer normalizes with the statistics
    of the current batch, and updates ``running_mean`` and ``running_var``.
    **Inference** (``model.eval()``): it normalizes with ``running_mean`` and
    ``running_var``, so the output of one sample no longer depends on the rest
    of the batch. With ``track_running_stats=False`` batch statistics are used
    in both modes.

    The variance used to normalize is the biased one (divided by ``m``, the
    number of values per channel); ``running_var`` is updated with the
    unbiased one (divided by ``m - 1``). The update rule is
    ``running = (1 - momentum) * running + momentum * batch``; with
    ``momentum=None`` it is a cumulative average,
    ``momentum = 1 / num_batches_tracked``.

    Drop-in for ``torch.nn.{torch_name}``: same arguments, parameters,
    buffers, ``state_dict`` and errors. Our additions are keyword-only.

    Args:
        num_features: ``C``, the number of channels.{lazy_note}
        eps: added to the variance for numerical stability. Default: ``1e-5``.
        momentum: weight of the new batch in the running statistics, or
            ``None`` for a cumulative average. Default: ``0.1``.
        affine: learnable ``weight`` and ``bias``. Default: ``True``.
        track_running_stats: keep running statistics for inference.
            Default: ``True``.
        bias: with ``affine``, whether to learn ``bias``. Default: ``True``.
        activation: fused activation after normalization (and after the
            residual add): ``None``, ``"relu"``, ``"leaky_relu"``, ``"silu"``,
            ``"gelu"``, ``"sigmoid"``, ``"tanh"``. Default: ``None``.
        negative_slope: slope of ``"leaky_relu"``. Default: ``0.01``.
        backend: ``"auto"``, ``"torch"``, ``"cpu"`` or ``"triton"``.
            Default: ``"auto"``.
        check_finite: raise instead of letting NaN/Inf from the input reach
            the running statistics. Default: ``False`` (as PyTorch).
        virtual_batch_size: in training, normalize each consecutive slice of
            this many samples with its own statistics (ghost batches, see
            :mod:`batchnorm.nn.ghost`); the running statistics are still
            updated once per batch. ``None``: the whole batch.
            Default: ``None``.

    Shape:
        - Input: {shape}
        - Residual (``forward(x, residual)``): same as input
        - Output: same shape, dtype and memory format as input

    Example:
        >>> import torch
        >>> import batchnorm
        >>> m = batchnorm.{name}({example_args}activation="relu")
        >>> x = torch.randn({example_shape})
        >>> m(x).shape
        torch.Size([{example_size}])
    """


def _doc(name, torch_name, input_desc, shape, example_shape, lazy=False):
    lazy_note = (" Inferred from ``input.size(1)`` on the first call (lazy)." if lazy else "")
    return _TEMPLATE.format(
        name=name, torch_name=torch_name, input_desc=input_desc, shape=shape,
        lazy_note=lazy_note, example_args="" if lazy else f"{example_shape[1]}, ",
        example_shape=", ".join(map(str, example_shape)),
        example_size=", ".join(map(str, example_shape)))


class _OursMixin:
    """What our modules add to PyTorch's: the forward, the fused epilogue, repr."""

    # Class-level defaults keep modules unpickled from older states working.
    activation = None
    negative_slope = 0.01
    backend = "auto"
    check_finite = False
    virtual_batch_size = None

    def _init_ours(self, bias, activation, negative_slope, backend, check_finite,
                   virtual_batch_size=None):
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of "
                             + ", ".join(repr(a) for a in ACTIVATIONS))
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
        if not bias and self.bias is not None:
            # torch < 2.10 has no ``bias=`` argument: drop the parameter ourselves.
            del self.bias
            self.register_parameter("bias", None)
        self.activation = activation
        self.negative_slope = float(negative_slope)
        self.backend = backend
        self.check_finite = bool(check_finite)
        check_virtual_batch_size(virtual_batch_size)
        self.virtual_batch_size = virtual_batch_size

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input_dim(input)
        return self._batch_norm(input, residual)

    def _batch_norm(self, input, residual):
        # torch increments num_batches_tracked before validating; we only
        # count a batch once the call has succeeded.
        track = self.training and self.track_running_stats and self.num_batches_tracked is not None
        momentum = 0.0 if self.momentum is None else self.momentum
        if track and self.momentum is None:
            momentum = 1.0 / (float(self.num_batches_tracked) + 1.0)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        use_buffers = not self.training or self.track_running_stats
        out = self._functional()(
            input,
            self.running_mean if use_buffers else None,
            self.running_var if use_buffers else None,
            self.weight, self.bias, use_batch_stats, momentum, self.eps,
            activation=self.activation, negative_slope=self.negative_slope,
            residual=residual, backend=self.backend, check_finite=self.check_finite)
        if track:
            self.num_batches_tracked.add_(1)
        return out

    def _functional(self):
        """The op ``forward`` calls, with ``batch_norm``'s signature."""
        if self.training and self.virtual_batch_size is not None:
            return partial(ghost_batch_norm, virtual_batch_size=self.virtual_batch_size)
        return batch_norm

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.virtual_batch_size is not None:
            text += f", virtual_batch_size={self.virtual_batch_size}"
        if self.activation is not None:
            text += f", activation={self.activation!r}"
            if self.activation == "leaky_relu":
                text += f", negative_slope={self.negative_slope}"
        if self.backend != "auto":
            text += f", backend={self.backend!r}"
        return text


def _init(self, parent, num_features, eps, momentum, affine, track_running_stats, device,
          dtype, bias, activation, negative_slope, backend, check_finite, virtual_batch_size=None):
    args = () if num_features is None else (num_features,)
    parent.__init__(self, *args, eps=eps, momentum=momentum, affine=affine,
                    track_running_stats=track_running_stats, device=device, dtype=dtype)
    self._init_ours(bias, activation, negative_slope, backend, check_finite, virtual_batch_size)


class BatchNorm1d(_OursMixin, nn.BatchNorm1d):
    __doc__ = _doc("BatchNorm1d", "BatchNorm1d", "2D or 3D input",
                   ":math:`(N, C)` or :math:`(N, C, L)`", (4, 3, 5))

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None, *, bias=True,
                 activation=None, negative_slope=0.01, backend="auto", check_finite=False,
                 virtual_batch_size=None):
        _init(self, nn.BatchNorm1d, num_features, eps, momentum, affine, track_running_stats,
              device, dtype, bias, activation, negative_slope, backend, check_finite,
              virtual_batch_size)


class BatchNorm2d(_OursMixin, nn.BatchNorm2d):
    __doc__ = _doc("BatchNorm2d", "BatchNorm2d", "4D input", ":math:`(N, C, H, W)`",
                   (4, 3, 5, 5))

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None, *, bias=True,
                 activation=None, negative_slope=0.01, backend="auto", check_finite=False,
                 virtual_batch_size=None):
        _init(self, nn.BatchNorm2d, num_features, eps, momentum, affine, track_running_stats,
              device, dtype, bias, activation, negative_slope, backend, check_finite,
              virtual_batch_size)


class BatchNorm3d(_OursMixin, nn.BatchNorm3d):
    __doc__ = _doc("BatchNorm3d", "BatchNorm3d", "5D input", ":math:`(N, C, D, H, W)`",
                   (2, 3, 4, 4, 4))

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None, *, bias=True,
                 activation=None, negative_slope=0.01, backend="auto", check_finite=False,
                 virtual_batch_size=None):
        _init(self, nn.BatchNorm3d, num_features, eps, momentum, affine, track_running_stats,
              device, dtype, bias, activation, negative_slope, backend, check_finite,
              virtual_batch_size)


class _LazyOurs(_OursMixin):
    """Lazy modules: ``num_features`` from the first input, then the plain class."""

    def __init__(self, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, *, bias=True, activation=None, negative_slope=0.01,
                 backend="auto", check_finite=False, virtual_batch_size=None):
        parent = next(c for c in type(self).__mro__ if issubclass(c, _LazyNormBase)
                      and c.__module__.startswith("torch."))
        _init(self, parent, None, eps, momentum, affine, track_running_stats, device, dtype,
              True, activation, negative_slope, backend, check_finite, virtual_batch_size)
        if not bias:
            self.register_parameter("bias", None)

    def initialize_parameters(self, input, residual=None) -> None:  # noqa: ARG002
        super().initialize_parameters(input)


class LazyBatchNorm1d(_LazyOurs, nn.LazyBatchNorm1d):
    __doc__ = _doc("LazyBatchNorm1d", "LazyBatchNorm1d", "2D or 3D input",
                   ":math:`(N, C)` or :math:`(N, C, L)`", (4, 3, 5), lazy=True)
    cls_to_become = BatchNorm1d


class LazyBatchNorm2d(_LazyOurs, nn.LazyBatchNorm2d):
    __doc__ = _doc("LazyBatchNorm2d", "LazyBatchNorm2d", "4D input", ":math:`(N, C, H, W)`",
                   (4, 3, 5, 5), lazy=True)
    cls_to_become = BatchNorm2d


class LazyBatchNorm3d(_LazyOurs, nn.LazyBatchNorm3d):
    __doc__ = _doc("LazyBatchNorm3d", "LazyBatchNorm3d", "5D input", ":math:`(N, C, D, H, W)`",
                   (2, 3, 4, 4, 4), lazy=True)
    cls_to_become = BatchNorm3d


class BatchNorm(_LazyOurs, _LazyNormBase, _BatchNorm):
    __doc__ = _doc("BatchNorm", "BatchNorm2d", "(N, C, *) input of any rank >= 2",
                   ":math:`(N, C, *)`", (4, 3, 2, 2, 2, 2), lazy=True).replace(
        "Drop-in for ``torch.nn.BatchNorm2d``", "Like ``torch.nn.BatchNorm1d/2d/3d`` for "
        "any rank (``num_features=None`` infers it on the first call)")
    cls_to_become = None

    def __init__(self, num_features=None, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None, *, bias=True,
                 activation=None, negative_slope=0.01, backend="auto", check_finite=False,
                 virtual_batch_size=None):
        super().__init__(eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
                         activation=activation, negative_slope=negative_slope, backend=backend,
                         check_finite=check_finite, virtual_batch_size=virtual_batch_size)
        if num_features is not None:
            materialize(self, num_features)

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")


def materialize(module, num_features: int) -> None:
    """Give a lazy module its size now, as its first forward would."""
    module.initialize_parameters(torch.empty(0, num_features, device="meta"))
    # Same end state as LazyModuleMixin after the first forward.
    module._initialize_hook.remove()
    module._load_hook.remove()
    del module._initialize_hook, module._load_hook
    if module.cls_to_become is not None:
        module.__class__ = module.cls_to_become
