"""The compiled variants of the CPU kernels' passes, built on first use.

Each pass is specialised per layout, storage type, activation and flags, all
compile-time constants (closure cells, which Numba's disk cache keys on): a
loop that tests a runtime activation code around calls to exp/erf/tanh is
too large for LLVM to unswitch, and runs 5-10x slower than the specialised
loop.

The parallel passes are *trampolines* (``void f(void *block)`` C functions,
Numba ``cfunc``; see ``_parallel``): ``block`` holds the dimensions
``(d0, d1, d2)`` of the input (``(N, C, L)`` planar, ``(M, C, 1)`` rows)
and a ``(pointer, length)`` pair per array, in the order of the pass's
arguments below; every thread that runs the trampoline takes chunks of the
pass from the ``sched`` array, the last one. Arrays a variant does not read
(a residual, a pre-activation, ``g``) may be any array: they are never
touched.
"""

from __future__ import annotations

import numpy as np
from numba import carray, cfunc, njit, types

from . import _bodies as Bd
from . import _kernels as K
from ._kernels import _unpack
from ._parallel import as_pointer

_SIGNATURE = types.void(types.voidptr)
_ELEMENTWISE = {"cache": True, "error_model": "numpy"}
_REDUCE = {**_ELEMENTWISE, "fastmath": {"reassoc"}}

_SPECIALISED: dict = {}


def specialised(kind: str, *flags):
    """The trampoline of pass ``kind`` (``"stats"``, ``"normalize"``, ``"grad_sums"``,
    ``"grad_input"``) for the flags given (layout first, then those of the
    factory), built once."""
    key = (kind, *flags)
    fn = _SPECIALISED.get(key)
    if fn is None:
        fn = _SPECIALISED[key] = _FACTORIES[kind](*flags)
    return fn


def _compute(storage):
    """The compute type of a storage type (bfloat16/float16 bits: float32)."""
    return np.float64 if storage is np.float64 else np.float32


@njit(inline="always")
def _arr(b, i, dtype, shape):
    """Array ``i`` of a block, with ``shape``."""
    return carray(as_pointer(b[3 + 2 * i], dtype), shape)


@njit(inline="always")
def _vec(b, i, dtype):
    """Array ``i`` of a block, one-dimensional, with its own length."""
    return carray(as_pointer(b[3 + 2 * i], dtype), (b[4 + 2 * i],))


@njit(inline="always")
def _partials(b, i):
    """Array ``i`` of a block: a reduction's float64 ``(P, 2, C)`` partials."""
    return carray(as_pointer(b[3 + 2 * i], np.float64), (b[4 + 2 * i], 2, b[1]))


def _make_stats(planar, storage):
    """Shifted sums ``(x, shift, part, sched)``: see K.shifted_sums_planar / _rows."""
    if planar:
        @cfunc(_SIGNATURE, **_REDUCE)
        def stats_planar(data):
            b = carray(data, (11,), np.int64)
            K._shifted_sums_planar(_arr(b, 0, storage, (b[0], b[1], b[2])),
                                   _vec(b, 1, np.float64), _partials(b, 2),
                                   _vec(b, 3, np.int64))
        return stats_planar

    ct = _compute(storage)

    @cfunc(_SIGNATURE, **_REDUCE)
    def stats_rows(data):
        b = carray(data, (11,), np.int64)
        K._shifted_sums_rows(_arr(b, 0, storage, (b[0], b[1])), _vec(b, 1, ct),
                             _partials(b, 2), _vec(b, 3, np.int64))
    return stats_rows


