r"""Frozen batch norm: ``FrozenBatchNorm1d/2d/3d``, a fixed per-channel affine map.

For fine-tuning with small batches (detection, segmentation) the statistics
and the affine parameters of a pretrained network's BN layers are frozen::

    scale = weight / sqrt(running_var + eps)
    shift = bias - running_mean * scale
    y     = x * scale + shift

``weight``, ``bias``, ``running_mean`` and ``running_var`` are *buffers*, not
parameters: nothing is trained, an optimizer sees nothing, and ``train()``
changes nothing (the layer behaves the same in both modes). Gradients still
flow to the input. The output is computed by
:func:`batchnorm.functional.batch_norm` in inference mode (our kernels, never
PyTorch's batch-norm op), which evaluates the same map in the centred form
``(x - running_mean) * scale + bias``: it avoids the cancellation of
``x * scale + shift`` when the mean is large next to the spread, and it is
exactly batch norm's eval output. A fused ``activation`` and ``residual`` work
as in our :class:`batchnorm.BatchNorm2d`.

**Checkpoints.** The buffer names are those of torchvision's and detectron2's
``FrozenBatchNorm2d`` (both default to ``eps=1e-5``), so their ``state_dict``
loads as is. As torchvision's does, loading drops ``num_batches_tracked``, so
a ``torch.nn.BatchNorm2d`` checkpoint loads too; as detectron2's does, a
checkpoint without metadata or of version < 2 that lacks the running
statistics (Caffe2-converted weights hold only ``weight`` and ``bias``) gets
``running_mean = 0`` and ``running_var = 1``. Our ``state_dict`` keeps version
1 (torchvision's), so it loads strictly into torchvision's and detectron2's
classes and into ``torch.nn.BatchNorm2d`` (which then starts
``num_batches_tracked`` at 0). A fresh layer has ``running_var = 1`` as
torchvision's and PyTorch's BN (detectron2 starts at ``1 - eps``).

:meth:`FrozenBatchNorm.from_batchnorm` and :func:`convert_frozen_batchnorm`
turn trained BN layers (ours, PyTorch's, SyncBatchNorm, renorm) into frozen
ones with the same eval output; :meth:`FrozenBatchNorm.scale_shift` gives the
folded ``(scale, shift)`` for tools that fold BN into a convolution.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy

from .._backend import BACKENDS
from ..functional import ACTIVATIONS, batch_norm

__all__ = [
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "convert_frozen_batchnorm",
]

_BUFFERS = ("weight", "bias", "running_mean", "running_var")


class FrozenBatchNorm(nn.Module):
    r"""Frozen batch norm over ``(N, C, *)`` input of any rank >= 2.

    ``y = x * scale + shift`` per channel, with
    ``scale = weight / sqrt(running_var + eps)`` and
    ``shift = bias - running_mean * scale``, all four buffers. Same output in
    ``train()`` and ``eval()`` mode: the batch never changes anything. See
    :mod:`batchnorm.nn.frozen` for the checkpoints it loads.

    Args:
        num_features: ``C``, the number of channels.
        eps: added to ``running_var``. Default: ``1e-5``.
        device, dtype: of the buffers.
        activation, negative_slope: fused activation after the affine map
            (and the residual add), as in :class:`batchnorm.BatchNorm2d`.
            Default: ``None``.
        backend: ``"auto"``, ``"torch"``, ``"cpu"`` or ``"triton"``.
            Default: ``"auto"``.

    Shape:
        - Input: :math:`(N, C, *)`
        - Residual (``forward(x, residual)``): same as input
        - Output: same shape, dtype and memory format as input

    Example:
        >>> import torch
        >>> from batchnorm import BatchNorm2d, FrozenBatchNorm2d
        >>> bn = BatchNorm2d(3)
        >>> _ = bn(torch.randn(8, 3, 4, 4) * 2 + 1)   # one training step
        >>> frozen = FrozenBatchNorm2d.from_batchnorm(bn.eval())
        >>> x = torch.randn(2, 3, 4, 4)
        >>> torch.allclose(frozen(x), bn(x)), list(frozen.parameters())
        (True, [])
    """

    def __init__(self, num_features: int, eps: float = 1e-5, device=None, dtype=None, *,
                 activation=None, negative_slope=0.01, backend="auto"):
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) \
                or num_features < 0:
            raise ValueError(f"num_features must be a non-negative int, got {num_features!r}")
        if not eps >= 0:
            raise ValueError(f"eps must be non-negative, got {eps}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of "
                             + ", ".join(repr(a) for a in ACTIVATIONS))
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
        self.num_features = num_features
        self.eps = eps
        self.activation = activation
        self.negative_slope = float(negative_slope)
        self.backend = backend
        f = dict(device=device, dtype=dtype)
        self.register_buffer("weight", torch.ones(num_features, **f))
        self.register_buffer("bias", torch.zeros(num_features, **f))
        self.register_buffer("running_mean", torch.zeros(num_features, **f))
        self.register_buffer("running_var", torch.ones(num_features, **f))

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input_dim(input)
        return batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                          False, 0.0, self.eps, activation=self.activation,
                          negative_slope=self.negative_slope, residual=residual,
                          backend=self.backend)

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The folded per-channel ``(scale, shift)`` with ``y = x * scale + shift``."""
        with torch.no_grad():
            scale = self.weight * torch.rsqrt(self.running_var + self.eps)
            return scale, self.bias - self.running_mean * scale

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # torchvision: a BatchNorm checkpoint's counter means nothing here.
        state_dict.pop(prefix + "num_batches_tracked", None)
        version = local_metadata.get("version", None)
        if version is None or version < 2:
            # detectron2: early and Caffe2-converted checkpoints have no running statistics.
            for name, fill in (("running_mean", torch.zeros_like),
                               ("running_var", torch.ones_like)):
                if prefix + name not in state_dict:
                    state_dict[prefix + name] = fill(getattr(self, name))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        text = f"{self.num_features}, eps={self.eps}"
        if self.activation is not None:
            text += f", activation={self.activation!r}"
            if self.activation == "leaky_relu":
                text += f", negative_slope={self.negative_slope}"
        if self.backend != "auto":
            text += f", backend={self.backend!r}"
        return text

    @classmethod
    def from_batchnorm(cls, bn: nn.Module) -> FrozenBatchNorm:
        """A frozen layer with ``bn``'s eval output (its buffers copied, not shared).

        Args:
            bn: a batch norm layer with running statistics: ours (including
                renorm and ghost-batch layers), PyTorch's ``BatchNorm1d/2d/3d``
                and ``SyncBatchNorm``, or any module with ``running_mean``,
                ``running_var``, ``eps`` and optional ``weight``/``bias``
                (e.g. torchvision's or detectron2's frozen layers). A missing
                ``weight``/``bias`` (``affine=False``) becomes 1/0; our fused
                activation is kept.

        Raises:
            ValueError: ``bn`` has no running statistics, is a lazy layer not
                yet initialized, or normalizes another axis than 1.
        """
        rm, rv = getattr(bn, "running_mean", None), getattr(bn, "running_var", None)
        name = type(bn).__name__
        if not isinstance(rm, torch.Tensor) or not isinstance(rv, torch.Tensor):
            raise ValueError(f"{name} has no running statistics (track_running_stats=False?): "
                             "there is nothing to freeze")
        if getattr(bn, "axis", 1) != 1:
            raise ValueError(f"{name} normalizes axis {bn.axis}; frozen layers normalize "
                             "axis 1")
        if is_lazy(rm):
            raise ValueError(f"{name} is lazy and not initialized yet: run one batch through "
                             "it first")
        frozen = cls(rm.numel(), bn.eps, device=rm.device, dtype=rm.dtype,
                     activation=getattr(bn, "activation", None),
                     negative_slope=getattr(bn, "negative_slope", 0.01),
                     backend=getattr(bn, "backend", "auto"))
        weight, bias = getattr(bn, "weight", None), getattr(bn, "bias", None)
        with torch.no_grad():
            frozen.running_mean = rm.detach().clone()
            frozen.running_var = rv.detach().clone()
            if weight is not None:
                frozen.weight = weight.detach().clone()
            if bias is not None:
                frozen.bias = bias.detach().clone()
        frozen.train(bn.training)
        return frozen


