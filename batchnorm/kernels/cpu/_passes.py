"""The forward and the backward, each as one compiled call.

A training forward is a statistics pass, the per-channel arithmetic, and the
normalize pass; a backward is a gradient-sums pass, the per-channel
arithmetic, and the ``grad_input`` pass. Here each runs from one compiled
function, which launches the passes' trampolines (``_variants``) itself,
as OpenMP regions or on the calling thread (``_parallel.launch``), so a call
from Python costs one dispatch instead of a dozen small NumPy and Numba calls
between the passes (most of a small input's time). Where the passes must run
on our own pool instead (``_parallel.use_openmp`` is false and the input is
split), the driver in ``batchnorm.kernels.cpu`` runs them from Python.

``dims`` is ``(N, C, L)`` for a planar input and ``(M, C, 1)`` for rows;
``x.ndim`` (3 or 2) tells them apart at compile time.
"""

# Numba's @overload fixes the argument list of its implementations.
# ruff: noqa: ARG001

from __future__ import annotations

import numpy as np
from numba import njit
from numba.extending import overload

from . import _kernels as K
from ._bits import ld
from ._parallel import launch
from ._schedule import schedule_jit


def _initial_shift(x, shift):
    """The statistics' first shift: one value per channel (planar) or a sample
    mean (rows, K.rows_shift)."""


@overload(_initial_shift)
def _initial_shift_impl(x, shift):
    if x.ndim == 3:
        def planar(x, shift):
            for c in range(x.shape[1]):
                shift[c] = ld(x[0, c, 0])
        return planar

    def rows(x, shift):
        K.rows_shift(x, shift)
    return rows


@njit(inline="always")
def _extent(dims, x, chunks):
    """``(total, parts)``: the units a pass over ``x`` splits into (runs or rows)
    and how many partial sums a reduction writes (one per sample or chunk)."""
    if x.ndim == 3:
        return dims[0] * dims[1], dims[0]
    return dims[0], chunks


@njit(cache=True, nogil=True)
def forward(gomp, threads, chunks, stats_fn, normalize_fn, dims, x, res, out, pre, k, eps, w,
            b, training, recentre, shift, mean, var, invstd, hi, scale, offset):
    """The forward: in training the statistics into ``mean``, ``var`` (float64)
    by ``stats_fn`` (again around the mean when ``shift`` was more than
    ``sqrt(recentre)`` standard deviations off), else ``mean``, ``var`` are
    the running statistics; then ``invstd``, ``hi``, ``scale``, ``offset``
    (K.prepare_affine) and ``normalize_fn`` into ``out`` (and ``pre``)."""
    C = dims[1]
    total, parts = _extent(dims, x, chunks)
    if training:
        m = dims[0] * dims[2]  # values per channel: N * L or M
        _initial_shift(x, shift)
        part = np.empty((parts, 2, C))
        launch(gomp, stats_fn, threads, dims, (x, shift, part, schedule_jit(total, chunks)))
        if K.finalize_stats(part, shift, m, recentre, mean, var):
            for c in range(C):
                shift[c] = mean[c]
            launch(gomp, stats_fn, threads, dims, (x, shift, part, schedule_jit(total, chunks)))
            K.finalize_stats(part, shift, m, np.inf, mean, var)
    K.prepare_affine(mean, var, eps, w, b, invstd, hi, scale, offset)
    launch(gomp, normalize_fn, threads, dims,
           (x, hi, scale, offset, res, out, pre, k, schedule_jit(total, chunks)))


@njit(cache=True, nogil=True)
def backward(gomp, threads, chunks, sums_fn, input_fn, dims, dy, x, a, g, g_in, dx, mean,
             invstd, w, k, count, training, grad_w, grad_b):
    """The backward: ``grad_b = sum(g)`` and ``grad_w = sum(g * (x - mean)) *
    invstd`` (``g = dy * act'(.)``, written to ``g`` by a ``sums_fn`` that
    keeps it), then, if ``input_fn`` is set, ``dx`` by ``input_fn`` (reading
    ``g_in``: ``g`` or, when ``g`` is not read, anything)."""
    C = dims[1]
    total, parts = _extent(dims, x, chunks)
    hi = np.empty(C, k.dtype)  # the mean in the compute dtype, and its rounding error
    lo = np.empty(C)
    for c in range(C):
        hi[c] = mean[c]
        lo[c] = mean[c] - np.float64(hi[c])
    part = np.empty((parts, 2, C))
    launch(gomp, sums_fn, threads, dims, (dy, x, a, hi, k, g, part, schedule_jit(total, chunks)))
    sum_g, sum_gxc, kx, c0, scale = (np.empty(C), np.empty(C), np.empty(C), np.empty(C),
                                     np.empty(C))
    K.finalize_grad(part, lo, invstd, w, count, training, sum_g, sum_gxc, kx, c0, scale)
    for c in range(C):
        grad_b[c] = sum_g[c]
        grad_w[c] = sum_gxc[c] * np.float64(invstd[c])
    if input_fn != 0:
        launch(gomp, input_fn, threads, dims,
               (dy, x, a, hi, k, g_in, kx.astype(k.dtype), c0.astype(k.dtype),
                scale.astype(k.dtype), dx, schedule_jit(total, chunks)))
