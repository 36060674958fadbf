"""Numba kernels of the fused CPU backend (compiled on first use, cached on disk).

Two memory layouts cover every dense batch-norm input:

* **planar** ``(N, C, L)``, C-contiguous (NCHW, NCL, NCDHW with ``L > 1``):
  each ``(n, c)`` pair owns a contiguous run of ``L`` values; a kernel call
  takes the runs ``start:stop`` of the ``N * C`` (``r = n * C + c``), the
  inner loop over ``L`` vectorises, and reductions write one partial sum per
  run.
* **rows** ``(M, C)``, C-contiguous (channels_last / NHWC, channels_last_3d,
  and ``(N, C)`` inputs): each row holds one value of every channel; a
  kernel call takes the rows ``start:stop``, the inner loop over the
  channels vectorises, and reductions accumulate per-channel partial sums
  into the slot they are given.

Every kernel is serial and releases the GIL (``nogil``): the caller splits
the work into ranges and runs them on its own threads (see
:mod:`batchnorm.kernels.cpu`), so there is no second OpenMP runtime in the
process spinning beside PyTorch's.

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

# Numba's @intrinsic and @overload fix the argument lists of the bfloat16 helpers.
# ruff: noqa: ARG001, ARG005

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir as llvm_ir
from numba import njit, types
from numba.extending import intrinsic, overload

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


# ---------------------------------------------------------------- bfloat16
#
# Numba has no bfloat16: a bfloat16 tensor reaches the kernels as its uint16
# bits. ``ld`` widens a stored value to the compute type (bfloat16 -> float32
# is the bits shifted into the top half of a float32), ``st`` narrows a
# computed value to an array's element type (float32 -> bfloat16 rounds to
# nearest even, as PyTorch's conversion; NaN stays a quiet NaN). Both are
# plain casts for float32/float64 arrays; in bfloat16 they are integer ops
# that vectorize.

@intrinsic
def _bits_as_f32(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llvm_ir.FloatType())
    return types.float32(types.uint32), codegen


@intrinsic
def _f32_as_bits(typingctx, value):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llvm_ir.IntType(32))
    return types.uint32(types.float32), codegen


def ld(value):
    """A stored element as the compute type (see the section comment)."""


def st(value, array):
    """``value`` as ``array``'s element type (see the section comment)."""


@overload(ld, inline="always")
def _ld(value):
    if value == types.uint16:
        return lambda value: _bits_as_f32(np.uint32(value) << np.uint32(16))
    return lambda value: value


@overload(st, inline="always")
def _st(value, array):
    if array.dtype == types.uint16:
        def to_bf16(value, array):
            v = np.float32(value)
            if v != v:
                return np.uint16(0x7FC0)
            bits = _f32_as_bits(v)
            bits += np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
            return np.uint16(bits >> np.uint32(16))
        return to_bf16
    return lambda value, array: value


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
def shifted_sums_planar(x, shift, out, start, stop):
    """``out[n, :, c] = (sum(x[n, c] - shift[c]), sum((x[n, c] - shift[c])^2))``
    in float64 for the runs ``r = n * C + c`` in ``start:stop``."""
    N, C, L = x.shape
    for r in range(start, stop):
        n = r // C
        c = r - n * C
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


@njit(**_REDUCE)
def shifted_sums_rows(x, shift, out, start, stop):
    """``out = (sum(x - shift), sum((x - shift)^2))`` per channel over the rows
    ``start:stop``; ``out`` is this range's ``(2, C)`` slot."""
    C = x.shape[1]
    # Partials and shift in arrays of this call's own (LLVM then knows they
    # alias nothing the loop reads): 10-25 % faster than accumulating in ``out``.
    s1 = np.zeros(C)
    s2 = np.zeros(C)
    k = shift.copy()
    for r in range(start, stop):
        xr = x[r]
        for c in range(C):
            d = np.float64(ld(xr[c])) - k[c]
            s1[c] += d
            s2[c] += d * d
    out[0, :] = s1
    out[1, :] = s2


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


# ---------------------------------------------------------------- specialised kernels
#
# The elementwise passes and the gradient sums are built per variant by a
# factory, with the activation code and the flags as compile-time constants
# (closure cells, which Numba's disk cache keys on): a loop that tests a
# runtime activation code around calls to exp/erf/tanh is too large for LLVM
# to unswitch, and runs 5-10x slower than the specialised loop.

_SPECIALISED: dict = {}


def specialised(kind: str, *flags):
    """The kernel ``kind`` (``"normalize"``, ``"grad_sums"``, ``"grad_input"``)
    for the layout and flags given, built on first use."""
    key = (kind, *flags)
    fn = _SPECIALISED.get(key)
    if fn is None:
        fn = _SPECIALISED[key] = _FACTORIES[kind](*flags)
    return fn