_TEMPLATE = """Frozen batch norm over a {input_desc}: a fixed per-channel affine map.

    :class:`FrozenBatchNorm` restricted to {shape} input, the frozen form of
    :class:`batchnorm.{bn}` and ``torch.nn.{bn}``; loads torchvision's and
    detectron2's ``FrozenBatchNorm2d`` checkpoints (see
    :mod:`batchnorm.nn.frozen`).

    Example:
        >>> import torch
        >>> from batchnorm import {name}
        >>> m = {name}(3)
        >>> m(torch.randn({example})).shape
        torch.Size([{example}])
    """


class FrozenBatchNorm1d(FrozenBatchNorm):
    __doc__ = _TEMPLATE.format(name="FrozenBatchNorm1d", bn="BatchNorm1d",
                               input_desc="2D or 3D input", shape="(N, C) or (N, C, L)",
                               example="4, 3, 5")

    def _check_input_dim(self, input):
        if input.dim() not in (2, 3):
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


class FrozenBatchNorm2d(FrozenBatchNorm):
    __doc__ = _TEMPLATE.format(name="FrozenBatchNorm2d", bn="BatchNorm2d",
                               input_desc="4D input", shape="(N, C, H, W)",
                               example="4, 3, 5, 5")

    def _check_input_dim(self, input):
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class FrozenBatchNorm3d(FrozenBatchNorm):
    __doc__ = _TEMPLATE.format(name="FrozenBatchNorm3d", bn="BatchNorm3d",
                               input_desc="5D input", shape="(N, C, D, H, W)",
                               example="2, 3, 4, 4, 4")

    def _check_input_dim(self, input):
        if input.dim() != 5:
            raise ValueError(f"expected 5D input (got {input.dim()}D input)")


