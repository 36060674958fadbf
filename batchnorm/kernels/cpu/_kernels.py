"""Numba kernels of the fused CPU backend (compiled on first use, cached on disk).

Two memory layouts cover every dense batch-norm input:

* **planar** ``(N, C, L)``, C-contiguous (NCHW, NCL, NCDHW with ``L > 1``):
  each ``(n, c)`` pair owns a contiguous run of ``L`` values; the parallel
  loop runs over those ``N * C`` runs and the inner loop over ``L``
  vectorises.
* **rows** ``(M, C)``, C-contiguous (channels_last / NHWC, channels_last_3d,
  and ``(N, C)`` inputs): each row holds one value of every channel; the
  parallel loop runs over blocks of rows and the inner loop over the
  channels vectorises, accumulating per-channel partial sums per block.

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
from numba import njit, prange

ACT = {None: 0, "relu": 1, "leaky_relu": 2, "silu": 3, "gelu": 4, "sigmoid": 5, "tanh": 6}

_REDUCE = {"fastmath": {"reassoc"}, "parallel": True, "cache": True, "nogil": True}
_ELEMENTWISE = {"parallel": True, "cache": True, "nogil": True}

# consts[...] in the compute dtype (numba would promote float32 arithmetic
# with Python float literals to float64): 0, 1, 0.5, 1/sqrt(2), 1/sqrt(2 pi),
# negative_slope.
ZERO, ONE, HALF, RSQRT2, RSQRT2PI, SLOPE = range(6)


def constants(dtype, negative_slope):
    """The ``consts`` array the kernels take, in ``dtype``."""
    return np.array([0.0, 1.0, 0.5, 1 / math.sqrt(2), 1 / math.sqrt(2 * math.pi),
                     negative_slope], dtype=dtype)


@njit(inline="always")
def _act(z, code, k):
    if code == 0:
        return z
    if code == 1:
        return k[ZERO] if z < k[ZERO] else z  # NaN stays NaN, as torch.relu
    if code == 2:
        return z if z > k[ZERO] else z * k[SLOPE]
    if code == 3:
        return z / (k[ONE] + math.exp(-z))
    if code == 4:
        return k[HALF] * z * (k[ONE] + math.erf(z * k[RSQRT2]))
    if code == 5:
        return k[ONE] / (k[ONE] + math.exp(-z))
    return math.tanh(z)


@njit(inline="always")
def _act_grad(dy, a, code, k):
    """``dy * act'(z)``; ``a`` is the output (relu, leaky_relu with a positive
    slope, sigmoid, tanh) or the pre-activation ``z`` (silu, gelu, leaky_relu
    with slope <= 0), as :func:`saves_output` says."""
    if code == 0:
        return dy
    if code == 1:
        return dy if a > k[ZERO] else k[ZERO]
    if code == 2:
        return dy if a > k[ZERO] else dy * k[SLOPE]
    if code == 3:
        s = k[ONE] / (k[ONE] + math.exp(-a))
        return dy * s * (k[ONE] + a * (k[ONE] - s))
    if code == 4:
        cdf = k[HALF] * (k[ONE] + math.erf(a * k[RSQRT2]))
        pdf = math.exp(-k[HALF] * a * a) * k[RSQRT2PI]
        return dy * (cdf + a * pdf)
    if code == 5:
        return dy * a * (k[ONE] - a)
    return dy * (k[ONE] - a * a)


def saves_output(activation, negative_slope) -> bool:
    """Whether the activation's derivative is read off the output (else the
    pre-activation is kept)."""
    return activation in (None, "relu", "sigmoid", "tanh") or (
        activation == "leaky_relu" and negative_slope > 0)


# ---------------------------------------------------------------- statistics

@njit(**_REDUCE)
def shifted_sums_planar(x, shift, out):
    """``out[n, c] = (sum(x[n, c] - shift[c]), sum((x[n, c] - shift[c])^2))`` in float64."""
    N, C, L = x.shape
    for r in prange(N * C):
        n = r // C
        c = r - n * C
        k = shift[c]
        s1 = 0.0
        s2 = 0.0
        for i in range(L):
            d = np.float64(x[n, c, i]) - k
            s1 += d
            s2 += d * d
        out[n, c, 0] = s1
        out[n, c, 1] = s2


@njit(**_REDUCE)
def shifted_sums_rows(x, shift, out):
    """Per block ``b`` of rows: ``out[b, 0] = sum(x - shift)``, ``out[b, 1] = sum((x - shift)^2)``."""
    M, C = x.shape
    B = out.shape[0]
    for b in prange(B):
        s1 = out[b, 0]
        s2 = out[b, 1]
        s1[:] = 0.0
        s2[:] = 0.0
        for r in range(b * M // B, (b + 1) * M // B):
            for c in range(C):
                d = np.float64(x[r, c]) - shift[c]
                s1[c] += d
                s2[c] += d * d


# ---------------------------------------------------------------- normalize

@njit(**_ELEMENTWISE)
def normalize_planar(x, hi, scale, shift, res, has_res, out, pre, save_pre, code, k):
    """``out = act(z)``, ``z = (x - hi) * scale + shift (+ res)``; ``pre = z`` if ``save_pre``."""
    N, C, L = x.shape
    for r in prange(N * C):
        n = r // C
        c = r - n * C
        h = hi[c]
        s = scale[c]
        t = shift[c]
        for i in range(L):
            z = (x[n, c, i] - h) * s + t
            if has_res:
                z += res[n, c, i]
            if save_pre:
                pre[n, c, i] = z
            out[n, c, i] = _act(z, code, k)


@njit(**_ELEMENTWISE)
def normalize_rows(x, hi, scale, shift, res, has_res, out, pre, save_pre, code, k, blocks):
    M, C = x.shape
    for b in prange(blocks):
        for r in range(b * M // blocks, (b + 1) * M // blocks):
            for c in range(C):
                z = (x[r, c] - hi[c]) * scale[c] + shift[c]
                if has_res:
                    z += res[r, c]
                if save_pre:
                    pre[r, c] = z
                out[r, c] = _act(z, code, k)


# ---------------------------------------------------------------- backward

@njit(**_REDUCE)
def grad_sums_planar(dy, x, a, hi, code, k, g, keep_g, out):
    """``out[n, c] = (sum(g), sum(g * (x - hi)))`` in float64 with ``g = act'(.) * dy``;
    ``g`` written out when ``keep_g``."""
    N, C, L = x.shape
    for r in prange(N * C):
        n = r // C
        c = r - n * C
        h = hi[c]
        s1 = 0.0
        s2 = 0.0
        for i in range(L):
            gv = _act_grad(dy[n, c, i], a[n, c, i], code, k) if code else dy[n, c, i]
            if keep_g:
                g[n, c, i] = gv
            s1 += np.float64(gv)
            s2 += np.float64(gv) * np.float64(x[n, c, i] - h)
        out[n, c, 0] = s1
        out[n, c, 1] = s2


@njit(**_REDUCE)
def grad_sums_rows(dy, x, a, hi, code, k, g, keep_g, out):
    M, C = x.shape
    B = out.shape[0]
    for b in prange(B):
        s1 = out[b, 0]
        s2 = out[b, 1]
        s1[:] = 0.0
        s2[:] = 0.0
        for r in range(b * M // B, (b + 1) * M // B):
            for c in range(C):
                gv = _act_grad(dy[r, c], a[r, c], code, k) if code else dy[r, c]
                if keep_g:
                    g[r, c] = gv
                s1[c] += np.float64(gv)
                s2[c] += np.float64(gv) * np.float64(x[r, c] - hi[c])


@njit(**_ELEMENTWISE)
def grad_input_planar(dy, x, a, hi, code, k, g, use_g, kx, c0, scale, training, dx):
    """``dx = kx * (x - hi) + c0 + scale * g`` (training) or ``scale * g`` (eval);
    ``g`` read from ``g`` when ``use_g``, else recomputed from ``dy``."""
    N, C, L = x.shape
    for r in prange(N * C):
        n = r // C
        c = r - n * C
        h = hi[c]
        s = scale[c]
        kc = kx[c]
        cc = c0[c]
        for i in range(L):
            if use_g:
                gv = g[n, c, i]
            elif code:
                gv = _act_grad(dy[n, c, i], a[n, c, i], code, k)
            else:
                gv = dy[n, c, i]
            if training:
                dx[n, c, i] = kc * (x[n, c, i] - h) + cc + s * gv
            else:
                dx[n, c, i] = s * gv


@njit(**_ELEMENTWISE)
def grad_input_rows(dy, x, a, hi, code, k, g, use_g, kx, c0, scale, training, dx, blocks):
    M, C = x.shape
    for b in prange(blocks):
        for r in range(b * M // blocks, (b + 1) * M // blocks):
            for c in range(C):
                if use_g:
                    gv = g[r, c]
                elif code:
                    gv = _act_grad(dy[r, c], a[r, c], code, k)
                else:
                    gv = dy[r, c]
                if training:
                    dx[r, c] = kx[c] * (x[r, c] - hi[c]) + c0[c] + scale[c] * gv
                else:
                    dx[r, c] = scale[c] * gv