def _make_normalize(planar, code, has_res, save_pre):
    """``out = act(z)``, ``z = (x - hi) * scale + shift (+ res)``; ``pre = z`` if ``save_pre``."""
    if planar:
        @njit(**_ELEMENTWISE)
        def normalize_planar(x, hi, scale, shift, res, out, pre, k, start, stop):
            kk = _unpack(k)
            N, C, L = x.shape
            for r in range(start, stop):
                n = r // C
                c = r - n * C
                h, s, t = hi[c], scale[c], shift[c]
                xr, orow = x[n, c], out[n, c]
                rr = res[n, c] if has_res else xr
                for i in range(L):
                    z = (ld(xr[i]) - h) * s + t
                    if has_res:
                        z += ld(rr[i])
                    if save_pre:
                        pre[n, c, i] = z
                    orow[i] = st(_act(z, code, kk), orow)
        return normalize_planar

    @njit(**_ELEMENTWISE)
    def normalize_rows(x, hi, scale, shift, res, out, pre, k, start, stop):
        kk = _unpack(k)
        C = x.shape[1]
        h, s, t = hi.copy(), scale.copy(), shift.copy()  # alias nothing
        for r in range(start, stop):
            xr, orow = x[r], out[r]
            rr = res[r] if has_res else xr
            for c in range(C):
                z = (ld(xr[c]) - h[c]) * s[c] + t[c]
                if has_res:
                    z += ld(rr[c])
                if save_pre:
                    pre[r, c] = z
                orow[c] = st(_act(z, code, kk), orow)
    return normalize_rows


def _make_grad_sums(planar, code, keep_g):
    """Float64 ``(sum(g), sum(g * (x - hi)))`` with ``g = dy * act'(.)``; ``g``
    written out when ``keep_g``. Planar: one partial per run; rows: into the slot given."""
    if planar:
        @njit(**_REDUCE)
        def grad_sums_planar(dy, x, a, hi, k, g, out, start, stop):
            kk = _unpack(k)
            N, C, L = x.shape
            for r in range(start, stop):
                n = r // C
                c = r - n * C
                h = hi[c]
                dr, xr = dy[n, c], x[n, c]
                ar = a[n, c]
                gr = g[n, c] if keep_g else dr
                s1 = 0.0
                s2 = 0.0
                for i in range(L):
                    gv = _act_grad(ld(dr[i]), ld(ar[i]), code, kk)
                    if keep_g:
                        gr[i] = st(gv, gr)
                    s1 += np.float64(gv)
                    s2 += np.float64(gv) * np.float64(ld(xr[i]) - h)
                out[n, 0, c] = s1
                out[n, 1, c] = s2
        return grad_sums_planar

    @njit(**_REDUCE)
    def grad_sums_rows(dy, x, a, hi, k, g, out, start, stop):
        kk = _unpack(k)
        C = x.shape[1]
        s1 = np.zeros(C)  # this call's own arrays, as in shifted_sums_rows
        s2 = np.zeros(C)
        h = hi.copy()
        for r in range(start, stop):
            dr, xr = dy[r], x[r]
            ar = a[r]
            gr = g[r] if keep_g else dr
            for c in range(C):
                gv = _act_grad(ld(dr[c]), ld(ar[c]), code, kk)
                if keep_g:
                    gr[c] = st(gv, gr)
                s1[c] += np.float64(gv)
                s2[c] += np.float64(gv) * np.float64(ld(xr[c]) - h[c])
        out[0, :] = s1
        out[1, :] = s2
    return grad_sums_rows


def _make_grad_input(planar, code, use_g, training):
    """``dx = kx * (x - hi) + c0 + scale * g`` (training) or ``scale * g`` (eval);
    ``g`` read from ``g`` when ``use_g``, else recomputed from ``dy``."""
    if planar:
        @njit(**_ELEMENTWISE)
        def grad_input_planar(dy, x, a, hi, k, g, kx, c0, scale, dx, start, stop):
            kk = _unpack(k)
            N, C, L = x.shape
            for r in range(start, stop):
                n = r // C
                c = r - n * C
                h, s, kc, cc = hi[c], scale[c], kx[c], c0[c]
                dr, xr, dxr = dy[n, c], x[n, c], dx[n, c]
                ar = a[n, c]
                gr = g[n, c] if use_g else dr
                for i in range(L):
                    gv = ld(gr[i]) if use_g else _act_grad(ld(dr[i]), ld(ar[i]), code, kk)
                    if training:
                        dxr[i] = st(kc * (ld(xr[i]) - h) + cc + s * gv, dxr)
                    else:
                        dxr[i] = st(s * gv, dxr)
        return grad_input_planar

    @njit(**_ELEMENTWISE)
    def grad_input_rows(dy, x, a, hi, k, g, kx, c0, scale, dx, start, stop):
        kk = _unpack(k)
        C = x.shape[1]
        hi, kx, c0, scale = hi.copy(), kx.copy(), c0.copy(), scale.copy()  # alias nothing
        for r in range(start, stop):
            dr, xr, dxr = dy[r], x[r], dx[r]
            ar = a[r]
            gr = g[r] if use_g else dr
            for c in range(C):
                gv = ld(gr[c]) if use_g else _act_grad(ld(dr[c]), ld(ar[c]), code, kk)
                if training:
                    dxr[c] = st(kx[c] * (ld(xr[c]) - hi[c]) + c0[c] + scale[c] * gv, dxr)
                else:
                    dxr[c] = st(scale[c] * gv, dxr)
    return grad_input_rows


_FACTORIES = {"normalize": _make_normalize, "grad_sums": _make_grad_sums,
              "grad_input": _make_grad_input}