def _make_normalize(planar, code, has_res, save_pre, storage):
    """``(x, hi, scale, shift, res, out, pre, k, sched)``: ``out = act(z)``,
    ``z = (x - hi) * scale + shift (+ res)``, ``pre = z`` if ``save_pre``."""
    ct = _compute(storage)
    if planar:
        @cfunc(_SIGNATURE, **_ELEMENTWISE)
        def normalize_planar(data):
            b = carray(data, (21,), np.int64)
            shape = (b[0], b[1], b[2])
            Bd._normalize_planar(
                _arr(b, 0, storage, shape), _vec(b, 1, ct), _vec(b, 2, ct), _vec(b, 3, ct),
                _arr(b, 4, storage, shape), _arr(b, 5, storage, shape), _arr(b, 6, ct, shape),
                _unpack(_vec(b, 7, ct)), code, has_res, save_pre, _vec(b, 8, np.int64))
        return normalize_planar

    @cfunc(_SIGNATURE, **_ELEMENTWISE)
    def normalize_rows(data):
        b = carray(data, (21,), np.int64)
        shape = (b[0], b[1])
        Bd._normalize_rows(
            _arr(b, 0, storage, shape), _vec(b, 1, ct), _vec(b, 2, ct), _vec(b, 3, ct),
            _arr(b, 4, storage, shape), _arr(b, 5, storage, shape), _arr(b, 6, ct, shape),
            _unpack(_vec(b, 7, ct)), code, has_res, save_pre, _vec(b, 8, np.int64))
    return normalize_rows


def _make_grad_sums(planar, code, keep_g, storage, a_type):
    """``(dy, x, a, hi, k, g, part, sched)``: float64 partials of ``sum(g)`` and
    ``sum(g * (x - hi))``, ``g = dy * act'(.)``, written to ``g`` when ``keep_g``;
    ``a`` (the output or the pre-activation, K._act_grad) is of type ``a_type``."""
    ct = _compute(storage)
    if planar:
        @cfunc(_SIGNATURE, **_REDUCE)
        def grad_sums_planar(data):
            b = carray(data, (19,), np.int64)
            shape = (b[0], b[1], b[2])
            Bd._grad_sums_planar(
                _arr(b, 0, storage, shape), _arr(b, 1, storage, shape),
                _arr(b, 2, a_type, shape), _vec(b, 3, ct), _unpack(_vec(b, 4, ct)),
                _arr(b, 5, storage, shape), _partials(b, 6), _vec(b, 7, np.int64), code,
                keep_g)
        return grad_sums_planar

    @cfunc(_SIGNATURE, **_REDUCE)
    def grad_sums_rows(data):
        b = carray(data, (19,), np.int64)
        shape = (b[0], b[1])
        Bd._grad_sums_rows(
            _arr(b, 0, storage, shape), _arr(b, 1, storage, shape), _arr(b, 2, a_type, shape),
            _vec(b, 3, ct), _unpack(_vec(b, 4, ct)), _arr(b, 5, storage, shape),
            _partials(b, 6), _vec(b, 7, np.int64), code, keep_g)
    return grad_sums_rows


def _make_grad_input(planar, code, use_g, training, storage, a_type):
    """``(dy, x, a, hi, k, g, kx, c0, scale, dx, sched)``:
    ``dx = kx * (x - hi) + c0 + scale * g`` (training) or ``scale * g`` (eval);
    ``a`` as in :func:`_make_grad_sums`."""
    ct = _compute(storage)
    if planar:
        @cfunc(_SIGNATURE, **_ELEMENTWISE)
        def grad_input_planar(data):
            b = carray(data, (25,), np.int64)
            shape = (b[0], b[1], b[2])
            Bd._grad_input_planar(
                _arr(b, 0, storage, shape), _arr(b, 1, storage, shape),
                _arr(b, 2, a_type, shape), _vec(b, 3, ct), _unpack(_vec(b, 4, ct)),
                _arr(b, 5, storage, shape), _vec(b, 6, ct), _vec(b, 7, ct), _vec(b, 8, ct),
                _arr(b, 9, storage, shape), _vec(b, 10, np.int64), code, use_g, training)
        return grad_input_planar

    @cfunc(_SIGNATURE, **_ELEMENTWISE)
    def grad_input_rows(data):
        b = carray(data, (25,), np.int64)
        shape = (b[0], b[1])
        Bd._grad_input_rows(
            _arr(b, 0, storage, shape), _arr(b, 1, storage, shape), _arr(b, 2, a_type, shape),
            _vec(b, 3, ct), _unpack(_vec(b, 4, ct)), _arr(b, 5, storage, shape),
            _vec(b, 6, ct), _vec(b, 7, ct), _vec(b, 8, ct), _arr(b, 9, storage, shape),
            _vec(b, 10, np.int64), code, use_g, training)
    return grad_input_rows


_FACTORIES = {"stats": _make_stats, "normalize": _make_normalize, "grad_sums": _make_grad_sums,
              "grad_input": _make_grad_input}
