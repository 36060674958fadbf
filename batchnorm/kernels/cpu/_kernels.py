"""Numba kernels of the fused CPU backend (compiled on first use, cached on disk).

Two memory layouts cover every dense batch-norm input:

* **planar** ``(N, C, L)``, C-contiguous (NCHW, NCL, NCDHW with ``L > 1``):
  each ``(n, c)`` pair owns a contiguous run of ``L`` values; a pass is cut
  into chunks of the ``N * C`` runs (``r = n * C + c``), the inner loop over
  ``L`` vectorises, and reductions write one partial sum per run.
* **rows** ``(M, C)``, C-contiguous (channels_last / NHWC, channels_last_3d,
  and ``(N, C)`` inputs): each row holds one value of every channel; a pass
  is cut into chunks of rows, the inner loop over the channels vectorises,
  and reductions write one per-channel partial sum per chunk.

Every kernel is serial and releases the GIL (``nogil``): the caller runs the
same call on its own threads, which share out the chunks (see
"scheduling" below and :mod:`batchnorm.kernels.cpu`), so there is no second
OpenMP runtime in the process spinning beside PyTorch's.

Statistics are *shifted sums* in float64: ``S1 = sum(x - K)`` and
``S2 = sum((x - K)^2)`` around ``K``, one value of the channel, so one read
of ``x`` gives ``mean = K + S1 / M`` and ``var = S2 / M - (S1 / M)^2``.
The subtraction loses about ``(S1/M)^2 / var`` times float64's precision,
nothing while ``K`` is within a few standard deviations of the mean; when
``K`` was an outlier the caller runs the sums again around the mean found
(see :func:`batchnorm.kernels.cpu.forward`). Reductions are compiled with
``reassoc`` (sums in vector lanes, the order of additions changed) and
nothing else from fast-math: NaN and Inf propagate exactly as without it.

The elementwise passes compute ``(x - hi) * scale + shift`` in the compute
dtype (float32 for float32 input), centring before scaling; ``hi`` is the
mean rounded to the compute dtype and ``shift`` carries the rounding error
``lo`` (``shift = bias - lo * scale``), as in the portable path.

Activation codes (``ACT``) select the epilogue; the branch on the code is
loop-invariant, so LLVM unswitches it out of the inner loop.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

# The 16-bit formats and the chunk scheduler live in their own files; their
# names are re-exported here, where the driver and the tests look for them.
from ._bits import BF16_BITS, HALF_BITS, f32_to_half_int, half_to_f32_int, ld, st
from ._schedule import _claim, _done, schedule, wait

__all__ = ["BF16_BITS", "HALF_BITS", "f32_to_half_int", "half_to_f32_int", "ld", "st",
           "schedule", "wait"]

ACT = {None: 0, "relu": 1, "leaky_relu": 2, "silu": 3, "gelu": 4, "sigmoid": 5, "tanh": 6}

_REDUCE = {"fastmath": {"reassoc"}, "cache": True, "nogil": True}
_ELEMENTWISE = {"cache": True, "nogil": True}

# consts[...] in the compute dtype (numba would promote float32 arithmetic
# with Python float literals to float64): 0, 1, 0.5, 1/sqrt(2), 1/sqrt(2 pi),
# negative_slope.
ZERO, ONE, HALF, RSQRT2, RSQRT2PI, SLOPE = range(6)


def constants(dtype, negative_slope):
    """The ``consts`` array the kernels take, in ``dtype``."""
    return np.array([0.0, 1.0, 0.5, 1 / math.sqrt(2), 1 / math.sqrt(2 * math.pi),
                     negative_slope], dtype=dtype)


@njit(inline="always")
def _act(z, code, kk):
    """``act(z)`` for activation ``code`` (a compile-time constant where
    inlined); ``kk`` is the tuple of :func:`constants`."""
    if code == 0:
        return z
    if code == 1:
        return kk[ZERO] if z < kk[ZERO] else z  # NaN stays NaN, as torch.relu
    if code == 2:
        return z if z > kk[ZERO] else z * kk[SLOPE]
    if code == 3:
        return z / (kk[ONE] + math.exp(-z))
    if code == 4:
        return kk[HALF] * z * (kk[ONE] + math.erf(z * kk[RSQRT2]))
    if code == 5:
        return kk[ONE] / (kk[ONE] + math.exp(-z))
    return math.tanh(z)


@njit(inline="always")
def _act_grad(dy, a, code, kk):
    """``dy * act'(z)``; ``a`` is the output (relu, leaky_relu with a positive
    slope, sigmoid, tanh) or the pre-activation ``z`` (silu, gelu, leaky_relu
    with slope <= 0), as :func:`saves_output` says."""
    if code == 0:
        return dy
    if code == 1:
        return dy if a > kk[ZERO] else kk[ZERO]
    if code == 2:
        return dy if a > kk[ZERO] else dy * kk[SLOPE]
    if code == 3:
        s = kk[ONE] / (kk[ONE] + math.exp(-a))
        return dy * s * (kk[ONE] + a * (kk[ONE] - s))
    if code == 4:
        cdf = kk[HALF] * (kk[ONE] + math.erf(a * kk[RSQRT2]))
        pdf = math.exp(-kk[HALF] * a * a) * kk[RSQRT2PI]
        return dy * (cdf + a * pdf)
    if code == 5:
        return dy * a * (kk[ONE] - a)
    return dy * (kk[ONE] - a * a)


@njit(inline="always")
def _unpack(k):
    return k[0], k[1], k[2], k[3], k[4], k[5]


def saves_output(activation, negative_slope) -> bool:
    """Whether the activation's derivative is read off the output (else the
    pre-activation is kept)."""
    return activation in (None, "relu", "sigmoid", "tanh") or (
        activation == "leaky_relu" and negative_slope > 0)


# ---------------------------------------------------------------- statistics

@njit(**_REDUCE)
def shifted_sums_planar(x, shift, out, sched):
    """``out[n, :, c] = (sum(x[n, c] - shift[c]), sum((x[n, c] - shift[c])^2))``
    in float64 for the runs ``r = n * C + c`` of the chunks taken."""
    _shifted_sums_planar(x, shift, out, sched)


@njit(inline="always")
def _shifted_sums_planar(x, shift, out, sched):
    N, C, L = x.shape
    j, start, stop = _claim(sched)
    while j >= 0:
        for n in range(start // C, (stop + C - 1) // C):
            for c in range(max(start - n * C, 0), min(stop - n * C, C)):
                k = shift[c]
                xr = x[n, c]
                s1 = 0.0
                s2 = 0.0
                for i in range(L):
                    d = np.float64(ld(xr[i])) - k
                    s1 += d
                    s2 += d * d
                out[n, 0, c] = s1
                out[n, 1, c] = s2
        _done(sched)
        j, start, stop = _claim(sched)


# Rows reductions sum a block of at most ROWS_BLOCK rows in the compute dtype
# (float32 lanes for float32 and bfloat16 input, float64 for float64), one
# row per step, and add each block into float64 partials. (Four rows per step
# ran up to 4x slower than one, from one process to the next, depending on
# where the block's sums were allocated relative to the rows: likely stores
# to the sums stalling loads whose addresses match them modulo 4 KiB, which
# four row streams meet four times as often as one.) A float32 block sum is off by at most
# ~ROWS_BLOCK * 2^-24 of its terms' magnitude; the statistics keep that small
# by shifting around a sample mean (:func:`rows_shift`) and re-centring when
# the shift is more than a standard deviation off (see
# ``batchnorm.kernels.cpu._stats``).
ROWS_BLOCK = 16


@njit(cache=True, nogil=True)
def rows_shift(x, shift):
    """``shift[c]``: the mean of up to 16 rows spread evenly over ``x``, in
    ``shift``'s dtype."""
    M, C = x.shape
    S = min(M, 16)
    acc = np.zeros(C)
    for j in range(S):
        xr = x[j * M // S]
        for c in range(C):
            acc[c] += np.float64(ld(xr[c]))
    for c in range(C):
        shift[c] = acc[c] / S


@njit(inline="always")
def _flush(a1, a2, s1, s2):
    """Add a block's sums (compute dtype) into the float64 sums; zero them."""
    for c in range(a1.size):
        s1[c] += np.float64(a1[c])
        s2[c] += np.float64(a2[c])
        a1[c] = 0
        a2[c] = 0


@njit(**_REDUCE)
def shifted_sums_rows(x, shift, out, sched):
    """``out[j] = (sum(x - shift), sum((x - shift)^2))`` per channel over the
    rows of each chunk ``j`` taken, summed in ``shift``'s dtype by blocks of
    rows (see ROWS_BLOCK); ``out`` is the float64 ``(chunks, 2, C)`` partials."""
    _shifted_sums_rows(x, shift, out, sched)


@njit(inline="always")
def _shifted_sums_rows(x, shift, out, sched):
    C = x.shape[1]
    # Sums and shift in arrays of this call's own (LLVM then knows they alias
    # nothing the loop reads).
    s1 = np.empty(C)
    s2 = np.empty(C)
    k = shift.copy()
    a1 = np.zeros_like(k)
    a2 = np.zeros_like(k)
    j, r, stop = _claim(sched)
    while j >= 0:
        s1[:] = 0.0
        s2[:] = 0.0
        while r < stop:
            r1 = min(r + ROWS_BLOCK, stop)
            while r < r1:
                xr = x[r]
                for c in range(C):
                    d = ld(xr[c]) - k[c]
                    a1[c] += d
                    a2[c] += d * d
                r += 1
            _flush(a1, a2, s1, s2)
        out[j, 0, :] = s1
        out[j, 1, :] = s2
        _done(sched)
        j, r, stop = _claim(sched)


# ---------------------------------------------------------------- per-channel steps
#
# The per-channel arithmetic between the passes, one call each instead of a
# dozen NumPy operations on (C,) arrays (whose dispatch, not arithmetic,
# dominates a small batch). ``part`` is the ``(P, 2, C)`` float64 partial
# sums of a reduction; ``w``/``b`` empty arrays stand for no weight/bias.

@njit(inline="always")
def _channel_sums(part, c):
    """Channel ``c``'s two sums over the partials, in a fixed order."""
    s1 = 0.0
    s2 = 0.0
    for p in range(part.shape[0]):
        s1 += part[p, 0, c]
        s2 += part[p, 1, c]
    return s1, s2


@njit(cache=True, nogil=True)
def finalize_stats(part, shift, m, recentre, mean, var):
    """``mean``, ``var`` (float64) from shifted partial sums over ``m`` values per
    channel; True when some shift was more than ``sqrt(recentre)`` standard
    deviations from the mean (the caller sums again around ``mean``)."""
    again = False
    for c in range(part.shape[2]):
        s1, s2 = _channel_sums(part, c)
        lo = s1 / m
        v = s2 / m - lo * lo
        if lo * lo > recentre * v:
            again = True
        mean[c] = shift[c] + lo
        var[c] = 0.0 if v < 0.0 else v  # NaN stays NaN
    return again


@njit(inline="always")
def _lerp(start, end, weight):
    """``start + weight * (end - start)``, exact at both ends (as torch.lerp)."""
    if weight < 0.5:
        return start + weight * (end - start)
    return end - (end - start) * (1.0 - weight)


@njit(cache=True, nogil=True)
def update_running(running_mean, running_var, mean, var, unbias, momentum):
    """PyTorch's running-statistics update in place, in float64, rounded once:
    ``running += momentum * (batch - running)`` (``var * unbias`` for the variance)."""
    for c in range(running_mean.size):
        running_mean[c] = _lerp(np.float64(running_mean[c]), np.float64(mean[c]), momentum)
        running_var[c] = _lerp(np.float64(running_var[c]), np.float64(var[c]) * unbias,
                               momentum)


@njit(cache=True, nogil=True)
def prepare_affine(mean, var, eps, w, b, invstd, hi, scale, shift):
    """``invstd``, and ``hi``, ``scale``, ``shift`` (compute dtype) such that
    ``w * (x - mean) * invstd + b == (x - hi) * scale + shift``, where
    ``hi`` is ``mean`` rounded and ``shift`` carries the rounding error."""
    for c in range(mean.size):
        invstd[c] = 1.0 / math.sqrt(np.float64(var[c]) + eps)
        scale[c] = invstd[c] * w[c] if w.size else invstd[c]
        hi[c] = mean[c]
        shift[c] = np.float64(mean[c]) - np.float64(hi[c])  # lo, rounded
        shift[c] = (b[c] - shift[c] * scale[c]) if b.size else -shift[c] * scale[c]


@njit(cache=True, nogil=True)
def finalize_grad(part, lo, invstd, w, count, training, sum_g, sum_gxc, kx, c0, scale):
    """``sum_g``, ``sum_gxc`` (float64, centred on the exact mean ``hi + lo``) and
    the coefficients of ``dx = kx * (x - hi) + c0 + scale * g``."""
    m = max(count, 1)
    for c in range(part.shape[2]):
        s1, s2 = _channel_sums(part, c)
        sum_g[c] = s1
        sum_gxc[c] = s2 - lo[c] * s1
        coeffs(sum_g[c], sum_gxc[c], lo[c], invstd[c], w[c] if w.size else 1.0, m, training,
               kx, c0, scale, c)


@njit(inline="always")
def coeffs(sg, sgx, lo, inv, w, m, training, kx, c0, scale, c):
    inv = np.float64(inv)
    sc = inv * np.float64(w)
    scale[c] = sc
    if training:
        k = -sc * inv * inv * sgx / m
        kx[c] = k
        c0[c] = -sc * sg / m - k * lo
    else:  # the statistics are constants: dx = scale * g
        kx[c] = 0.0
        c0[c] = 0.0


@njit(cache=True, nogil=True)
def grad_coeffs(sum_g, sum_gxc, lo, invstd, w, count, training, kx, c0, scale):
    """The coefficients of :func:`finalize_grad` from given sums (SyncBatchNorm's)."""
    m = max(count, 1)
    for c in range(lo.size):
        coeffs(sum_g[c] if training else 0.0, sum_gxc[c] if training else 0.0, lo[c],
               invstd[c], w[c] if w.size else 1.0, m, training, kx, c0, scale, c)