def _frozen_class(bn: nn.Module) -> type[FrozenBatchNorm]:
    for torch_cls, frozen_cls in ((nn.BatchNorm1d, FrozenBatchNorm1d),
                                  (nn.BatchNorm2d, FrozenBatchNorm2d),
                                  (nn.BatchNorm3d, FrozenBatchNorm3d)):
        if isinstance(bn, torch_cls):
            return frozen_cls
    return FrozenBatchNorm


def convert_frozen_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every batch norm layer in ``module`` by its frozen form.

    ``BatchNorm1d/2d/3d`` (ours or PyTorch's, and their subclasses such as
    our renorm layers) become ``FrozenBatchNorm1d/2d/3d``; other batch norm
    layers (``SyncBatchNorm``, our rank-agnostic ``BatchNorm``) become
    :class:`FrozenBatchNorm`. Each keeps its eval output (see
    :meth:`FrozenBatchNorm.from_batchnorm`).

    Returns:
        The frozen layer if ``module`` itself is a batch norm layer, else
        ``module``, converted in place.

    Example:
        >>> import torch
        >>> from batchnorm import BatchNorm2d, convert_frozen_batchnorm
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), BatchNorm2d(4))
        >>> model = convert_frozen_batchnorm(model)
        >>> type(model[1]).__name__, sum(p.numel() for p in model[1].parameters())
        ('FrozenBatchNorm2d', 0)
    """
    # Every frozen layer is built before any is put in place, so a layer that
    # cannot be frozen leaves the model as it was.
    if isinstance(module, _BatchNorm):
        return _frozen(module)
    swaps = [(parent, name, _frozen(child)) for parent, name, child in _bn_layers(module)]
    for parent, name, frozen in swaps:
        parent.add_module(name, frozen)
    return module


def _bn_layers(module: nn.Module):
    """``(parent, name, layer)`` for every batch norm layer under ``module``
    (not looking inside one)."""
    for name, child in module.named_children():
        if isinstance(child, _BatchNorm):
            yield module, name, child
        else:
            yield from _bn_layers(child)


def _frozen(bn: _BatchNorm) -> FrozenBatchNorm:
    extra = [name for name, _ in bn.named_children()]
    if extra:
        # timm's BatchNormAct2d and the like: its activation (and drop) would be lost.
        raise ValueError(
            f"{type(bn).__name__} has submodules ({', '.join(extra)}) that a frozen layer "
            "would drop; use batchnorm.tools.convert_batchnorm(model, to='frozen'), which "
            "keeps a timm BatchNormAct2d's activation")
    return _frozen_class(bn).from_batchnorm(bn)
