"""How the CPU kernels see tensors: NumPy views without copies, and the
per-channel arrays (weights, statistics, constants) they take.

Part of :mod:`batchnorm.kernels.cpu`, which imports these names.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..torch_ops import compute_dtype
from . import _kernels as K

_FLOATS = (torch.float32, torch.float64)

# bfloat16 and float16 reach the kernels as their bits, uint16 and int16 views
# (K.BF16_BITS, K.HALF_BITS: see _kernels.ld / st).
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


_BITS = {torch.bfloat16: K.BF16_BITS, torch.float16: K.HALF_BITS}


class _View:
    """``x`` as a C-contiguous NumPy array: planar ``(N, C, L)`` or rows ``(M, C)``."""

    __slots__ = ("kind", "shape", "perm", "numel", "dims", "planar", "storage")

    def __init__(self, kind, shape, perm, dtype):
        self.kind, self.shape, self.perm = kind, shape, perm
        self.numel = math.prod(shape)
        self.planar = kind == "planar"
        self.dims = shape if self.planar else (*shape, 1)  # a trampoline's (d0, d1, d2)
        # The NumPy type the kernels read ``x`` as (16-bit formats: their bits).
        self.storage = _BITS.get(dtype) or _np_dtype(dtype)

    def of(self, t: torch.Tensor) -> np.ndarray:
        """The same view of ``t`` (which has ``x``'s shape and strides: its
        memory is this view's C-contiguous array); a bfloat16 or float16
        tensor as its bits (see _BITS)."""
        return as_numpy(t, self.shape)

    def like(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``t`` (its dtype kept) with ``x``'s layout; a copy only when it differs."""
        if t.stride() == x.stride():
            return t
        return torch.empty_like(x, dtype=t.dtype).copy_(t)


class _Exported:
    """A tensor's memory offered to NumPy through ``__array_interface__``.

    ``Tensor.numpy()`` marks the tensor's storage as never resizable again, a
    side effect on the user's inputs, outputs, parameters and gradients that
    PyTorch's own batch norm does not have; this does not touch the tensor.
    NumPy keeps this object, and with it the tensor, as the array's base.
    """

    __slots__ = ("__array_interface__", "_tensor")

    def __init__(self, t: torch.Tensor, shape: tuple, strides: tuple | None, typestr: str):
        self._tensor = t
        self.__array_interface__ = {"data": (t.data_ptr(), False), "shape": shape,
                                    "strides": strides, "typestr": typestr, "version": 3}


# NumPy's type string per tensor dtype, as the kernels read it (16-bit floats:
# their bits, see _BITS) and as values (NumPy's float16; no bfloat16 there).
_BITS_TYPESTR = {torch.float32: np.dtype(np.float32).str,
                 torch.float64: np.dtype(np.float64).str,
                 torch.bfloat16: np.dtype(K.BF16_BITS).str,
                 torch.float16: np.dtype(K.HALF_BITS).str}
_VALUE_TYPESTR = {**_BITS_TYPESTR, torch.float16: np.dtype(np.float16).str}


def as_numpy(t: torch.Tensor, shape: tuple, strides: tuple | None = None,
             values: bool = False) -> np.ndarray:
    """``t``'s memory as a NumPy array of ``shape`` (C-contiguous, or with byte
    ``strides``): 16-bit floats as their bits, or as values (float16 only)
    with ``values``; without ``Tensor.numpy()`` (see _Exported)."""
    typestr = (_VALUE_TYPESTR if values else _BITS_TYPESTR)[t.dtype]
    return np.asarray(_Exported(t, shape, strides, typestr))


def _view(x: torch.Tensor) -> _View | None:
    """How the kernels see ``x``, or ``None`` when they cannot (the portable path runs);
    cached per (shape, strides, dtype, device), which is all it depends on."""
    key = (x.shape, x.stride(), x.dtype, x.device.type)
    try:
        return _VIEW_OF[key]
    except KeyError:
        pass
    if len(_VIEW_OF) >= 1024:
        _VIEW_OF.clear()
    v = _VIEW_OF[key] = _make_view(x)
    return v


_VIEW_OF: dict[tuple, _View | None] = {}


def _make_view(x: torch.Tensor) -> _View | None:
    if x.dtype not in DTYPES or x.device.type != "cpu" or x.numel() == 0:
        return None
    N, C = x.shape[0], x.shape[1]
    L = x.numel() // (N * C)
    if x.is_contiguous():
        if L == 1:
            return _View("rows", (N, C), None, x.dtype)
        return _View("planar", (N, C, L), None, x.dtype)
    perm = (0, *range(2, x.dim()), 1)
    if x.permute(perm).is_contiguous():
        return _View("rows", (N * L, C), perm, x.dtype)
    return None


def runs_on(x: torch.Tensor) -> bool:
    """Whether these kernels run on ``x`` (else its calls take the portable path)."""
    return _view(x) is not None


def _empty_like(x, dtype=None):
    return torch.empty_like(x, dtype=dtype)


def _dummy(v: _View, dtype) -> np.ndarray:
    return np.empty((0,) * len(v.shape), dtype=dtype)


def _np_dtype(dtype: torch.dtype):
    """The compute dtype: float64 for float64, float32 otherwise."""
    return np.float64 if dtype == torch.float64 else np.float32


def _widen(a: np.ndarray) -> np.ndarray:
    """Stored values (bfloat16 and float16 bits included) as float64."""
    if a.dtype == K.BF16_BITS:
        a = (a.astype(np.uint32) << 16).view(np.float32)
    elif a.dtype == K.HALF_BITS:
        a = a.view(np.float16)
    return a.astype(np.float64)


def _ranges(v: _View) -> int:
    """How many units a pass over ``v`` splits into: runs (planar) or rows."""
    return v.shape[0] * v.shape[1] if v.kind == "planar" else v.shape[0]


# NumPy views of per-channel tensors (weights, biases, running statistics),
# by tensor object: a module hands the same ones to every call, and making
# one costs a microsecond or two. An entry holds its
# tensor, so an id is not reused while it is cached; a tensor whose storage
# was swapped (``.data =``, ``resize_``) misses.
_VIEWS: dict[int, tuple] = {}


_VIEWS_MAX = 1024


def _channel_array(t: torch.Tensor) -> np.ndarray:
    """A per-channel tensor as NumPy (see as_numpy), cached (see _VIEWS)."""
    key = (t.data_ptr(), t.numel(), t.dtype)
    hit = _VIEWS.get(id(t))
    if hit is not None and hit[0] is t and hit[1] == key:
        return hit[2]
    a = as_numpy(t, (t.numel(),), (t.stride(0) * t.element_size(),), values=True)
    if len(_VIEWS) >= _VIEWS_MAX:
        _VIEWS.clear()
    _VIEWS[id(t)] = (t, key, a)
    return a


def _param(t, ndt) -> np.ndarray:
    """A weight or bias as the kernels take it (empty for ``None``)."""
    if t is None:
        return np.empty(0, ndt)
    if t.dtype == torch.bfloat16:  # NumPy has no bfloat16
        return t.detach().to(torch.float32 if ndt is np.float32 else torch.float64).numpy()
    a = _channel_array(t)
    return a if a.dtype == ndt else a.astype(ndt)


def _np(t: torch.Tensor) -> np.ndarray:
    """A per-call per-channel tensor (batch statistics) as NumPy, float32 or float64."""
    t = t.detach()
    return t.numpy() if t.dtype in _FLOATS else t.float().numpy()


def _in_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A running statistic in ``dtype``'s compute dtype (``t`` itself if it is:
    ``.to`` costs a dispatch even then)."""
    cdtype = compute_dtype(dtype)
    return t if t.dtype == cdtype else t.to(cdtype)


def _stat_array(t: torch.Tensor) -> np.ndarray:
    """A running statistic as NumPy (float32 for a bfloat16 or float16 buffer)."""
    if t.dtype in (torch.float32, torch.float64):
        return _channel_array(t)
    return t.detach().float().numpy()


_CONSTANTS: dict = {}


def _constants(ndt, negative_slope) -> np.ndarray:
    """K.constants, one array per dtype and slope, made once."""
    key = (ndt, negative_slope)
    k = _CONSTANTS.get(key)
    if k is None:
        if len(_CONSTANTS) > 64:
            _CONSTANTS.clear()
        k = _CONSTANTS[key] = K.constants(ndt, negative_slope)  # the kernels only read it
    return k


def _count(x: torch.Tensor) -> int:
    return x.numel() // x.shape[1] if x.shape[1] else 0
